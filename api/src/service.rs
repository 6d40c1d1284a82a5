//! The job service: what the `/v1/jobs` routes do, without HTTP. A
//! submission is validated, inserted (submissions arriving together share one
//! statement, and their messages), published with a confirm, and its confirm
//! recorded; reads go through the job cache; cancels and requeues are
//! guarded moves.

use std::collections::HashMap;
use std::sync::Arc;

use shared::batch::Batcher;
use shared::config::Settings;
use shared::db::idempotency::Keyed;
use shared::db::{self, jobs};
use shared::job::{Cancel, Enqueued, Job, JobStatus, ListFilter, ListedJob, NewJob, stamp_messages};
use shared::outbox::Outbox;
use sqlx::PgPool;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::admission::Admission;
use crate::cache::{JobCache, Rendered};
use crate::caching::Freshness;
use crate::error::ApiError;
use crate::metrics::ApiMetrics;
use crate::submission::{BatchRequest, SubmitRequest, fingerprint};

/// Submissions per insert statement at most.
const INSERT_BATCH: usize = 256;

/// Job reads per statement at most.
const READ_BATCH: usize = 128;

/// Turns `true` once the publish of a submission's message is done
/// (confirmed, or failed and left to the outbox sweep).
type Published = tokio::sync::watch::Receiver<bool>;

/// A job as read for a client: rendered, with what it may assume of it.
#[derive(Debug)]
pub struct Read {
    pub rendered: Rendered,
    pub freshness: Freshness,
    /// Seconds since it was read from Postgres, when it came from memory.
    pub age: Option<u64>,
}

/// What a submission came to: its jobs, and whether they were created by an
/// earlier request with the same idempotency key.
#[derive(Debug)]
pub struct Submitted<T> {
    pub jobs: T,
    pub replayed: bool,
}

/// One page of a list.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JobPage {
    pub jobs: Vec<ListedJob>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Where a submission came from, stored with its jobs: the request's id and
/// the API's span for it (W3C `traceparent`).
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
}

pub struct JobService {
    settings: Arc<Settings>,
    pool: PgPool,
    /// Inserts submitted jobs, those arriving together in one statement, and
    /// publishes them together: they share messages (see [`stamp_messages`]).
    /// One submission's refused values fail only that submission. Each
    /// caller gets its job and a signal that its message's publish is done.
    inserter: Batcher<NewJob, db::Result<(Job, Published)>, db::Error>,
    /// Reads jobs the cache could not answer, those asked together in one
    /// statement (any tenant's: the caller checks whose it is).
    reader: Batcher<Uuid, Option<Job>, db::Error>,
    outbox: Outbox,
    cache: Arc<JobCache>,
    admission: Arc<Admission>,
    lanes: Lanes,
    metrics: Arc<ApiMetrics>,
}

/// Tenants' lanes (see [`shared::db::lanes`]), remembered: a tenant's lane
/// never changes, so each replica asks Postgres once per tenant.
struct Lanes {
    pool: PgPool,
    count: u16,
    known: std::sync::RwLock<HashMap<String, i16>>,
}

/// More tenants than this remembered and the memory starts over (tenants
/// are few; this bounds a flood of distinct JWT subjects).
const LANES_REMEMBERED: usize = 100_000;

impl Lanes {
    fn new(pool: PgPool, count: u16) -> Self {
        Self { pool, count: count.max(1), known: std::sync::RwLock::new(HashMap::new()) }
    }

    async fn of(&self, tenant: &str) -> Result<i16, ApiError> {
        if self.count == 1 {
            return Ok(0);
        }
        if let Ok(known) = self.known.read()
            && let Some(lane) = known.get(tenant)
        {
            return Ok(*lane);
        }
        let given = db::lanes::of(&self.pool, tenant).await?;
        let lane = i16::try_from(given.rem_euclid(i32::from(self.count))).unwrap_or(0);
        if let Ok(mut known) = self.known.write() {
            if known.len() >= LANES_REMEMBERED {
                known.clear();
            }
            known.insert(tenant.to_owned(), lane);
        }
        Ok(lane)
    }
}

impl JobService {
    /// A service whose batching tasks run on `tasks`.
    pub fn new(
        settings: Arc<Settings>,
        pool: PgPool,
        outbox: Outbox,
        cache: Arc<JobCache>,
        admission: Arc<Admission>,
        metrics: Arc<ApiMetrics>,
        tasks: &TaskTracker,
    ) -> Self {
        let (insert_pool, insert_outbox, publishing) = (pool.clone(), outbox.clone(), tasks.clone());
        let per_message = usize::from(settings.amqp.jobs_per_message);
        let inserter = Batcher::spawn(tasks, INSERT_BATCH, move |mut jobs: Vec<NewJob>| {
            stamp_messages(&mut jobs, per_message);
            let (pool, outbox, publishing) = (insert_pool.clone(), insert_outbox.clone(), publishing.clone());
            async move {
                let inserted = jobs::insert_each_if_refused(&pool, &jobs).await?;
                let queued =
                    queued(inserted.iter().zip(&jobs).filter_map(|(job, new)| Some((job.as_ref().ok()?, new))));
                // Published on a task of its own, so that the next insert
                // need not wait for these confirms; each caller waits for them.
                let (done, published) = tokio::sync::watch::channel(false);
                if !queued.is_empty() {
                    publishing.spawn(async move {
                        outbox.publish(queued).await;
                        let _ = done.send(true);
                    });
                }
                Ok(inserted.into_iter().map(|job| job.map(|job| (job, published.clone()))).collect())
            }
        });
        let read_pool = pool.clone();
        let reader = Batcher::spawn(tasks, READ_BATCH, move |ids: Vec<Uuid>| {
            let pool = read_pool.clone();
            async move {
                let found = jobs::get_many(&pool, None, &ids).await?;
                Ok(each_asked(&ids, found.into_iter().map(|job| (job.id, job))))
            }
        });
        let lanes = Lanes::new(pool.clone(), settings.amqp.lanes);
        Self { settings, pool, inserter, reader, outbox, cache, admission, lanes, metrics }
    }

    /// Validates, commits and publishes one submission of `tenant`. Once the
    /// row is committed the job is accepted whatever happens next: a publish
    /// that fails leaves it in the outbox, for the reconciler. With an
    /// idempotency key, a retry of an earlier submission gets its job back.
    pub async fn submit(
        &self,
        tenant: &str,
        origin: Origin,
        key: Option<String>,
        request: SubmitRequest,
    ) -> Result<Submitted<Job>, ApiError> {
        let hash = key.as_ref().map(|_| fingerprint("POST /v1/jobs", [&request]));
        let mut new_job = request.validate(&self.settings, tenant.to_owned())?;
        self.admission.admit([new_job.queue.as_str()])?;
        new_job.request_id = origin.request_id;
        new_job.traceparent = origin.traceparent;
        let lane = self.lanes.of(tenant).await?;
        new_job.lane = lane;
        let (Some(key), Some(hash)) = (key, hash) else {
            let (job, mut published) = self.inserter.call(new_job).await??;
            self.metrics.submitted(&job.queue, &job.kind);
            // Done, or its publisher gone: either way the outbox has the job.
            let _ = published.wait_for(|done| *done).await;
            return Ok(Submitted { jobs: job, replayed: false });
        };
        let submitted = self.insert_keyed(tenant, key, &hash, vec![new_job]).await?;
        let replayed = submitted.replayed;
        let job =
            submitted.jobs.into_iter().next().ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("a keyed submission of one job came back without it"))
            })?;
        Ok(Submitted { jobs: job, replayed })
    }

    /// Validates, commits and publishes a batch of `tenant`'s submissions:
    /// all of them or, when one is invalid, none. One insert statement; the
    /// publishes are pipelined on one channel.
    pub async fn submit_batch(
        &self,
        tenant: &str,
        origin: Origin,
        key: Option<String>,
        batch: BatchRequest,
    ) -> Result<Submitted<Vec<Job>>, ApiError> {
        let hash = key.as_ref().map(|_| fingerprint("POST /v1/jobs/batch", &batch.jobs));
        let mut new_jobs = batch.validate(&self.settings, tenant)?;
        self.admission.admit(new_jobs.iter().map(|job| job.queue.as_str()))?;
        let lane = self.lanes.of(tenant).await?;
        for job in &mut new_jobs {
            job.request_id.clone_from(&origin.request_id);
            job.traceparent.clone_from(&origin.traceparent);
            job.lane = lane;
        }
        stamp_messages(&mut new_jobs, usize::from(self.settings.amqp.jobs_per_message));
        if let (Some(key), Some(hash)) = (key, hash) {
            return self.insert_keyed(tenant, key, &hash, new_jobs).await;
        }
        let created = jobs::insert_many(&self.pool, &new_jobs).await?;
        self.publish(&created, &new_jobs).await;
        Ok(Submitted { jobs: created, replayed: false })
    }

    /// Inserts `jobs` under idempotency key `key` in one transaction and
    /// publishes them; or, when the key was used before by the same request
    /// (`hash`), returns what that request created, as it is now.
    async fn insert_keyed(
        &self,
        tenant: &str,
        key: String,
        hash: &[u8; 32],
        mut jobs: Vec<NewJob>,
    ) -> Result<Submitted<Vec<Job>>, ApiError> {
        for job in &mut jobs {
            job.idempotency_key = Some(key.clone());
        }
        let ttl = i64::try_from(self.settings.jobs.idempotency_ttl_seconds).unwrap_or(i64::MAX);
        match db::idempotency::submit(&self.pool, tenant, &key, hash, ttl, &jobs).await? {
            Keyed::Created(created) => {
                self.publish(&created, &jobs).await;
                Ok(Submitted { jobs: created, replayed: false })
            }
            Keyed::Replayed(ids) => {
                let earlier = jobs::get_many(&self.pool, Some(tenant), &ids).await?;
                if earlier.len() != ids.len() {
                    return Err(ApiError::Conflict(format!(
                        "Idempotency-Key {key:?} was used for jobs that have since been deleted; use a new key"
                    )));
                }
                Ok(Submitted { jobs: earlier, replayed: true })
            }
            Keyed::Conflict => Err(ApiError::Conflict(format!(
                "Idempotency-Key {key:?} was already used for a different request; use a new key for a new request"
            ))),
        }
    }

    /// Counts the jobs just inserted as submitted, and publishes the queued
    /// ones (`inserted`, from `submitted` in the same order).
    async fn publish(&self, inserted: &[Job], submitted: &[NewJob]) {
        for job in inserted {
            self.metrics.submitted(&job.queue, &job.kind);
        }
        let queued = queued(inserted.iter().zip(submitted));
        if !queued.is_empty() {
            self.outbox.publish(queued).await;
        }
    }

    /// One of `tenant`'s jobs, from memory when it was read recently and has
    /// not changed since (see [`crate::cache`]). Another tenant's job is "not
    /// found", exactly like a job that does not exist: its existence is not
    /// revealed.
    pub async fn read(&self, tenant: &str, id: Uuid) -> Result<Read, ApiError> {
        let max_age = self.settings.http.ended_cache_seconds;
        let ticket = match self.cache.get(id) {
            Ok(entry) if entry.tenant == tenant => {
                self.metrics.ended_cache(true);
                return Ok(Read {
                    rendered: entry.rendered.clone(),
                    freshness: entry.freshness,
                    age: Some(entry.age()),
                });
            }
            Ok(_) => return Err(not_found(id)),
            Err(ticket) => ticket,
        };
        self.metrics.ended_cache(false);
        let job = self.get(tenant, id).await?;
        let rendered = Rendered::of(&job)
            .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context(format!("rendering job {id}"))))?;
        let freshness = Freshness::of(&job, max_age);
        self.cache.insert(ticket, id, tenant, rendered.clone(), freshness);
        Ok(Read { rendered, freshness, age: None })
    }

    async fn get(&self, tenant: &str, id: Uuid) -> Result<Job, ApiError> {
        self.reader.call(id).await?.filter(|job| job.tenant == tenant).ok_or_else(|| not_found(id))
    }

    /// Cancels one of `tenant`'s jobs: scheduled, queued and retrying jobs at
    /// once; a running one is asked to stop (its worker tells the handler).
    pub async fn cancel(&self, tenant: &str, id: Uuid) -> Result<Job, ApiError> {
        let cancelled = jobs::cancel(&self.pool, tenant, id).await?;
        // Other replicas hear of it from Postgres; this one must not answer the
        // caller's next GET from a cache the notification has not reached yet.
        self.cache.forget([id]);
        match cancelled {
            Cancel::Cancelled(job) | Cancel::Requested(job) => Ok(job),
            Cancel::Terminal(job) => Err(ApiError::Conflict(format!(
                "job {id} has already ended: {}; a failed or cancelled job can be requeued (POST /v1/jobs/{id}/requeue)",
                job.status
            ))),
            Cancel::NotFound => Err(not_found(id)),
            Cancel::KeptChanging => Err(ApiError::Conflict(format!(
                "job {id} kept changing state while being cancelled; retry the request"
            ))),
        }
    }

    /// Puts one of `tenant`'s failed or cancelled jobs back in its queue,
    /// attempts restarted.
    pub async fn requeue(&self, tenant: &str, id: Uuid) -> Result<Job, ApiError> {
        let Some(moved) = jobs::requeue_one(&self.pool, tenant, id).await? else {
            let job = self.get(tenant, id).await?;
            return Err(ApiError::Conflict(format!(
                "job {id} is {}; only failed or cancelled jobs can be requeued",
                job.status
            )));
        };
        // As for a cancel.
        self.cache.clear();
        self.outbox.publish(vec![moved]).await;
        self.get(tenant, id).await
    }

    /// A page of `tenant`'s jobs, newest first.
    /// A page of `tenant`'s jobs, newest first, within `http.list_page_bytes`
    /// of payload and result text (see [`fit`]).
    pub async fn list(&self, tenant: &str, filter: &ListFilter, limit: i64) -> Result<JobPage, ApiError> {
        let budget = self.settings.http.list_page_bytes;
        let inline = i32::try_from(budget / 16).unwrap_or(i32::MAX);
        // One row more than asked tells whether another page exists.
        let mut jobs = jobs::list(&self.pool, Some(tenant), filter, limit + 1, inline).await?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        fit(&mut jobs, budget);
        let next_cursor = if more { jobs.last().map(|job| job.id.to_string()) } else { None };
        Ok(JobPage { jobs, next_cursor })
    }
}

/// Keeps a page's payloads and results within `budget` bytes of text, newest
/// job first: a field not read for its size (over a sixteenth of the budget),
/// or one that no longer fits, is left out and named in its item's `omitted`.
fn fit(jobs: &mut [ListedJob], budget: usize) {
    let mut spent = 0usize;
    for job in jobs {
        let sizes =
            [("payload", job.payload_bytes, job.payload.is_some()), ("result", job.result_bytes, job.result.is_some())];
        for (field, bytes, read) in sizes {
            let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
            let exists = read || bytes > 0;
            if !exists {
                continue;
            }
            if read && spent.saturating_add(bytes) <= budget {
                spent += bytes;
            } else {
                job.omit(field);
            }
        }
    }
}

/// What to publish of jobs just inserted (each with the submission it came
/// from): the queued ones, in their lane and the message they were stamped
/// with, with their request's `traceparent`.
fn queued<'a>(inserted: impl IntoIterator<Item = (&'a Job, &'a NewJob)>) -> Vec<Enqueued> {
    inserted
        .into_iter()
        .filter(|(job, _)| job.status == JobStatus::Queued)
        .map(|(job, new)| Enqueued::of(job, new.lane, new.message_id, new.traceparent.as_deref()))
        .collect()
}

/// An answer per id asked, in order, from the jobs found (each once): an id
/// asked twice in one batch gets the job twice.
fn each_asked<T: Clone>(ids: &[Uuid], found: impl IntoIterator<Item = (Uuid, T)>) -> Vec<Option<T>> {
    let mut asked: HashMap<Uuid, usize> = HashMap::with_capacity(ids.len());
    for id in ids {
        *asked.entry(*id).or_default() += 1;
    }
    let mut found: HashMap<Uuid, T> = found.into_iter().collect();
    ids.iter()
        .map(|id| {
            let left = asked.get_mut(id)?;
            *left -= 1;
            if *left == 0 { found.remove(id) } else { found.get(id).cloned() }
        })
        .collect()
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no job {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_id_asked_gets_its_answer_even_when_asked_twice() {
        let (a, b, missing) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let answers = each_asked(&[b, missing, a, b], [(a, "a"), (b, "b")]);
        assert_eq!(answers, [Some("b"), None, Some("a"), Some("b")]);
    }
}
