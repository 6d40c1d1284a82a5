//! What every request handler can reach. Built once by [`crate::startup`];
//! the authenticator is registered beside it, so that `auth` needs nothing
//! of this module.

use std::sync::Arc;

use shared::config::Settings;
use shared::queue::Publisher;
use shared::spans::Spans;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::changes::Changes;
use crate::metrics::ApiMetrics;
use crate::routes::health::Readiness;
use crate::service::JobService;

pub struct AppState {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    /// For readiness and queue depths; jobs are published by the service.
    pub publisher: Publisher,
    pub jobs: JobService,
    /// `/readyz`'s last answer, reused for a second.
    pub readiness: Readiness,
    pub metrics: Arc<ApiMetrics>,
    /// Where each request's span goes (nowhere unless `telemetry.otlp_endpoint`).
    pub spans: Spans,
    /// Which jobs changed, for long-polls.
    pub changes: Arc<Changes>,
    /// Cancelled when the server starts to stop: long-polls answer at once.
    pub draining: CancellationToken,
}
