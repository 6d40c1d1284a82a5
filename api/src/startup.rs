//! Building and running the HTTP server. [`Application::build`] returns with
//! the listener already bound, so tests can ask for port 0 and read the port;
//! [`Application::run_until_stopped`] serves until a signal, then drains (see
//! [`StopHandle::stop`]) and flushes the background tasks.
//!
//! The background tasks (the insert batcher, the confirm recorder, the
//! job change listener) run on one [`TaskTracker`]: the batchers end once the
//! application state that feeds them is dropped with the server, having
//! written what they held; the listener ends on a cancellation token.

use std::net::{Shutdown, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use shared::config::Settings;
use shared::db;
use shared::outbox::Outbox;
use shared::queue::Publisher;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::auth::Authenticator;
use crate::cache::JobCache;
use crate::changes::{self, Changes};
use crate::metrics::ApiMetrics;
use crate::observe;
use crate::openapi::{Description, DocsConfig};
use crate::overload::{self, InFlight};
use crate::rate_limit::{self, Limits};
use crate::routes;
use crate::service::JobService;
use crate::state::AppState;

/// How long, after the server stopped, the background tasks may take to
/// write what they hold (confirms, a last batch of inserts).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long actix's accept thread takes, at most, to act on a pause.
const PAUSE_SETTLES: Duration = Duration::from_millis(50);

pub struct Application {
    port: u16,
    server: Server,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// The one background task that runs for as long as the server does.
    listener: JoinHandle<()>,
    /// Cancelled as the server starts to stop: long-polls answer at once,
    /// so that the drain does not wait for them.
    draining: CancellationToken,
    drain: Drain,
}

/// What a drain needs besides the server: the listening socket (actix keeps
/// it open until it stops), the connections open, and how long to wait.
#[derive(Clone)]
struct Drain {
    socket: Arc<socket2::Socket>,
    connections: Arc<Connections>,
    patience: Duration,
}

/// Connections open now, counted by a guard each connection carries.
#[derive(Default)]
struct Connections {
    open: AtomicUsize,
    closed: Notify,
}

struct Open(Arc<Connections>);

impl Open {
    fn new(connections: &Arc<Connections>) -> Self {
        connections.open.fetch_add(1, Ordering::Relaxed);
        Self(connections.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.closed.notify_waiters();
    }
}

/// Stops an [`Application`] gracefully; see [`StopHandle::stop`].
#[derive(Clone)]
pub struct StopHandle {
    server: ServerHandle,
    draining: CancellationToken,
    drain: Drain,
}

impl StopHandle {
    /// Takes no new connection from now on: refused, a load balancer retries
    /// the request on another replica, even a POST, since none of it was
    /// sent (a listener merely left unpolled would hold such connections
    /// until they were reset, requests sent). Long-polls answer at once.
    /// Requests on the connections already open are still answered, each
    /// answer closing its connection, until none is left or `http.drain_ms`
    /// has passed: a load balancer stops reusing them without ever sending
    /// on one the server closes. Then the requests in progress finish and
    /// the server stops.
    pub async fn stop(&self) {
        self.server.pause().await;
        // actix's accept thread stops polling the socket once it has seen the
        // pause, a moment after this returns; closing the socket under it
        // would have it log accept errors. Meanwhile connections kept alive
        // carry on as before, so that the balancer has no reason to open
        // new ones, which would wait unaccepted and be reset.
        tokio::time::sleep(PAUSE_SETTLES).await;
        if let Err(e) = self.drain.socket.shutdown(Shutdown::Both) {
            tracing::warn!(error = %e, "could not close the listening socket; new connections wait until the server stops");
        }
        self.draining.cancel();
        let connections = &self.drain.connections;
        let all_closed = async {
            loop {
                let closed = connections.closed.notified();
                if connections.open.load(Ordering::Relaxed) == 0 {
                    return;
                }
                closed.await;
            }
        };
        let _ = tokio::time::timeout(self.drain.patience, all_closed).await;
        self.server.stop(true).await;
    }
}

impl Application {
    /// Opens the pool, migrates when `database.migrate_on_start`, and binds.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = db::server_pool(&settings.database).context("Failed to configure the database pool")?;
        if settings.database.migrate_on_start {
            db::migrate(&settings.database, &pool).await?;
        }
        Self::build_with_pool(settings, pool).await
    }

    /// Binds the server on `http.host:http.port` with an existing pool.
    pub async fn build_with_pool(settings: Settings, pool: PgPool) -> anyhow::Result<Self> {
        let auth = web::Data::new(Authenticator::new(&settings.auth, pool.clone())?);
        let address = format!("{}:{}", settings.http.host, settings.http.port);
        let listener = TcpListener::bind(&address).with_context(|| format!("Failed to bind {address}"))?;
        let port = listener.local_addr()?.port();
        let drain = Drain {
            socket: Arc::new(socket2::Socket::from(listener.try_clone()?)),
            connections: Arc::default(),
            patience: Duration::from_millis(settings.http.drain_ms),
        };
        let queues = settings.queues.keys().cloned().collect();
        let publisher = Publisher::new(&settings.amqp, queues, &format!("conveyor-api-{}", uuid::Uuid::now_v7()));
        if !publisher.is_ready().await {
            tracing::warn!("RabbitMQ is not reachable yet; jobs are accepted and published once it is");
        }
        let workers = match settings.http.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let draining = CancellationToken::new();
        let http = &settings.http;
        let cache =
            Arc::new(JobCache::new(Duration::from_secs(u64::from(http.ended_cache_seconds)), http.ended_cache_bytes));
        let changes = Arc::new(Changes::new(&settings.events));
        let notified = changes::spawn_listener(
            &tasks,
            pool.clone(),
            changes.clone(),
            cache.clone(),
            Duration::from_millis(500),
            stop.clone(),
        );
        let settings = Arc::new(settings);
        let outbox = Outbox::new(publisher.clone(), pool.clone(), &tasks);
        let admission = Arc::new(Admission::new(&settings));
        admission.spawn_refresher(&tasks, publisher.clone(), stop.clone());
        let metrics = Arc::new(ApiMetrics::new());
        let jobs = JobService::new(settings.clone(), pool.clone(), outbox, cache, admission, metrics.clone(), &tasks);
        let spans = shared::spans::start(&settings.telemetry.otlp_endpoint, "conveyor-api", &tasks, stop.clone());
        let state = web::Data::new(AppState {
            settings,
            pool,
            publisher,
            jobs,
            readiness: Default::default(),
            metrics,
            spans,
            changes,
            draining: draining.clone(),
        });
        let in_flight = web::Data::new(InFlight::new(state.settings.max_in_flight()));
        let limits = Limits::new(
            &state.settings.rate_limit,
            &state.settings.http.trusted_proxies,
            &state.settings.amqp.namespace,
        )
        .await;
        limits.spawn_housekeeping(&tasks, stop.clone());
        let limits = web::Data::new(limits);
        let description = web::Data::new(Description::new(&state.settings));
        let docs = web::Data::new(DocsConfig::default());
        let connections = drain.connections.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(description.clone())
                .app_data(docs.clone())
                .app_data(auth.clone())
                .app_data(in_flight.clone())
                .app_data(limits.clone())
                // The last wrapped runs first: the request id, trace and
                // metrics (which count what the others refuse), the address
                // limit (a refused flood takes no in-flight place), shedding.
                .wrap(from_fn(overload::shed))
                .wrap(from_fn(rate_limit::limit))
                .wrap(from_fn(observe::observe))
                .configure(routes::configure)
        })
        .workers(workers)
        .on_connect(move |_, extensions| {
            extensions.insert(Open::new(&connections));
        })
        // Signals are ours (run_until_stopped): long-polls must end before the drain.
        .disable_signals()
        .listen(listener)?
        .run();
        tracing::info!(%address, port, "API listening");
        Ok(Self { port, server, tasks, stop, listener: notified, draining, drain })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server gracefully, as SIGTERM does.
    pub fn handle(&self) -> StopHandle {
        StopHandle { server: self.server.handle(), draining: self.draining.clone(), drain: self.drain.clone() }
    }

    /// Serves until SIGINT/SIGTERM (or [`StopHandle::stop`]), then answers
    /// long-polls, drains in-flight requests and flushes the background
    /// tasks. Says which task ended and why: the server on a signal (`Ok`), or
    /// a background task that stopped on its own (`Err`, after stopping the
    /// server).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let stopper = self.handle();
        let Self { server, tasks, stop, mut listener, .. } = self;
        let signalled = CancellationToken::new();
        tokio::spawn(shared::signal::cancel_on_signal(signalled.clone()));
        let mut server = std::pin::pin!(server);
        let ended = tokio::select! {
            served = &mut server => served.context("the HTTP server failed"),
            // The server future carries out the stop: it is polled meanwhile.
            () = signalled.cancelled() => {
                let ((), served) = tokio::join!(stopper.stop(), &mut server);
                served.context("the HTTP server failed")
            }
            listened = &mut listener => {
                let _ = tokio::join!(stopper.stop(), &mut server);
                Err(anyhow::anyhow!("the job change listener stopped on its own: {listened:?}"))
            }
        };
        tracing::info!("HTTP server stopped; writing what the background tasks hold");
        stop.cancel();
        tasks.close();
        if tokio::time::timeout(FLUSH_TIMEOUT, tasks.wait()).await.is_err() {
            tracing::warn!(timeout = ?FLUSH_TIMEOUT, "background tasks did not finish; unrecorded confirms are republished by the outbox sweep");
        }
        ended
    }
}
