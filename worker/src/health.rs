//! The worker's own HTTP port (`worker.http_port`, 0 = none): `/healthz`
//! (the process lives) and `/readyz` (Postgres answers and the worker is
//! consuming), so a load balancer or Kubernetes can tell a worker that runs
//! from one that only exists; and `/metrics` for Prometheus.
//!
//! Readiness of RabbitMQ is the worker's own view, not a fresh connection:
//! it is ready while its consumers are up, and not from the moment its
//! connection breaks until it consumes again.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use sqlx::PgPool;

use crate::metrics::Metrics;

/// Longest a readiness probe waits for Postgres.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the worker's consumers are up: set by its consume loop.
#[derive(Debug, Clone, Default)]
pub struct Consuming(Arc<AtomicBool>);

impl Consuming {
    pub fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

struct Probed {
    pool: PgPool,
    consuming: Consuming,
    metrics: Arc<Metrics>,
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "alive"}))
}

/// 200 when Postgres answers and the consumers are up, else 503 naming what is down.
async fn readyz(probed: web::Data<Probed>) -> HttpResponse {
    let postgres = matches!(tokio::time::timeout(PROBE_TIMEOUT, shared::db::ping(&probed.pool)).await, Ok(Ok(())));
    let rabbitmq = probed.consuming.get();
    let word = |up: bool| if up { "up" } else { "down" };
    let ready = postgres && rabbitmq;
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "postgres": word(postgres),
        "rabbitmq": word(rabbitmq),
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "1")).json(body)
    }
}

/// The worker's metrics, in Prometheus' text format.
async fn metrics(probed: web::Data<Probed>) -> HttpResponse {
    HttpResponse::Ok().content_type(shared::metrics::CONTENT_TYPE).body(probed.metrics.render())
}

/// The server of the health routes on `listener`, one thread; it runs once awaited.
pub fn serve(
    listener: TcpListener,
    pool: PgPool,
    consuming: Consuming,
    metrics: Arc<Metrics>,
) -> std::io::Result<Server> {
    let probed = web::Data::new(Probed { pool, consuming, metrics });
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(probed.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(self::metrics))
    })
    .workers(1)
    // The worker handles its signals itself and stops this server on its way out.
    .disable_signals()
    .listen(listener)?
    .run())
}
