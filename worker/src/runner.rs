//! The worker's main loop. One AMQP channel per worker process carries one
//! consumer per queue; a semaphore caps the jobs that run at once at
//! `concurrency`, and the channel's prefetch is the same number, so the broker
//! never hands this process more than it can start soon.
//!
//! A message is acknowledged as soon as its claim is committed in Postgres
//! (README, "Workers"), not when the job ends: from then on the job's lease keeps it, so
//! a job may run longer than RabbitMQ's consumer timeout. Running jobs need
//! only Postgres, so they carry on while the worker reconnects to RabbitMQ.
//!
//! Beside the consumers run the heartbeat (registration, lease renewal,
//! cancel requests), a `LISTEN` for immediate cancel requests, and the
//! reconciler.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::ServerHandle;

use shared::config::Settings;
use shared::db::{CANCEL_CHANNEL, notify, workers};
use shared::kinds::Resources;
use shared::outbox::Outbox;
use shared::queue::{Consumer, Held, Publisher, QueueError, Subscription};
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::envelope::{Envelope, Turns};
use crate::execute::{Executor, Limits};
use crate::health::{self, Consuming};
use crate::metrics::Metrics;
use crate::reconciler::Reconciler;

/// What a worker consumes and how much it runs at once.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub queues: Vec<String>,
    pub concurrency: u16,
}

impl WorkerConfig {
    pub fn from_settings(settings: &Settings) -> Self {
        Self { queues: settings.worker.queues.clone(), concurrency: settings.worker.concurrency }
    }
}

/// How a connection to RabbitMQ ended.
enum Ended {
    Shutdown,
    /// It failed; `consumed` when it had been consuming (the backoff starts over).
    Broken {
        consumed: bool,
        error: anyhow::Error,
    },
}

/// Waits between reconnection attempts to RabbitMQ: doubling from the first
/// to the last, so an outage costs the broker little when it comes back.
const RECONNECT_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

/// A worker process's engine, usable in-process by tests.
pub struct Worker {
    /// Fresh at every start, never derived from the host name: a restarted
    /// worker must not be mistaken for its predecessor.
    id: Uuid,
    settings: Settings,
    pool: PgPool,
    config: WorkerConfig,
}

impl Worker {
    pub fn new(settings: Settings, pool: PgPool, config: WorkerConfig) -> anyhow::Result<Self> {
        settings.check_worker_queues(&config.queues)?;
        anyhow::ensure!(config.concurrency >= 1, "concurrency must be at least 1");
        Ok(Self { id: Uuid::now_v7(), settings, pool, config })
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Runs until `shutdown` fires, then stops taking messages, waits up to the
    /// grace period for running jobs, hands back those still running, and
    /// closes its channel so that prefetched messages go back to their queues.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let name = format!("conveyor-worker-{}", self.id);
        // Everything that runs beside the jobs: the claim, outcome and confirm
        // batchers, the heartbeat, the cancel listener and the reconciler.
        // They stop after the jobs are drained (running jobs need their leases
        // renewed and their outcomes written until the very end), and waiting
        // for them flushes what the batchers still hold.
        let background = TaskTracker::new();
        let background_stop = CancellationToken::new();
        let publisher = Publisher::new(&self.settings.amqp, self.settings.queues.keys().cloned().collect(), &name);
        let outbox = Outbox::new(publisher, self.pool.clone(), &background);
        let resources = Resources::new(&self.settings.jobs)?;
        let executor = Arc::new(
            Executor::new(
                self.id,
                self.pool.clone(),
                outbox.clone(),
                self.settings.jobs.clone(),
                Limits {
                    lease_seconds: self.settings.worker.lease_seconds,
                    max_running: self.settings.tenants.max_running,
                    finishing: usize::from(self.config.concurrency),
                },
                resources,
                &background,
            )
            .with_spans(shared::spans::start(
                &self.settings.telemetry.otlp_endpoint,
                "conveyor-worker",
                &background,
                background_stop.clone(),
            )),
        );
        let slots = Arc::new(Semaphore::new(usize::from(self.config.concurrency)));
        let held = Held::new(&self.config.queues);
        let jobs = TaskTracker::new();
        background.spawn(heartbeat(
            self.id,
            self.pool.clone(),
            self.config.clone(),
            self.settings.worker.heartbeat(),
            Duration::from_secs(u64::from(self.settings.worker.lease_seconds)),
            executor.clone(),
            held.clone(),
            background_stop.clone(),
        ));
        background.spawn(listen_for_cancels(self.pool.clone(), executor.clone(), background_stop.clone()));
        let metrics = executor.metrics().clone();
        let reconciler =
            Reconciler::new(self.id, self.pool.clone(), outbox, &self.settings).with_metrics(metrics.clone());
        background.spawn(reconciler.run(shutdown.child_token()));
        let consuming = Consuming::default();
        let health = self.serve_health(&consuming, &metrics);
        tracing::info!(worker.id = %self.id, queues = ?self.config.queues, concurrency = self.config.concurrency, "worker started");

        let mut backoff = RECONNECT_BACKOFF.0;
        while !shutdown.is_cancelled() {
            let consumed = self.consume(&name, &executor, &slots, &held, &jobs, &consuming, &shutdown).await;
            let error = match consumed {
                Ended::Shutdown => break,
                Ended::Broken { consumed: true, error } => {
                    // It worked until now: the next try is a fresh start.
                    backoff = RECONNECT_BACKOFF.0;
                    metrics.reconnected();
                    error
                }
                Ended::Broken { consumed: false, error } => error,
            };
            match error.downcast_ref::<QueueError>() {
                Some(incompatible @ QueueError::Incompatible { .. }) => {
                    tracing::error!(worker.id = %self.id, error = %incompatible, retry_in = ?backoff, "cannot consume")
                }
                _ => {
                    tracing::warn!(worker.id = %self.id, error = %format!("{error:#}"), retry_in = ?backoff, "lost RabbitMQ; reconnecting")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
        }

        tracing::info!(worker.id = %self.id, in_flight = executor.in_flight(), "worker stopping; waiting for running jobs");
        jobs.close();
        let grace = Duration::from_secs(self.settings.worker.shutdown_grace_seconds);
        if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
            tracing::warn!(worker.id = %self.id, unfinished = executor.in_flight(), "grace period over; handing back running jobs");
            executor.stop_all();
            jobs.wait().await;
        }
        background_stop.cancel();
        if let Some(health) = health {
            health.stop(true).await;
        }
        // The batchers end once nothing can send to them any more.
        drop(executor);
        background.close();
        background.wait().await;
        if let Err(e) = workers::deregister(&self.pool, self.id).await {
            tracing::warn!(worker.id = %self.id, error = %e, "could not deregister");
        }
        tracing::info!(worker.id = %self.id, "worker stopped");
        Ok(())
    }

    /// Starts the health port (`worker.http_port` on `http.host`), if any. A
    /// port that cannot be had is logged, not fatal: the worker still works.
    fn serve_health(&self, consuming: &Consuming, metrics: &Arc<Metrics>) -> Option<ServerHandle> {
        let port = self.settings.worker.http_port;
        if port == 0 {
            return None;
        }
        let address = (self.settings.http.host.as_str(), port);
        let served = std::net::TcpListener::bind(address)
            .and_then(|listener| health::serve(listener, self.pool.clone(), consuming.clone(), metrics.clone()));
        match served {
            Ok(server) => {
                let handle = server.handle();
                tokio::spawn(server);
                tracing::info!(worker.id = %self.id, host = %self.settings.http.host, port, "health port listening");
                Some(handle)
            }
            Err(e) => {
                tracing::error!(
                    worker.id = %self.id, host = %self.settings.http.host, port, error = %e,
                    "cannot serve the health port; running without it. Give each worker on this host its own \
                     worker.http_port (CONVEYOR__WORKER__HTTP_PORT), or 0 for none"
                );
                None
            }
        }
    }

    /// Connects and consumes until `shutdown` or until the connection or a
    /// consumer fails. Deliveries are handed to `jobs`, which outlive this
    /// connection. `consuming` says whether the consumers are up.
    #[allow(clippy::too_many_arguments)]
    async fn consume(
        &self,
        name: &str,
        executor: &Arc<Executor>,
        slots: &Arc<Semaphore>,
        held: &Held,
        jobs: &TaskTracker,
        consuming: &Consuming,
        shutdown: &CancellationToken,
    ) -> Ended {
        let opened = Subscription::open(&self.settings.amqp, &self.config.queues, self.config.concurrency, name, held);
        let mut subscription = match opened.await {
            Ok(subscription) => subscription,
            Err(e) => return Ended::Broken { consumed: false, error: anyhow::Error::new(e) },
        };
        tracing::info!(worker.id = %self.id, "consuming");
        consuming.set(true);
        // Stops this connection's consumers, and the deliveries of it still
        // waiting for a slot: on shutdown, or when the connection breaks (its
        // deliveries are back in their queues then, for anyone to take).
        let stop = shutdown.child_token();
        let broken = CancellationToken::new();
        let loops = TaskTracker::new();
        let consumers = subscription.take_consumers();
        let waiting = Arc::new(Waiting { turns: Mutex::new(Turns::new(consumers.len())), arrived: Notify::new() });
        for (lane, consumer) in consumers.into_iter().enumerate() {
            let (stop, broken, waiting) = (stop.clone(), broken.clone(), waiting.clone());
            loops.spawn(async move {
                if consume_queue(consumer, lane, waiting, stop).await {
                    broken.cancel();
                }
            });
        }
        loops.spawn(dispatch(waiting, executor.clone(), slots.clone(), jobs.clone(), stop.clone()));
        loops.close();
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = broken.cancelled() => {}
        }
        let failed = broken.is_cancelled() && !shutdown.is_cancelled();
        consuming.set(false);
        stop.cancel();
        // Returns unsettled (prefetched, unclaimed) messages to their queues at once.
        subscription.close().await;
        loops.wait().await;
        if failed {
            Ended::Broken { consumed: true, error: anyhow::anyhow!("a consumer stopped") }
        } else {
            Ended::Shutdown
        }
    }
}

/// The messages a connection's consumers delivered whose jobs have not all
/// started, and a wake-up for the dispatcher when one arrives.
struct Waiting {
    turns: Mutex<Turns>,
    arrived: Notify,
}

/// Takes deliveries from one lane (consumer number `lane`) until `stop`
/// (returns false) or until the consumer fails or is cancelled by the broker
/// (returns true).
///
/// Each delivery is held, unacknowledged, until its jobs start: prefetch (=
/// concurrency) keeps the broker from sending more than this process can
/// start soon, and every message it holds is counted (see
/// [`Held`]) rather than buffered out of sight in the client.
async fn consume_queue(mut consumer: Consumer, lane: usize, waiting: Arc<Waiting>, stop: CancellationToken) -> bool {
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return false,
            delivery = consumer.next() => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => {
                tracing::warn!(queue = %consumer.queue(), error = %e, "consumer failed");
                return true;
            }
            None => {
                tracing::warn!(queue = %consumer.queue(), "consumer cancelled by the broker");
                return !stop.is_cancelled();
            }
        };
        let Some(envelope) = Envelope::open(delivery).await else { continue };
        if let Ok(mut turns) = waiting.turns.lock() {
            turns.push(lane, Arc::new(envelope));
        }
        waiting.arrived.notify_one();
    }
}

/// Starts the held messages' jobs, one per free slot, in [`Turns`] order,
/// until `stop`. What it has not started when it stops is dropped unsettled:
/// closing the channel returns those messages to their queues.
async fn dispatch(
    waiting: Arc<Waiting>,
    executor: Arc<Executor>,
    slots: Arc<Semaphore>,
    jobs: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (envelope, job_id) = loop {
            if let Some(next) = waiting.turns.lock().ok().and_then(|mut turns| turns.take()) {
                break next;
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = waiting.arrived.notified() => {}
            }
        };
        let executor = executor.clone();
        jobs.spawn(async move {
            // Boxed: a job's future is tens of KiB, and thousands may be in flight.
            Box::pin(executor.run_one(&envelope, job_id, Some(permit))).await;
        });
    }
}

/// Registers the worker, then every `interval` records that it is alive and
/// what it holds, and renews the leases of its running jobs (stopping those
/// cancelled or lost meanwhile), until `stop`.
#[allow(clippy::too_many_arguments)]
async fn heartbeat(
    id: Uuid,
    pool: PgPool,
    config: WorkerConfig,
    interval: Duration,
    lease: Duration,
    executor: Arc<Executor>,
    held: Held,
    stop: CancellationToken,
) {
    let host = host_name();
    // When the leases were last renewed (or known to need none).
    let mut renewed = tokio::time::Instant::now();
    let concurrency = i32::from(config.concurrency);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match executor.renew_leases().await {
            Ok(()) => renewed = tokio::time::Instant::now(),
            Err(e) if renewed.elapsed() > lease => {
                // The leases have lapsed: the jobs may be rescued and run elsewhere.
                tracing::warn!(worker.id = %id, error = %e, unrenewed = ?renewed.elapsed(), "leases lapsed unrenewed; stopping their handlers");
                executor.abandon_all();
            }
            Err(e) => tracing::warn!(worker.id = %id, error = %e, "could not renew leases"),
        }
        let in_flight = i32::try_from(executor.in_flight()).unwrap_or(i32::MAX);
        let held = held.snapshot();
        if let Err(e) = workers::heartbeat(&pool, id, &host, &config.queues, concurrency, in_flight, &held).await {
            tracing::warn!(worker.id = %id, error = %e, "heartbeat failed");
        }
    }
}

/// Stops a running job as soon as a client cancels it: the API notifies
/// `conveyor_cancel` with the job id. Notifications missed while the listener
/// reconnects are caught by the next heartbeat.
async fn listen_for_cancels(pool: PgPool, executor: Arc<Executor>, stop: CancellationToken) {
    loop {
        let listening = async {
            let mut listener = notify::listen(&pool, CANCEL_CHANNEL).await?;
            while let Some(payload) = listener.recv().await? {
                match payload.parse::<Uuid>() {
                    Ok(id) => executor.cancel(id),
                    Err(_) => tracing::debug!(%payload, "ignoring a malformed cancel notification"),
                }
            }
            Ok::<(), shared::db::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = listening => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "cancel listener failed; restarting");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECONNECT_BACKOFF.1 / 10) => {}
        }
    }
}

/// The machine's (or container's) name, for operators; never used as an identity.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
