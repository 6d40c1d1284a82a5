//! The `outbox` table: one row per queued job whose message RabbitMQ has not
//! confirmed yet. The statements that make a job queued insert its row (in
//! [`super::jobs`]); a confirm deletes it; the reconciler sweeps the rows
//! that stay, and publishes their jobs again.

use sqlx::PgExecutor;

use super::Result;
use super::leadership::Term;
use crate::job::{Enqueued, OutboxRow};

/// Records that RabbitMQ confirmed these jobs' messages, taking them out of
/// the outbox. A confirm removes only the row of the queued stint it was
/// published for: a late confirm must not take out a job queued again since
/// (requeued, handed back), whose new message may yet fail.
pub async fn confirmed(db: impl PgExecutor<'_>, published: &[OutboxRow]) -> Result<()> {
    sqlx::query!(
        r#"
        DELETE FROM outbox o USING UNNEST($1::uuid[], $2::timestamptz[]) AS c(job_id, queued_at)
        WHERE o.job_id = c.job_id AND o.created_at = c.queued_at
        "#,
        &published.iter().map(|row| row.job_id).collect::<Vec<_>>(),
        &published.iter().map(|row| row.queued_at).collect::<Vec<_>>(),
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Reconciler: the `limit` oldest rows older than `grace_seconds` (so as not
/// to race the API's own publish). Those of jobs still queued are returned, to
/// be published again; the others (cancelled before their publish was
/// confirmed, deleted) are dropped in the same statement. Bounded by `limit`
/// however large the outbox has grown (a long broker outage), since it reads
/// the oldest rows by their index. Fenced by `leader` like
/// [`super::jobs::queue_due`].
pub async fn sweep(db: impl PgExecutor<'_>, leader: Term, grace_seconds: i32, limit: i64) -> Result<Vec<Enqueued>> {
    let unconfirmed = sqlx::query_as!(
        Enqueued,
        r#"
        WITH oldest AS (
            SELECT o.job_id, o.created_at, j.status, j.queue, j.priority, j.lane, j.message_id, j.traceparent
            FROM outbox o LEFT JOIN jobs j ON j.id = o.job_id
            WHERE o.created_at < now() - make_interval(secs => $1)
              AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $3
                                                 AND term = $4 AND expires_at > now())
            ORDER BY o.created_at LIMIT $2),
        settled AS (
            DELETE FROM outbox o USING oldest
            WHERE o.job_id = oldest.job_id AND o.created_at = oldest.created_at
              AND oldest.status IS DISTINCT FROM 'queued')
        SELECT job_id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id, traceparent, created_at AS "queued_at!"
        FROM oldest WHERE status = 'queued'
        "#,
        f64::from(grace_seconds),
        limit,
        leader.holder,
        leader.term,
    )
    .fetch_all(db)
    .await?;
    Ok(unconfirmed)
}

/// Seconds since the oldest unconfirmed publish was queued (0 when every
/// publish is confirmed): one read of the outbox's oldest row, by its index.
pub async fn oldest_age_seconds(db: impl PgExecutor<'_>) -> Result<f64> {
    let age = sqlx::query_scalar!(
        r#"SELECT coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS "age!" FROM outbox"#,
    )
    .fetch_one(db)
    .await?;
    Ok(age)
}
