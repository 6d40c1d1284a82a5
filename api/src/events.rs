//! Server-sent events: `GET /v1/jobs/{id}/events` streams one job's changes
//! until it ends; `GET /v1/events` streams every change of the caller's
//! jobs (optionally of one `queue` and one `type`).
//!
//! Streams read the process's log of the changes Postgres announced (see
//! [`crate::changes`]): an open stream costs a connection and no query. Each
//! event's id names its place in that log on every replica, so a client that
//! reconnects with `Last-Event-ID` (as `EventSource` does by itself) gets what
//! it missed, from any replica, while the log still holds it
//! (`events.replay_seconds`, `events.replay_changes`). Beyond that, a job's
//! stream starts again from the job as it is; the tenant's stream answers
//! `410 Gone` (list the jobs, then reconnect without `Last-Event-ID`).
//!
//! A stream that falls behind the log (a client not reading) is sent a
//! `lagged` event and closed: memory is bounded by the log, not by clients.
//! Streams end when the server starts to stop and when the replica loses its
//! `LISTEN` connection (changes might go unheard); clients reconnect.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use shared::job::JobStatus;
use tokio::sync::watch;
use uuid::Uuid;

use crate::auth::{Authorized, JobsRead};
use crate::caching::Freshness;
use crate::changes::{Change, Cursor, EventId, Gone};
use crate::error::ApiError;
use crate::metrics::Waiting;
use crate::routes::jobs::parse_id;
use crate::state::AppState;

/// The id of the last event of a job's stream, sent once the job has ended:
/// a client reconnecting with it is answered `204` (nothing more will come),
/// which tells `EventSource` to stop reconnecting.
const ENDED: &str = "ended";

/// How long a client waits before reconnecting (the `retry:` field).
const RECONNECT_MS: u32 = 1000;

/// `GET /v1/jobs/{id}/events`: the job as it is, then each change, until
/// it ends (the last event is the ended job, as `GET` shows it).
#[utoipa::path(get, path = "/v1/jobs/{id}/events", operation_id = "jobEvents", tag = "events", security(("bearer" = ["jobs:read"])),
    params(
        ("id" = Uuid, Path, description = "The job's id"),
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received: go on after it"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "Server-sent events: \
            first the job (as GET shows it), then a `ChangeEvent` per change, last the ended job (id `ended`); \
            `: heartbeat` comments while quiet; `event: lagged` before closing a stream that fell behind"),
        (status = 204, description = "The job has ended and the client saw its end (Last-Event-ID `ended`): no more events"),
        (status = 400, description = "see the problem"),
        (status = 404, description = "see the problem"),
    ))]
pub async fn job(
    caller: Authorized<JobsRead>,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    let last = LastEventId::of(&req)?;
    let heard = open(&state, &req)?;
    let (cursor, resumed) = {
        let log = state.changes.log();
        match last {
            Some(LastEventId::At(id)) => log.resume(id).map_or_else(|| (log.end(), false), |cursor| (cursor, true)),
            _ => (log.end(), false),
        }
    };
    // Read after taking the place: a change from now on is in the stream.
    let read = state.jobs.read(&caller.tenant, id).await?;
    let mut first = String::new();
    let _ = write!(first, "retry: {RECONNECT_MS}\n\n");
    if matches!(read.freshness, Freshness::Ended { .. }) {
        if last == Some(LastEventId::Ended) || (resumed && !ends_after(&state, cursor, id)) {
            return Ok(HttpResponse::NoContent().finish());
        }
        if !resumed {
            write_event(&mut first, Some(ENDED), &read.rendered.body);
            return Ok(respond(Stream::finished(state, first)));
        }
    } else if !resumed {
        let at = state.changes.log().last_id(&cursor).map(|id| id.to_string());
        write_event(&mut first, at.as_deref(), &read.rendered.body);
    }
    let last = if resumed { None } else { Shown::of(&read.rendered.body) };
    let filter = Filter::Job { tenant: caller.tenant.clone(), id, last };
    Ok(respond(Stream::new(state, cursor, heard, filter, first)))
}

/// Whether the job's stream from `cursor` holds its end: if not, the client
/// has seen it already.
fn ends_after(state: &AppState, mut cursor: Cursor, id: Uuid) -> bool {
    let batches = state.changes.log().read(&mut cursor).unwrap_or_default();
    batches
        .iter()
        .any(|(batch, skip)| batch.changes[*skip..].iter().any(|change| change.id == id && change.status.is_terminal()))
}

/// Query string of `GET /v1/events`.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    queue: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `GET /v1/events?queue=…&type=…`: each change of the caller's jobs, from
/// now or from `Last-Event-ID`.
#[utoipa::path(get, path = "/v1/events", operation_id = "events", tag = "events", security(("bearer" = ["jobs:read"])),
    params(
        ("queue" = Option<String>, Query, description = "Only jobs of this queue"),
        ("type" = Option<String>, Query, description = "Only jobs of this type"),
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received: go on after it"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "Server-sent events: \
            a `ChangeEvent` per change of the caller's jobs; `: heartbeat` comments while quiet; \
            `event: lagged` before closing a stream that fell behind"),
        (status = 400, description = "see the problem"),
        (status = 410, description = "see the problem"),
    ))]
pub async fn tenant(
    caller: Authorized<JobsRead>,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: EventsQuery = crate::routes::query(&req)?;
    let last = LastEventId::of(&req)?;
    let heard = open(&state, &req)?;
    let cursor = {
        let log = state.changes.log();
        match last {
            None => log.end(),
            Some(LastEventId::At(id)) => log.resume(id).ok_or_else(|| {
                ApiError::Gone(format!(
                    "the events after {id} are no longer held (they are kept {} s, {} at most): \
                     list the jobs (GET /v1/jobs) and reconnect without Last-Event-ID",
                    state.settings.events.replay_seconds, state.settings.events.replay_changes
                ))
            })?,
            Some(LastEventId::Ended) => {
                return Err(ApiError::BadRequest(format!(
                    "Last-Event-ID {ENDED:?} ends a job's stream; GET /v1/events has no end"
                )));
            }
        }
    };
    let mut first = format!("retry: {RECONNECT_MS}\n");
    // An id without data moves the client's Last-Event-ID without an event:
    // it resumes from here, not from before it connected.
    match state.changes.log().last_id(&cursor) {
        Some(id) => {
            let _ = write!(first, "id: {id}\n\n");
        }
        None => first.push('\n'),
    }
    let filter = Filter::Tenant { tenant: caller.tenant.clone(), queue: query.queue, kind: query.kind };
    Ok(respond(Stream::new(state, cursor, heard, filter, first)))
}

/// What a client sent as `Last-Event-ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastEventId {
    At(EventId),
    Ended,
}

impl LastEventId {
    fn of(req: &HttpRequest) -> Result<Option<Self>, ApiError> {
        let Some(value) = req.headers().get("last-event-id") else {
            return Ok(None);
        };
        let value = value.to_str().unwrap_or_default().trim();
        if value.is_empty() {
            return Ok(None);
        }
        if value == ENDED {
            return Ok(Some(Self::Ended));
        }
        value.parse().map(|id| Some(Self::At(id))).map_err(|()| {
            ApiError::BadRequest(format!(
                "Last-Event-ID {value:?} is not an event id this API sent; reconnect without it to start from now"
            ))
        })
    }
}

/// A stream may start: the replica hears changes (else `503`: retry, maybe
/// on another replica). It then waits without holding an in-flight place.
fn open(state: &AppState, req: &HttpRequest) -> Result<watch::Receiver<u64>, ApiError> {
    if !state.changes.listening() {
        return Err(ApiError::Unavailable(
            "this replica is reconnecting to Postgres and cannot stream job changes yet; retry".to_owned(),
        ));
    }
    crate::overload::leave(req);
    // Before the stream takes its place in the log, so that it misses no wake-up.
    Ok(state.changes.subscribe())
}

fn respond(stream: Stream) -> HttpResponse {
    let body = futures_lite::stream::unfold(stream, |mut stream| async move {
        stream.next().await.map(|chunk| (Ok::<_, Infallible>(chunk), stream))
    });
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // nginx would otherwise buffer the stream.
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body)
}

/// Which changes a stream shows.
enum Filter {
    /// One job's, until it ends; `last` is what the client saw last, so that
    /// a change it already saw in the first event is not shown again.
    Job {
        tenant: String,
        id: Uuid,
        last: Option<Shown>,
    },
    Tenant {
        tenant: String,
        queue: Option<String>,
        kind: Option<String>,
    },
}

impl Filter {
    fn shows(&self, change: &Change) -> bool {
        match self {
            Self::Job { id, .. } => change.id == *id,
            Self::Tenant { tenant, queue, kind } => {
                *change.tenant == **tenant
                    && queue.as_deref().is_none_or(|queue| *change.queue == *queue)
                    && kind.as_deref().is_none_or(|kind| *change.kind == *kind)
            }
        }
    }
}

/// What a job's stream showed of it last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shown {
    status: JobStatus,
    progress: Option<i16>,
    cancel_requested: bool,
}

impl Shown {
    /// Of the job as `GET` renders it.
    fn of(rendered: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Job {
            status: JobStatus,
            progress: Option<i16>,
            cancel_requested_at: Option<serde_json::Value>,
        }
        let job: Job = serde_json::from_slice(rendered).ok()?;
        Some(Self { status: job.status, progress: job.progress, cancel_requested: job.cancel_requested_at.is_some() })
    }
}

/// A change as an event shows it; an ended job's stream ends with the whole
/// job instead (its result or error).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ChangeEvent<'a> {
    id: Uuid,
    status: JobStatus,
    progress: Option<i16>,
    /// Whether a client asked to cancel the job while it ran.
    cancel_requested: bool,
    queue: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

struct Stream {
    state: web::Data<AppState>,
    cursor: Cursor,
    heard: watch::Receiver<u64>,
    filter: Filter,
    heartbeat: tokio::time::Interval,
    /// Sent before anything else.
    first: Option<String>,
    done: bool,
    _open: Waiting,
}

impl Stream {
    fn new(
        state: web::Data<AppState>,
        cursor: Cursor,
        heard: watch::Receiver<u64>,
        filter: Filter,
        first: String,
    ) -> Self {
        let every = Duration::from_secs(state.settings.events.heartbeat_seconds);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let open = state.metrics.streaming();
        Self { state, cursor, heard, filter, heartbeat, first: Some(first), done: false, _open: open }
    }

    /// A stream of what is already written, and nothing after.
    fn finished(state: web::Data<AppState>, first: String) -> Self {
        let (cursor, heard) = (state.changes.log().end(), state.changes.subscribe());
        let filter = Filter::Tenant { tenant: String::new(), queue: None, kind: None };
        let mut stream = Self::new(state, cursor, heard, filter, first);
        stream.done = true;
        stream
    }

    /// The next chunk to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(Bytes::from(first));
        }
        if self.done {
            return None;
        }
        loop {
            let read = self.state.changes.log().read(&mut self.cursor);
            let mut out = String::new();
            match read {
                Err(Gone::Reset) => return None,
                Err(Gone::Lagged) => {
                    self.done = true;
                    let detail = "this stream fell behind the changes this server keeps and is closed; \
                                  reconnect with Last-Event-ID to resume, if it is still held";
                    let _ = write!(out, "event: lagged\ndata: {}\n\n", serde_json::json!({ "detail": detail }));
                    return Some(Bytes::from(out));
                }
                Ok(batches) => {
                    for (batch, skip) in &batches {
                        for (index, change) in batch.changes.iter().enumerate().skip(*skip) {
                            if self.filter.shows(change) {
                                let id = EventId { seq: batch.seq, index };
                                if self.show(&mut out, id, change).await {
                                    self.done = true;
                                    return Some(Bytes::from(out));
                                }
                            }
                        }
                    }
                }
            }
            if !out.is_empty() {
                self.heartbeat.reset();
                return Some(Bytes::from(out));
            }
            tokio::select! {
                () = self.state.draining.cancelled() => return None,
                heard = self.heard.changed() => if heard.is_err() { return None },
                _ = self.heartbeat.tick() => {
                    // With the place reached, so that a reconnect resumes from here.
                    let at = self.state.changes.log().last_id(&self.cursor);
                    return Some(Bytes::from(match at {
                        Some(id) => format!(": heartbeat\nid: {id}\n\n"),
                        None => ": heartbeat\n\n".to_owned(),
                    }));
                }
            }
        }
    }

    /// Writes the event for `change`; `true` when it was the job stream's last.
    async fn show(&mut self, out: &mut String, id: EventId, change: &Change) -> bool {
        if let Filter::Job { tenant, id: job, last } = &mut self.filter {
            let seen =
                Shown { status: change.status, progress: change.progress, cancel_requested: change.cancel_requested };
            if *last == Some(seen) {
                return false;
            }
            *last = Some(seen);
            if change.status.is_terminal() {
                // The ended job as GET shows it: its result or error is final.
                if let Ok(read) = self.state.jobs.read(tenant, *job).await {
                    write_event(out, Some(ENDED), &read.rendered.body);
                    return true;
                }
            }
        }
        let event = ChangeEvent {
            id: change.id,
            status: change.status,
            progress: change.progress,
            cancel_requested: change.cancel_requested,
            queue: &change.queue,
            kind: &change.kind,
        };
        let data = serde_json::to_vec(&event).unwrap_or_default();
        let ends = matches!(self.filter, Filter::Job { .. }) && change.status.is_terminal();
        write_event(out, Some(&if ends { ENDED.to_owned() } else { id.to_string() }), &data);
        ends
    }
}

/// One event: `data` (JSON) on as many `data:` lines as it has lines, which
/// the client joins back with newlines.
fn write_event(out: &mut String, id: Option<&str>, data: &[u8]) {
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    let data = String::from_utf8_lossy(data);
    for line in data.split(['\n', '\r']).filter(|line| !line.is_empty()) {
        let _ = writeln!(out, "data: {line}");
    }
    out.push('\n');
}
