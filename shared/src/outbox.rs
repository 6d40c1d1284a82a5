//! Publishing jobs that are already committed: publish each with a confirm,
//! then record the confirms. A job whose publish fails stays `queued` with no
//! `published_at`, where the reconciler's outbox sweep finds it.

use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::db::jobs::{self, Enqueued};
use crate::queue::{PublishError, Publisher};

/// What became of a batch of publishes.
#[derive(Debug, Default)]
pub struct Report {
    pub published: Vec<Uuid>,
    pub failed: Vec<(Uuid, PublishError)>,
}

/// Publishes `jobs` concurrently (their confirms pipelined on one channel)
/// and marks the confirmed ones published in one statement.
pub async fn publish(publisher: &Publisher, pool: &PgPool, jobs: Vec<Enqueued>) -> sqlx::Result<Report> {
    let mut report = Report::default();
    let mut publishes = JoinSet::new();
    for job in jobs {
        let publisher = publisher.clone();
        publishes.spawn(async move {
            let result = publisher
                .publish_job(&job.queue, job.id, job.priority, job.request_id.as_deref())
                .await;
            (job.id, result)
        });
    }
    while let Some(done) = publishes.join_next().await {
        match done {
            Ok((id, Ok(()))) => report.published.push(id),
            Ok((id, Err(e))) => report.failed.push((id, e)),
            // A publish task cannot panic short of a bug in lapin; the job stays in the outbox.
            Err(e) => tracing::error!(error = %e, "publish task failed"),
        }
    }
    if !report.published.is_empty() {
        jobs::mark_published(pool, &report.published).await?;
    }
    for (id, e) in &report.failed {
        tracing::warn!(job.id = %id, error = %e, "publish failed; the job stays in the outbox");
    }
    Ok(report)
}
