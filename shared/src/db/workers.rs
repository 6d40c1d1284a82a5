//! The `workers` table: each worker process registers at start with a fresh
//! id, heartbeats while it runs, and removes itself when it stops cleanly.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use sqlx::types::Json;
use uuid::Uuid;

/// A registered worker process.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
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
/// messages it holds unacknowledged per queue (`held`). Re-registers a worker
/// whose row was removed (e.g. pruned while it was cut off).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    id: Uuid,
    host: &str,
    queues: &[String],
    concurrency: i32,
    in_flight: i32,
    held: &BTreeMap<String, i64>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, host, queues, concurrency, in_flight, held) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (id) DO UPDATE SET in_flight = $5, held = $6, last_heartbeat_at = now()",
    )
    .bind(id)
    .bind(host)
    .bind(queues)
    .bind(concurrency)
    .bind(in_flight)
    .bind(Json(held))
    .execute(db)
    .await?;
    Ok(())
}

/// Messages of `queue` that workers heard from within `within_seconds`
/// reported holding unacknowledged at their last heartbeat.
pub async fn held(db: impl PgExecutor<'_>, queue: &str, within_seconds: i32) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT coalesce(sum((held ->> $1)::int8), 0)::int8 FROM workers \
         WHERE last_heartbeat_at > now() - make_interval(secs => $2)",
    )
    .bind(queue)
    .bind(within_seconds)
    .fetch_one(db)
    .await
}

pub async fn deregister(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM workers WHERE id = $1").bind(id).execute(db).await?;
    Ok(())
}

/// Workers whose last heartbeat is younger than `within_seconds`.
pub async fn live(db: impl PgExecutor<'_>, within_seconds: i32) -> sqlx::Result<Vec<WorkerRow>> {
    sqlx::query_as(
        "SELECT id, host, queues, concurrency, in_flight, started_at, last_heartbeat_at FROM workers \
         WHERE last_heartbeat_at > now() - make_interval(secs => $1) ORDER BY started_at",
    )
    .bind(within_seconds)
    .fetch_all(db)
    .await
}
