//! Operator routes (`operator` scope): queues across all tenants, workers
//! and their hosts. A tenant's `admin` does not see them.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use serde::Serialize;
use shared::db::{queues, workers};

use crate::auth::{Authorized, Operator};
use crate::error::ApiError;
use crate::state::AppState;

/// The answer of `GET /v1/queues`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Queues {
    queues: Vec<QueueView>,
}

/// The answer of `GET /v1/workers`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Workers {
    workers: Vec<workers::WorkerRow>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct QueueView {
    name: String,
    /// Messages waiting in RabbitMQ (`null` when RabbitMQ is unreachable).
    depth: Option<u32>,
    /// Consumers attached in RabbitMQ (`null` when RabbitMQ is unreachable).
    consumers: Option<u32>,
    max_depth: u64,
    weight: u32,
    /// Jobs of this queue by status, from Postgres.
    jobs: BTreeMap<String, i64>,
}

/// `GET /v1/queues`: per configured queue, its RabbitMQ depth and consumers and its jobs by status.
#[utoipa::path(get, path = "/v1/queues", operation_id = "listQueues", tag = "operations", security(("bearer" = ["operator"])),
    responses((status = 200, description = "Every configured queue", body = Queues)))]
pub async fn queues(_: Authorized<Operator>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut counts = queues::job_counts(&state.pool).await?;
    let mut views = Vec::with_capacity(state.settings.queues.len());
    for (name, queue) in &state.settings.queues {
        let stats = state.publisher.queue_stats(name).await;
        if let Err(e) = &stats {
            tracing::warn!(queue = %name, error = %e, "could not read queue stats from RabbitMQ");
        }
        views.push(QueueView {
            name: name.clone(),
            depth: stats.as_ref().ok().map(|s| s.0),
            consumers: stats.as_ref().ok().map(|s| s.1),
            max_depth: queue.max_depth,
            weight: queue.weight,
            jobs: counts.remove(name).unwrap_or_default(),
        });
    }
    Ok(HttpResponse::Ok().json(Queues { queues: views }))
}

/// `GET /v1/workers`: workers that heartbeat within the last three intervals.
#[utoipa::path(get, path = "/v1/workers", operation_id = "listWorkers", tag = "operations", security(("bearer" = ["operator"])),
    responses((status = 200, description = "Live workers", body = Workers)))]
pub async fn workers(_: Authorized<Operator>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let within = i32::try_from(state.settings.worker.heartbeat_seconds.saturating_mul(3)).unwrap_or(i32::MAX);
    let live = workers::live(&state.pool, within).await?;
    Ok(HttpResponse::Ok().json(Workers { workers: live }))
}
