//! Every query on `jobs`. Each status move is one guarded `UPDATE … WHERE
//! status = <expected> [AND attempt = <fence>]`, so two actors racing for the
//! same job cannot both win, and a stale worker cannot overwrite a newer attempt.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::leadership::Term;
use crate::job::{Job, JobFailure, JobStatus, NewJob};

/// The columns of [`Job`], in one place for every query that returns jobs.
macro_rules! job_columns {
    () => {
        "id, tenant, queue, type, payload, status, priority, attempt, max_attempts, \
         timeout_seconds, run_at, progress, result, error, idempotency_key, request_id, \
         requeue_count, cancel_requested_at, created_at, started_at, finished_at, updated_at"
    };
}

/// Inserts a job: `scheduled` when its `run_at` is in the future (by the
/// database's clock, the only one all replicas share), else `queued`.
pub async fn insert(db: impl PgExecutor<'_>, job: &NewJob) -> sqlx::Result<Job> {
    insert_many(db, std::slice::from_ref(job)).await?.pop().ok_or(sqlx::Error::RowNotFound)
}

/// Inserts many jobs in one statement (see [`insert`]); returns them in the
/// order given.
pub async fn insert_many(db: impl PgExecutor<'_>, jobs: &[NewJob]) -> sqlx::Result<Vec<Job>> {
    let inserted: Vec<Job> = sqlx::query_as(concat!(
        "WITH inserted AS (\
         INSERT INTO jobs (id, tenant, queue, type, payload, status, priority, max_attempts, \
                           timeout_seconds, run_at, idempotency_key, request_id) \
         SELECT id, tenant, queue, type, payload, \
                CASE WHEN run_at > now() THEN 'scheduled' ELSE 'queued' END, \
                priority, max_attempts, timeout_seconds, COALESCE(run_at, now()), idempotency_key, request_id \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int2[], $7::int4[], \
                     $8::int4[], $9::timestamptz[], $10::text[], $11::text[]) \
              AS t(id, tenant, queue, type, payload, priority, max_attempts, timeout_seconds, run_at, \
                   idempotency_key, request_id) \
         RETURNING ",
        job_columns!(),
        "), pending AS (INSERT INTO outbox (job_id, created_at) \
                         SELECT id, updated_at FROM inserted WHERE status = 'queued') \
         SELECT * FROM inserted"
    ))
    .bind(jobs.iter().map(|j| j.id).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.tenant.as_str()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.queue.as_str()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.kind.as_str()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| Json(&j.payload)).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.priority).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.timeout_seconds).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.run_at).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.idempotency_key.as_deref()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.request_id.as_deref()).collect::<Vec<_>>())
    .fetch_all(db)
    .await?;
    // RETURNING does not promise the input's order.
    let mut by_id: HashMap<Uuid, Job> = inserted.into_iter().map(|job| (job.id, job)).collect();
    jobs.iter().map(|job| by_id.remove(&job.id).ok_or(sqlx::Error::RowNotFound)).collect()
}

/// Like [`insert_many`], but when Postgres refuses the statement (not when it
/// cannot be reached), each job is inserted on its own: a value one
/// submission got past validation must fail that submission only, not the
/// others of its batch (other tenants' among them).
pub async fn insert_each_if_refused(db: &PgPool, jobs: &[NewJob]) -> sqlx::Result<Vec<sqlx::Result<Job>>> {
    match insert_many(db, jobs).await {
        Ok(inserted) => Ok(inserted.into_iter().map(Ok).collect()),
        Err(e) if jobs.len() > 1 && !super::unavailable(&e) => {
            let mut each = Vec::with_capacity(jobs.len());
            for job in jobs {
                each.push(insert(db, job).await);
            }
            Ok(each)
        }
        Err(e) => Err(e),
    }
}

/// Records that RabbitMQ confirmed these jobs' messages, taking them out of
/// the outbox the reconciler sweeps. A confirm removes only the row of the
/// queued stint it was published for: a late confirm must not take out a job
/// queued again since (requeued, handed back), whose new message may yet fail.
pub async fn mark_published(db: impl PgExecutor<'_>, published: &[OutboxRow]) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM outbox o USING UNNEST($1::uuid[], $2::timestamptz[]) AS c(job_id, queued_at) \
         WHERE o.job_id = c.job_id AND o.created_at = c.queued_at",
    )
    .bind(published.iter().map(|row| row.job_id).collect::<Vec<_>>())
    .bind(published.iter().map(|row| row.queued_at).collect::<Vec<_>>())
    .execute(db)
    .await?;
    Ok(())
}

/// A job's row in the outbox: which job, and which queued stint of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxRow {
    pub job_id: Uuid,
    pub queued_at: DateTime<Utc>,
}

/// A queued job whose message must be published.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Enqueued {
    pub id: Uuid,
    pub queue: String,
    pub priority: i16,
    /// When the statement that queued it ran (the job's `updated_at` then, and
    /// its outbox row's `created_at`): tells this queued stint from later ones.
    pub queued_at: DateTime<Utc>,
}

impl Enqueued {
    pub fn outbox_row(&self) -> OutboxRow {
        OutboxRow { job_id: self.id, queued_at: self.queued_at }
    }
}

impl From<&Job> for Enqueued {
    /// A job as returned by the statement that queued it.
    fn from(job: &Job) -> Self {
        Self { id: job.id, queue: job.queue.clone(), priority: job.priority, queued_at: job.updated_at }
    }
}

/// What a requeue does to a failed or cancelled job: back to `queued` with the
/// attempt count restarted and the result cleared. The last error stays, so
/// an operator can still see why it failed before.
macro_rules! requeue_set {
    () => {
        "SET status = 'queued', attempt = 0, requeue_count = requeue_count + 1, run_at = now(), \
             started_at = NULL, finished_at = NULL, result = NULL, progress = NULL, \
             cancel_requested_at = NULL, updated_at = now()"
    };
}

/// Wraps an `UPDATE` that makes jobs queued: the same statement puts them in
/// the outbox, so a queued job always has a confirmed message or an outbox
/// row. The statement returns the moved jobs as [`Enqueued`].
macro_rules! queued_into_outbox {
    ($update:expr) => {
        concat!("WITH moved AS (", $update, outbox_tail!())
    };
}

/// The part of [`queued_into_outbox!`] after the `UPDATE`.
macro_rules! outbox_tail {
    () => {
        " RETURNING id, queue, priority, updated_at AS queued_at), \
         pending AS (INSERT INTO outbox (job_id, created_at) SELECT id, queued_at FROM moved \
                     ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at) \
         SELECT id, queue, priority, queued_at FROM moved"
    };
}

/// Requeues these jobs where they are failed or cancelled (and belong to
/// `tenant`, when given). Returns those it moved.
pub async fn requeue(db: impl PgExecutor<'_>, tenant: Option<&str>, ids: &[Uuid]) -> sqlx::Result<Vec<Enqueued>> {
    sqlx::query_as(queued_into_outbox!(concat!(
        "UPDATE jobs ",
        requeue_set!(),
        " WHERE id = ANY($1) AND status IN ('failed', 'cancelled') AND ($2::text IS NULL OR tenant = $2)"
    )))
    .bind(ids)
    .bind(tenant)
    .fetch_all(db)
    .await
}

/// Which jobs a bulk requeue (or its dry run) takes.
#[derive(Debug, Clone)]
pub struct RequeueFilter {
    /// `failed` or `cancelled`.
    pub status: JobStatus,
    pub kind: Option<String>,
    pub queue: Option<String>,
    pub tenant: Option<String>,
    /// Only jobs that finished at or after this time.
    pub finished_since: Option<DateTime<Utc>>,
}

fn requeue_candidates(sql: &mut QueryBuilder<Postgres>, filter: &RequeueFilter, after: Option<Uuid>, limit: i64) {
    sql.push("SELECT id FROM jobs WHERE status = ").push_bind(filter.status.as_str());
    if let Some(kind) = &filter.kind {
        sql.push(" AND type = ").push_bind(kind);
    }
    if let Some(queue) = &filter.queue {
        sql.push(" AND queue = ").push_bind(queue);
    }
    if let Some(tenant) = &filter.tenant {
        sql.push(" AND tenant = ").push_bind(tenant);
    }
    if let Some(since) = filter.finished_since {
        sql.push(" AND finished_at >= ").push_bind(since);
    }
    if let Some(after) = after {
        sql.push(" AND id > ").push_bind(after);
    }
    sql.push(" ORDER BY id LIMIT ").push_bind(limit);
}

/// The ids of up to `limit` jobs matching `filter` after `after`, in id order:
/// one page of a dry run.
pub async fn requeue_preview(
    db: impl PgExecutor<'_>,
    filter: &RequeueFilter,
    after: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    let mut sql = QueryBuilder::new("");
    requeue_candidates(&mut sql, filter, after, limit);
    sql.build_query_scalar().fetch_all(db).await
}

/// Requeues up to `limit` jobs matching `filter` after `after`, in one short
/// statement; callers loop over batches so that no transaction grows with
/// the number of jobs. Rows another transaction holds are skipped, not waited for.
pub async fn requeue_batch(
    db: impl PgExecutor<'_>,
    filter: &RequeueFilter,
    after: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<Enqueued>> {
    let mut sql = QueryBuilder::new(concat!("WITH moved AS (UPDATE jobs ", requeue_set!(), " WHERE id IN ("));
    requeue_candidates(&mut sql, filter, after, limit);
    sql.push(" FOR UPDATE SKIP LOCKED) AND status IN ('failed', 'cancelled')");
    sql.push(outbox_tail!());
    sql.build_query_as().fetch_all(db).await
}

/// The result of asking to cancel a job.
#[derive(Debug)]
pub enum Cancel {
    /// It was scheduled, queued or retrying, and is now cancelled.
    Cancelled(Job),
    /// It is running; its worker has been asked to stop it.
    Requested(Job),
    /// It had already ended.
    Terminal(Job),
    NotFound,
}

/// Cancels one of `tenant`'s jobs: at once unless it is running, in which case
/// the request is recorded for its worker.
pub async fn cancel(db: &sqlx::PgPool, tenant: &str, id: Uuid) -> sqlx::Result<Cancel> {
    // A job can move between our statements (queued -> running, running ->
    // retrying); each pass re-reads, and a few passes always settle it.
    for _ in 0..3 {
        let cancelled: Option<Job> = sqlx::query_as(concat!(
            "UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(), \
                             error = jsonb_build_object('message', 'cancelled by request', 'kind', 'cancelled', \
                                                        'attempt', attempt) \
             WHERE id = $1 AND tenant = $2 AND status IN ('scheduled', 'queued', 'retrying') RETURNING ",
            job_columns!()
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(db)
        .await?;
        if let Some(job) = cancelled {
            return Ok(Cancel::Cancelled(job));
        }
        let requested: Option<Job> = sqlx::query_as(concat!(
            "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now() \
             WHERE id = $1 AND tenant = $2 AND status = 'running' RETURNING ",
            job_columns!()
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(db)
        .await?;
        if let Some(job) = requested {
            // Wake the worker running it now rather than at its next heartbeat.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::CANCEL_CHANNEL)
                .bind(id.to_string())
                .execute(db)
                .await?;
            return Ok(Cancel::Requested(job));
        }
        match get(db, tenant, id).await? {
            Some(job) if job.status.is_terminal() => return Ok(Cancel::Terminal(job)),
            Some(_) => continue,
            None => return Ok(Cancel::NotFound),
        }
    }
    Err(sqlx::Error::Protocol("the job kept changing state while being cancelled".into()))
}

/// One of `tenant`'s jobs; another tenant's id is simply not found.
pub async fn get(db: impl PgExecutor<'_>, tenant: &str, id: Uuid) -> sqlx::Result<Option<Job>> {
    get_scoped(db, Some(tenant), id).await
}

/// A job of `tenant`, or of any tenant when `None` (operators).
pub async fn get_scoped(db: impl PgExecutor<'_>, tenant: Option<&str>, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"))
        .bind(id)
        .bind(tenant)
        .fetch_optional(db)
        .await
}

/// The statuses of those of `ids` that exist.
pub async fn statuses(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<Vec<(Uuid, JobStatus)>> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM jobs WHERE id = ANY($1)").bind(ids).fetch_all(db).await?;
    rows.into_iter()
        .map(|(id, status)| Ok((id, status.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?)))
        .collect()
}

/// Deletes up to `limit` jobs in `statuses` that finished before `before`,
/// in one statement; callers loop until it returns less than `limit`.
///
/// Ids are UUIDv7, so every job finished before `before` was also created
/// before it: bounding `id` by `before`'s smallest v7 id turns the search into
/// a range scan of the primary key, with no index on `finished_at` to maintain.
pub async fn prune_batch(
    db: impl PgExecutor<'_>,
    statuses: &[JobStatus],
    before: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<u64> {
    let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
    let done = sqlx::query(
        "DELETE FROM jobs WHERE id IN (\
            SELECT id FROM jobs WHERE id < $1 AND status = ANY($2) AND finished_at < $3 LIMIT $4 \
            FOR UPDATE SKIP LOCKED)",
    )
    .bind(crate::job::first_id_at(before))
    .bind(&statuses)
    .bind(before)
    .bind(limit)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// How many jobs [`prune_batch`] would delete.
pub async fn prune_count(db: impl PgExecutor<'_>, statuses: &[JobStatus], before: DateTime<Utc>) -> sqlx::Result<i64> {
    let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id < $1 AND status = ANY($2) AND finished_at < $3")
        .bind(crate::job::first_id_at(before))
        .bind(&statuses)
        .bind(before)
        .fetch_one(db)
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

/// A page of jobs, newest first: `tenant`'s, or every tenant's when `None` (operators).
///
/// The SQL is assembled per combination of filters rather than written as
/// `($2 IS NULL OR status = $2)`, because Postgres plans the latter once for
/// all values and then cannot use the status index.
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant: Option<&str>,
    filter: &ListFilter,
    limit: i64,
) -> sqlx::Result<Vec<Job>> {
    let mut sql = QueryBuilder::<Postgres>::new(concat!("SELECT ", job_columns!(), " FROM jobs WHERE true"));
    if let Some(tenant) = tenant {
        sql.push(" AND tenant = ").push_bind(tenant);
    }
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
    /// Fresh at every claim; every later write about this run must present it.
    pub lease_token: Uuid,
}

/// Claims a queued job for `worker`: queued → running, attempt + 1, a fresh
/// lease token, and a lease of `lease_seconds` (renewed by the worker's
/// heartbeat). `None` when the job is not queued (already claimed, ended,
/// cancelled) or does not exist.
pub async fn claim(
    db: impl PgExecutor<'_>,
    id: Uuid,
    worker: Uuid,
    lease_seconds: i32,
) -> sqlx::Result<Option<Claimed>> {
    Ok(claim_many(db, &[id], worker, lease_seconds).await?.pop())
}

/// Claims every one of `ids` that is queued, in one statement (see [`claim`]).
pub async fn claim_many(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    worker: Uuid,
    lease_seconds: i32,
) -> sqlx::Result<Vec<Claimed>> {
    sqlx::query_as(
        "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = now(), \
                         updated_at = now(), progress = NULL, lease_owner = $2, lease_token = gen_random_uuid(), \
                         lease_expires_at = now() + make_interval(secs => $3) \
         WHERE id = ANY($1) AND status = 'queued' \
         RETURNING id, tenant, queue, type, payload, attempt, max_attempts, timeout_seconds, request_id, lease_token",
    )
    .bind(ids)
    .bind(worker)
    .bind(lease_seconds)
    .fetch_all(db)
    .await
}

/// A running job's lease, as its worker holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: Uuid,
    pub token: Uuid,
}

/// Extends the leases a worker still holds by `lease_seconds`. Returns, for
/// each lease still held, whether a client asked to cancel the job; a lease
/// missing from the answer is lost (expired and rescued, or the job ended).
pub async fn renew(db: impl PgExecutor<'_>, leases: &[Lease], lease_seconds: i32) -> sqlx::Result<Vec<(Uuid, bool)>> {
    let ids: Vec<Uuid> = leases.iter().map(|l| l.id).collect();
    let tokens: Vec<Uuid> = leases.iter().map(|l| l.token).collect();
    sqlx::query_as(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3) \
         FROM UNNEST($1::uuid[], $2::uuid[]) AS held(id, token) \
         WHERE jobs.id = held.id AND jobs.lease_token = held.token AND jobs.status = 'running' \
         RETURNING jobs.id, jobs.cancel_requested_at IS NOT NULL",
    )
    .bind(ids)
    .bind(tokens)
    .bind(lease_seconds)
    .fetch_all(db)
    .await
}

/// Hands a running job back, unfinished, when its worker shuts down: queued
/// again, the interrupted attempt not counted (it was not the job's fault).
/// `None` if the lease is no longer held.
pub async fn release(db: impl PgExecutor<'_>, lease: Lease) -> sqlx::Result<Option<Enqueued>> {
    sqlx::query_as(queued_into_outbox!(
        "UPDATE jobs SET status = 'queued', attempt = attempt - 1, started_at = NULL, progress = NULL, \
                         lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND lease_token = $2 AND status = 'running'"
    ))
    .bind(lease.id)
    .bind(lease.token)
    .fetch_optional(db)
    .await
}

/// Reconciler: moves scheduled and retrying jobs whose time has come to
/// `queued`, up to `limit`, oldest due first, and puts them in the outbox.
/// The caller publishes them. Fenced by `leader`: nothing moves unless that
/// term still holds the reconciler's leadership.
pub async fn queue_due(db: impl PgExecutor<'_>, leader: Term, limit: i64) -> sqlx::Result<Vec<Enqueued>> {
    sqlx::query_as(
        "WITH moved AS ( \
             UPDATE jobs SET status = 'queued', updated_at = now() \
             WHERE id IN (SELECT id FROM jobs WHERE status IN ('scheduled', 'retrying') AND run_at <= now() \
                            AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $2 \
                                                               AND term = $3 AND expires_at > now()) \
                          ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, queue, priority, updated_at AS queued_at), \
         pending AS (INSERT INTO outbox (job_id, created_at) SELECT id, queued_at FROM moved \
                     ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at) \
         SELECT id, queue, priority, queued_at FROM moved",
    )
    .bind(limit)
    .bind(leader.holder)
    .bind(leader.term)
    .fetch_all(db)
    .await
}

/// Reconciler: running jobs whose lease expired (their worker died, froze or
/// lost Postgres) fail that attempt. With attempts left they are retried at
/// once (`retrying`, due now); on their last attempt they fail. Returns how
/// many. Fenced by `leader` like [`queue_due`].
pub async fn rescue_expired(db: impl PgExecutor<'_>, leader: Term, limit: i64) -> sqlx::Result<u64> {
    let done = sqlx::query(
        // A job whose cancel was requested is not retried: it ends cancelled.
        "UPDATE jobs SET status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
                                       WHEN attempt < max_attempts THEN 'retrying' ELSE 'failed' END, \
                         run_at = now(), \
                         finished_at = CASE WHEN cancel_requested_at IS NULL AND attempt < max_attempts \
                                            THEN NULL ELSE now() END, \
                         error = jsonb_build_object('message', 'the worker running this attempt was lost (lease expired)', \
                                                    'kind', 'lease_expired', 'attempt', attempt), \
                         lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id IN (SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at < now() \
                        AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $2 \
                                                           AND term = $3 AND expires_at > now()) \
                      LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind(limit)
    .bind(leader.holder)
    .bind(leader.term)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Reconciler (outbox): the `limit` oldest outbox rows older than
/// `grace_seconds` (so as not to race the API's own publish). Those of jobs
/// still queued are returned, to be published again; the others (cancelled
/// before their publish was confirmed, deleted) are dropped in the same
/// statement. Bounded by `limit` however large the outbox has grown (a long
/// broker outage), since it reads the oldest rows by their index. Fenced by
/// `leader` like [`queue_due`].
pub async fn unpublished(
    db: impl PgExecutor<'_>,
    leader: Term,
    grace_seconds: i32,
    limit: i64,
) -> sqlx::Result<Vec<Enqueued>> {
    sqlx::query_as(
        "WITH oldest AS ( \
             SELECT o.job_id, o.created_at, j.status, j.queue, j.priority \
             FROM outbox o LEFT JOIN jobs j ON j.id = o.job_id \
             WHERE o.created_at < now() - make_interval(secs => $1) \
               AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $3 \
                                                  AND term = $4 AND expires_at > now()) \
             ORDER BY o.created_at LIMIT $2), \
         settled AS ( \
             DELETE FROM outbox o USING oldest \
             WHERE o.job_id = oldest.job_id AND o.created_at = oldest.created_at \
               AND oldest.status IS DISTINCT FROM 'queued') \
         SELECT job_id AS id, queue, priority, created_at AS queued_at FROM oldest WHERE status = 'queued'",
    )
    .bind(grace_seconds)
    .bind(limit)
    .bind(leader.holder)
    .bind(leader.term)
    .fetch_all(db)
    .await
}

/// Reconciler (lost messages): how many of `queue`'s jobs have been queued
/// for longer than `grace_seconds` with a confirmed message (they are not in
/// the outbox), counted up to `cap`. Each of them should have a message in
/// RabbitMQ, ready or held by a worker; when fewer messages exist than this,
/// some were lost after their confirm (a purged queue, a lost node).
pub async fn confirmed_queued(db: impl PgExecutor<'_>, queue: &str, grace_seconds: i32, cap: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM ( \
             SELECT FROM jobs j \
             WHERE j.queue = $1 AND j.status = 'queued' AND j.updated_at < now() - make_interval(secs => $2) \
               AND NOT EXISTS (SELECT FROM outbox o WHERE o.job_id = j.id) \
             LIMIT $3) AS confirmed",
    )
    .bind(queue)
    .bind(grace_seconds)
    .bind(cap)
    .fetch_one(db)
    .await
}

/// Reconciler (lost messages): the `limit` jobs of `queue` that have waited
/// longest among those [`confirmed_queued`] counts, to be published again.
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
) -> sqlx::Result<Vec<Enqueued>> {
    sqlx::query_as(
        "SELECT id, queue, priority, updated_at AS queued_at FROM jobs j \
         WHERE j.queue = $1 AND j.status = 'queued' AND j.updated_at < now() - make_interval(secs => $2) \
           AND NOT EXISTS (SELECT FROM outbox o WHERE o.job_id = j.id) \
           AND EXISTS (SELECT FROM leaders WHERE name = 'reconciler' AND holder = $4 \
                                              AND term = $5 AND expires_at > now()) \
         ORDER BY j.updated_at LIMIT $3",
    )
    .bind(queue)
    .bind(grace_seconds)
    .bind(limit)
    .bind(leader.holder)
    .bind(leader.term)
    .fetch_all(db)
    .await
}

/// The status of a job, when it exists.
pub async fn status(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<JobStatus>> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1").bind(id).fetch_optional(db).await?;
    status.map(|s| s.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))).transpose()
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

/// Records the outcome of the run holding `lease`. Fenced: it only applies
/// while that lease is still the job's, so it returns `false` for a worker
/// whose job was rescued and claimed again meanwhile (a zombie).
pub async fn finish(db: impl PgExecutor<'_>, lease: Lease, outcome: &Outcome) -> sqlx::Result<bool> {
    Ok(!finish_many(db, &[(lease, outcome)]).await?.is_empty())
}

/// Like [`finish_many`], answering for each outcome whether it was recorded;
/// when Postgres refuses the statement (not when it cannot be reached), each
/// outcome is written on its own, so that a result Postgres will not store
/// fails only its own job's write.
pub async fn finish_each_if_refused(
    db: &PgPool,
    outcomes: &[(Lease, &Outcome)],
) -> sqlx::Result<Vec<sqlx::Result<bool>>> {
    match finish_many(db, outcomes).await {
        Ok(written) => Ok(outcomes.iter().map(|(lease, _)| Ok(written.contains(&lease.id))).collect()),
        Err(e) if outcomes.len() > 1 && !super::unavailable(&e) => {
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
pub async fn finish_many(db: impl PgExecutor<'_>, outcomes: &[(Lease, &Outcome)]) -> sqlx::Result<Vec<Uuid>> {
    let n = outcomes.len();
    let (mut ids, mut tokens, mut statuses) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut results, mut errors, mut retry_ats) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (lease, outcome) in outcomes {
        let (result, error, retry_at) = match outcome {
            Outcome::Succeeded(result) => (Some(Json(result)), None, None),
            Outcome::Retrying { error, retry_at } => (None, Some(Json(error)), Some(*retry_at)),
            Outcome::Failed(error) | Outcome::Cancelled(error) => (None, Some(Json(error)), None),
        };
        ids.push(lease.id);
        tokens.push(lease.token);
        statuses.push(outcome.status().as_str());
        results.push(result);
        errors.push(error);
        retry_ats.push(retry_at);
    }
    sqlx::query_scalar(
        // A retry of a job whose cancel was requested (its handler failed
        // without stopping) would run it again: it ends cancelled instead.
        "UPDATE jobs SET status = CASE WHEN o.status = 'retrying' AND jobs.cancel_requested_at IS NOT NULL \
                                       THEN 'cancelled' ELSE o.status END, \
                         result = o.result, error = COALESCE(o.error, jobs.error), \
                         run_at = COALESCE(o.retry_at, jobs.run_at), \
                         finished_at = CASE WHEN o.status = 'retrying' AND jobs.cancel_requested_at IS NULL \
                                            THEN NULL ELSE now() END, \
                         lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now() \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[], $6::timestamptz[]) \
              AS o(id, token, status, result, error, retry_at) \
         WHERE jobs.id = o.id AND jobs.lease_token = o.token AND jobs.status = 'running' \
         RETURNING jobs.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(statuses)
    .bind(results)
    .bind(errors)
    .bind(retry_ats)
    .fetch_all(db)
    .await
}

/// Records a running attempt's progress (fenced like [`finish`]).
pub async fn set_progress(db: impl PgExecutor<'_>, lease: Lease, progress: i16) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET progress = $3, updated_at = now() \
         WHERE id = $1 AND lease_token = $2 AND status = 'running'",
    )
    .bind(lease.id)
    .bind(lease.token)
    .bind(progress)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
