//! Overload shedding: each API process works on at most `http.max_in_flight`
//! requests at once; the excess is answered at once with `503` and
//! `Retry-After`, before authentication or any database work. A long-poll
//! gives up its place while it waits (it holds nothing then).
//!
//! Without the bound every request is accepted and waits inside the process
//! (for a pooled connection, a batch slot, a confirm), so under a flood
//! latency grows with the number of clients and memory with the requests
//! held. With it, what is accepted keeps its unloaded latency and a client
//! that is refused learns it in microseconds and backs off.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{ResponseError as _, web};

use crate::error::ApiError;
use crate::metrics::Rejection;

/// Requests being worked on in this process, across its HTTP workers.
pub struct InFlight {
    limit: usize,
    now: AtomicUsize,
}

/// One admitted request; leaving frees its place.
struct Place(Arc<InFlight>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, now: AtomicUsize::new(0) })
    }

    fn enter(self: &Arc<Self>) -> Option<Place> {
        if self.now.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.now.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Place(self.clone()))
    }
}

/// Probes are never shed nor rate limited: an orchestrator must not restart
/// a replica for being busy, nor take it out of rotation for a moment's flood.
pub fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// Middleware: admits a request if this process has room for it, else
/// answers `503` at once.
pub async fn shed(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let in_flight = req.app_data::<web::Data<Arc<InFlight>>>().map(|data| data.get_ref().clone());
    let place = match in_flight {
        Some(in_flight) if !is_probe(req.path()) => match in_flight.enter() {
            Some(place) => Some(place),
            None => {
                let refusal = ApiError::Saturated(
                    Rejection::Overload,
                    format!("the server is at capacity ({} requests in progress); retry shortly", in_flight.limit),
                );
                let mut req = req;
                discard_small_body(&mut req).await;
                return Ok(req.into_response(refusal.error_response()).map_into_right_body());
            }
        },
        _ => None,
    };
    let place = Leave(std::rc::Rc::new(std::cell::Cell::new(place)));
    actix_web::HttpMessage::extensions_mut(&req).insert(place.clone());
    let response = next.call(req).await;
    drop(place.0.take());
    response.map(ServiceResponse::map_into_left_body)
}

/// A request's place, which its handler may give up early (see [`leave`]).
#[derive(Clone)]
struct Leave(std::rc::Rc<std::cell::Cell<Option<Place>>>);

/// Gives up the request's in-flight place: for a long-poll, which holds
/// nothing (no connection, no batch slot) while it waits, so that parked
/// clients do not crowd out working ones.
pub fn leave(req: &actix_web::HttpRequest) {
    use actix_web::HttpMessage as _;
    if let Some(place) = req.extensions().get::<Leave>() {
        drop(place.0.take());
    }
}

/// Bodies up to this size are read and dropped before a refusal.
const DISCARDED_BODY_MAX: usize = 64 * 1024;

/// Reads and drops the body of a request that is answered without it, when
/// it is small. A connection whose request body went unread cannot carry
/// another request, so actix closes it; for a refused submission (a few
/// hundred bytes, already in the socket buffer) that would turn every
/// refusal into a new TCP connection, which costs far more than the read.
/// A larger body is left unread and its connection closed.
pub async fn discard_small_body(req: &mut ServiceRequest) {
    use actix_web::HttpMessage as _;
    use futures_lite::StreamExt as _;
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_none_or(|len| len == 0 || len > DISCARDED_BODY_MAX) {
        return;
    }
    let mut payload = req.take_payload();
    let mut read = 0;
    while let Some(Ok(chunk)) = payload.next().await {
        read += chunk.len();
        if read > DISCARDED_BODY_MAX {
            return;
        }
    }
}
