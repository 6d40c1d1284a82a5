//! A delivered message and the jobs it names, handed out one at a time, and
//! the order in which a worker starts the jobs of the messages it holds.
//!
//! A message names one job, or several of one batch (`amqp.jobs_per_message`).
//! Its jobs are claimed as slots free up, and the message is settled once,
//! when the last of them has been claimed or found not queued: until then
//! RabbitMQ keeps it, so if this worker dies the jobs it had not claimed are
//! delivered to another (the ones it had are rescued with their leases, and
//! their ids in the redelivered message are dropped as not queued).
//!
//! [`Turns`] decides which held message's job starts next: the lanes (one
//! consumer each) take turns, as RabbitMQ's own dispatch does, so a tenant
//! whose messages fill a worker's prefetch does not hold up another tenant's
//! job that arrives after them; within a lane, higher priority first, then
//! the oldest message, finished before the next is started so that its
//! acknowledgement (and with it room for the next message) comes soon.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use shared::queue::{Delivery, QueueError};
use uuid::Uuid;

/// A held message and its jobs.
pub struct Envelope {
    /// `None` once settled.
    delivery: Mutex<Option<Delivery>>,
    job_ids: Vec<Uuid>,
    priority: u8,
    /// Job ids handed out so far.
    handed: AtomicUsize,
    /// Job ids whose claim has not been resolved yet.
    unresolved: AtomicUsize,
    /// Whether any of its jobs exists: a message naming none is dead-lettered.
    any_found: AtomicBool,
}

/// How the claim of one of an envelope's jobs ended.
pub enum Claim {
    /// Claimed, or not queued (a duplicate, or ended meanwhile): done with.
    Done,
    /// No such job.
    Missing,
}

impl Envelope {
    /// The jobs `delivery`'s message names; `None` when it is not a message
    /// or names no job, having dead-lettered it for a human to look at.
    pub async fn open(delivery: Delivery) -> Option<Self> {
        let job_ids = match delivery.message() {
            Ok(message) if !message.job_ids().is_empty() => message.job_ids().to_vec(),
            unusable => {
                let why = unusable.map_or_else(|e| e.to_string(), |_| "it names no job".to_owned());
                tracing::warn!(error = %why, queue = %delivery.queue(), "unparseable message; dead-lettering it");
                settle(delivery.dead_letter(), "dead-letter").await;
                return None;
            }
        };
        Some(Self {
            priority: delivery.priority(),
            unresolved: AtomicUsize::new(job_ids.len()),
            job_ids,
            handed: AtomicUsize::new(0),
            any_found: AtomicBool::new(false),
            delivery: Mutex::new(Some(delivery)),
        })
    }

    /// The next job to start, if any is left and the message was not given back.
    pub fn next_job(&self) -> Option<Uuid> {
        if self.is_settled() {
            return None;
        }
        let i = self.handed.fetch_add(1, Ordering::Relaxed);
        self.job_ids.get(i).copied()
    }

    fn is_settled(&self) -> bool {
        self.delivery.lock().map_or(true, |delivery| delivery.is_none())
    }

    /// Whether every job has been handed out (or none will be).
    fn is_spent(&self) -> bool {
        self.handed.load(Ordering::Relaxed) >= self.job_ids.len() || self.is_settled()
    }

    fn take(&self) -> Option<Delivery> {
        self.delivery.lock().ok().and_then(|mut delivery| delivery.take())
    }

    /// Records how one job's claim ended; the last one settles the message:
    /// acknowledged, or dead-lettered when none of its jobs exists.
    pub async fn resolved(&self, claim: Claim) {
        if matches!(claim, Claim::Done) {
            self.any_found.store(true, Ordering::Relaxed);
        }
        if self.unresolved.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(delivery) = self.take() else { return };
        if self.any_found.load(Ordering::Relaxed) {
            settle(delivery.ack(), "acknowledge").await;
        } else {
            tracing::warn!(job.ids = ?self.job_ids, "message for jobs that do not exist; dead-lettering it");
            settle(delivery.dead_letter(), "dead-letter").await;
        }
    }

    /// Hands the message back to its queue (Postgres could not be asked about
    /// a job): its jobs not started here are not started, and are delivered
    /// again; those claimed meanwhile are dropped then as not queued.
    pub async fn give_back(&self) {
        if let Some(delivery) = self.take() {
            settle(delivery.requeue(), "requeue").await;
        }
    }
}

/// Settles a message, logging a failure (the message then comes back, and a
/// job already claimed is dropped as not queued).
async fn settle(settled: impl Future<Output = Result<(), QueueError>>, what: &str) {
    if let Err(e) = settled.await {
        tracing::warn!(error = %e, "could not {what} a message");
    }
}

/// The envelopes a worker holds, by lane, and whose turn is next.
pub struct Turns {
    lanes: Vec<VecDeque<Arc<Envelope>>>,
    next: usize,
}

impl Turns {
    pub fn new(lanes: usize) -> Self {
        Self { lanes: (0..lanes.max(1)).map(|_| VecDeque::new()).collect(), next: 0 }
    }

    /// Adds an envelope that arrived on lane `lane`: after those of its lane
    /// with the same priority or higher.
    pub fn push(&mut self, lane: usize, envelope: Arc<Envelope>) {
        let count = self.lanes.len();
        let queue = &mut self.lanes[lane % count];
        let at = queue.iter().position(|held| held.priority < envelope.priority).unwrap_or(queue.len());
        queue.insert(at, envelope);
    }

    /// The job to start next: from the lane after the last one served that
    /// has one.
    pub fn take(&mut self) -> Option<(Arc<Envelope>, Uuid)> {
        let count = self.lanes.len();
        for step in 0..count {
            let lane = (self.next + step) % count;
            let queue = &mut self.lanes[lane];
            while let Some(front) = queue.front() {
                let job = front.next_job();
                let envelope = if front.is_spent() { queue.pop_front() } else { Some(front.clone()) };
                if let (Some(job), Some(envelope)) = (job, envelope) {
                    self.next = (lane + 1) % count;
                    return Some((envelope, job));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use shared::queue::Message;

    use super::*;

    async fn envelope(ids: &[Uuid]) -> Arc<Envelope> {
        let body = serde_json::to_vec(&Message::RunJobs { job_ids: ids.to_vec() }).unwrap_or_default();
        let (delivery, _settled) = Delivery::recorded(body, "default");
        Arc::new(Envelope::open(delivery).await.expect("a message"))
    }

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::now_v7()).collect()
    }

    #[tokio::test]
    async fn lanes_take_turns_and_a_lanes_oldest_message_is_finished_first() {
        let (a1, a2, b) = (ids(3), ids(2), ids(1));
        let mut turns = Turns::new(2);
        turns.push(0, envelope(&a1).await);
        turns.push(0, envelope(&a2).await);
        // Tenant B's job arrives after A filled lane 0: it is started second, not sixth.
        turns.push(1, envelope(&b).await);
        let order: Vec<Uuid> = std::iter::from_fn(|| turns.take().map(|(_, id)| id)).collect();
        assert_eq!(order, [a1[0], b[0], a1[1], a1[2], a2[0], a2[1]]);
        assert!(turns.take().is_none());
    }

    #[tokio::test]
    async fn a_message_given_back_starts_nothing_more() {
        let jobs = ids(3);
        let mut turns = Turns::new(1);
        let held = envelope(&jobs).await;
        turns.push(0, held.clone());
        assert_eq!(turns.take().map(|(_, id)| id), Some(jobs[0]));
        held.give_back().await;
        assert!(turns.take().is_none(), "its other jobs are delivered again, to anyone");
    }
}
