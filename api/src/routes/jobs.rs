//! `/v1/jobs`: submit, read, list, cancel and requeue jobs. Each handler
//! reads the request, asks the [job service](crate::service), and writes the
//! answer; what happens to a job is the service's business.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use shared::job::{Job, JobStatus, ListFilter};
use uuid::Uuid;

use crate::auth::{Admin, Authorized, JobsRead, JobsWrite};
use crate::body::read_json;
use crate::caching::{Freshness, matches_etag, respond};
use crate::changes::SHORT_WAIT;
use crate::error::{ApiError, FieldProblem};
use crate::observe::{RequestId, Span};
use crate::service::{Origin, Read};
use crate::state::AppState;
use crate::submission::{BatchRequest, SubmitRequest};

/// `POST /v1/jobs`: commits the job, publishes it with a confirm, answers 202.
#[utoipa::path(post, path = "/v1/jobs", operation_id = "submitJob", tag = "jobs", security(("bearer" = ["jobs:write"])),
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]([ -~]*[!-~])?$",
            description = "1 to 255 characters: the same key from the same tenant answers the first job again; with another body, 409")),
    request_body(content = ref("#/components/schemas/SubmitRequest"), content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: committed and published", body = Job, headers(
            ("Location" = String, description = "/v1/jobs/{id}"),
            ("Idempotent-Replayed" = String, description = "`true` when the Idempotency-Key named an earlier submission"))),
        (status = 400, description = "see the problem"),
        (status = 409, description = "see the problem"),
        (status = 413, description = "see the problem"),
        (status = 415, description = "see the problem"),
        (status = 422, description = "see the problem"),
    ))]
pub async fn submit(
    caller: Authorized<JobsWrite>,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let key = idempotency_key(&req)?;
    let request: SubmitRequest = read_json(&req, body, state.settings.http.body_limit_bytes).await?;
    let submitted = state.jobs.submit(&caller.tenant, origin(&req), key, request).await?;
    let mut response = HttpResponse::Accepted();
    response.insert_header((header::LOCATION, format!("/v1/jobs/{}", submitted.jobs.id)));
    if submitted.replayed {
        response.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
    Ok(response.json(&submitted.jobs))
}

/// `POST /v1/jobs/batch`: up to 1,000 submissions, all accepted or none:
/// one insert, publishes pipelined; `202 {"jobs": […]}` in the order given.
#[utoipa::path(post, path = "/v1/jobs/batch", operation_id = "submitBatch", tag = "jobs", security(("bearer" = ["jobs:write"])),
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]([ -~]*[!-~])?$", description = "As for a single submission, for the whole batch")),
    request_body(content = ref("#/components/schemas/BatchRequest"), content_type = "application/json"),
    responses(
        (status = 202, description = "All accepted, in the order given", body = Batch<'_>, headers(
            ("Idempotent-Replayed" = String, description = "`true` when the Idempotency-Key named an earlier batch"))),
        (status = 400, description = "see the problem"),
        (status = 409, description = "see the problem"),
        (status = 413, description = "see the problem"),
        (status = 415, description = "see the problem"),
        (status = 422, description = "see the problem"),
    ))]
pub async fn submit_batch(
    caller: Authorized<JobsWrite>,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let key = idempotency_key(&req)?;
    let batch: BatchRequest = read_json(&req, body, state.settings.http.body_limit_bytes).await?;
    // A batch counts as its jobs (at most the burst); the request took one.
    let jobs = u32::try_from(batch.jobs.len()).unwrap_or(u32::MAX);
    caller.charge(&req, jobs, 1).await?;
    let submitted = state.jobs.submit_batch(&caller.tenant, origin(&req), key, batch).await?;
    let mut response = HttpResponse::Accepted();
    if submitted.replayed {
        response.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
    Ok(response.json(Batch { jobs: &submitted.jobs }))
}

/// The answer to a batch: its jobs, in the order submitted.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Batch<'a> {
    jobs: &'a [Job],
}

/// Where a submission came from, as stored with its jobs.
fn origin(req: &HttpRequest) -> Origin {
    Origin { request_id: RequestId::of(req), traceparent: Span::of(req) }
}

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The request's `Idempotency-Key`: 1 to 255 characters, no control
/// characters (a UUID, typically), or a 400 saying what is wrong with it.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let mut values = req.headers().get_all(IDEMPOTENCY_KEY);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest("give one Idempotency-Key header, not several".to_owned()));
    }
    let key = std::str::from_utf8(value.as_bytes()).ok().filter(|key| {
        let chars = key.chars().count();
        (1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&chars) && !key.chars().any(char::is_control)
    });
    match key {
        Some(key) => Ok(Some(key.to_owned())),
        None => Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters of UTF-8 text (a UUID, say)"
        ))),
    }
}

/// Longest `?wait=` accepted, in seconds.
pub const MAX_WAIT_SECONDS: u64 = 30;

/// `GET /v1/jobs/{id}`, with an `ETag` (`If-None-Match` → `304`) and caching
/// headers: an ended job may be cached, a live one is polled.
///
/// With `?wait=N` (1 to 30 seconds) it is a long-poll: it answers as soon as
/// the job differs from the `If-None-Match` the client sent (without one:
/// as soon as the job has ended), and at the latest after N seconds, with
/// `304` when the client's `ETag` still holds (without one: the job as it
/// is). Waiting costs no query: the process hears from Postgres which jobs
/// changed, and the job is read again only then.
#[utoipa::path(get, path = "/v1/jobs/{id}", operation_id = "getJob", tag = "jobs", security(("bearer" = ["jobs:read"])),
    params(
        ("id" = Uuid, Path, description = "The job's id"),
        ("wait" = Option<u64>, Query, maximum = 30, description = "Long-poll up to this many seconds (0: answer at once)"),
        ("If-None-Match" = Option<String>, Header, description = "The ETag you hold: 304 while the job is unchanged"),
    ),
    responses(
        (status = 200, description = "The job", body = Job, headers(
            ("ETag" = String, description = "Strong validator of this representation"),
            ("Cache-Control" = String, description = "`private, max-age=…` once ended, else `no-cache`"),
            ("Retry-After" = u32, description = "While the job moves: seconds before polling again"),
            ("Age" = u32, description = "Seconds since it was read from the database, when served from memory"))),
        (status = 304, description = "Unchanged since the If-None-Match given", headers(("ETag" = String))),
        (status = 400, description = "see the problem"),
        (status = 404, description = "see the problem"),
    ))]
pub async fn get(
    caller: Authorized<JobsRead>,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    let Some(wait) = wait_of(&req)? else {
        let read = state.jobs.read(&caller.tenant, id).await?;
        return Ok(answer(&req, &read));
    };
    crate::overload::leave(&req);
    let _waiting = state.metrics.waiting();
    let deadline = tokio::time::Instant::now() + wait;
    let revalidating = req.headers().contains_key(header::IF_NONE_MATCH);
    loop {
        // Registered before the read: a change between the read and the wait still wakes it.
        let watch = state.changes.watch(id);
        let mut woken = std::pin::pin!(watch.notify().notified());
        woken.as_mut().enable();
        let read = state.jobs.read(&caller.tenant, id).await?;
        let ended = matches!(read.freshness, Freshness::Ended { .. });
        let changed = revalidating && !matches_etag(&req, &read.rendered.etag);
        let now = tokio::time::Instant::now();
        if ended || changed || now >= deadline || state.draining.is_cancelled() {
            return Ok(answer(&req, &read));
        }
        let until = if state.changes.listening() { deadline } else { deadline.min(now + SHORT_WAIT) };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep_until(until) => {}
            // The job as last read: thousands of waiters re-reading it at once
            // would only hold up the stop.
            () = state.draining.cancelled() => return Ok(answer(&req, &read)),
        }
    }
}

fn answer(req: &HttpRequest, read: &Read) -> HttpResponse {
    let mut response = respond(req, &read.rendered, read.freshness);
    if let Some(age) = read.age {
        // Served from memory: say how old it is, as any cache would (RFC 9111).
        response.headers_mut().insert(header::AGE, header::HeaderValue::from(age));
    }
    response
}

/// The request's `?wait=`: `None` without one (or `0`), else 1 to 30 seconds.
fn wait_of(req: &HttpRequest) -> Result<Option<Duration>, ApiError> {
    #[derive(Deserialize)]
    struct Wait {
        wait: Option<String>,
    }
    let query: Wait = super::query(req)?;
    match query.wait.as_deref().map(str::parse::<u64>) {
        None | Some(Ok(0)) => Ok(None),
        Some(Ok(seconds)) if seconds <= MAX_WAIT_SECONDS => Ok(Some(Duration::from_secs(seconds))),
        Some(_) => Err(ApiError::BadRequest(format!(
            "invalid query parameters: wait: must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS}"
        ))),
    }
}

/// `POST /v1/jobs/{id}/cancel`: scheduled, queued and retrying jobs are
/// cancelled at once; a running one is asked to stop; an ended one is a 409.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", operation_id = "cancelJob", tag = "jobs", security(("bearer" = ["jobs:write"])),
    params(("id" = Uuid, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Cancelled, or (running) asked to stop: `cancel_requested_at`", body = Job),
        (status = 400, description = "see the problem"),
        (status = 404, description = "see the problem"),
        (status = 409, description = "see the problem"),
    ))]
pub async fn cancel(
    caller: Authorized<JobsWrite>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job = state.jobs.cancel(&caller.tenant, parse_id(&id)?).await?;
    Ok(HttpResponse::Ok().json(&job))
}

/// `POST /v1/jobs/{id}/requeue` (admin): a failed or cancelled job goes back
/// to `queued` with its attempts restarted.
#[utoipa::path(post, path = "/v1/jobs/{id}/requeue", operation_id = "requeueJob", tag = "jobs", security(("bearer" = ["admin"])),
    params(("id" = Uuid, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Queued again", body = Job),
        (status = 400, description = "see the problem"),
        (status = 404, description = "see the problem"),
        (status = 409, description = "see the problem"),
    ))]
pub async fn requeue(
    caller: Authorized<Admin>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job = state.jobs.requeue(&caller.tenant, parse_id(&id)?).await?;
    Ok(HttpResponse::Ok().json(&job))
}

pub(crate) fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
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

/// `GET /v1/jobs`: the caller's jobs, newest first, keyset-paginated.
#[utoipa::path(get, path = "/v1/jobs", operation_id = "listJobs", tag = "jobs", security(("bearer" = ["jobs:read"])),
    params(
        ("status" = Option<JobStatus>, Query),
        ("type" = Option<String>, Query, pattern = "^[^\\x00]*$"),
        ("queue" = Option<String>, Query, pattern = "^[^\\x00]*$"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Jobs per page (default 50)"),
        ("cursor" = Option<Uuid>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of jobs, newest first", body = crate::service::JobPage),
        (status = 400, description = "see the problem"),
    ))]
pub async fn list(
    caller: Authorized<JobsRead>,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: ListQuery = super::query(&req)?;
    let mut problems = Vec::new();
    // Postgres cannot compare against text holding U+0000: a 400, not a 500.
    for (name, value) in [("type", &query.kind), ("queue", &query.queue)] {
        if value.as_deref().is_some_and(|v| v.contains('\0')) {
            problems.push(FieldProblem::new(name, "must not contain U+0000"));
        }
    }
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
    let page = state.jobs.list(&caller.tenant, &filter, limit).await?;
    Ok(HttpResponse::Ok().json(page))
}
