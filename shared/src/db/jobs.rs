//! Every query on `jobs`. Each status move is one guarded `UPDATE … WHERE
//! status = <expected> [AND attempt = <fence>]`, so two actors racing for the
//! same job cannot both win, and a stale worker cannot overwrite a newer attempt.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::job::{Job, JobFailure, JobStatus, NewJob};

/// The columns of [`Job`], in one place for every query that returns jobs.
macro_rules! job_columns {
    () => {
        "id, tenant, queue, type, payload, status, priority, attempt, max_attempts, \
         timeout_seconds, run_at, progress, result, error, idempotency_key, request_id, \
         created_at, started_at, finished_at, updated_at"
    };
}

/// Inserts a job: `scheduled` when its `run_at` is in the future (by the
/// database's clock, the only one all replicas share), else `queued`.
pub async fn insert(db: impl PgExecutor<'_>, job: &NewJob) -> sqlx::Result<Job> {
    sqlx::query_as(concat!(
        "INSERT INTO jobs (id, tenant, queue, type, payload, status, priority, max_attempts, \
                           timeout_seconds, run_at, idempotency_key, request_id) \
         VALUES ($1, $2, $3, $4, $5, \
                 CASE WHEN $8::timestamptz > now() THEN 'scheduled' ELSE 'queued' END, \
                 $6, $7, $9, COALESCE($8, now()), $10, $11) \
         RETURNING ",
        job_columns!()
    ))
    .bind(job.id)
    .bind(&job.tenant)
    .bind(&job.queue)
    .bind(&job.kind)
    .bind(Json(&job.payload))
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(job.run_at)
    .bind(job.timeout_seconds)
    .bind(&job.idempotency_key)
    .bind(&job.request_id)
    .fetch_one(db)
    .await
}

/// Records that RabbitMQ confirmed the job's message, taking it out of the
/// outbox the reconciler sweeps.
pub async fn mark_published(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE jobs SET published_at = now() WHERE id = $1 AND status = 'queued'")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// One of `tenant`'s jobs; another tenant's id is simply not found.
pub async fn get(db: impl PgExecutor<'_>, tenant: &str, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE id = $1 AND tenant = $2"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

/// Filters of [`list`]; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    /// Keyset cursor: only jobs older (smaller id) than this one.
    pub before: Option<Uuid>,
}

/// A page of `tenant`'s jobs, newest first.
///
/// The SQL is assembled per combination of filters rather than written as
/// `($2 IS NULL OR status = $2)`, because Postgres plans the latter once for
/// all values and then cannot use the status index.
pub async fn list(db: impl PgExecutor<'_>, tenant: &str, filter: &ListFilter, limit: i64) -> sqlx::Result<Vec<Job>> {
    let mut sql = QueryBuilder::<Postgres>::new(concat!("SELECT ", job_columns!(), " FROM jobs WHERE tenant = "));
    sql.push_bind(tenant);
    if let Some(status) = filter.status {
        sql.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(kind) = &filter.kind {
        sql.push(" AND type = ").push_bind(kind);
    }
    if let Some(queue) = &filter.queue {
        sql.push(" AND queue = ").push_bind(queue);
    }
    if let Some(before) = filter.before {
        sql.push(" AND id < ").push_bind(before);
    }
    sql.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
    sql.build_query_as().fetch_all(db).await
}

/// What a worker needs to run a job it has just claimed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub tenant: String,
    pub queue: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub payload: Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_seconds: i32,
    pub request_id: Option<String>,
}

/// Claims a queued job for `worker`: queued → running, attempt + 1, with a
/// lease until `lease_seconds` past the job's timeout. `None` when the job is
/// not queued (already claimed, terminal, cancelled) or does not exist.
pub async fn claim(
    db: impl PgExecutor<'_>,
    id: Uuid,
    worker: Uuid,
    lease_seconds: i32,
) -> sqlx::Result<Option<Claimed>> {
    sqlx::query_as(
        "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = now(), \
                         updated_at = now(), progress = NULL, lease_owner = $2, \
                         lease_expires_at = now() + make_interval(secs => timeout_seconds + $3) \
         WHERE id = $1 AND status = 'queued' \
         RETURNING id, tenant, queue, type, payload, attempt, max_attempts, timeout_seconds, request_id",
    )
    .bind(id)
    .bind(worker)
    .bind(lease_seconds)
    .fetch_optional(db)
    .await
}

/// The status of a job, when it exists.
pub async fn status(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<JobStatus>> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?;
    status
        .map(|s| s.parse().map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

/// How a running attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    /// Failed with attempts left: waits in `retrying` until `retry_at`.
    Retrying {
        error: JobFailure,
        retry_at: DateTime<Utc>,
    },
    Failed(JobFailure),
    Cancelled(JobFailure),
}

impl Outcome {
    pub fn status(&self) -> JobStatus {
        match self {
            Self::Succeeded(_) => JobStatus::Succeeded,
            Self::Retrying { .. } => JobStatus::Retrying,
            Self::Failed(_) => JobStatus::Failed,
            Self::Cancelled(_) => JobStatus::Cancelled,
        }
    }
}

/// Records the outcome of attempt `attempt`. Fenced: it only applies while
/// that very attempt is still the running one, so it returns `false` for a
/// worker whose job was rescued and re-run meanwhile (a zombie).
pub async fn finish(db: impl PgExecutor<'_>, id: Uuid, attempt: i32, outcome: &Outcome) -> sqlx::Result<bool> {
    let (result, error, retry_at) = match outcome {
        Outcome::Succeeded(result) => (Some(result), None, None),
        Outcome::Retrying { error, retry_at } => (None, Some(error), Some(*retry_at)),
        Outcome::Failed(error) | Outcome::Cancelled(error) => (None, Some(error), None),
    };
    let done = sqlx::query(
        "UPDATE jobs SET status = $3, result = $4, error = COALESCE($5, error), \
                         run_at = COALESCE($6, run_at), \
                         finished_at = CASE WHEN $3 = 'retrying' THEN NULL ELSE now() END, \
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .bind(outcome.status().as_str())
    .bind(result.map(Json))
    .bind(error.map(Json))
    .bind(retry_at)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a running attempt's progress (fenced like [`finish`]).
pub async fn set_progress(db: impl PgExecutor<'_>, id: Uuid, attempt: i32, progress: i16) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET progress = $3, updated_at = now() \
         WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .bind(progress)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
