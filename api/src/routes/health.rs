//! Liveness and readiness probes.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::state::AppState;

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 while the process lives.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 when Postgres and RabbitMQ both answer, else 503 naming which does not.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let postgres = tokio::time::timeout(PROBE_TIMEOUT, shared::db::ping(&state.pool)).await;
    let postgres = matches!(postgres, Ok(Ok(_)));
    let rabbitmq = tokio::time::timeout(PROBE_TIMEOUT, state.publisher.is_ready()).await.unwrap_or(false);
    let word = |up: bool| if up { "up" } else { "down" };
    let body = json!({
        "status": if postgres && rabbitmq { "ready" } else { "unavailable" },
        "postgres": word(postgres),
        "rabbitmq": word(rabbitmq),
    });
    if postgres && rabbitmq {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "1")).json(body)
    }
}
