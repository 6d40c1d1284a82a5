//! Batching without a timer: requests made while one batch is being written
//! queue up and go together in the next. Under load one statement (and one
//! commit) serves many requests; when idle, each request goes at once, so
//! batching adds no latency. Every caller still gets its own answer.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

type Reply<R, E> = oneshot::Sender<Result<R, E>>;

/// Why a batcher could not answer, besides the batch function's own errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFailure {
    /// The batching task is gone (its runtime is shutting down).
    Stopped,
    /// The batch function answered a different number of items than it was given.
    Mismatch,
}

impl From<BatchFailure> for String {
    fn from(failure: BatchFailure) -> Self {
        match failure {
            BatchFailure::Stopped => "batcher stopped".to_owned(),
            BatchFailure::Mismatch => "batch answered the wrong number of items".to_owned(),
        }
    }
}

/// Hands items of type `T` to a batch function and each caller its `R` (or the batch's error `E`).
pub struct Batcher<T, R, E = String> {
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
    /// Starts the batching task on the current runtime. `run` gets up to `max`
    /// items and returns one answer per item, in the same order (or one error
    /// for all). The task ends, after answering what it was given, when every
    /// clone of the batcher is dropped.
    pub fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<R>, E>> + Send,
    {
        let (queue, mut pending) = mpsc::channel::<(T, Reply<R, E>)>(max * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while pending.recv_many(&mut batch, max).await > 0 {
                let (items, replies): (Vec<T>, Vec<Reply<R, E>>) = batch.drain(..).unzip();
                match run(items).await {
                    Ok(answers) if answers.len() == replies.len() => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Ok(_) => {
                        for reply in replies {
                            let _ = reply.send(Err(E::from(BatchFailure::Mismatch)));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
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
        self.queue.send((item, reply)).await.map_err(|_| E::from(BatchFailure::Stopped))?;
        answer.await.map_err(|_| E::from(BatchFailure::Stopped))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_caller_gets_its_own_answer_and_busy_periods_batch() {
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let doubler: Batcher<u32, u32> = Batcher::spawn(64, move |items: Vec<u32>| {
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
}
