//! Liveness and readiness probes, and the metrics scrape.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::rate_limit::Limits;
use crate::state::AppState;

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /metrics`: this replica's metrics, in Prometheus' text format.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations", security(()),
    responses((status = 200, description = "This replica's metrics", content_type = "text/plain", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type(shared::metrics::CONTENT_TYPE).body(state.metrics.render(&state.pool))
}

/// 200 while the process lives.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process lives", body = Object, example = json!({"status": "ok"}))))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// What `/readyz` says (documentation only: the handler writes it as JSON).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ReadinessView {
    /// `ready`, `degraded` (serving, with per-replica rate limits) or `unavailable`.
    status: String,
    /// `up` or `down`.
    postgres: String,
    /// `up` or `down`.
    rabbitmq: String,
    /// `local` or `redis`.
    rate_limiter: Option<String>,
    /// Why the replica is degraded.
    degraded: Option<Vec<String>>,
}

/// How long a readiness answer is reused: probes may come often, from
/// anyone (no auth), and each real one costs a query and a broker round trip.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// The last readiness answer: when, and whether Postgres and RabbitMQ were up.
#[derive(Debug, Default)]
pub struct Readiness(std::sync::Mutex<Option<(std::time::Instant, bool, bool)>>);

impl Readiness {
    async fn check(&self, state: &AppState) -> (bool, bool) {
        if let Ok(last) = self.0.lock()
            && let Some((at, postgres, rabbitmq)) = *last
            && at.elapsed() < READINESS_TTL
        {
            return (postgres, rabbitmq);
        }
        let postgres = tokio::time::timeout(PROBE_TIMEOUT, shared::db::ping(&state.pool)).await;
        let postgres = matches!(postgres, Ok(Ok(_)));
        let rabbitmq = tokio::time::timeout(PROBE_TIMEOUT, state.publisher.is_ready()).await.unwrap_or(false);
        if let Ok(mut last) = self.0.lock() {
            *last = Some((std::time::Instant::now(), postgres, rabbitmq));
        }
        (postgres, rabbitmq)
    }
}

/// 200 when Postgres and RabbitMQ both answer, else 503 naming which does not;
/// the answer is reused for a second. A rate limiter that lost Redis makes
/// the replica `degraded`, still 200: it serves, with per-replica limits.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Postgres and RabbitMQ answer", body = ReadinessView),
        (status = 503, description = "Postgres or RabbitMQ does not answer", body = ReadinessView,
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ))]
pub async fn readyz(state: web::Data<AppState>, limits: Option<web::Data<Arc<Limits>>>) -> HttpResponse {
    let (postgres, rabbitmq) = state.readiness.check(&state).await;
    let word = |up: bool| if up { "up" } else { "down" };
    let degraded = limits.as_ref().and_then(|limits| limits.degraded());
    let status = match (postgres && rabbitmq, degraded) {
        (false, _) => "unavailable",
        (true, Some(_)) => "degraded",
        (true, None) => "ready",
    };
    let mut body = json!({
        "status": status,
        "postgres": word(postgres),
        "rabbitmq": word(rabbitmq),
    });
    if let Some(limits) = &limits {
        body["rate_limiter"] = json!(limits.backend());
    }
    if let Some(why) = degraded {
        body["degraded"] = json!([why]);
    }
    if postgres && rabbitmq {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "1")).json(body)
    }
}
