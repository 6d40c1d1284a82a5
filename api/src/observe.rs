//! What wraps every request first: its id (`X-Request-Id`, echoed on every
//! answer), its place in a trace (W3C `traceparent`, continued or started),
//! and, once answered, its metrics and its one log line.
//!
//! The log line (`info`, target `conveyor::http`) has the method, the route
//! template, the status, the latency, the request id, the trace id and the
//! tenant when the request was authenticated; never a token, a payload or
//! the raw path (its ids are in the route's template's place). Probes and
//! scrapes log at `debug`: an orchestrator's every-few-seconds checks would
//! drown the rest.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{ConnectionType, Method};
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, HttpRequest, web};
use shared::spans::{Attribute, Finished, Kind};
use shared::trace::{self, TraceParent};
use uuid::Uuid;

use crate::metrics::Rejection;
use crate::overload::is_probe;
use crate::state::AppState;

/// The request's id: the client's `X-Request-Id` when it sent a sane one, else a fresh UUIDv7.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    pub fn of(req: &HttpRequest) -> Option<String> {
        req.extensions().get::<RequestId>().map(|id| id.0.clone())
    }
}

/// The API's span for the request: a child of the client's `traceparent`, or
/// the root of a new trace. Stored with the jobs the request submits.
#[derive(Debug, Clone, Copy)]
pub struct Span(pub TraceParent);

impl Span {
    /// The request's `traceparent`, as stored with its jobs.
    pub fn of(req: &HttpRequest) -> Option<String> {
        req.extensions().get::<Span>().map(|span| span.0.to_string())
    }
}

/// The tenant of an authenticated request, for its log line.
#[derive(Debug, Clone)]
pub struct Tenant(pub String);

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Middleware: request id and span in, metrics and a log line out.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned);
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let recording = state.as_ref().is_some_and(|state| state.spans.recording());
    let header = req.headers().get(trace::HEADER).and_then(|v| v.to_str().ok());
    let (span, parent) = TraceParent::continue_or_start(header, recording);
    let started_at = std::time::SystemTime::now();
    req.extensions_mut().insert(RequestId(id.clone()));
    req.extensions_mut().insert(Span(span));
    let method = method_label(req.method());
    let mut response = next.call(req).await?;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    // A draining replica closes each connection after its answer, so that a
    // load balancer stops reusing it before the server stops (see startup).
    if state.as_ref().is_some_and(|state| state.draining.is_cancelled()) {
        response.response_mut().head_mut().set_connection_type(ConnectionType::Close);
    }
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let request = response.request();
    let route = request.match_pattern();
    let route = route.as_deref().unwrap_or("unmatched");
    let tenant = request.extensions().get::<Tenant>().map(|t| t.0.clone());
    if let Some(state) = &state {
        state.metrics.answered(method, route, status, elapsed.as_secs_f64());
        if let Some(reason) = response.response().extensions().get::<Rejection>() {
            state.metrics.rejected(*reason);
        }
        if recording && span.sampled() {
            let mut attributes = vec![
                ("http.request.method", Attribute::Text(method.to_owned())),
                ("http.route", Attribute::Text(route.to_owned())),
                ("http.response.status_code", Attribute::Int(i64::from(status))),
                ("conveyor.request_id", Attribute::Text(id.clone())),
            ];
            if let Some(tenant) = &tenant {
                attributes.push(("conveyor.tenant", Attribute::Text(tenant.clone())));
            }
            state.spans.record(Finished {
                name: format!("{method} {route}"),
                kind: Kind::Server,
                span,
                parent,
                start: started_at,
                end: std::time::SystemTime::now(),
                attributes,
                error: (status >= 500).then(|| format!("answered {status}")),
            });
        }
    }
    let latency_ms = elapsed.as_secs_f64() * 1e3;
    let trace_id = span.trace_id();
    // `None` is left out of the line (an unauthenticated request has no tenant).
    let tenant = tenant.as_deref();
    if is_probe(request.path()) {
        tracing::debug!(target: "conveyor::http", method, route, status, latency_ms, request_id = %id, trace_id, "request");
    } else {
        tracing::info!(target: "conveyor::http", method, route, status, latency_ms, request_id = %id, trace_id, tenant, "request");
    }
    Ok(response)
}

/// A method as a label: the standard ones by name, anything else "other"
/// (a client may send any token as a method; labels must stay few).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}
