//! SIGKILL and SIGTERM on worker processes with jobs in flight: every job
//! still ends exactly once.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use shared::config::Settings;
use shared::db::jobs::{self, Enqueued};
use shared::job::JobStatus;
use shared::outbox;
use shared::queue::Publisher;
use shared::testing::{AmqpNamespace, settings};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::{Worker, WorkerConfig};

struct Harness {
    settings: Settings,
    pool: PgPool,
    publisher: Publisher,
    _amqp: AmqpNamespace,
}

impl Harness {
    async fn new(connect: PgConnectOptions) -> Self {
        let amqp = AmqpNamespace::new(&["default"]);
        let mut settings = settings(&connect, &amqp);
        // A dead worker's jobs are rescued within ~2 s.
        settings.worker.heartbeat_seconds = 1;
        settings.worker.lease_seconds = 2;
        settings.worker.reconcile_interval_ms = 100;
        let pool = PgPoolOptions::new().max_connections(16).connect_lazy_with(connect);
        let publisher = Publisher::new(&settings.amqp, vec!["default".to_owned()], "test-submitter");
        Self { settings, pool, publisher, _amqp: amqp }
    }

    /// Submits `n` jobs of `kind` the way the API does: commit, then publish with a confirm.
    async fn submit(&self, n: usize, kind: &str, payload: serde_json::Value) -> Vec<Uuid> {
        let mut published = Vec::new();
        for _ in 0..n {
            let job = shared::testing::new_job(kind, payload.clone());
            let job = jobs::insert(&self.pool, &job).await.expect("insert");
            published.push(Enqueued::from(&job));
        }
        let ids = published.iter().map(|j| j.id).collect();
        let report = outbox::publish(&self.publisher, &self.pool, published).await.expect("publish");
        assert!(report.failed.is_empty(), "publish failed: {:?}", report.failed);
        ids
    }

    /// Starts the real worker binary.
    fn spawn_process(&self, concurrency: u16, grace_seconds: u64) -> Child {
        let worker = &self.settings.worker;
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["--queues", "default", "--concurrency", &concurrency.to_string()])
            .env_clear()
            .env("DATABASE_URL", &self.settings.database.url)
            .env("AMQP_URL", &self.settings.amqp.url)
            .env("CONVEYOR__AMQP__NAMESPACE", &self.settings.amqp.namespace)
            .env("CONVEYOR__WORKER__HEARTBEAT_SECONDS", worker.heartbeat_seconds.to_string())
            .env("CONVEYOR__WORKER__LEASE_SECONDS", worker.lease_seconds.to_string())
            .env("CONVEYOR__WORKER__RECONCILE_INTERVAL_MS", worker.reconcile_interval_ms.to_string())
            .env("CONVEYOR__WORKER__SHUTDOWN_GRACE_SECONDS", grace_seconds.to_string())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the worker binary starts")
    }

    /// Starts a worker inside the test process.
    fn spawn_in_process(&self, concurrency: u16) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let config = WorkerConfig { queues: vec!["default".to_owned()], concurrency };
        let worker = Worker::new(self.settings.clone(), self.pool.clone(), config).expect("config");
        let stop = CancellationToken::new();
        (stop.clone(), tokio::spawn(worker.run(stop)))
    }

    async fn count(&self, status: JobStatus, ids: &[Uuid]) -> usize {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = $1 AND id = ANY($2)")
            .bind(status.as_str())
            .bind(ids)
            .fetch_one(&self.pool)
            .await
            .expect("count");
        usize::try_from(n).unwrap_or_default()
    }

    /// Waits (bounded) until `done` holds.
    async fn wait(&self, limit: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done().await {
            assert!(Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// attempt → number of jobs, over `ids`.
    async fn attempts(&self, ids: &[Uuid]) -> HashMap<i32, i64> {
        let rows: Vec<(i32, i64)> =
            sqlx::query_as("SELECT attempt, count(*) FROM jobs WHERE id = ANY($1) GROUP BY attempt")
                .bind(ids)
                .fetch_all(&self.pool)
                .await
                .expect("query");
        rows.into_iter().collect()
    }

    async fn close(self) {
        self.pool.close().await;
    }
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("the worker is running").to_string();
    let status = std::process::Command::new("kill").args([signal, &pid]).status().expect("kill runs");
    assert!(status.success());
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn jobs_of_a_worker_killed_with_sigkill_are_finished_by_another(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    let mut doomed = h.spawn_process(4, 30);
    let ids = h.submit(4, "sleep", json!({"ms": 3000})).await;
    h.wait(Duration::from_secs(20), "the doomed worker runs all four", async || {
        h.count(JobStatus::Running, &ids).await == 4
    })
    .await;

    signal(&doomed, "-KILL");
    let _ = doomed.wait().await;
    let (stop, survivor) = h.spawn_in_process(4);

    h.wait(Duration::from_secs(30), "every job succeeds", async || h.count(JobStatus::Succeeded, &ids).await == 4)
        .await;
    // Each was rescued once (its lost attempt counted) and then ran to completion once.
    assert_eq!(h.attempts(&ids).await, HashMap::from([(2, 4)]));
    let kinds: Vec<String> = sqlx::query_scalar("SELECT error->>'kind' FROM jobs WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(&h.pool)
        .await
        .expect("query");
    assert!(kinds.iter().all(|k| k == "lease_expired"), "{kinds:?}");
    stop.cancel();
    survivor.await.expect("joined").expect("clean stop");
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_worker_stopped_with_sigterm_finishes_short_jobs_and_hands_back_the_rest(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    // Grace of 2 s: the 1 s jobs finish, the 6 s jobs do not.
    let mut stopping = h.spawn_process(4, 2);
    let short = h.submit(2, "sleep", json!({"ms": 1000})).await;
    let long = h.submit(2, "sleep", json!({"ms": 6_000})).await;
    let all: Vec<Uuid> = short.iter().chain(&long).copied().collect();
    h.wait(Duration::from_secs(20), "the worker runs all four", async || h.count(JobStatus::Running, &all).await == 4)
        .await;
    // More work arrives that the stopping worker has prefetched but not started.
    let waiting = h.submit(3, "noop", json!({})).await;

    let stopped_at = Instant::now();
    signal(&stopping, "-TERM");
    let exit = tokio::time::timeout(Duration::from_secs(15), stopping.wait()).await.expect("it exits").expect("status");
    assert!(exit.success(), "a clean exit: {exit:?}");
    let took = stopped_at.elapsed();
    assert!(took < Duration::from_secs(6), "it stopped within its grace period: {took:?}");
    assert_eq!(h.count(JobStatus::Succeeded, &short).await, 2, "short jobs finished during the grace period");
    assert_eq!(h.count(JobStatus::Queued, &long).await, 2, "long jobs were handed back");
    assert_eq!(h.attempts(&long).await, HashMap::from([(0, 2)]), "the interrupted attempt is not counted");

    let (stop, survivor) = h.spawn_in_process(4);
    let everything: Vec<Uuid> = all.iter().chain(&waiting).copied().collect();
    h.wait(Duration::from_secs(40), "every job succeeds", async || {
        h.count(JobStatus::Succeeded, &everything).await == everything.len()
    })
    .await;
    assert_eq!(h.attempts(&everything).await, HashMap::from([(1, 7)]), "none ran twice to completion");
    stop.cancel();
    survivor.await.expect("joined").expect("clean stop");
    h.close().await;
}
