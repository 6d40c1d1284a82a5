//! The worker's metrics, in Prometheus' text format on its health port
//! (`GET /metrics`). One registry per [`crate::Worker`], so that workers run
//! side by side in one process (tests) count apart. Label values are bounded:
//! queue and job type names, outcomes, reconciler actions; never ids.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use shared::metrics::registered;

/// What became of a job, as counted by `conveyor_worker_jobs_total`.
#[derive(Debug, Clone, Copy)]
pub enum JobEvent {
    Started,
    Succeeded,
    /// Failed with attempts left.
    Retried,
    Failed,
    Cancelled,
    /// Ran past its timeout (counted as `retried` or `failed` too).
    TimedOut,
}

impl JobEvent {
    fn label(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Retried => "retried",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

/// What the active reconciler did, as counted by `conveyor_reconciler_actions_total`.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Scheduled or retrying jobs queued at their time.
    QueuedDue,
    /// Running jobs whose lease expired, put back.
    Rescued,
    /// Jobs whose publish was never confirmed, published again (the outbox).
    Republished,
    /// Queued jobs whose messages RabbitMQ lost, published again.
    RepublishedLost,
    /// Parked jobs of tenants back under their cap, published.
    Unparked,
    /// Ended jobs deleted once past their retention.
    Expired,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Self::QueuedDue => "queued_due",
            Self::Rescued => "rescued",
            Self::Republished => "republished_unconfirmed",
            Self::RepublishedLost => "republished_lost",
            Self::Unparked => "unparked",
            Self::Expired => "expired",
        }
    }
}

/// A worker's metrics.
pub struct Metrics {
    registry: Registry,
    jobs: IntCounterVec,
    run_seconds: HistogramVec,
    pickup_seconds: HistogramVec,
    claim_batches: Histogram,
    outcome_batches: Histogram,
    in_flight: IntGauge,
    actions: IntCounterVec,
    reconnects: IntCounter,
    queue_ready: IntGaugeVec,
    /// Label-less vectors: a series that exists only while this worker leads.
    workers_alive: IntGaugeVec,
    outbox_oldest: GaugeVec,
}

/// Run times from a millisecond to ten minutes.
const RUN_SECONDS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 600.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let jobs = IntCounterVec::new(
            Opts::new("conveyor_worker_jobs_total", "Jobs started and their outcomes, by queue and type"),
            &["queue", "type", "outcome"],
        );
        let run_seconds = HistogramVec::new(
            HistogramOpts::new("conveyor_worker_job_run_seconds", "How long a job's handler ran, by queue and type")
                .buckets(RUN_SECONDS.to_vec()),
            &["queue", "type"],
        );
        let pickup_seconds = HistogramVec::new(
            HistogramOpts::new(
                "conveyor_worker_job_pickup_seconds",
                "From a job being ready to run (submitted, due, retried) to its claim, by queue",
            )
            .buckets(RUN_SECONDS.to_vec()),
            &["queue"],
        );
        let batch_sizes = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
        let claim_batches = Histogram::with_opts(
            HistogramOpts::new("conveyor_worker_claim_batch_size", "Jobs claimed by one claim statement")
                .buckets(batch_sizes.clone()),
        );
        let outcome_batches = Histogram::with_opts(
            HistogramOpts::new("conveyor_worker_outcome_batch_size", "Job outcomes written by one statement")
                .buckets(batch_sizes),
        );
        let in_flight = IntGauge::new("conveyor_worker_jobs_in_flight", "Jobs running in this worker now");
        let actions = IntCounterVec::new(
            Opts::new(
                "conveyor_reconciler_actions_total",
                "Jobs the active reconciler moved, published or deleted, by action",
            ),
            &["action"],
        );
        let reconnects = IntCounter::new(
            "conveyor_worker_rabbitmq_reconnects_total",
            "Times this worker lost RabbitMQ and connected again",
        );
        let queue_ready = IntGaugeVec::new(
            Opts::new(
                "conveyor_queue_messages_ready",
                "Messages waiting in RabbitMQ per queue, all lanes (a batch's message carries several jobs); \
                 exported by the active reconciler only",
            ),
            &["queue"],
        );
        let workers_alive = IntGaugeVec::new(
            Opts::new(
                "conveyor_workers_alive",
                "Workers whose heartbeat is fresh in Postgres; exported by the active reconciler only",
            ),
            &[],
        );
        let outbox_oldest = GaugeVec::new(
            Opts::new(
                "conveyor_outbox_oldest_age_seconds",
                "Age of the oldest publish RabbitMQ has not confirmed (0: none); exported by the active reconciler only",
            ),
            &[],
        );
        Self {
            workers_alive: registered(&registry, workers_alive),
            outbox_oldest: registered(&registry, outbox_oldest),
            queue_ready: registered(&registry, queue_ready),
            jobs: registered(&registry, jobs),
            run_seconds: registered(&registry, run_seconds),
            pickup_seconds: registered(&registry, pickup_seconds),
            claim_batches: registered(&registry, claim_batches),
            outcome_batches: registered(&registry, outcome_batches),
            in_flight: registered(&registry, in_flight),
            actions: registered(&registry, actions),
            reconnects: registered(&registry, reconnects),
            registry,
        }
    }

    pub fn job(&self, queue: &str, kind: &str, event: JobEvent) {
        self.jobs.with_label_values(&[queue, kind, event.label()]).inc();
    }

    pub fn ran(&self, queue: &str, kind: &str, seconds: f64) {
        self.run_seconds.with_label_values(&[queue, kind]).observe(seconds);
    }

    pub fn picked_up(&self, queue: &str, seconds: f64) {
        self.pickup_seconds.with_label_values(&[queue]).observe(seconds.max(0.0));
    }

    pub fn claimed_together(&self, jobs: usize) {
        self.claim_batches.observe(jobs as f64);
    }

    pub fn wrote_outcomes_together(&self, outcomes: usize) {
        self.outcome_batches.observe(outcomes as f64);
    }

    pub fn set_in_flight(&self, jobs: usize) {
        self.in_flight.set(i64::try_from(jobs).unwrap_or(i64::MAX));
    }

    pub fn acted(&self, action: Action, jobs: usize) {
        self.actions.with_label_values(&[action.label()]).inc_by(u64::try_from(jobs).unwrap_or(u64::MAX));
    }

    /// What the active reconciler read of `queue`'s depth.
    pub fn set_ready(&self, queue: &str, messages: i64) {
        self.queue_ready.with_label_values(&[queue]).set(messages);
    }

    /// What the active reconciler read of the workers' heartbeats and the outbox.
    pub fn set_platform(&self, workers_alive: i64, outbox_oldest_seconds: f64) {
        self.workers_alive.with_label_values::<&str>(&[]).set(workers_alive);
        self.outbox_oldest.with_label_values::<&str>(&[]).set(outbox_oldest_seconds);
    }

    /// No platform-wide gauges any more: this worker no longer leads, another exports them.
    pub fn forget_platform(&self) {
        self.queue_ready.reset();
        self.workers_alive.reset();
        self.outbox_oldest.reset();
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Everything, in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        shared::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
