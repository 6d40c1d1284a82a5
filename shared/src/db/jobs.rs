//! Every statement on `jobs`. Each status move is one guarded `UPDATE … WHERE
//! status = <expected> [AND lease_token = <fence>]`, so two actors racing for
//! the same job cannot both win, and a stale worker cannot overwrite a newer
//! run. Every statement that makes a job `queued` also puts it in the outbox
//! (the same statement), so a queued job always has a confirmed message or an
//! outbox row.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::leadership::Term;
use super::{Error, Result};
use crate::job::{
    Cancel, Claimed, Enqueued, Job, JobFailure, JobStatus, Lease, ListFilter, ListedJob, NewJob, Outcome, RawJson,
    RequeueFilter, RequeueRefused,
};

/// Inserts a job: `scheduled` when its `run_at` is in the future (by the
/// database's clock, the only one all replicas share), else `queued`.
pub async fn insert(db: impl PgExecutor<'_>, job: &NewJob) -> Result<Job> {
    let mut inserted = insert_many(db, std::slice::from_ref(job)).await?;
    inserted.pop().ok_or_else(|| Error::from(sqlx::Error::RowNotFound))
}

/// Inserts many jobs in one statement (see [`insert`]); returns them in the
/// order given.
pub async fn insert_many(db: impl PgExecutor<'_>, jobs: &[NewJob]) -> Result<Vec<Job>> {
    let payloads: Vec<&str> = jobs.iter().map(|j| j.payload.get()).collect();
    let inserted = sqlx::query_as!(
        Job,
        r#"
        WITH inserted AS (
            INSERT INTO jobs (id, tenant, queue, type, payload, payload_bytes, status, priority, max_attempts,
                              timeout_seconds, run_at, idempotency_key, request_id, lane, message_id, traceparent)
            SELECT id, tenant, queue, type, payload::jsonb, octet_length(payload),
                   CASE WHEN run_at > now() THEN 'scheduled' ELSE 'queued' END,
                   priority, max_attempts, timeout_seconds, COALESCE(run_at, now()), idempotency_key, request_id, lane,
                   message_id, traceparent
            FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::int4[],
                        $8::int4[], $9::timestamptz[], $10::text[], $11::text[], $12::int2[], $13::uuid[], $14::text[])
                 AS t(id, tenant, queue, type, payload, priority, max_attempts, timeout_seconds, run_at,
                      idempotency_key, request_id, lane, message_id, traceparent)
            RETURNING *),
        pending AS (
            INSERT INTO outbox (job_id, created_at)
            SELECT id, updated_at FROM inserted WHERE status = 'queued')
        SELECT id AS "id!", tenant AS "tenant!", queue AS "queue!", type AS "kind!", payload::text AS "payload!: RawJson",
               status AS "status!: JobStatus", priority AS "priority!", attempt AS "attempt!",
               max_attempts AS "max_attempts!", timeout_seconds AS "timeout_seconds!", run_at AS "run_at!",
               progress, result::text AS "result: RawJson", error AS "error: JobFailure", idempotency_key, request_id,
               requeue_count AS "requeue_count!", cancel_requested_at, created_at AS "created_at!",
               started_at, finished_at, updated_at AS "updated_at!"
        FROM inserted
        "#,
        &jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        &jobs.iter().map(|j| j.tenant.clone()).collect::<Vec<_>>(),
        &jobs.iter().map(|j| j.queue.clone()).collect::<Vec<_>>(),
        &jobs.iter().map(|j| j.kind.clone()).collect::<Vec<_>>(),
        &payloads as &[&str],
        &jobs.iter().map(|j| j.priority).collect::<Vec<_>>(),
        &jobs.iter().map(|j| j.max_attempts).collect::<Vec<_>>(),
        &jobs.iter().map(|j| j.timeout_seconds).collect::<Vec<_>>(),
        &jobs.iter().map(|j| j.run_at).collect::<Vec<_>>() as _,
        &jobs.iter().map(|j| j.idempotency_key.clone()).collect::<Vec<_>>() as _,
        &jobs.iter().map(|j| j.request_id.clone()).collect::<Vec<_>>() as _,
        &jobs.iter().map(|j| j.lane).collect::<Vec<_>>(),
        &jobs.iter().map(|j| j.message_id).collect::<Vec<_>>() as _,
        &jobs.iter().map(|j| j.traceparent.clone()).collect::<Vec<_>>() as _,
    )
    .fetch_all(db)
    .await?;
    // RETURNING does not promise the input's order.
    let mut by_id: HashMap<Uuid, Job> = inserted.into_iter().map(|job| (job.id, job)).collect();
    jobs.iter().map(|job| by_id.remove(&job.id).ok_or_else(|| Error::from(sqlx::Error::RowNotFound))).collect()
}

/// Like [`insert_many`], but when Postgres refuses the statement (not when it
/// cannot be reached), each job is inserted on its own: a value one
/// submission got past validation must fail that submission only, not the
/// others of its batch (other tenants' among them).
pub async fn insert_each_if_refused(db: &PgPool, jobs: &[NewJob]) -> Result<Vec<Result<Job>>> {
    match insert_many(db, jobs).await {
        Ok(inserted) => Ok(inserted.into_iter().map(Ok).collect()),
        Err(Error::Refused(_)) if jobs.len() > 1 => {
            let mut each = Vec::with_capacity(jobs.len());
            for job in jobs {
                each.push(insert(db, job).await);
            }
            Ok(each)
        }
        Err(e) => Err(e),
    }
}

/// Requeues one of `tenant`'s jobs if it is failed or cancelled: back to
/// `queued` with the attempt count restarted and the result cleared (the last
/// error stays, so an operator can still see why it failed before). `None`
/// when it is not failed or cancelled, or not `tenant`'s.
pub async fn requeue_one(db: impl PgExecutor<'_>, tenant: &str, id: Uuid) -> Result<Option<Enqueued>> {
    let moved = sqlx::query_as!(
        Enqueued,
        r#"
        WITH moved AS (
            UPDATE jobs SET status = 'queued', attempt = 0, requeue_count = requeue_count + 1, run_at = now(), parked_at = NULL, message_id = NULL,
                            started_at = NULL, finished_at = NULL, result = NULL, result_bytes = NULL, progress = NULL,
                            cancel_requested_at = NULL, updated_at = now()
            WHERE id = $1 AND tenant = $2 AND status IN ('failed', 'cancelled')
            RETURNING id, queue, priority, lane, message_id, traceparent, updated_at),
        pending AS (
            INSERT INTO outbox (job_id, created_at) SELECT id, updated_at FROM moved
            ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at)
        SELECT id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id, traceparent, updated_at AS "queued_at!" FROM moved
        "#,
        id,
        tenant,
    )
    .fetch_optional(db)
    .await?;
    Ok(moved)
}

/// Requeues exactly `ids` (as [`requeue_one`] does, across tenants), or none
/// of them: in one transaction that locks them first, so no job can change
/// between the check and the move. `Ok(Err(_))` names the first id that made
/// it refuse; with `dry_run`, only the check is made.
pub async fn requeue_exactly(
    db: &PgPool,
    ids: &[Uuid],
    dry_run: bool,
) -> Result<Result<Vec<Enqueued>, RequeueRefused>> {
    let mut tx = db.begin().await?;
    let found =
        sqlx::query!(r#"SELECT id, status AS "status: JobStatus" FROM jobs WHERE id = ANY($1) FOR UPDATE"#, ids,)
            .fetch_all(&mut *tx)
            .await?;
    for id in ids {
        match found.iter().find(|row| row.id == *id) {
            None => return Ok(Err(RequeueRefused::Missing(*id))),
            Some(row) if !matches!(row.status, JobStatus::Failed | JobStatus::Cancelled) => {
                return Ok(Err(RequeueRefused::NotEnded(*id, row.status)));
            }
            Some(_) => {}
        }
    }
    if dry_run {
        return Ok(Ok(Vec::new()));
    }
    let moved = sqlx::query_as!(
        Enqueued,
        r#"
        WITH moved AS (
            UPDATE jobs SET status = 'queued', attempt = 0, requeue_count = requeue_count + 1, run_at = now(), parked_at = NULL, message_id = NULL,
                            started_at = NULL, finished_at = NULL, result = NULL, result_bytes = NULL, progress = NULL,
                            cancel_requested_at = NULL, updated_at = now()
            WHERE id = ANY($1) AND status IN ('failed', 'cancelled')
            RETURNING id, queue, priority, lane, message_id, traceparent, updated_at),
        pending AS (
            INSERT INTO outbox (job_id, created_at) SELECT id, updated_at FROM moved
            ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at)
        SELECT id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id, traceparent, updated_at AS "queued_at!" FROM moved
        "#,
        ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ok(moved))
}

/// The ids of up to `limit` jobs matching `filter` after `after` (all, when
/// `None`), in id order: one page of a bulk requeue's dry run.
pub async fn requeue_preview(
    db: impl PgExecutor<'_>,
    filter: &RequeueFilter,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Uuid>> {
    let ids = sqlx::query_scalar!(
        r#"
        SELECT id FROM jobs
        WHERE status = $1 AND id > $2
          AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR queue = $4)
          AND ($5::text IS NULL OR tenant = $5) AND ($6::timestamptz IS NULL OR finished_at >= $6)
        ORDER BY id LIMIT $7
        "#,
        filter.status as _,
        after.unwrap_or(Uuid::nil()),
        filter.kind.as_deref(),
        filter.queue.as_deref(),
        filter.tenant.as_deref(),
        filter.finished_since,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(ids)
}

/// Requeues up to `limit` jobs matching `filter` after `after`, in one short
/// statement; callers loop over batches so that no transaction grows with
/// the number of jobs. Rows another transaction holds are skipped, not waited for.
pub async fn requeue_batch(
    db: impl PgExecutor<'_>,
    filter: &RequeueFilter,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Enqueued>> {
    let moved = sqlx::query_as!(
        Enqueued,
        r#"
        WITH moved AS (
            UPDATE jobs SET status = 'queued', attempt = 0, requeue_count = requeue_count + 1, run_at = now(), parked_at = NULL, message_id = NULL,
                            started_at = NULL, finished_at = NULL, result = NULL, result_bytes = NULL, progress = NULL,
                            cancel_requested_at = NULL, updated_at = now()
            WHERE id IN (SELECT id FROM jobs
                         WHERE status = $1 AND id > $2
                           AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR queue = $4)
                           AND ($5::text IS NULL OR tenant = $5) AND ($6::timestamptz IS NULL OR finished_at >= $6)
                         ORDER BY id LIMIT $7 FOR UPDATE SKIP LOCKED)
              AND status IN ('failed', 'cancelled')
            RETURNING id, queue, priority, lane, message_id, traceparent, updated_at),
        pending AS (
            INSERT INTO outbox (job_id, created_at) SELECT id, updated_at FROM moved
            ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at)
        SELECT id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id, traceparent, updated_at AS "queued_at!" FROM moved
        "#,
        filter.status as _,
        after.unwrap_or(Uuid::nil()),
        filter.kind.as_deref(),
        filter.queue.as_deref(),
        filter.tenant.as_deref(),
        filter.finished_since,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(moved)
}

/// Cancels one of `tenant`'s jobs: at once unless it is running, in which case
/// the request is recorded for its worker, which is woken by a notification.
pub async fn cancel(db: &PgPool, tenant: &str, id: Uuid) -> Result<Cancel> {
    // A job can move between our statements (queued -> running, running ->
    // retrying); each pass re-reads, and a few passes almost always settle it.
    for _ in 0..3 {
        let cancelled = sqlx::query_as!(
            Job,
            r#"
            UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
                            error = jsonb_build_object('message', 'cancelled by request', 'kind', 'cancelled',
                                                       'attempt', attempt)
            WHERE id = $1 AND tenant = $2 AND status IN ('scheduled', 'queued', 'retrying')
            RETURNING id, tenant, queue, type AS kind, payload::text AS "payload!: RawJson", status AS "status: JobStatus", priority, attempt,
                      max_attempts, timeout_seconds, run_at, progress, result::text AS "result: RawJson", error AS "error: JobFailure",
                      idempotency_key, request_id, requeue_count, cancel_requested_at, created_at, started_at,
                      finished_at, updated_at
            "#,
            id,
            tenant,
        )
        .fetch_optional(db)
        .await?;
        if let Some(job) = cancelled {
            return Ok(Cancel::Cancelled(job));
        }
        let requested = sqlx::query_as!(
            Job,
            r#"
            UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now()
            WHERE id = $1 AND tenant = $2 AND status = 'running'
            RETURNING id, tenant, queue, type AS kind, payload::text AS "payload!: RawJson", status AS "status: JobStatus", priority, attempt,
                      max_attempts, timeout_seconds, run_at, progress, result::text AS "result: RawJson", error AS "error: JobFailure",
                      idempotency_key, request_id, requeue_count, cancel_requested_at, created_at, started_at,
                      finished_at, updated_at
            "#,
            id,
            tenant,
        )
        .fetch_optional(db)
        .await?;
        if requested.is_some() {
            // Wakes the worker running it now rather than at its next heartbeat.
            sqlx::query!("SELECT pg_notify($1, $2)", super::CANCEL_CHANNEL, id.to_string()).execute(db).await?;
        }
        if let Some(job) = requested {
            return Ok(Cancel::Requested(job));
        }
        match get(db, tenant, id).await? {
            Some(job) if job.status.is_terminal() => return Ok(Cancel::Terminal(job)),
            Some(_) => continue,
            None => return Ok(Cancel::NotFound),
        }
    }
    Ok(Cancel::KeptChanging)
}

/// `tenant`'s jobs (any tenant's when `None`) with these ids, in the order of
/// `ids` (those that exist, each once).
pub async fn get_many(db: impl PgExecutor<'_>, tenant: Option<&str>, ids: &[Uuid]) -> Result<Vec<Job>> {
    let found = sqlx::query_as!(
        Job,
        r#"
        SELECT id, tenant, queue, type AS kind, payload::text AS "payload!: RawJson", status AS "status: JobStatus",
               priority, attempt, max_attempts, timeout_seconds, run_at, progress, result::text AS "result: RawJson",
               error AS "error: JobFailure", idempotency_key, request_id, requeue_count, cancel_requested_at,
               created_at, started_at, finished_at, updated_at
        FROM jobs WHERE ($1::text IS NULL OR tenant = $1) AND id = ANY($2)
        "#,
        tenant,
        ids,
    )
    .fetch_all(db)
    .await?;
    let mut by_id: HashMap<Uuid, Job> = found.into_iter().map(|job| (job.id, job)).collect();
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

/// One of `tenant`'s jobs; another tenant's id is simply not found.
pub async fn get(db: impl PgExecutor<'_>, tenant: &str, id: Uuid) -> Result<Option<Job>> {
    get_scoped(db, Some(tenant), id).await
}

/// A job of `tenant`, or of any tenant when `None` (operators).
pub async fn get_scoped(db: impl PgExecutor<'_>, tenant: Option<&str>, id: Uuid) -> Result<Option<Job>> {
    let job = sqlx::query_as!(
        Job,
        r#"
        SELECT id, tenant, queue, type AS kind, payload::text AS "payload!: RawJson", status AS "status: JobStatus", priority, attempt,
               max_attempts, timeout_seconds, run_at, progress, result::text AS "result: RawJson", error AS "error: JobFailure",
               idempotency_key, request_id, requeue_count, cancel_requested_at, created_at, started_at,
               finished_at, updated_at
        FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
        "#,
        id,
        tenant,
    )
    .fetch_optional(db)
    .await?;
    Ok(job)
}

/// What one [`prune_batch`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: u64,
    /// When the last of them ended: where the next batch starts.
    pub last: Option<DateTime<Utc>>,
}

/// Deletes up to `limit` jobs in `status` (an ended one) that finished before
/// `before`, oldest first, starting at `from` (inclusive: the previous
/// batch's [`Pruned::last`], or `None` for the oldest); callers loop until a
/// batch deletes less than `limit`. Jobs someone else holds locked are left.
///
/// A walk of the ended jobs' (status, finished_at) index: it reads only what
/// it deletes, however many younger or kept jobs the table holds, and each
/// batch starts where the last stopped rather than stepping again over the
/// entries of the jobs already deleted (they stay in the index until vacuum).
pub async fn prune_batch(
    db: impl PgExecutor<'_>,
    status: JobStatus,
    before: DateTime<Utc>,
    from: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Pruned> {
    // The repeated status list lets a generic plan use the partial index.
    let pruned = sqlx::query!(
        r#"
        WITH doomed AS (
            SELECT id FROM jobs
            WHERE status = $1 AND status IN ('succeeded', 'failed', 'cancelled')
              AND finished_at >= $2 AND finished_at < $3
            ORDER BY finished_at LIMIT $4
            FOR UPDATE SKIP LOCKED
        ), gone AS (
            DELETE FROM jobs WHERE id IN (SELECT id FROM doomed) RETURNING finished_at
        )
        SELECT count(*) AS "deleted!", max(finished_at) AS last FROM gone
        "#,
        status.as_str(),
        from.unwrap_or(DateTime::UNIX_EPOCH),
        before,
        limit,
    )
    .fetch_one(db)
    .await?;
    Ok(Pruned { deleted: u64::try_from(pruned.deleted).unwrap_or(0), last: pruned.last })
}

/// How many jobs [`prune_batch`] would delete.
pub async fn prune_count(db: impl PgExecutor<'_>, statuses: &[JobStatus], before: DateTime<Utc>) -> Result<i64> {
    let count = sqlx::query_scalar!(
        r#"
        SELECT count(*) AS "count!" FROM jobs
        WHERE status = ANY($1) AND status IN ('succeeded', 'failed', 'cancelled') AND finished_at < $2
        "#,
        &statuses.iter().map(|s| s.as_str().to_owned()).collect::<Vec<_>>(),
        before,
    )
    .fetch_one(db)
    .await?;
    Ok(count)
}

/// A page of jobs, newest first: `tenant`'s, or every tenant's when `None`
/// (operators). A payload or result larger than `inline_bytes` is not read
/// (it comes back `None`, its size given), so a page of jobs with huge
/// results costs no more than their ids.
///
/// Four statements, one per walk: a tenant's jobs by the (tenant, id) index,
/// or by the (tenant, status, id) index when a status is asked for, and the
/// same across tenants. Type and queue are filters applied during the walk;
/// the cursor is always a bound on the index (the largest id when there is
/// none), never an `IS NULL OR`, which would turn it into a filter.
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant: Option<&str>,
    filter: &ListFilter,
    limit: i64,
    inline_bytes: i32,
) -> Result<Vec<ListedJob>> {
    let before = filter.before.unwrap_or(Uuid::max());
    let (kind, queue) = (filter.kind.as_deref(), filter.queue.as_deref());
    let jobs = match (tenant, filter.status) {
        (Some(tenant), Some(status)) => {
            sqlx::query_as!(
                ListedJob,
                r#"
                SELECT id, tenant, queue, type AS kind,
                       CASE WHEN COALESCE(payload_bytes, octet_length(payload::text)) <= $7
                            THEN payload::text END AS "payload: RawJson",
                       COALESCE(payload_bytes, octet_length(payload::text)) AS "payload_bytes!",
                       status AS "status: JobStatus", priority, attempt, max_attempts, timeout_seconds, run_at,
                       progress,
                       CASE WHEN COALESCE(result_bytes, octet_length(result::text)) <= $7
                            THEN result::text END AS "result: RawJson",
                       COALESCE(result_bytes, octet_length(result::text), 0) AS "result_bytes!",
                       error AS "error: JobFailure", idempotency_key, request_id, requeue_count,
                       cancel_requested_at, created_at, started_at, finished_at, updated_at,
                       ARRAY[]::text[] AS "omitted!"
                FROM jobs
                WHERE tenant = $1 AND status = $2 AND id < $3
                  AND ($4::text IS NULL OR type = $4) AND ($5::text IS NULL OR queue = $5)
                ORDER BY id DESC LIMIT $6
                "#,
                tenant,
                status as _,
                before,
                kind,
                queue,
                limit,
                inline_bytes,
            )
            .fetch_all(db)
            .await?
        }
        (Some(tenant), None) => {
            sqlx::query_as!(
                ListedJob,
                r#"
                SELECT id, tenant, queue, type AS kind,
                       CASE WHEN COALESCE(payload_bytes, octet_length(payload::text)) <= $6
                            THEN payload::text END AS "payload: RawJson",
                       COALESCE(payload_bytes, octet_length(payload::text)) AS "payload_bytes!",
                       status AS "status: JobStatus", priority, attempt, max_attempts, timeout_seconds, run_at,
                       progress,
                       CASE WHEN COALESCE(result_bytes, octet_length(result::text)) <= $6
                            THEN result::text END AS "result: RawJson",
                       COALESCE(result_bytes, octet_length(result::text), 0) AS "result_bytes!",
                       error AS "error: JobFailure", idempotency_key, request_id, requeue_count,
                       cancel_requested_at, created_at, started_at, finished_at, updated_at,
                       ARRAY[]::text[] AS "omitted!"
                FROM jobs
                WHERE tenant = $1 AND id < $2
                  AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR queue = $4)
                ORDER BY id DESC LIMIT $5
                "#,
                tenant,
                before,
                kind,
                queue,
                limit,
                inline_bytes,
            )
            .fetch_all(db)
            .await?
        }
        (None, Some(status)) => {
            sqlx::query_as!(
                ListedJob,
                r#"
                SELECT id, tenant, queue, type AS kind,
                       CASE WHEN COALESCE(payload_bytes, octet_length(payload::text)) <= $6
                            THEN payload::text END AS "payload: RawJson",
                       COALESCE(payload_bytes, octet_length(payload::text)) AS "payload_bytes!",
                       status AS "status: JobStatus", priority, attempt, max_attempts, timeout_seconds, run_at,
                       progress,
                       CASE WHEN COALESCE(result_bytes, octet_length(result::text)) <= $6
                            THEN result::text END AS "result: RawJson",
                       COALESCE(result_bytes, octet_length(result::text), 0) AS "result_bytes!",
                       error AS "error: JobFailure", idempotency_key, request_id, requeue_count,
                       cancel_requested_at, created_at, started_at, finished_at, updated_at,
                       ARRAY[]::text[] AS "omitted!"
                FROM jobs
                WHERE status = $1 AND id < $2
                  AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR queue = $4)
                ORDER BY id DESC LIMIT $5
                "#,
                status as _,
                before,
                kind,
                queue,
                limit,
                inline_bytes,
            )
            .fetch_all(db)
            .await?
        }
        (None, None) => {
            sqlx::query_as!(
                ListedJob,
                r#"
                SELECT id, tenant, queue, type AS kind,
                       CASE WHEN COALESCE(payload_bytes, octet_length(payload::text)) <= $5
                            THEN payload::text END AS "payload: RawJson",
                       COALESCE(payload_bytes, octet_length(payload::text)) AS "payload_bytes!",
                       status AS "status: JobStatus", priority, attempt, max_attempts, timeout_seconds, run_at,
                       progress,
                       CASE WHEN COALESCE(result_bytes, octet_length(result::text)) <= $5
                            THEN result::text END AS "result: RawJson",
                       COALESCE(result_bytes, octet_length(result::text), 0) AS "result_bytes!",
                       error AS "error: JobFailure", idempotency_key, request_id, requeue_count,
                       cancel_requested_at, created_at, started_at, finished_at, updated_at,
                       ARRAY[]::text[] AS "omitted!"
                FROM jobs
                WHERE id < $1 AND ($2::text IS NULL OR type = $2) AND ($3::text IS NULL OR queue = $3)
                ORDER BY id DESC LIMIT $4
                "#,
                before,
                kind,
                queue,
                limit,
                inline_bytes,
            )
            .fetch_all(db)
            .await?
        }
    };
    Ok(jobs)
}

/// Claims a queued job for `worker`: queued → running, attempt + 1, a fresh
/// lease token, and a lease of `lease_seconds` (renewed by the worker's
/// heartbeat). `None` when the job is not queued (already claimed, ended,
/// cancelled) or does not exist.
pub async fn claim(db: impl PgExecutor<'_>, id: Uuid, worker: Uuid, lease_seconds: i32) -> Result<Option<Claimed>> {
    Ok(claim_many(db, &[id], worker, lease_seconds).await?.pop())
}

/// Claims every one of `ids` that is queued, in one statement (see [`claim`]).
pub async fn claim_many(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    worker: Uuid,
    lease_seconds: i32,
) -> Result<Vec<Claimed>> {
    let claimed = sqlx::query_as!(
        Claimed,
        r#"
        UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = now(), updated_at = now(),
                        progress = NULL, lease_owner = $2, lease_token = gen_random_uuid(),
                        lease_expires_at = now() + make_interval(secs => $3)
        WHERE id = ANY($1) AND status = 'queued'
        RETURNING id, tenant, queue, type AS kind, payload::text AS "payload!: RawJson", attempt, max_attempts, timeout_seconds,
                  request_id, traceparent, run_at,
                  lease_token AS "lease_token!"
        "#,
        ids,
        worker,
        f64::from(lease_seconds),
    )
    .fetch_all(db)
    .await?;
    Ok(claimed)
}

/// Like [`claim_many`], for a platform with `tenants.max_running` =
/// `max_running`: a tenant's jobs are claimed only while it runs fewer than
/// that, across every worker (its claims are serialised by an advisory lock
/// per tenant, and its running jobs counted after taking it). A job that
/// does not fit is parked: it stays queued, without a message (the caller
/// acknowledges it), until [`unpark`] publishes it again.
pub async fn claim_many_capped(
    pool: &sqlx::PgPool,
    ids: &[Uuid],
    worker: Uuid,
    lease_seconds: i32,
    max_running: i32,
) -> Result<Vec<Claimed>> {
    let mut tx = pool.begin().await?;
    // In one order everywhere, so two workers' claims never deadlock.
    sqlx::query!(
        r#"
        SELECT pg_advisory_xact_lock(k) AS "locked!: ()" FROM (
            SELECT DISTINCT hashtextextended('conveyor.tenant.' || tenant, 0) AS k
            FROM jobs WHERE id = ANY($1) AND status = 'queued' ORDER BY k) AS tenants
        "#,
        ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    // A statement of its own: its snapshot sees every claim committed before
    // the locks were granted. It parks what does not fit and names what does.
    let fitting = sqlx::query_scalar!(
        r#"
        WITH candidates AS (
            SELECT id, tenant, row_number() OVER (PARTITION BY tenant ORDER BY priority DESC, id) AS n
            FROM jobs WHERE id = ANY($1) AND status = 'queued'),
        room AS (
            SELECT t.tenant,
                   $2 - (SELECT count(*) FROM jobs r WHERE r.tenant = t.tenant AND r.status = 'running') AS free
            FROM (SELECT DISTINCT tenant FROM candidates) AS t),
        fitting AS (
            SELECT c.id FROM candidates c JOIN room USING (tenant) WHERE c.n <= room.free),
        parked AS (
            UPDATE jobs SET parked_at = now()
            WHERE id IN (SELECT id FROM candidates) AND id NOT IN (SELECT id FROM fitting)
            RETURNING id)
        SELECT id AS "id!" FROM fitting
        "#,
        ids,
        i64::from(max_running),
    )
    .fetch_all(&mut *tx)
    .await?;
    let claimed = claim_many(&mut *tx, &fitting, worker, lease_seconds).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// Reconciler (`tenants.max_running`): publishes parked jobs again, for each
/// tenant as many as it has room for (its cap less its running jobs and its
/// queued jobs that have a message), highest priority and oldest first, up
/// to `limit` in all. Fenced by `leader` like [`queue_due`].
pub async fn unpark(db: impl PgExecutor<'_>, leader: Term, max_running: i32, limit: i64) -> Result<Vec<Enqueued>> {
    let unparked = sqlx::query_as!(
        Enqueued,
        r#"
        WITH room AS (
            SELECT t.tenant,
                   $1 - (SELECT count(*) FROM jobs r
                         WHERE r.tenant = t.tenant
                           AND (r.status = 'running' OR (r.status = 'queued' AND r.parked_at IS NULL))) AS free
            FROM (SELECT DISTINCT tenant FROM jobs WHERE parked_at IS NOT NULL AND status = 'queued') AS t),
        picked AS (
            SELECT p.id FROM room, LATERAL (
                SELECT id FROM jobs j
                WHERE j.tenant = room.tenant AND j.parked_at IS NOT NULL AND j.status = 'queued'
                ORDER BY j.priority DESC, j.id LIMIT greatest(room.free, 0)) AS p
            LIMIT $2),
        moved AS (
            UPDATE jobs SET parked_at = NULL, message_id = NULL, updated_at = now()
            WHERE id IN (SELECT id FROM picked) AND status = 'queued'
              AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $3
                                                 AND term = $4 AND expires_at > now())
            RETURNING id, queue, priority, lane, message_id, traceparent, updated_at),
        pending AS (
            INSERT INTO outbox (job_id, created_at) SELECT id, updated_at FROM moved
            ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at)
        SELECT id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id, traceparent, updated_at AS "queued_at!" FROM moved
        "#,
        i64::from(max_running),
        limit,
        leader.holder,
        leader.term,
    )
    .fetch_all(db)
    .await?;
    Ok(unparked)
}

/// Extends the leases a worker still holds by `lease_seconds`. Returns, for
/// each lease still held, whether a client asked to cancel the job; a lease
/// missing from the answer is lost (expired and rescued, or the job ended).
pub async fn renew(db: impl PgExecutor<'_>, leases: &[Lease], lease_seconds: i32) -> Result<Vec<(Uuid, bool)>> {
    let held = sqlx::query!(
        r#"
        UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
        FROM UNNEST($1::uuid[], $2::uuid[]) AS held(id, token)
        WHERE jobs.id = held.id AND jobs.lease_token = held.token AND jobs.status = 'running'
        RETURNING jobs.id, jobs.cancel_requested_at IS NOT NULL AS "cancel_requested!"
        "#,
        &leases.iter().map(|l| l.id).collect::<Vec<_>>(),
        &leases.iter().map(|l| l.token).collect::<Vec<_>>(),
        f64::from(lease_seconds),
    )
    .fetch_all(db)
    .await?;
    Ok(held.into_iter().map(|row| (row.id, row.cancel_requested)).collect())
}

/// Hands a running job back, unfinished, when its worker shuts down: queued
/// again, the interrupted attempt not counted (it was not the job's fault).
/// A job whose cancel was requested meanwhile ends cancelled instead: handing
/// it back would run it again. `None` if the lease is no longer held.
pub async fn release(db: impl PgExecutor<'_>, lease: Lease) -> Result<Option<Released>> {
    let row = sqlx::query!(
        r#"
        WITH moved AS (
            UPDATE jobs SET
                status = CASE WHEN cancel_requested_at IS NULL THEN 'queued' ELSE 'cancelled' END,
                attempt = CASE WHEN cancel_requested_at IS NULL THEN attempt - 1 ELSE attempt END,
                started_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE started_at END,
                finished_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE now() END,
                error = CASE WHEN cancel_requested_at IS NULL THEN error
                             ELSE jsonb_build_object('message', 'cancelled by request while its worker stopped',
                                                     'kind', 'cancelled', 'attempt', attempt) END,
                progress = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, message_id = NULL,
                updated_at = now()
            WHERE id = $1 AND lease_token = $2 AND status = 'running'
            RETURNING id, queue, priority, lane, message_id, traceparent, updated_at, status),
        pending AS (
            INSERT INTO outbox (job_id, created_at) SELECT id, updated_at FROM moved WHERE status = 'queued'
            ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at)
        SELECT id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id, traceparent, updated_at AS "queued_at!",
               status AS "status!: JobStatus"
        FROM moved
        "#,
        lease.id,
        lease.token,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| match row.status {
        JobStatus::Queued => Released::Queued(Enqueued {
            id: row.id,
            queue: row.queue,
            priority: row.priority,
            lane: row.lane,
            message_id: row.message_id,
            traceparent: row.traceparent,
            queued_at: row.queued_at,
        }),
        _ => Released::Cancelled,
    }))
}

/// What became of a job handed back (see [`release`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Queued again; its message must be published.
    Queued(Enqueued),
    /// Its cancel had been requested: it ended cancelled.
    Cancelled,
}

/// Reconciler: moves scheduled and retrying jobs whose time has come to
/// `queued`, up to `limit`, oldest due first, and puts them in the outbox.
/// The caller publishes them. Fenced by `leader`: nothing moves unless that
/// term still holds the reconciler's leadership.
pub async fn queue_due(db: impl PgExecutor<'_>, leader: Term, limit: i64) -> Result<Vec<Enqueued>> {
    let due = sqlx::query_as!(
        Enqueued,
        r#"
        WITH moved AS (
            UPDATE jobs SET status = 'queued', message_id = NULL, updated_at = now()
            WHERE id IN (SELECT id FROM jobs WHERE status IN ('scheduled', 'retrying') AND run_at <= now()
                           AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $2
                                                              AND term = $3 AND expires_at > now())
                         ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED)
            RETURNING id, queue, priority, lane, message_id, traceparent, updated_at),
        pending AS (
            INSERT INTO outbox (job_id, created_at) SELECT id, updated_at FROM moved
            ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at)
        SELECT id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id, traceparent, updated_at AS "queued_at!" FROM moved
        "#,
        limit,
        leader.holder,
        leader.term,
    )
    .fetch_all(db)
    .await?;
    Ok(due)
}

/// Reconciler: running jobs whose lease expired (their worker died, froze or
/// lost Postgres) fail that attempt. With attempts left they are retried at
/// once (`retrying`, due now); on their last attempt they fail; a job whose
/// cancel was requested ends cancelled. Returns how many. Fenced by `leader`
/// like [`queue_due`].
pub async fn rescue_expired(db: impl PgExecutor<'_>, leader: Term, limit: i64) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        UPDATE jobs SET status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                                      WHEN attempt < max_attempts THEN 'retrying' ELSE 'failed' END,
                        run_at = now(),
                        finished_at = CASE WHEN cancel_requested_at IS NULL AND attempt < max_attempts
                                           THEN NULL ELSE now() END,
                        error = jsonb_build_object('message', 'the worker running this attempt was lost (lease expired)',
                                                   'kind', 'lease_expired', 'attempt', attempt),
                        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
        WHERE id IN (SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at < now()
                       AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $2
                                                          AND term = $3 AND expires_at > now())
                     LIMIT $1 FOR UPDATE SKIP LOCKED)
        "#,
        limit,
        leader.holder,
        leader.term,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Reconciler (lost messages): how many messages RabbitMQ should hold for
/// `queue`: its jobs queued for longer than `grace_seconds` with a confirmed
/// message (they are not in the outbox), a batch's jobs sharing a message
/// counted once, up to `cap` jobs looked at. Each of those messages should be
/// in RabbitMQ, ready or held by a worker; when fewer exist, some were lost
/// after their confirm (a purged queue, a lost node).
pub async fn confirmed_queued(db: impl PgExecutor<'_>, queue: &str, grace_seconds: i32, cap: i64) -> Result<i64> {
    let count = sqlx::query_scalar!(
        r#"
        SELECT count(DISTINCT message) AS "count!" FROM (
            SELECT coalesce(j.message_id, j.id) AS message FROM jobs j
            WHERE j.queue = $1 AND j.status = 'queued' AND j.updated_at < now() - make_interval(secs => $2)
              AND j.parked_at IS NULL AND NOT EXISTS (SELECT FROM outbox o WHERE o.job_id = j.id)
            LIMIT $3) AS confirmed
        "#,
        queue,
        f64::from(grace_seconds),
        cap,
    )
    .fetch_one(db)
    .await?;
    Ok(count)
}

/// Reconciler (lost messages): the jobs of the `limit` messages of `queue`
/// that have waited longest among those [`confirmed_queued`] counts, to be
/// published again (a batch's jobs together, as they were).
/// Lost messages are the old ones (a purge or a lost node takes everything
/// published before it; later jobs bring their own), so the oldest are the
/// ones to republish; a duplicate of a message that still exists is dropped
/// by the worker that finds its job claimed. Fenced by `leader` like [`queue_due`].
pub async fn longest_queued(
    db: impl PgExecutor<'_>,
    leader: Term,
    queue: &str,
    grace_seconds: i32,
    limit: i64,
) -> Result<Vec<Enqueued>> {
    let jobs = sqlx::query_as!(
        Enqueued,
        r#"
        WITH confirmed AS (
            SELECT j.id, j.queue, j.priority, j.lane, j.message_id, j.traceparent, j.updated_at FROM jobs j
            WHERE j.queue = $1 AND j.status = 'queued' AND j.updated_at < now() - make_interval(secs => $2)
              AND j.parked_at IS NULL AND NOT EXISTS (SELECT FROM outbox o WHERE o.job_id = j.id)
              AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $4
                                                 AND term = $5 AND expires_at > now())),
        oldest AS (
            SELECT coalesce(message_id, id) AS message FROM confirmed
            GROUP BY 1 ORDER BY min(updated_at) LIMIT $3)
        SELECT id AS "id!", queue AS "queue!", priority AS "priority!", lane AS "lane!", message_id,
               traceparent, updated_at AS "queued_at!"
        FROM confirmed WHERE coalesce(message_id, id) IN (SELECT message FROM oldest)
        ORDER BY updated_at
        "#,
        queue,
        f64::from(grace_seconds),
        limit,
        leader.holder,
        leader.term,
    )
    .fetch_all(db)
    .await?;
    Ok(jobs)
}

/// The status of a job, when it exists.
pub async fn status(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<JobStatus>> {
    let status = sqlx::query_scalar!(r#"SELECT status AS "status: JobStatus" FROM jobs WHERE id = $1"#, id)
        .fetch_optional(db)
        .await?;
    Ok(status)
}

/// Records the outcome of the run holding `lease`. Fenced: it only applies
/// while that lease is still the job's, so it returns `false` for a worker
/// whose job was rescued and claimed again meanwhile (a zombie).
pub async fn finish(db: impl PgExecutor<'_>, lease: Lease, outcome: &Outcome) -> Result<bool> {
    Ok(!finish_many(db, &[(lease, outcome)]).await?.is_empty())
}

/// Like [`finish_many`], answering for each outcome whether it was recorded;
/// when Postgres refuses the statement (not when it cannot be reached), each
/// outcome is written on its own, so that a result Postgres will not store
/// fails only its own job's write.
pub async fn finish_each_if_refused(db: &PgPool, outcomes: &[(Lease, &Outcome)]) -> Result<Vec<Result<bool>>> {
    match finish_many(db, outcomes).await {
        Ok(written) => Ok(outcomes.iter().map(|(lease, _)| Ok(written.contains(&lease.id))).collect()),
        Err(Error::Refused(_)) if outcomes.len() > 1 => {
            let mut each = Vec::with_capacity(outcomes.len());
            for (lease, outcome) in outcomes {
                each.push(finish(db, *lease, outcome).await);
            }
            Ok(each)
        }
        Err(e) => Err(e),
    }
}

/// Records many outcomes in one statement (fenced one by one like [`finish`]);
/// returns the ids whose outcome was recorded.
pub async fn finish_many(db: impl PgExecutor<'_>, outcomes: &[(Lease, &Outcome)]) -> Result<Vec<Uuid>> {
    let n = outcomes.len();
    let (mut ids, mut tokens, mut statuses) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut results, mut errors, mut retry_ats) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (lease, outcome) in outcomes {
        let (result, error, retry_at) = match outcome {
            Outcome::Succeeded(result) => (Some(result.get()), None, None),
            Outcome::Retrying { error, retry_at } => (None, Some(Json(error)), Some(*retry_at)),
            Outcome::Failed(error) | Outcome::Cancelled(error) => (None, Some(Json(error)), None),
        };
        ids.push(lease.id);
        tokens.push(lease.token);
        statuses.push(outcome.status().as_str().to_owned());
        results.push(result);
        errors.push(error);
        retry_ats.push(retry_at);
    }
    let written = sqlx::query_scalar!(
        r#"
        UPDATE jobs SET status = CASE WHEN o.status = 'retrying' AND jobs.cancel_requested_at IS NOT NULL
                                      THEN 'cancelled' ELSE o.status END,
                        result = o.result::jsonb, result_bytes = octet_length(o.result),
                        error = COALESCE(o.error, jobs.error),
                        run_at = COALESCE(o.retry_at, jobs.run_at),
                        finished_at = CASE WHEN o.status = 'retrying' AND jobs.cancel_requested_at IS NULL
                                           THEN NULL ELSE now() END,
                        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
        FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[])
             AS o(id, token, status, result, error, retry_at)
        WHERE jobs.id = o.id AND jobs.lease_token = o.token AND jobs.status = 'running'
        RETURNING jobs.id
        "#,
        &ids,
        &tokens,
        &statuses,
        &results as _,
        &errors as _,
        &retry_ats as _,
    )
    .fetch_all(db)
    .await?;
    // A retry of a job whose cancel was requested (its handler failed without
    // stopping) would run it again: the statement ends it cancelled instead.
    Ok(written)
}

/// Records a running attempt's progress (fenced like [`finish`]).
pub async fn set_progress(db: impl PgExecutor<'_>, lease: Lease, progress: i16) -> Result<bool> {
    let done = sqlx::query!(
        "UPDATE jobs SET progress = $3, updated_at = now() WHERE id = $1 AND lease_token = $2 AND status = 'running'",
        lease.id,
        lease.token,
        progress,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
