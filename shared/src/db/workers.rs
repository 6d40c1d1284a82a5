//! The `workers` table: each worker process registers at start with a fresh
//! id, heartbeats while it runs, and removes itself when it stops cleanly.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
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

pub async fn register(
    db: impl PgExecutor<'_>,
    id: Uuid,
    host: &str,
    queues: &[String],
    concurrency: i32,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO workers (id, host, queues, concurrency) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(host)
        .bind(queues)
        .bind(concurrency)
        .execute(db)
        .await?;
    Ok(())
}

/// Records that the worker is alive and how many jobs it runs. Re-registers a
/// worker whose row was removed (e.g. pruned while it was cut off).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    id: Uuid,
    host: &str,
    queues: &[String],
    concurrency: i32,
    in_flight: i32,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, host, queues, concurrency, in_flight) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO UPDATE SET in_flight = $5, last_heartbeat_at = now()",
    )
    .bind(id)
    .bind(host)
    .bind(queues)
    .bind(concurrency)
    .bind(in_flight)
    .execute(db)
    .await?;
    Ok(())
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
