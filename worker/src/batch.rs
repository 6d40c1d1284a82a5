//! Claims and outcomes written in batches. While one statement runs, the
//! requests made meanwhile queue up and go together in the next, so under
//! load one commit serves many jobs, and when idle each request is written at
//! once (no timer, no added latency). Each caller still gets its own answer.

use shared::db::jobs::{self, Claimed, Lease, Outcome};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Requests per statement at most.
const BATCH: usize = 256;

type Reply<T> = oneshot::Sender<Result<T, String>>;

const STOPPED: &str = "batch writer stopped";

/// Claims jobs for one worker.
#[derive(Clone)]
pub struct Claimer {
    queue: mpsc::Sender<(Uuid, Reply<Option<Claimed>>)>,
}

impl Claimer {
    /// Starts the claiming task on the current runtime; it ends when every
    /// clone is dropped, after serving what it was given.
    pub fn spawn(pool: PgPool, worker: Uuid, lease_seconds: i32) -> Self {
        let (queue, mut pending) = mpsc::channel::<(Uuid, Reply<Option<Claimed>>)>(BATCH * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while pending.recv_many(&mut batch, BATCH).await > 0 {
                let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
                let mut claimed = jobs::claim_many(&pool, &ids, worker, lease_seconds)
                    .await
                    .map_err(|e| e.to_string());
                for (id, reply) in batch.drain(..) {
                    let answer = match &mut claimed {
                        // Taken out, not copied: if two messages for one job share a
                        // batch, only the first runs it; the other is a duplicate.
                        Ok(claimed) => Ok(claimed
                            .iter()
                            .position(|job| job.id == id)
                            .map(|i| claimed.swap_remove(i))),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = reply.send(answer);
                }
            }
        });
        Self { queue }
    }

    /// Claims job `id`; `Ok(None)` when it is not queued (see [`jobs::claim`]).
    pub async fn claim(&self, id: Uuid) -> Result<Option<Claimed>, String> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((id, reply)).await.map_err(|_| STOPPED.to_owned())?;
        answer.await.map_err(|_| STOPPED.to_owned())?
    }
}

/// Records job outcomes for one worker.
#[derive(Clone)]
pub struct OutcomeWriter {
    queue: mpsc::Sender<(Lease, Outcome, Reply<bool>)>,
}

impl OutcomeWriter {
    /// Starts the writing task on the current runtime; it ends when every
    /// clone is dropped, after writing what it was given.
    pub fn spawn(pool: PgPool) -> Self {
        let (queue, mut pending) = mpsc::channel::<(Lease, Outcome, Reply<bool>)>(BATCH * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while pending.recv_many(&mut batch, BATCH).await > 0 {
                let outcomes: Vec<(Lease, &Outcome)> =
                    batch.iter().map(|(lease, outcome, _)| (*lease, outcome)).collect();
                let written = jobs::finish_many(&pool, &outcomes).await.map_err(|e| e.to_string());
                for (lease, _, reply) in batch.drain(..) {
                    let _ = reply.send(
                        written
                            .as_ref()
                            .map(|ids| ids.contains(&lease.id))
                            .map_err(Clone::clone),
                    );
                }
            }
        });
        Self { queue }
    }

    /// Records `outcome` for the run holding `lease`: `Ok(false)` when the
    /// lease is no longer the job's (see [`jobs::finish`]).
    pub async fn write(&self, lease: Lease, outcome: Outcome) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((lease, outcome, reply))
            .await
            .map_err(|_| STOPPED.to_owned())?;
        answer.await.map_err(|_| STOPPED.to_owned())?
    }
}
