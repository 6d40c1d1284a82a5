//! The HTTP routes, and problem+json answers for unknown routes and methods.

use actix_web::{HttpRequest, HttpResponse, web};

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
    .service(
        web::resource("/v1/jobs/{id}/events")
            .route(web::get().to(crate::events::job))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/events")
            .route(web::get().to(crate::events::tenant))
            .default_service(web::to(method_not_allowed)),
    )
    .service(web::resource("/v1/queues").route(web::get().to(admin::queues)))
    .service(web::resource("/v1/workers").route(web::get().to(admin::workers)))
    .service(web::resource("/healthz").route(web::get().to(health::healthz)))
    .service(web::resource("/readyz").route(web::get().to(health::readyz)))
    .service(web::resource("/metrics").route(web::get().to(health::metrics)))
    .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
