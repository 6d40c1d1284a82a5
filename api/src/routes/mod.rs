//! The HTTP routes and what wraps them all: `X-Request-Id` and problem+json
//! answers for unknown routes and methods.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, web};
use uuid::Uuid;

use crate::error::ApiError;

pub mod admin;
pub mod health;
pub mod jobs;

/// Registers every route on an actix `App`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/jobs")
            .route(web::post().to(jobs::submit))
            .route(web::get().to(jobs::list))
            .default_service(web::to(method_not_allowed)),
    )
    // Before `/v1/jobs/{id}`, which would take `batch` for an id.
    .service(
        web::resource("/v1/jobs/batch")
            .route(web::post().to(jobs::submit_batch))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/jobs/{id}").route(web::get().to(jobs::get)).default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/jobs/{id}/cancel")
            .route(web::post().to(jobs::cancel))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/jobs/{id}/requeue")
            .route(web::post().to(jobs::requeue))
            .default_service(web::to(method_not_allowed)),
    )
    .service(web::resource("/v1/queues").route(web::get().to(admin::queues)))
    .service(web::resource("/v1/workers").route(web::get().to(admin::workers)))
    .service(web::resource("/healthz").route(web::get().to(health::healthz)))
    .service(web::resource("/readyz").route(web::get().to(health::readyz)))
    .default_service(web::to(not_found));
}

/// The request's id: the client's `X-Request-Id` when it sent a sane one, else a fresh UUIDv7.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Middleware: assigns the request id, records it in the request's span, and
/// echoes it on every response (errors included).
pub async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned);
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.call(req).await?;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    Ok(response)
}

impl RequestId {
    pub fn of(req: &HttpRequest) -> Option<String> {
        req.extensions().get::<RequestId>().map(|id| id.0.clone())
    }
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
