//! The consume loop. One AMQP channel per worker process carries one consumer
//! per queue; a semaphore caps the jobs that run at once at `concurrency`, and
//! the channel's prefetch is the same number, so the broker never hands this
//! process more than it can start soon.
//!
//! A message is acknowledged as soon as its claim is committed in Postgres
//! (SPEC §3), not when the job ends: from then on the job's lease keeps it, so
//! a job may run longer than RabbitMQ's consumer timeout.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_lite::StreamExt as _;
use lapin::Consumer;
use shared::config::Settings;
use shared::db::workers;
use shared::queue::{Names, rabbitmq};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::execute::Executor;

/// What a worker consumes and how much it runs at once.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub queues: Vec<String>,
    pub concurrency: u16,
}

impl WorkerConfig {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            queues: settings.worker.queues.clone(),
            concurrency: settings.worker.concurrency,
        }
    }
}

/// A worker process's engine, usable in-process by tests.
pub struct Worker {
    /// Fresh at every start, never derived from the host name: a restarted
    /// worker must not be mistaken for its predecessor, whose leases it does not hold.
    id: Uuid,
    settings: Settings,
    pool: PgPool,
    config: WorkerConfig,
}

impl Worker {
    pub fn new(settings: Settings, pool: PgPool, config: WorkerConfig) -> anyhow::Result<Self> {
        settings.check_worker_queues(&config.queues)?;
        anyhow::ensure!(config.concurrency >= 1, "concurrency must be at least 1");
        Ok(Self {
            id: Uuid::now_v7(),
            settings,
            pool,
            config,
        })
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Consumes until `shutdown` fires, then stops taking messages, waits up to
    /// the grace period for running jobs, and closes the channel so that
    /// prefetched messages go back to their queues.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let names = Names::new(&self.settings.amqp.namespace);
        let connection = rabbitmq::connect(&self.settings.amqp, &format!("conveyor-worker-{}", self.id))
            .await
            .context("Failed to connect to RabbitMQ")?;
        let (channel, consumers) = rabbitmq::consume(
            &connection,
            &names,
            &self.config.queues,
            self.config.concurrency,
            &format!("conveyor-worker-{}", self.id),
        )
        .await
        .context("Failed to start consuming")?;
        tracing::info!(worker.id = %self.id, queues = ?self.config.queues, concurrency = self.config.concurrency, "worker started");

        let executor = Arc::new(Executor::new(self.id, self.pool.clone(), self.settings.jobs.clone()));
        let slots = Arc::new(Semaphore::new(usize::from(self.config.concurrency)));
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(
            self.id,
            self.pool.clone(),
            self.config.clone(),
            Duration::from_secs(u64::from(self.settings.worker.heartbeat_seconds)),
            slots.clone(),
            heartbeat_stop.clone(),
        ));
        let jobs = TaskTracker::new();
        // Stops the consume loops, on shutdown or when one of them fails.
        let stop = shutdown.child_token();
        let loops = TaskTracker::new();
        for consumer in consumers {
            loops.spawn(consume(
                consumer,
                executor.clone(),
                slots.clone(),
                jobs.clone(),
                stop.clone(),
            ));
        }
        loops.close();
        loops.wait().await;
        let reason = if shutdown.is_cancelled() {
            "shutdown"
        } else {
            "consumer stopped"
        };
        tracing::info!(worker.id = %self.id, reason, in_flight = jobs.len(), "worker stopping; waiting for running jobs");

        jobs.close();
        let grace = Duration::from_secs(self.settings.worker.shutdown_grace_seconds);
        if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
            tracing::warn!(worker.id = %self.id, unfinished = jobs.len(), "grace period over; stopping running jobs");
            executor.stop_all();
            jobs.wait().await;
        }
        // Stopped, not aborted: a heartbeat cut off mid-statement could still
        // land after the deregistration and list a stopped worker as live.
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
        if let Err(e) = workers::deregister(&self.pool, self.id).await {
            tracing::warn!(worker.id = %self.id, error = %e, "could not deregister");
        }
        // Closing the channel returns unacknowledged (prefetched, unclaimed)
        // messages to their queues at once.
        let _ = channel.close(200, "worker stopping".into()).await;
        let _ = connection.close(200, "worker stopping".into()).await;
        tracing::info!(worker.id = %self.id, "worker stopped");
        if shutdown.is_cancelled() {
            Ok(())
        } else {
            anyhow::bail!("a consumer stopped unexpectedly")
        }
    }
}

/// Registers the worker, then records every `interval` that it is alive and
/// how many jobs it runs, until `stop`.
async fn heartbeat(
    id: Uuid,
    pool: PgPool,
    config: WorkerConfig,
    interval: Duration,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let host = host_name();
    let concurrency = i32::from(config.concurrency);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let in_flight = concurrency - i32::try_from(slots.available_permits()).unwrap_or(concurrency);
        if let Err(e) = workers::heartbeat(&pool, id, &host, &config.queues, concurrency, in_flight).await {
            tracing::warn!(worker.id = %id, error = %e, "heartbeat failed");
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

async fn consume(
    mut consumer: Consumer,
    executor: Arc<Executor>,
    slots: Arc<Semaphore>,
    jobs: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return,
            delivery = consumer.next() => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => {
                tracing::error!(queue = %consumer.queue(), error = %e, "consumer failed");
                stop.cancel();
                return;
            }
            None => {
                tracing::warn!(queue = %consumer.queue(), "consumer cancelled by the broker");
                stop.cancel();
                return;
            }
        };
        // Wait for a free slot while holding the delivery: it stays unacknowledged,
        // so prefetch keeps the broker from sending more than we can start.
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let executor = executor.clone();
        jobs.spawn(async move {
            executor.handle(delivery).await;
            drop(permit);
        });
    }
}
