//! Building and running the HTTP server. [`Application::build`] returns with
//! the listener already bound, so tests can ask for port 0 and read the port.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use shared::config::Settings;
use shared::db;
use shared::outbox::Recorder;
use shared::queue::Publisher;
use sqlx::PgPool;

use shared::batch::Batcher;
use shared::job::{Job, NewJob};

use crate::auth::Authenticator;
use crate::cache::EndedJobs;
use crate::error::SharedDbError;
use crate::routes;

/// What every request handler can reach.
pub struct AppState {
    pub settings: Settings,
    pub pool: PgPool,
    pub publisher: Publisher,
    /// Inserts submitted jobs, those arriving together in one statement.
    /// One submission's refused values fail only that submission.
    pub inserter: Batcher<NewJob, Result<Job, SharedDbError>, SharedDbError>,
    /// Records confirmed publishes in batches (see [`shared::outbox`]).
    pub recorder: Recorder,
    pub auth: Authenticator,
    /// Ended jobs served from memory (see [`crate::cache`]).
    pub ended: Arc<EndedJobs>,
}

pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    /// Opens the pool, migrates when `database.migrate_on_start`, and binds.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = db::pool(&settings.database).context("Failed to configure the database pool")?;
        if settings.database.migrate_on_start {
            db::migrate(&settings.database, &pool).await?;
        }
        Self::build_with_pool(settings, pool).await
    }

    /// Binds the server on `http.host:http.port` with an existing pool.
    pub async fn build_with_pool(settings: Settings, pool: PgPool) -> anyhow::Result<Self> {
        let auth = Authenticator::new(&settings.auth)?;
        let address = format!("{}:{}", settings.http.host, settings.http.port);
        let listener = TcpListener::bind(&address).with_context(|| format!("Failed to bind {address}"))?;
        let port = listener.local_addr()?.port();
        let queues = settings.queues.keys().cloned().collect();
        let publisher = Publisher::new(&settings.amqp, queues, &format!("conveyor-api-{}", uuid::Uuid::now_v7()));
        if !publisher.is_ready().await {
            tracing::warn!("RabbitMQ is not reachable yet; jobs are accepted and published once it is");
        }
        let workers = match settings.http.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let recorder = Recorder::spawn(pool.clone());
        let inserter = inserter(pool.clone());
        let http = &settings.http;
        let ended =
            Arc::new(EndedJobs::new(Duration::from_secs(u64::from(http.ended_cache_seconds)), http.ended_cache_bytes));
        ended.spawn_listener(pool.clone(), Duration::from_millis(500));
        let state = web::Data::new(AppState { settings, pool, publisher, inserter, recorder, auth, ended });
        let server = HttpServer::new(move || {
            App::new().app_data(state.clone()).wrap(from_fn(routes::request_id)).configure(routes::configure)
        })
        .workers(workers)
        .listen(listener)?
        .run();
        tracing::info!(%address, port, "API listening");
        Ok(Self { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server gracefully (tests; signals are handled by actix itself).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGINT/SIGTERM (or [`ServerHandle::stop`]), then drains
    /// in-flight requests.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Submissions per insert statement at most.
const INSERT_BATCH: usize = 256;

fn inserter(pool: PgPool) -> Batcher<NewJob, Result<Job, SharedDbError>, SharedDbError> {
    Batcher::spawn(INSERT_BATCH, move |jobs: Vec<NewJob>| {
        let pool = pool.clone();
        async move {
            let each = shared::db::jobs::insert_each_if_refused(&pool, &jobs).await?;
            Ok(each.into_iter().map(|job| job.map_err(SharedDbError::from)).collect())
        }
    })
}
