//! Records job outcomes in batches: while one statement runs, the outcomes
//! finished meanwhile queue up and go together in the next, so under load one
//! commit records many jobs, and when idle each is recorded at once. Each
//! caller still learns whether its own outcome was recorded (the fence held).

use shared::db::jobs::{self, Lease, Outcome};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

/// Outcomes per statement at most.
const BATCH: usize = 256;

type Reply = oneshot::Sender<Result<bool, String>>;

#[derive(Clone)]
pub struct OutcomeWriter {
    queue: mpsc::Sender<(Lease, Outcome, Reply)>,
}

impl OutcomeWriter {
    /// Starts the writing task on the current runtime; it ends when every
    /// clone of the writer is dropped, after writing what it was given.
    pub fn spawn(pool: PgPool) -> Self {
        let (queue, mut pending) = mpsc::channel::<(Lease, Outcome, Reply)>(BATCH * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while pending.recv_many(&mut batch, BATCH).await > 0 {
                let outcomes: Vec<(Lease, &Outcome)> =
                    batch.iter().map(|(lease, outcome, _)| (*lease, outcome)).collect();
                let written = jobs::finish_many(&pool, &outcomes).await.map_err(|e| e.to_string());
                for (lease, _, reply) in batch.drain(..) {
                    let answer = written
                        .as_ref()
                        .map(|ids| ids.contains(&lease.id))
                        .map_err(Clone::clone);
                    let _ = reply.send(answer);
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
            .map_err(|_| "outcome writer stopped".to_owned())?;
        answer.await.map_err(|_| "outcome writer stopped".to_owned())?
    }
}
