//! Batching without a timer: requests made while one batch is being written
//! queue up and go together in the next. Under load one statement (and one
//! commit) serves many requests; when idle, each request goes at once, so
//! batching adds no latency. Every caller still gets its own answer.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

/// Where an item's answer goes; `None` for items sent without waiting.
type Reply<R, E> = Option<oneshot::Sender<Result<R, E>>>;

/// Why a batcher could not answer, besides the batch function's own errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchFailure {
    /// The batching task is gone (its runtime is shutting down).
    #[error("the batching task has stopped")]
    Stopped,
    /// The batch function answered a different number of items than it was given.
    #[error("the batch answered a different number of items than it was given")]
    Mismatch,
}

/// Hands items of type `T` to a batch function and each caller its `R` (or the batch's error `E`).
pub struct Batcher<T, R, E> {
    queue: mpsc::Sender<(T, Reply<R, E>)>,
}

impl<T, R, E> Clone for Batcher<T, R, E> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone() }
    }
}

impl<T, R, E> Batcher<T, R, E>
where
    T: Send + 'static,
    R: Send + 'static,
    E: Clone + Send + From<BatchFailure> + 'static,
{
    /// Starts the batching task on `tasks`. `run` gets up to `max` items and
    /// returns one answer per item, in the same order (or one error for all).
    /// The task ends, after answering what it was given, when every clone of
    /// the batcher is dropped: waiting for `tasks` then flushes it.
    pub fn spawn<F, Fut>(tasks: &TaskTracker, max: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<R>, E>> + Send,
    {
        let (queue, mut pending) = mpsc::channel::<(T, Reply<R, E>)>(max * 4);
        tasks.spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while pending.recv_many(&mut batch, max).await > 0 {
                let (items, replies): (Vec<T>, Vec<Reply<R, E>>) = batch.drain(..).unzip();
                match run(items).await {
                    Ok(answers) if answers.len() == replies.len() => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            if let Some(reply) = reply {
                                let _ = reply.send(Ok(answer));
                            }
                        }
                    }
                    Ok(_) => {
                        for reply in replies.into_iter().flatten() {
                            let _ = reply.send(Err(E::from(BatchFailure::Mismatch)));
                        }
                    }
                    Err(e) => {
                        for reply in replies.into_iter().flatten() {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// Submits one item and waits for its answer.
    pub async fn call(&self, item: T) -> Result<R, E> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((item, Some(reply))).await.map_err(|_| E::from(BatchFailure::Stopped))?;
        answer.await.map_err(|_| E::from(BatchFailure::Stopped))?
    }

    /// Submits one item without waiting for its answer: for work whose outcome
    /// the caller does not need (the batch function logs its own failures).
    /// Waits only while the queue is full.
    pub async fn send(&self, item: T) -> Result<(), BatchFailure> {
        self.queue.send((item, None)).await.map_err(|_| BatchFailure::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_caller_gets_its_own_answer_and_busy_periods_batch() {
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let tasks = TaskTracker::new();
        let doubler: Batcher<u32, u32, BatchFailure> = Batcher::spawn(&tasks, 64, move |items: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.lock().map(|mut s| s.push(items.len())).ok();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(items.into_iter().map(|i| i * 2).collect())
            }
        });
        let calls: Vec<_> = (0..100)
            .map(|i| {
                let doubler = doubler.clone();
                tokio::spawn(async move { (i, doubler.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.expect("joined");
            assert_eq!(answer, Ok(i * 2));
        }
        let sizes = sizes.lock().map(|s| s.clone()).unwrap_or_default();
        assert!(sizes.len() < 100, "calls made together were batched: {sizes:?}");
        assert!(sizes.iter().all(|n| *n <= 64), "never more than max: {sizes:?}");
    }

    #[tokio::test]
    async fn items_sent_without_waiting_are_all_handled_before_the_task_ends() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = TaskTracker::new();
        let record = seen.clone();
        let recorder: Batcher<u32, (), BatchFailure> = Batcher::spawn(&tasks, 8, move |items: Vec<u32>| {
            let record = record.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let n = items.len();
                record.lock().map(|mut s| s.extend(items)).ok();
                Ok(vec![(); n])
            }
        });
        for i in 0..100 {
            recorder.send(i).await.expect("running");
        }
        // Closing: the last sender goes, the task drains what it was given, then ends.
        drop(recorder);
        tasks.close();
        tasks.wait().await;
        let mut seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }
}
