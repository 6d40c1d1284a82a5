//! The harness: a database per test (`#[sqlx::test]`), a RabbitMQ namespace per
//! test, jobs submitted the way the API does, and real worker processes (or
//! in-process workers) with settings that make failures show within seconds.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::config::Settings;
use shared::db::jobs;
use shared::db::leadership::{self, RECONCILER, Term};
use shared::job::{Enqueued, JobStatus};
use shared::outbox::{self, Outbox};
use shared::queue::Publisher;
pub use shared::testing::logs::Logs;
use shared::testing::{AmqpNamespace, child_env, db, settings};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use worker::reconciler::Reconciler;
use worker::{Worker, WorkerConfig};

pub struct Harness {
    pub settings: Settings,
    pub pool: PgPool,
    pub publisher: Publisher,
    pub amqp: AmqpNamespace,
}

impl Harness {
    pub async fn new(connect: PgConnectOptions) -> Self {
        Self::with(connect, |_| {}).await
    }

    /// A harness whose workers run with `configure`'s edits of the test settings.
    pub async fn with(connect: PgConnectOptions, configure: impl FnOnce(&mut Settings)) -> Self {
        let amqp = AmqpNamespace::new(&["default"]);
        let mut settings = settings(&connect, &amqp);
        // A dead worker's jobs are rescued within ~2 s, a stalled leader replaced within 2 s.
        settings.worker.heartbeat_seconds = 1;
        settings.worker.lease_seconds = 2;
        settings.worker.reconcile_interval_ms = 100;
        settings.worker.leader_ttl_seconds = 2;
        configure(&mut settings);
        let pool = PgPoolOptions::new().max_connections(16).connect_lazy_with(connect);
        let publisher = Publisher::new(&settings.amqp, vec!["default".to_owned()], "test-submitter");
        Self { settings, pool, publisher, amqp }
    }

    /// Submits `n` jobs of `kind` the way the API does: commit, then publish
    /// with a confirm (and take them out of the outbox, as the API's recorder does).
    pub async fn submit(&self, n: usize, kind: &str, payload: Value) -> Vec<Uuid> {
        self.submit_many(n, kind, payload, 1).await
    }

    /// Submits `n` jobs of `kind` as one batch submission does: several to a
    /// message (`amqp.jobs_per_message`).
    pub async fn submit_batch(&self, n: usize, kind: &str, payload: Value) -> Vec<Uuid> {
        self.submit_many(n, kind, payload, usize::from(self.settings.amqp.jobs_per_message)).await
    }

    async fn submit_many(&self, n: usize, kind: &str, payload: Value, per_message: usize) -> Vec<Uuid> {
        let new_jobs: Vec<_> = (0..n).map(|_| shared::testing::new_job(kind, payload.clone())).collect();
        self.submit_new(new_jobs, per_message).await
    }

    /// Submits `new_jobs` as made by the test, `per_message` to a message.
    pub async fn submit_new(&self, mut new_jobs: Vec<shared::job::NewJob>, per_message: usize) -> Vec<Uuid> {
        shared::job::stamp_messages(&mut new_jobs, per_message);
        let inserted = jobs::insert_many(&self.pool, &new_jobs).await.expect("insert");
        let published: Vec<_> =
            inserted.iter().zip(&new_jobs).map(|(job, new)| Enqueued::of(job, 0, new.message_id, None)).collect();
        let ids = published.iter().map(|j| j.id).collect();
        let rows: Vec<_> = published.iter().map(Enqueued::outbox_row).collect();
        let report = outbox::publish_all(&self.publisher, published).await;
        assert!(report.failed.is_empty(), "publish failed: {:?}", report.failed);
        shared::db::outbox::confirmed(&self.pool, &rows).await.expect("record the confirms");
        ids
    }

    /// The real worker binary, configured like this harness, with a shutdown
    /// grace of `grace_seconds`.
    pub fn spawn_process(&self, concurrency: u16, grace_seconds: u64) -> Child {
        self.command(concurrency, grace_seconds).spawn().expect("the worker binary starts")
    }

    /// The real worker binary, its JSON log lines (reconciler at debug) kept in [`Logs`].
    pub fn spawn_logged(&self, concurrency: u16) -> (Child, Logs) {
        let mut command = self.command(concurrency, 30);
        command
            .env("RUST_LOG", "info,worker::reconciler=debug")
            .env("CONVEYOR__LOG__FORMAT", "json")
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the worker binary starts");
        let logs = Logs::capture(child.stderr.take().expect("stderr is piped"));
        (child, logs)
    }

    fn command(&self, concurrency: u16, grace_seconds: u64) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
        command
            .args(["--queues", "default", "--concurrency", &concurrency.to_string()])
            .env_clear()
            .envs(child_env(&self.settings))
            .env("CONVEYOR__WORKER__SHUTDOWN_GRACE_SECONDS", grace_seconds.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Starts a worker inside the test process.
    pub fn spawn_in_process(
        &self,
        concurrency: u16,
    ) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let config = WorkerConfig { queues: vec!["default".to_owned()], concurrency };
        let worker = Worker::new(self.settings.clone(), self.pool.clone(), config).expect("config");
        let stop = CancellationToken::new();
        (stop.clone(), tokio::spawn(worker.run(stop)))
    }

    pub async fn count(&self, status: JobStatus, ids: &[Uuid]) -> usize {
        usize::try_from(db::count(&self.pool, Some(status), Some(ids)).await).unwrap_or_default()
    }

    /// Waits (bounded) until `done` holds; returns how long that took.
    pub async fn wait(&self, limit: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !done().await {
            assert!(start.elapsed() < limit, "timed out after {limit:?} waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    /// attempt → number of jobs, over `ids`.
    pub async fn attempts(&self, ids: &[Uuid]) -> BTreeMap<i32, i64> {
        db::attempts(&self.pool, Some(ids)).await
    }

    /// The worker holding job `id`'s lease, while it runs.
    pub async fn lease_owner(&self, id: Uuid) -> Option<Uuid> {
        db::lease_owner(&self.pool, id).await
    }

    /// A reconciler of a made-up worker process, to drive step by step.
    pub fn reconciler(&self) -> Reconciler {
        let outbox = Outbox::new(self.publisher.clone(), self.pool.clone(), &TaskTracker::new());
        Reconciler::new(Uuid::now_v7(), self.pool.clone(), outbox, &self.settings)
    }

    /// The reconciler's current leader, while its term has not lapsed.
    pub async fn leader(&self) -> Option<Term> {
        match leadership::current(&self.pool, RECONCILER).await.expect("query") {
            Some((term, true)) => Some(term),
            _ => None,
        }
    }

    /// The registered workers' ids.
    pub async fn workers(&self) -> Vec<Uuid> {
        db::worker_ids(&self.pool).await
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// Sends `signal` (e.g. "-STOP") to a worker process.
pub fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("the worker is running").to_string();
    let status = std::process::Command::new("kill").args([signal, &pid]).status().expect("kill runs");
    assert!(status.success());
}
