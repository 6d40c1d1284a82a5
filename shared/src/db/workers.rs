//! The `workers` table: each worker process registers at start with a fresh
//! id, heartbeats while it runs (saying what it runs and what it holds), and
//! removes itself when it stops cleanly.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use sqlx::types::Json;
use uuid::Uuid;

use super::Result;

/// A registered worker process.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerRow {
    pub id: Uuid,
    pub host: String,
    pub queues: Vec<String>,
    pub concurrency: i32,
    pub in_flight: i32,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
}

/// Records that the worker is alive, how many jobs it runs, and how many
/// messages it holds unacknowledged per queue (`held`). Registers the worker
/// at its first heartbeat, and again if its row was removed meanwhile.
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    id: Uuid,
    host: &str,
    queues: &[String],
    concurrency: i32,
    in_flight: i32,
    held: &BTreeMap<String, i64>,
) -> Result<()> {
    sqlx::query!(
        r#"
        INSERT INTO workers (id, host, queues, concurrency, in_flight, held) VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (id) DO UPDATE SET in_flight = $5, held = $6, last_heartbeat_at = now()
        "#,
        id,
        host,
        queues,
        concurrency,
        in_flight,
        Json(held) as _,
    )
    .execute(db)
    .await?;
    Ok(())
}

pub async fn deregister(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    sqlx::query!("DELETE FROM workers WHERE id = $1", id).execute(db).await?;
    Ok(())
}

/// Workers whose last heartbeat is younger than `within_seconds`.
pub async fn live(db: impl PgExecutor<'_>, within_seconds: i32) -> Result<Vec<WorkerRow>> {
    let live = sqlx::query_as!(
        WorkerRow,
        r#"
        SELECT id, host, queues, concurrency, in_flight, started_at, last_heartbeat_at FROM workers
        WHERE last_heartbeat_at > now() - make_interval(secs => $1) ORDER BY started_at
        "#,
        f64::from(within_seconds),
    )
    .fetch_all(db)
    .await?;
    Ok(live)
}

/// Messages of `queue` that workers heard from within `within_seconds`
/// reported holding unacknowledged at their last heartbeat.
pub async fn held(db: impl PgExecutor<'_>, queue: &str, within_seconds: i32) -> Result<i64> {
    let held = sqlx::query_scalar!(
        r#"
        SELECT coalesce(sum((held ->> $1)::int8), 0)::int8 AS "held!" FROM workers
        WHERE last_heartbeat_at > now() - make_interval(secs => $2)
        "#,
        queue,
        f64::from(within_seconds),
    )
    .fetch_one(db)
    .await?;
    Ok(held)
}

/// How many workers heartbeated within the last `within_seconds`.
pub async fn count_live(db: impl PgExecutor<'_>, within_seconds: i32) -> Result<i64> {
    let live = sqlx::query_scalar!(
        r#"SELECT count(*) AS "live!" FROM workers WHERE last_heartbeat_at > now() - make_interval(secs => $1)"#,
        f64::from(within_seconds),
    )
    .fetch_one(db)
    .await?;
    Ok(live)
}
