//! Admission control: a queue holding `queues.<name>.max_depth` messages or
//! more refuses new submissions (503, `Retry-After`) until its workers bring
//! it back under; other queues are unaffected.
//!
//! Depths are RabbitMQ's count of ready messages, read once a second per
//! queue by one background task per API process (a passive declare), so a
//! submission only reads an atomic. A depth RabbitMQ could not give (it is
//! down, or not read yet) admits: the job is committed and the outbox
//! publishes it later, as for any publish that fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shared::config::Settings;
use shared::queue::Publisher;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ApiError;
use crate::metrics::Rejection;

/// How often depths are read: how stale a refusal (or an admission) may be.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Depth not known: admit.
const UNKNOWN: u64 = 0;

struct Queue {
    max_depth: u64,
    depth: AtomicU64,
}

/// The configured queues' last known depths.
pub struct Admission {
    queues: HashMap<String, Queue>,
}

impl Admission {
    pub fn new(settings: &Settings) -> Self {
        let queues = settings
            .queues
            .iter()
            .map(|(name, queue)| (name.clone(), Queue { max_depth: queue.max_depth, depth: AtomicU64::new(UNKNOWN) }))
            .collect();
        Self { queues }
    }

    /// Refuses a submission to any of `queues` that is full.
    pub fn admit<'a>(&self, queues: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
        for name in queues {
            let Some(queue) = self.queues.get(name) else { continue };
            let depth = queue.depth.load(Ordering::Relaxed);
            if depth >= queue.max_depth {
                return Err(ApiError::Saturated(
                    Rejection::Admission,
                    format!(
                        "queue {name:?} is full ({depth} jobs waiting, max_depth {}); retry once its workers catch up",
                        queue.max_depth
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads every queue's depth from RabbitMQ each [`REFRESH`], until `stop`.
    pub fn spawn_refresher(self: &Arc<Self>, tasks: &TaskTracker, publisher: Publisher, stop: CancellationToken) {
        let admission = self.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => admission.refresh(&publisher).await,
                }
            }
        });
    }

    async fn refresh(&self, publisher: &Publisher) {
        for (name, queue) in &self.queues {
            let depth = match publisher.queue_stats(name).await {
                Ok((ready, _)) => u64::from(ready),
                Err(e) => {
                    tracing::debug!(queue = %name, error = %e, "could not read the queue's depth; admitting");
                    UNKNOWN
                }
            };
            let was = queue.depth.swap(depth, Ordering::Relaxed);
            let full = |depth: u64| depth >= queue.max_depth;
            if full(depth) && !full(was) {
                tracing::warn!(queue = %name, depth, max_depth = queue.max_depth, "queue full: refusing submissions to it");
            } else if full(was) && !full(depth) {
                tracing::info!(queue = %name, depth, "queue below max_depth again: admitting submissions");
            }
        }
    }
}
