//! Publishing jobs that are already committed: publish each with a confirm,
//! then record the confirms. Every statement that makes a job queued also puts
//! it in the `outbox` table; a recorded confirm takes it out. A job whose
//! publish fails stays there, where the reconciler's sweep finds it.
//!
//! Recording a confirm is bookkeeping, not durability (the job is durable once
//! its row is committed and its message confirmed), so confirms are recorded
//! in batches, many per statement, without anyone waiting for them. If a
//! recording is lost (a crash between confirm and flush), the sweep publishes
//! the job again and the duplicate message is dropped by the worker that finds
//! the job claimed. Closing the [`Outbox`] (dropping every clone, then waiting
//! for its task tracker) records what is pending.

use sqlx::PgPool;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::batch::Batcher;
use crate::db;
use crate::job::{Enqueued, OutboxRow};
use crate::queue::{PublishError, Publisher};

/// What became of a batch of publishes.
#[derive(Debug, Default)]
pub struct Report {
    pub published: Vec<OutboxRow>,
    pub failed: Vec<(Uuid, PublishError)>,
}

/// Confirms recorded per statement at most.
const RECORD_BATCH: usize = 1024;

/// Publishes committed jobs and records their confirms.
#[derive(Clone)]
pub struct Outbox {
    publisher: Publisher,
    recorder: Batcher<OutboxRow, (), db::Error>,
}

impl Outbox {
    /// An outbox publishing with `publisher`, whose recording task runs on
    /// `tasks` (it ends, having recorded everything, once every clone is dropped).
    pub fn new(publisher: Publisher, pool: PgPool, tasks: &TaskTracker) -> Self {
        let recorder = Batcher::spawn(tasks, RECORD_BATCH, move |confirms: Vec<OutboxRow>| {
            let pool = pool.clone();
            async move {
                match db::outbox::confirmed(&pool, &confirms).await {
                    Ok(()) => Ok(vec![(); confirms.len()]),
                    Err(e) => {
                        // Not lost: unrecorded jobs are republished by the outbox sweep.
                        tracing::warn!(error = %e, count = confirms.len(), "could not record publishes");
                        Err(e)
                    }
                }
            }
        });
        Self { publisher, recorder }
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Publishes `jobs` (their confirms pipelined on one channel) and hands the
    /// confirmed ones to the recorder. Failures are logged and reported; the
    /// jobs stay in the outbox for the sweep.
    pub async fn publish(&self, jobs: Vec<Enqueued>) -> Report {
        let report = publish_all(&self.publisher, jobs).await;
        for row in &report.published {
            if self.recorder.send(*row).await.is_err() {
                tracing::warn!(job.id = %row.job_id, "publish recorder stopped; the outbox sweep will republish the job");
            }
        }
        report
    }
}

/// Publishes `jobs` and records nothing: for jobs that are not in the outbox
/// (their message was confirmed once, and lost since).
pub async fn publish_all(publisher: &Publisher, jobs: Vec<Enqueued>) -> Report {
    let mut report = Report::default();
    let results = publisher.publish_jobs(&jobs).await;
    for (job, result) in jobs.iter().zip(results) {
        match result {
            Ok(()) => report.published.push(job.outbox_row()),
            Err(e) => report.failed.push((job.id, e)),
        }
    }
    for (id, e) in &report.failed {
        tracing::warn!(job.id = %id, error = %e, "publish failed; the job stays in the outbox");
    }
    report
}
