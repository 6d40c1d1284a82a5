//! The `tenant_lanes` table: which lane of every queue a tenant's jobs take.
//!
//! A queue is carried by `amqp.lanes` RabbitMQ queues, and workers consume
//! them all at once, so RabbitMQ hands out their messages in turn: a tenant
//! with a backlog fills its own lane, and another tenant's job waits for a
//! turn, not for the backlog. Lanes are given out round robin on a tenant's
//! first submission, so the first `amqp.lanes` tenants each have a lane of
//! their own; later ones share.

use sqlx::PgExecutor;

use super::Result;

/// The lane of `tenant`, given now if it has none (a number that may exceed
/// the lanes configured: take it modulo their count).
pub async fn of(db: impl PgExecutor<'_>, tenant: &str) -> Result<i32> {
    let lane = sqlx::query_scalar!(
        r#"
        WITH given AS (
            INSERT INTO tenant_lanes (tenant, lane)
            SELECT $1, count(*)::int FROM tenant_lanes
            ON CONFLICT (tenant) DO NOTHING
            RETURNING lane)
        SELECT lane AS "lane!" FROM given
        UNION ALL
        SELECT lane FROM tenant_lanes WHERE tenant = $1
        LIMIT 1
        "#,
        tenant,
    )
    .fetch_one(db)
    .await?;
    Ok(lane)
}
