//! The `tenant_lanes` table: which lane of every queue a tenant's jobs take.
//!
//! A queue is carried by `amqp.lanes` RabbitMQ queues, and workers consume
//! them all at once, so RabbitMQ hands out their messages in turn: a tenant
//! with a backlog fills its own lane, and another tenant's job waits for a
//! turn, not for the backlog. Lanes are given out round robin on a tenant's
//! first submission, so the first `amqp.lanes` tenants each have a lane of
//! their own; later ones share.

use sqlx::PgPool;

use super::Result;

/// The lane of `tenant`, given now if it has none (a number that may exceed
/// the lanes configured: take it modulo their count).
///
/// Giving one takes a lock on the table, once per tenant and API replica:
/// two first submissions at once must both learn the one lane given (a
/// single `INSERT … ON CONFLICT` cannot, its snapshot predates the winner's
/// commit), and two new tenants at once must not both count the same lanes.
pub async fn of(db: &PgPool, tenant: &str) -> Result<i32> {
    let known = sqlx::query_scalar!("SELECT lane FROM tenant_lanes WHERE tenant = $1", tenant);
    if let Some(lane) = known.fetch_optional(db).await? {
        return Ok(lane);
    }
    let mut tx = db.begin().await?;
    // Conflicts with itself, not with readers: lookups of known lanes go on.
    sqlx::query!("LOCK TABLE tenant_lanes IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    // Statements after the lock see every lane given before it.
    sqlx::query!(
        r#"
        INSERT INTO tenant_lanes (tenant, lane)
        SELECT $1, count(*)::int FROM tenant_lanes
        ON CONFLICT (tenant) DO NOTHING
        "#,
        tenant,
    )
    .execute(&mut *tx)
    .await?;
    let lane =
        sqlx::query_scalar!("SELECT lane FROM tenant_lanes WHERE tenant = $1", tenant).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(lane)
}
