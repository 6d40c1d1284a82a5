//! Publishing jobs that are already committed: publish each with a confirm,
//! then record the confirms. Every statement that makes a job queued also puts
//! it in the `outbox` table; a confirm takes it out. A job whose publish fails
//! stays there, where the reconciler's outbox sweep finds it.
//!
//! Recording a confirm is bookkeeping, not durability (the job is durable once
//! its row is committed and its message confirmed), so the API records them
//! through a [`Recorder`], many per statement. If a recording is lost (a
//! crash between confirm and flush), the sweep publishes the job again and the
//! duplicate message is dropped by the worker that finds the job claimed.

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::db::jobs::{self, Enqueued, OutboxRow};
use crate::queue::{PublishError, Publisher};

/// What became of a batch of publishes.
#[derive(Debug, Default)]
pub struct Report {
    pub published: Vec<OutboxRow>,
    pub failed: Vec<(Uuid, PublishError)>,
}

/// Publishes `jobs` concurrently (their confirms pipelined on one channel)
/// and marks the confirmed ones published in one statement.
pub async fn publish(publisher: &Publisher, pool: &PgPool, jobs: Vec<Enqueued>) -> sqlx::Result<Report> {
    let report = publish_all(publisher, jobs).await;
    if !report.published.is_empty() {
        jobs::mark_published(pool, &report.published).await?;
    }
    Ok(report)
}

/// Publishes `jobs` and hands the confirmed ones to `recorder`.
pub async fn publish_recorded(publisher: &Publisher, recorder: &Recorder, jobs: Vec<Enqueued>) -> Report {
    let report = publish_all(publisher, jobs).await;
    for row in &report.published {
        recorder.record(*row).await;
    }
    report
}

/// Publishes `jobs` and records nothing: for jobs that are not in the outbox
/// (their message was confirmed once, and lost since).
pub async fn publish_all(publisher: &Publisher, jobs: Vec<Enqueued>) -> Report {
    let mut report = Report::default();
    if let [job] = jobs.as_slice() {
        // The common case (one submission): no task to spawn.
        match publisher.publish_job(&job.queue, job.id, job.priority).await {
            Ok(()) => report.published.push(job.outbox_row()),
            Err(e) => report.failed.push((job.id, e)),
        }
    } else {
        let mut publishes = JoinSet::new();
        for job in jobs {
            let publisher = publisher.clone();
            publishes.spawn(async move {
                let result = publisher.publish_job(&job.queue, job.id, job.priority).await;
                (job.outbox_row(), result)
            });
        }
        while let Some(done) = publishes.join_next().await {
            match done {
                Ok((row, Ok(()))) => report.published.push(row),
                Ok((row, Err(e))) => report.failed.push((row.job_id, e)),
                // A publish task cannot panic short of a bug in lapin; the job stays in the outbox.
                Err(e) => tracing::error!(error = %e, "publish task failed"),
            }
        }
    }
    for (id, e) in &report.failed {
        tracing::warn!(job.id = %id, error = %e, "publish failed; the job stays in the outbox");
    }
    report
}

/// Confirms waiting to be recorded at most; past it, recording waits (backpressure).
const RECORDER_CAPACITY: usize = 16_384;

/// Confirms recorded per statement at most.
const RECORDER_BATCH: usize = 1024;

/// Records confirmed publishes in batches: while one statement runs, the next
/// confirms queue up, so under load each statement records many jobs and when
/// idle each records one at once. No timer, no added latency.
#[derive(Clone)]
pub struct Recorder {
    confirms: mpsc::Sender<OutboxRow>,
}

impl Recorder {
    /// Starts the recording task on the current runtime. It ends, after
    /// recording what it was given, when every `Recorder` clone is dropped.
    pub fn spawn(pool: PgPool) -> Self {
        let (confirms, mut queue) = mpsc::channel(RECORDER_CAPACITY);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(RECORDER_BATCH);
            while queue.recv_many(&mut batch, RECORDER_BATCH).await > 0 {
                if let Err(e) = jobs::mark_published(&pool, &batch).await {
                    // Not lost: unrecorded jobs are republished by the outbox sweep.
                    tracing::warn!(error = %e, count = batch.len(), "could not record publishes");
                }
                batch.clear();
            }
        });
        Self { confirms }
    }

    pub async fn record(&self, published: OutboxRow) {
        if self.confirms.send(published).await.is_err() {
            tracing::warn!(job.id = %published.job_id, "publish recorder stopped; the outbox sweep will republish the job");
        }
    }
}
