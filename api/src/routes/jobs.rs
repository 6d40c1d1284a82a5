//! `/v1/jobs`: submit, fetch and list jobs.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use shared::config::Settings;
use shared::db::jobs::{self, Cancel, Enqueued, ListFilter};
use shared::job::{Job, JobStatus, MAX_PRIORITY, NewJob};
use shared::{kinds, outbox};
use uuid::Uuid;

use super::RequestId;
use crate::auth::{Caller, Scope};
use crate::body::read_json;
use crate::cache::Rendered;
use crate::error::{ApiError, FieldProblem};
use crate::startup::AppState;

/// The body of `POST /v1/jobs`. Only `type` is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    #[serde(rename = "type")]
    pub kind: String,
    pub payload: Option<Value>,
    pub queue: Option<String>,
    pub priority: Option<i64>,
    pub max_attempts: Option<i64>,
    pub timeout_seconds: Option<i64>,
    pub run_at: Option<DateTime<Utc>>,
    pub delay_seconds: Option<u64>,
}

/// The path of the first string (or key) in `value` holding U+0000.
fn nul_in(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_owned()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| nul_in(item, &format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(key, field)| {
            let here = format!("{path}.{key}");
            if key.contains('\0') { Some(here) } else { nul_in(field, &here) }
        }),
        _ => None,
    }
}

/// Longest `delay_seconds` accepted: a year. Further out is a mistake, not a schedule.
const MAX_DELAY_SECONDS: u64 = 366 * 24 * 3600;

impl SubmitRequest {
    /// Checks every field against the job type and the configuration, reporting
    /// all problems at once.
    pub fn validate(self, settings: &Settings, tenant: String) -> Result<NewJob, ApiError> {
        let mut problems = Vec::new();
        let kind = kinds::find(&self.kind);
        if kind.is_none() {
            let known: Vec<_> = kinds::KINDS.iter().map(|k| k.name).collect();
            problems.push(FieldProblem::new("type", format!("unknown job type; known: {}", known.join(", "))));
        }
        let payload = self.payload.unwrap_or_else(|| Value::Object(Map::new()));
        if !payload.is_object() {
            problems.push(FieldProblem::new("payload", "must be a JSON object"));
        } else if let Some(path) = nul_in(&payload, "payload") {
            // Postgres' jsonb cannot store U+0000; say so now rather than fail the insert.
            problems.push(FieldProblem::new(path, "contains U+0000, which cannot be stored; remove or escape it"));
        } else if let Some(kind) = kind
            && let Err(e) = kind.validate(&payload)
        {
            let field = if e.path.is_empty() { "payload".to_owned() } else { format!("payload.{}", e.path) };
            problems.push(FieldProblem::new(field, e.message));
        }
        let queue = self.queue.unwrap_or_else(|| "default".to_owned());
        if !settings.queues.contains_key(&queue) {
            let known: Vec<_> = settings.queues.keys().map(String::as_str).collect();
            problems.push(FieldProblem::new("queue", format!("unknown queue; known: {}", known.join(", "))));
        }
        let mut bounded = |field: &str, value: Option<i64>, default: i32, (min, max): (i64, i64)| {
            let value = value.unwrap_or(i64::from(default));
            if (min..=max).contains(&value) {
                // In range, so the conversion is lossless.
                i32::try_from(value).unwrap_or(default)
            } else {
                problems.push(FieldProblem::new(field, format!("must be between {min} and {max}")));
                default
            }
        };
        let jobs = &settings.jobs;
        let priority = bounded("priority", self.priority, 0, (0, i64::from(MAX_PRIORITY)));
        let max_attempts = bounded(
            "max_attempts",
            self.max_attempts,
            jobs.default_max_attempts,
            (1, i64::from(jobs.max_attempts_limit)),
        );
        let timeout_seconds = bounded(
            "timeout_seconds",
            self.timeout_seconds,
            jobs.default_timeout_seconds,
            (1, i64::from(jobs.timeout_seconds_limit)),
        );
        let run_at = match (self.run_at, self.delay_seconds) {
            (Some(_), Some(_)) => {
                problems.push(FieldProblem::new("delay_seconds", "give run_at or delay_seconds, not both"));
                None
            }
            (Some(at), None) => Some(at),
            (None, Some(delay)) if delay > MAX_DELAY_SECONDS => {
                problems.push(FieldProblem::new("delay_seconds", format!("must be at most {MAX_DELAY_SECONDS}")));
                None
            }
            (None, Some(delay)) => Some(Utc::now() + Duration::from_secs(delay)),
            (None, None) => None,
        };
        if !problems.is_empty() {
            return Err(ApiError::Validation(problems));
        }
        Ok(NewJob {
            id: Uuid::now_v7(),
            tenant,
            queue,
            kind: self.kind,
            payload,
            priority: i16::try_from(priority).unwrap_or_default(),
            max_attempts,
            timeout_seconds,
            run_at,
            idempotency_key: None,
            request_id: None,
        })
    }
}

/// `POST /v1/jobs`: commits the job, publishes it with a confirm, answers 202.
pub async fn submit(
    caller: Caller,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let request: SubmitRequest = read_json(&req, body, state.settings.http.body_limit_bytes).await?;
    let mut new_job = request.validate(&state.settings, caller.tenant)?;
    new_job.request_id = RequestId::of(&req);
    // Submissions arriving together share one insert and one commit.
    let job = state.inserter.call(new_job).await??;
    if job.status == JobStatus::Queued {
        publish(&state, vec![Enqueued::from(&job)]).await;
    }
    Ok(HttpResponse::Accepted().insert_header((header::LOCATION, format!("/v1/jobs/{}", job.id))).json(&job))
}

/// Publishes committed jobs. The rows are committed, so the jobs are accepted
/// whatever happens here: one whose publish fails stays in the outbox and the
/// reconciler publishes it later. So failures are logged, not answered.
async fn publish(state: &AppState, jobs: Vec<Enqueued>) {
    outbox::publish_recorded(&state.publisher, &state.recorder, jobs).await;
}

/// `GET /v1/jobs/{id}`, with an `ETag` (`If-None-Match` → 304) and caching
/// headers: an ended job may be cached, a live one is polled (SPEC §4).
/// Ended jobs come from memory when they were read recently.
pub async fn get(
    caller: Caller,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::JobsRead)?;
    let id = parse_id(&id)?;
    let max_age = state.settings.http.ended_cache_seconds;
    let ticket = match state.ended.get(id) {
        Ok(entry) => {
            // Another tenant's job is "not found", exactly as from the database.
            if entry.tenant != caller.tenant {
                return Err(not_found(id));
            }
            let mut response = respond(&req, &entry.rendered, Freshness::Ended { max_age });
            // Served from memory: say how old it is, as any cache would (RFC 9111).
            response.headers_mut().insert(header::AGE, header::HeaderValue::from(entry.age()));
            return Ok(response);
        }
        Err(ticket) => ticket,
    };
    let job = jobs::get(&state.pool, &caller.tenant, id).await?.ok_or_else(|| not_found(id))?;
    let rendered = Rendered::of(&job).map_err(|e| ApiError::Internal(format!("rendering job {id}: {e}")))?;
    let freshness = Freshness::of(&job, max_age);
    let response = respond(&req, &rendered, freshness);
    if matches!(freshness, Freshness::Ended { .. }) {
        state.ended.insert(ticket, id, &caller.tenant, rendered);
    }
    Ok(response)
}

/// What a client may assume about a job it just read.
#[derive(Debug, Clone, Copy)]
enum Freshness {
    /// Immutable (short of an operator's requeue): cache it this long.
    Ended { max_age: u32 },
    /// Still moving: revalidate, and poll again after this many seconds.
    Live { retry_after: u32 },
}

impl Freshness {
    fn of(job: &Job, max_age: u32) -> Self {
        if job.status.is_terminal() {
            return Self::Ended { max_age };
        }
        // A job waiting for its time will not change before then (short of a
        // cancel): no point polling sooner, though never wait over a minute.
        let until_due = (job.run_at - Utc::now()).num_seconds().clamp(1, 60);
        let retry_after = match job.status {
            JobStatus::Scheduled | JobStatus::Retrying => until_due,
            _ => 1,
        };
        Self::Live { retry_after: u32::try_from(retry_after).unwrap_or(1) }
    }
}

fn respond(req: &HttpRequest, rendered: &Rendered, freshness: Freshness) -> HttpResponse {
    let not_modified = matches_etag(req, &rendered.etag);
    let mut response = if not_modified { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    response.insert_header((header::ETAG, rendered.etag.as_str()));
    match freshness {
        Freshness::Ended { max_age } => {
            response.insert_header((header::CACHE_CONTROL, format!("private, max-age={max_age}")));
        }
        Freshness::Live { retry_after } => {
            response.insert_header((header::CACHE_CONTROL, "no-cache"));
            response.insert_header((header::RETRY_AFTER, retry_after.to_string()));
        }
    }
    if not_modified {
        return response.finish();
    }
    response.content_type(header::ContentType::json()).body(rendered.body.clone())
}

/// Whether the request's `If-None-Match` names `etag` (weak comparison, as
/// RFC 9110 asks for this header) or is `*`.
fn matches_etag(req: &HttpRequest, etag: &str) -> bool {
    let Some(value) = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    value.split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no job {id}"))
}

/// One of the caller's jobs. Another tenant's job is "not found", exactly like
/// a job that does not exist: its existence is not revealed.
async fn find(state: &AppState, caller: &Caller, raw_id: &str) -> Result<Job, ApiError> {
    let id = parse_id(raw_id)?;
    jobs::get(&state.pool, &caller.tenant, id).await?.ok_or_else(|| not_found(id))
}

/// `POST /v1/jobs/{id}/cancel`: scheduled, queued and retrying jobs are
/// cancelled at once; a running one is asked to stop (its worker tells the
/// handler); an ended one is a 409.
pub async fn cancel(
    caller: Caller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let id = parse_id(&id)?;
    match jobs::cancel(&state.pool, &caller.tenant, id).await? {
        Cancel::Cancelled(job) | Cancel::Requested(job) => Ok(HttpResponse::Ok().json(&job)),
        Cancel::Terminal(job) => Err(ApiError::Conflict(format!(
            "job {id} has already ended: {}; a failed or cancelled job can be requeued (POST /v1/jobs/{id}/requeue)",
            job.status
        ))),
        Cancel::NotFound => Err(not_found(id)),
    }
}

/// `POST /v1/jobs/{id}/requeue` (admin): a failed or cancelled job goes back
/// to `queued` with its attempts restarted.
pub async fn requeue(
    caller: Caller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::Admin)?;
    let job = find(&state, &caller, &id).await?;
    let moved = jobs::requeue(&state.pool, Some(&caller.tenant), &[job.id]).await?;
    if moved.is_empty() {
        return Err(ApiError::Conflict(format!(
            "job {} is {}; only failed or cancelled jobs can be requeued",
            job.id, job.status
        )));
    }
    // Other replicas hear of it from Postgres; this one must not answer the
    // caller's next GET from a cache the notification has not reached yet.
    state.ended.clear();
    publish(&state, moved).await;
    let job = find(&state, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(&job))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a job id (a UUID)")))
}

/// Query string of `GET /v1/jobs`; all optional, read as text so that every
/// mistake is reported with its parameter's name.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    queue: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 500;

#[derive(Debug, Serialize)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/jobs`: the caller's jobs, newest first, keyset-paginated.
pub async fn list(caller: Caller, state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::JobsRead)?;
    let query = web::Query::<ListQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?
        .into_inner();
    let mut problems = Vec::new();
    let status = match query.status.as_deref().map(str::parse::<JobStatus>) {
        None => None,
        Some(Ok(status)) => Some(status),
        Some(Err(_)) => {
            let known: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
            problems.push(FieldProblem::new("status", format!("must be one of {}", known.join(", "))));
            None
        }
    };
    let limit = match query.limit.as_deref().map(str::parse::<i64>) {
        None => DEFAULT_LIST_LIMIT,
        Some(Ok(limit)) if (1..=MAX_LIST_LIMIT).contains(&limit) => limit,
        Some(_) => {
            problems.push(FieldProblem::new("limit", format!("must be an integer between 1 and {MAX_LIST_LIMIT}")));
            DEFAULT_LIST_LIMIT
        }
    };
    let before = match query.cursor.as_deref().map(Uuid::parse_str) {
        None => None,
        Some(Ok(cursor)) => Some(cursor),
        Some(Err(_)) => {
            problems.push(FieldProblem::new("cursor", "not a cursor returned by this API"));
            None
        }
    };
    if !problems.is_empty() {
        let fields: Vec<_> = problems.iter().map(|p| format!("{}: {}", p.field, p.message)).collect();
        return Err(ApiError::BadRequest(format!("invalid query parameters: {}", fields.join("; "))));
    }
    let filter = ListFilter { status, kind: query.kind, queue: query.queue, before };
    // One row more than asked tells whether another page exists.
    let mut jobs = jobs::list(&state.pool, Some(&caller.tenant), &filter, limit + 1).await?;
    let more = jobs.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    jobs.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more { jobs.last().map(|job| job.id.to_string()) } else { None };
    Ok(HttpResponse::Ok().json(JobPage { jobs, next_cursor }))
}
