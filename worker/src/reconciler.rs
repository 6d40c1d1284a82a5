//! The reconciler: every worker process runs this loop, and the one holding a
//! Postgres advisory lock is active. Each pass
//!
//! 1. queues scheduled and retrying jobs whose `run_at` has come, and publishes them;
//! 2. rescues running jobs whose lease expired (their worker died): retried
//!    with the attempt counted, or failed on their last attempt;
//! 3. republishes queued jobs whose publish was never confirmed (the outbox).
//!
//! The lock is a session lock held on one connection, and every statement of
//! a pass runs on that connection: if it breaks, the lock is gone *and* this
//! process stops acting on it, so two reconcilers never act at once.

use std::time::Duration;

use shared::config::WorkerSettings;
use shared::db::jobs;
use shared::outbox;
use shared::queue::Publisher;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;

/// The advisory lock key: "conveyor" in ASCII, so it is recognisable in `pg_locks`.
const LOCK_KEY: i64 = 0x636f_6e76_6579_6f72;

/// Rows per statement; a pass loops while batches come back full.
const BATCH: i64 = 1000;

pub struct Reconciler {
    pool: PgPool,
    publisher: Publisher,
    interval: Duration,
    outbox_grace_seconds: i32,
}

impl Reconciler {
    pub fn new(pool: PgPool, publisher: Publisher, settings: &WorkerSettings) -> Self {
        Self {
            pool,
            publisher,
            interval: Duration::from_millis(settings.reconcile_interval_ms),
            outbox_grace_seconds: i32::try_from(settings.outbox_grace_seconds).unwrap_or(i32::MAX),
        }
    }

    /// Runs until `stop`: waits for the lock, then passes every interval while it holds it.
    pub async fn run(self, stop: CancellationToken) {
        // Standby reconcilers ask for the lock less often than the active one passes.
        let standby = self.interval.max(Duration::from_millis(200)) * 4;
        loop {
            let lock = tokio::select! {
                () = stop.cancelled() => return,
                lock = self.try_lock() => lock,
            };
            match lock {
                Ok(Some(mut connection)) => {
                    tracing::info!("reconciler active");
                    if let Err(e) = self.lead(&mut connection, &stop).await {
                        tracing::warn!(error = %e, "reconciler lost its connection; standing by");
                        // The session (and its lock) may still be alive: never return it to the pool.
                        connection.close_on_drop();
                    } else {
                        let _ =
                            sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK_KEY).execute(&mut *connection).await;
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "reconciler could not ask for the lock"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(standby) => {}
            }
        }
    }

    async fn try_lock(&self) -> sqlx::Result<Option<PoolConnection<Postgres>>> {
        let mut connection = self.pool.acquire().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(LOCK_KEY).fetch_one(&mut *connection).await?;
        Ok(locked.then_some(connection))
    }

    /// Passes until `stop` (Ok) or until the lock connection fails (Err).
    async fn lead(&self, connection: &mut PoolConnection<Postgres>, stop: &CancellationToken) -> sqlx::Result<()> {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            self.pass(connection).await?;
        }
    }

    /// One pass. Public so tests can drive it step by step.
    pub async fn pass(&self, connection: &mut PoolConnection<Postgres>) -> sqlx::Result<()> {
        loop {
            let due = jobs::queue_due(&mut **connection, BATCH).await?;
            let full = due.len() as i64 == BATCH;
            if !due.is_empty() {
                tracing::debug!(count = due.len(), "queued due jobs");
                self.publish(due).await;
            }
            if !full {
                break;
            }
        }
        let rescued = jobs::rescue_expired(&mut **connection, BATCH).await?;
        if rescued > 0 {
            // They are `retrying`, due now: the next pass queues them.
            tracing::warn!(count = rescued, "rescued jobs whose worker was lost");
        }
        let unpublished = jobs::unpublished(&mut **connection, self.outbox_grace_seconds, BATCH).await?;
        if !unpublished.is_empty() {
            tracing::info!(count = unpublished.len(), "republishing jobs whose publish was never confirmed");
            self.publish(unpublished).await;
        }
        Ok(())
    }

    /// Publishes jobs the pass moved or found. Recording the confirms uses
    /// the shared pool, not the lock's connection, so its failure must not end
    /// the pass (and give up the lock): unrecorded jobs stay in the outbox and
    /// a later pass publishes them again.
    async fn publish(&self, jobs: Vec<jobs::Enqueued>) {
        if let Err(e) = outbox::publish(&self.publisher, &self.pool, jobs).await {
            tracing::warn!(error = %e, "could not record publishes; the outbox sweep will publish them again");
        }
    }
}
