//! What tests read and poke in the database directly: counts to assert on,
//! and the few shortcuts that stand in for time passing (a lease that has
//! expired, a job that has come due, a leadership that has lapsed). Written
//! with runtime-checked statements: they are the tests' own, not the product's.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::job::JobStatus;

async fn scalar<T>(pool: &PgPool, sql: &'static str, binds: impl FnOnce(Query<'_>) -> Query<'_>) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let query = binds(sqlx::query(sql));
    match query.fetch_one(pool).await {
        Ok(row) => match sqlx::Row::try_get(&row, 0) {
            Ok(value) => value,
            Err(e) => panic!("{sql}: {e}"),
        },
        Err(e) => panic!("{sql}: {e}"),
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

async fn execute(pool: &PgPool, sql: &'static str, binds: impl FnOnce(Query<'_>) -> Query<'_>) -> u64 {
    match binds(sqlx::query(sql)).execute(pool).await {
        Ok(done) => done.rows_affected(),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Jobs in the table, of `status` when given, among `ids` when given.
pub async fn count(pool: &PgPool, status: Option<JobStatus>, ids: Option<&[Uuid]>) -> i64 {
    scalar(
        pool,
        "SELECT count(*) FROM jobs WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid[] IS NULL OR id = ANY($2))",
        |q| q.bind(status.map(JobStatus::as_str)).bind(ids.map(<[Uuid]>::to_vec)),
    )
    .await
}

/// Attempt number → how many jobs (among `ids` when given) have it.
pub async fn attempts(pool: &PgPool, ids: Option<&[Uuid]>) -> BTreeMap<i32, i64> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT attempt, count(*) FROM jobs WHERE ($1::uuid[] IS NULL OR id = ANY($1)) GROUP BY attempt",
    )
    .bind(ids.map(<[Uuid]>::to_vec))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("attempts: {e}"));
    rows.into_iter().collect()
}

/// Status → how many jobs have it.
pub async fn statuses(pool: &PgPool) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("statuses: {e}"));
    rows.into_iter().collect()
}

/// Rows in the outbox (of `job` when given).
pub async fn outbox_len(pool: &PgPool, job: Option<Uuid>) -> i64 {
    scalar(pool, "SELECT count(*) FROM outbox WHERE ($1::uuid IS NULL OR job_id = $1)", |q| q.bind(job)).await
}

/// Empties the outbox, as if every publish had been confirmed and recorded.
pub async fn clear_outbox(pool: &PgPool) {
    execute(pool, "DELETE FROM outbox", |q| q).await;
}

/// Makes a running job's lease expire now, as if its worker had gone silent.
pub async fn expire_lease(pool: &PgPool, id: Uuid) {
    let n =
        execute(pool, "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", |q| q.bind(id))
            .await;
    assert_eq!(n, 1, "job {id} has no lease to expire");
}

/// Makes a scheduled or retrying job due now.
pub async fn make_due(pool: &PgPool, id: Uuid) {
    execute(pool, "UPDATE jobs SET run_at = now() - interval '1 second' WHERE id = $1", |q| q.bind(id)).await;
}

/// Makes job `id` look as if it ended with `status`, `ago` before now.
pub async fn end(pool: &PgPool, id: Uuid, status: JobStatus, ago: chrono::Duration) {
    let then = Utc::now() - ago;
    let sql = "UPDATE jobs SET status = $2, finished_at = $3, lease_expires_at = NULL WHERE id = $1";
    execute(pool, sql, |q| q.bind(id).bind(status.as_str()).bind(then)).await;
}

/// Makes the reconciler's leadership lapse now, as if its holder had frozen.
pub async fn lapse_leadership(pool: &PgPool) {
    execute(pool, "UPDATE leaders SET expires_at = now()", |q| q).await;
}

/// Every job's id, status and last change, in id order: a fingerprint of the table.
pub async fn snapshot(pool: &PgPool) -> Vec<(Uuid, String, DateTime<Utc>)> {
    sqlx::query_as("SELECT id, status, updated_at FROM jobs ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("snapshot: {e}"))
}

/// A job's last change and result.
pub async fn change_of(pool: &PgPool, id: Uuid) -> (DateTime<Utc>, Option<Value>) {
    sqlx::query_as("SELECT updated_at, result FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("change_of: {e}"))
}

/// The worker holding job `id`'s lease, while it runs.
pub async fn lease_owner(pool: &PgPool, id: Uuid) -> Option<Uuid> {
    scalar(pool, "SELECT lease_owner FROM jobs WHERE id = $1", |q| q.bind(id)).await
}

/// How many distinct workers hold leases now.
pub async fn lease_holders(pool: &PgPool) -> i64 {
    scalar(pool, "SELECT count(DISTINCT lease_owner) FROM jobs", |q| q).await
}

/// The `error.kind` of each of `ids`.
pub async fn error_kinds(pool: &PgPool, ids: &[Uuid]) -> Vec<Option<String>> {
    sqlx::query_scalar("SELECT error->>'kind' FROM jobs WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("error_kinds: {e}"))
}

/// Priorities of the jobs that started, in the order they started.
pub async fn priorities_by_start(pool: &PgPool) -> Vec<i16> {
    sqlx::query_scalar("SELECT priority FROM jobs WHERE started_at IS NOT NULL ORDER BY started_at")
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("priorities_by_start: {e}"))
}

/// Registered workers' ids, oldest first.
pub async fn worker_ids(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM workers ORDER BY started_at")
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("worker_ids: {e}"))
}

/// Messages of `queue` each registered worker last reported holding.
pub async fn held(pool: &PgPool, queue: &str) -> Vec<Option<i64>> {
    sqlx::query_scalar("SELECT (held ->> $1)::int8 FROM workers ORDER BY started_at")
        .bind(queue)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("held: {e}"))
}

/// Registers a made-up worker that reports holding `held` messages by queue.
pub async fn fake_worker(pool: &PgPool, held: Value) -> Uuid {
    let id = Uuid::now_v7();
    execute(
        pool,
        "INSERT INTO workers (id, host, queues, concurrency, held) VALUES ($1, 'fake', '{default}', 1, $2)",
        |q| q.bind(id).bind(held),
    )
    .await;
    id
}

/// Sets what every worker reports holding.
pub async fn set_held(pool: &PgPool, held: Value) {
    execute(pool, "UPDATE workers SET held = $1", |q| q.bind(held)).await;
}

/// Empties `jobs` by hand, as an operator with psql might.
pub async fn truncate_jobs(pool: &PgPool) {
    execute(pool, "TRUNCATE jobs", |q| q).await;
}

/// Turns off the triggers that announce changes of jobs: the API hears of none.
pub async fn disable_change_triggers(pool: &PgPool) {
    execute(pool, "ALTER TABLE jobs DISABLE TRIGGER jobs_ended_updated, DISABLE TRIGGER jobs_changed", |q| q).await;
}

/// Terminates the connections listening on `channel`; returns how many.
pub async fn cut_listeners(pool: &PgPool, channel: &str) -> usize {
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' || $1 || '%'",
    )
    .bind(channel)
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("cut_listeners: {e}"));
    cut.into_iter().filter(|cut| *cut).count()
}

/// The columns of `table`.
pub async fn columns(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT column_name::text FROM information_schema.columns WHERE table_name = $1")
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("columns: {e}"))
}

/// Tries to insert a job with status `status` by hand; the SQLSTATE when refused.
pub async fn insert_with_status(pool: &PgPool, status: &str) -> Option<String> {
    let inserted = sqlx::query("INSERT INTO jobs (id, queue, type, status) VALUES ($1, 'default', 'noop', $2)")
        .bind(Uuid::now_v7())
        .bind(status)
        .execute(pool)
        .await;
    inserted.err().and_then(|e| e.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned()))
}

/// Job `id`'s stored `traceparent`.
pub async fn traceparent(pool: &PgPool, id: Uuid) -> Option<String> {
    scalar(pool, "SELECT traceparent FROM jobs WHERE id = $1", |q| q.bind(id)).await
}
