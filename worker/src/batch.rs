//! Claims and outcomes written in batches (see [`shared::batch`]): under load
//! one statement, and one commit, serves many jobs.

use shared::batch::Batcher;
use shared::db::jobs::{self, Claimed, Lease, Outcome};
use sqlx::PgPool;
use uuid::Uuid;

/// Requests per statement at most.
const BATCH: usize = 256;

/// Claims jobs for one worker.
#[derive(Clone)]
pub struct Claimer(Batcher<Uuid, Option<Claimed>>);

impl Claimer {
    pub fn spawn(pool: PgPool, worker: Uuid, lease_seconds: i32) -> Self {
        Self(Batcher::spawn(BATCH, move |ids: Vec<Uuid>| {
            let pool = pool.clone();
            async move {
                let mut claimed =
                    jobs::claim_many(&pool, &ids, worker, lease_seconds).await.map_err(|e| e.to_string())?;
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
    pub async fn claim(&self, id: Uuid) -> Result<Option<Claimed>, String> {
        self.0.call(id).await
    }
}

/// Records job outcomes for one worker.
#[derive(Clone)]
pub struct OutcomeWriter(Batcher<(Lease, Outcome), Result<bool, String>>);

impl OutcomeWriter {
    pub fn spawn(pool: PgPool) -> Self {
        Self(Batcher::spawn(BATCH, move |outcomes: Vec<(Lease, Outcome)>| {
            let pool = pool.clone();
            async move {
                let refs: Vec<(Lease, &Outcome)> = outcomes.iter().map(|(lease, outcome)| (*lease, outcome)).collect();
                let each = jobs::finish_each_if_refused(&pool, &refs).await.map_err(|e| e.to_string())?;
                Ok(each.into_iter().map(|written| written.map_err(|e| e.to_string())).collect())
            }
        }))
    }

    /// Records `outcome` for the run holding `lease`: `Ok(false)` when the
    /// lease is no longer the job's (see [`jobs::finish`]).
    pub async fn write(&self, lease: Lease, outcome: Outcome) -> Result<bool, String> {
        self.0.call((lease, outcome)).await?
    }
}
