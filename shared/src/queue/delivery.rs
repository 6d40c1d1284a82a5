//! A message RabbitMQ delivered to this process, as the worker sees it: the
//! job message, and the three ways to settle it. Settling consumes the
//! delivery, so a message is settled at most once; one dropped unsettled goes
//! back to its queue when its channel closes.
//!
//! Every delivery counts in [`Held`] from the moment it arrives until it is
//! settled or dropped: the worker reports those counts with its heartbeat, so
//! the reconciler can tell a message sitting in a worker's prefetch from one
//! RabbitMQ lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::{Message, QueueError};

/// Longest a settle (ack or nack) may take. Neither waits for the broker's
/// answer, so a live connection settles at once; a dead one never does.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done with: RabbitMQ forgets the message.
    Ack,
    /// Back to its queue, for this or another worker to take again.
    Requeue,
    /// To the dead-letter queue, for a human to look at.
    DeadLetter,
}

/// A delivered message, to be settled once.
pub struct Delivery {
    body: Vec<u8>,
    queue: String,
    priority: u8,
    settle: Settle,
    _held: Option<HeldOne>,
}

/// Where a settlement goes.
enum Settle {
    Amqp(lapin::Acker),
    /// A delivery made by a test: the settlement is reported on this channel.
    #[cfg(feature = "test-util")]
    Recorded(tokio::sync::oneshot::Sender<Settlement>),
}

impl Delivery {
    pub(super) fn amqp(delivery: lapin::message::Delivery, queue: &str, held: HeldOne) -> Self {
        let priority = delivery.properties.priority().unwrap_or(0);
        Self {
            body: delivery.data,
            queue: queue.to_owned(),
            priority,
            settle: Settle::Amqp(delivery.acker),
            _held: Some(held),
        }
    }

    /// A delivery of `body` from Conveyor queue `queue` that no broker sent,
    /// for tests: its settlement arrives on the receiver.
    #[cfg(feature = "test-util")]
    pub fn recorded(body: Vec<u8>, queue: &str) -> (Self, tokio::sync::oneshot::Receiver<Settlement>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self { body, queue: queue.to_owned(), priority: 0, settle: Settle::Recorded(tx), _held: None }, rx)
    }

    /// The Conveyor queue it came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Its priority, as published (the job's, 0–9).
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The message, when the body is one.
    pub fn message(&self) -> Result<Message, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    pub async fn ack(self) -> Result<(), QueueError> {
        self.settle(Settlement::Ack).await
    }

    pub async fn requeue(self) -> Result<(), QueueError> {
        self.settle(Settlement::Requeue).await
    }

    pub async fn dead_letter(self) -> Result<(), QueueError> {
        self.settle(Settlement::DeadLetter).await
    }

    async fn settle(self, how: Settlement) -> Result<(), QueueError> {
        match self.settle {
            Settle::Amqp(acker) => {
                let settle = async {
                    match how {
                        Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
                        // A nack without requeue goes to the queue's dead-letter exchange.
                        Settlement::Requeue | Settlement::DeadLetter => {
                            let requeue = how == Settlement::Requeue;
                            acker.nack(BasicNackOptions { requeue, ..BasicNackOptions::default() }).await
                        }
                    }
                };
                // Bounded: on a connection that died mid-flight, a settle can
                // wait forever, and with it whatever waits for the settle.
                let settled = tokio::time::timeout(SETTLE_TIMEOUT, settle)
                    .await
                    .map_err(|_| QueueError::Timeout("settling a delivery"))??;
                if settled { Ok(()) } else { Err(QueueError::ChannelClosed) }
            }
            #[cfg(feature = "test-util")]
            Settle::Recorded(tx) => {
                let _ = tx.send(how);
                Ok(())
            }
        }
    }
}

/// Messages this process holds unacknowledged, per Conveyor queue.
#[derive(Debug, Clone, Default)]
pub struct Held {
    counts: Arc<BTreeMap<String, Arc<AtomicI64>>>,
}

impl Held {
    pub fn new(queues: &[String]) -> Self {
        Self { counts: Arc::new(queues.iter().map(|q| (q.clone(), Arc::new(AtomicI64::new(0)))).collect()) }
    }

    /// Counts one delivery from `queue` until the returned value is dropped.
    pub(super) fn hold(&self, queue: &str) -> HeldOne {
        let count = self.counts.get(queue).cloned().unwrap_or_default();
        count.fetch_add(1, Ordering::Relaxed);
        HeldOne(count)
    }

    /// The counts now, by queue.
    pub fn snapshot(&self) -> BTreeMap<String, i64> {
        self.counts.iter().map(|(queue, count)| (queue.clone(), count.load(Ordering::Relaxed).max(0))).collect()
    }
}

/// One held delivery; dropping it stops counting it.
#[derive(Debug)]
pub(super) struct HeldOne(Arc<AtomicI64>);

impl Drop for HeldOne {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_counts_until_it_is_dropped() {
        let held = Held::new(&["a".to_owned(), "b".to_owned()]);
        let one = held.hold("a");
        let two = held.hold("a");
        assert_eq!(held.snapshot(), BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 0)]));
        drop(one);
        drop(two);
        assert_eq!(held.snapshot()["a"], 0);
    }
}
