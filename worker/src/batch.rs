//! Claims and outcomes written in batches (see [`shared::batch`]): under load
//! one statement, and one commit, serves many jobs.

use std::sync::Arc;

use shared::batch::Batcher;
use shared::db::{self, jobs};
use shared::job::{Claimed, Lease, Outcome};
use sqlx::PgPool;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::metrics::Metrics;

/// Requests per statement at most.
const BATCH: usize = 256;

/// Claims jobs for one worker.
#[derive(Clone)]
pub struct Claimer(Batcher<Uuid, Option<Claimed>, db::Error>);

impl Claimer {
    /// With `max_running` > 0, no tenant runs more than that at once (see
    /// [`jobs::claim_many_capped`]); a job that does not fit is parked.
    pub fn spawn(
        tasks: &TaskTracker,
        pool: PgPool,
        worker: Uuid,
        lease_seconds: i32,
        max_running: i32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self(Batcher::spawn(tasks, BATCH, move |ids: Vec<Uuid>| {
            let pool = pool.clone();
            metrics.claimed_together(ids.len());
            async move {
                let mut claimed = match max_running {
                    0 => jobs::claim_many(&pool, &ids, worker, lease_seconds).await?,
                    cap => jobs::claim_many_capped(&pool, &ids, worker, lease_seconds, cap).await?,
                };
                // Taken out, not copied: if two messages for one job share a
                // batch, only the first runs it; the other is a duplicate.
                Ok(ids
                    .iter()
                    .map(|id| claimed.iter().position(|job| job.id == *id).map(|i| claimed.swap_remove(i)))
                    .collect())
            }
        }))
    }

    /// Claims job `id`; `Ok(None)` when it is not queued (see [`jobs::claim`]).
    pub async fn claim(&self, id: Uuid) -> db::Result<Option<Claimed>> {
        self.0.call(id).await
    }
}

/// Records job outcomes for one worker.
#[derive(Clone)]
pub struct OutcomeWriter(Batcher<(Lease, Outcome), db::Result<bool>, db::Error>);

impl OutcomeWriter {
    pub fn spawn(tasks: &TaskTracker, pool: PgPool, metrics: Arc<Metrics>) -> Self {
        Self(Batcher::spawn(tasks, BATCH, move |outcomes: Vec<(Lease, Outcome)>| {
            let pool = pool.clone();
            metrics.wrote_outcomes_together(outcomes.len());
            async move {
                let refs: Vec<(Lease, &Outcome)> = outcomes.iter().map(|(lease, outcome)| (*lease, outcome)).collect();
                jobs::finish_each_if_refused(&pool, &refs).await
            }
        }))
    }

    /// Records `outcome` for the run holding `lease`: `Ok(false)` when the
    /// lease is no longer the job's (see [`jobs::finish`]).
    pub async fn write(&self, lease: Lease, outcome: Outcome) -> db::Result<bool> {
        self.0.call((lease, outcome)).await?
    }
}
