//! The HTTP routes, and problem+json answers for unknown routes and methods.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, ResponseError as _, web};

use crate::error::ApiError;

pub mod admin;
pub mod health;
pub mod jobs;

/// Registers every route on an actix `App`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/jobs", "GET, POST").route(web::post().to(jobs::submit)).route(web::get().to(jobs::list)))
        // Before `/v1/jobs/{id}`, which would take `batch` for an id.
        .service(resource("/v1/jobs/batch", "POST").route(web::post().to(jobs::submit_batch)))
        .service(resource("/v1/jobs/{id}", "GET").route(web::get().to(jobs::get)))
        .service(resource("/v1/jobs/{id}/cancel", "POST").route(web::post().to(jobs::cancel)))
        .service(resource("/v1/jobs/{id}/requeue", "POST").route(web::post().to(jobs::requeue)))
        .service(resource("/v1/jobs/{id}/events", "GET").route(web::get().to(crate::events::job)))
        .service(resource("/v1/events", "GET").route(web::get().to(crate::events::tenant)))
        .service(resource("/v1/queues", "GET").route(web::get().to(admin::queues)))
        .service(resource("/v1/workers", "GET").route(web::get().to(admin::workers)))
        .service(resource("/healthz", "GET").route(web::get().to(health::healthz)))
        .service(resource("/readyz", "GET").route(web::get().to(health::readyz)))
        .service(resource("/metrics", "GET").route(web::get().to(health::metrics)))
        .service(resource("/openapi.json", "GET").route(web::get().to(crate::openapi::description)))
        .service(resource("/docs", "GET").route(web::get().to(crate::openapi::docs)))
        .service(resource("/docs/{file:.*}", "GET").route(web::get().to(crate::openapi::docs)))
        .default_service(web::to(not_found));
}

/// A route answering other methods than `allow` with a 405 problem that
/// says which it takes (`Allow`, as RFC 9110 requires).
fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move {
        let mut response = ApiError::MethodNotAllowed.error_response();
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
        response
    }))
}

/// The request's query string as `T`, or a 400 naming what is wrong with it.
pub(crate) fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())))
}
