//! The API's metrics, in Prometheus' text format at `GET /metrics` on the API
//! port (no authentication, never shed nor rate limited, like the probes).
//! One registry per [`crate::startup::Application`], so that several apps in
//! one process (tests) count apart. Label values are bounded: route
//! templates (never raw paths), methods, status codes, queue and job type
//! names, rejection reasons.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use shared::metrics::registered;
use sqlx::PgPool;

/// Why a request was refused before it did anything, as counted by
/// `conveyor_api_requests_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Malformed or invalid input: 400, 413, 415, 422.
    Validation,
    /// No valid token (401) or not the scope (403).
    Auth,
    /// Over the address's, tenant's or key's rate limit (429).
    RateLimit,
    /// A queue at its `max_depth` (503).
    Admission,
    /// This replica at `http.max_in_flight` (503).
    Overload,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Self::Validation => "validation",
            Self::Auth => "auth",
            Self::RateLimit => "rate_limit",
            Self::Admission => "admission",
            Self::Overload => "overload",
        }
    }
}

pub struct ApiMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    submitted: IntCounterVec,
    rejected: IntCounterVec,
    pool: IntGaugeVec,
    ended_cache: IntCounterVec,
    long_polls: IntGauge,
    event_streams: IntGauge,
}

/// One long-poll or event stream, counted in its gauge until dropped.
pub struct Waiting(IntGauge);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Request latencies from half a millisecond to a long-poll's 30 seconds.
const LATENCY_SECONDS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl ApiMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("conveyor_api_requests_total", "HTTP requests answered, by method, route template and status"),
            &["method", "route", "status"],
        );
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "conveyor_api_request_duration_seconds",
                "From a request's arrival to its answer, by method and route template",
            )
            .buckets(LATENCY_SECONDS.to_vec()),
            &["method", "route"],
        );
        let submitted = IntCounterVec::new(
            Opts::new("conveyor_api_jobs_submitted_total", "Jobs accepted (not idempotent replays), by queue and type"),
            &["queue", "type"],
        );
        let rejected = IntCounterVec::new(
            Opts::new(
                "conveyor_api_requests_rejected_total",
                "Requests refused before doing anything, by reason: validation, auth, rate_limit, admission, overload",
            ),
            &["reason"],
        );
        let pool = IntGaugeVec::new(
            Opts::new("conveyor_api_db_connections", "This replica's pooled Postgres connections, by state"),
            &["state"],
        );
        let ended_cache = IntCounterVec::new(
            Opts::new(
                "conveyor_api_ended_cache_lookups_total",
                "Job reads answered from memory (hit: read lately, unchanged since) or from Postgres (miss)",
            ),
            &["result"],
        );
        let long_polls = IntGauge::new(
            "conveyor_api_long_polls_waiting",
            "Long-polls (?wait=) waiting in this replica now; they hold a connection, no query",
        );
        let event_streams = IntGauge::new(
            "conveyor_api_event_streams_open",
            "Server-sent event streams open in this replica now; they hold a connection, no query",
        );
        let metrics = Self {
            long_polls: registered(&registry, long_polls),
            event_streams: registered(&registry, event_streams),
            requests: registered(&registry, requests),
            latency: registered(&registry, latency),
            submitted: registered(&registry, submitted),
            rejected: registered(&registry, rejected),
            pool: registered(&registry, pool),
            ended_cache: registered(&registry, ended_cache),
            registry,
        };
        // Every reason at 0 from the start: a rate of a series that appears
        // only with its first event reads as nothing at all until then.
        for reason in
            [Rejection::Validation, Rejection::Auth, Rejection::RateLimit, Rejection::Admission, Rejection::Overload]
        {
            metrics.rejected.with_label_values(&[reason.label()]);
        }
        for result in ["hit", "miss"] {
            metrics.ended_cache.with_label_values(&[result]);
        }
        metrics
    }

    /// One answered request. `method` is one of the standard methods or
    /// "other"; `route` a template or "unmatched".
    pub fn answered(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests.with_label_values(&[method, route, status.to_string().as_str()]).inc();
        self.latency.with_label_values(&[method, route]).observe(seconds);
    }

    pub fn rejected(&self, reason: Rejection) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    pub fn submitted(&self, queue: &str, kind: &str) {
        self.submitted.with_label_values(&[queue, kind]).inc();
    }

    /// Counts a long-poll as waiting until the guard is dropped.
    pub fn waiting(&self) -> Waiting {
        self.long_polls.inc();
        Waiting(self.long_polls.clone())
    }

    /// Counts an event stream as open until the guard is dropped.
    pub fn streaming(&self) -> Waiting {
        self.event_streams.inc();
        Waiting(self.event_streams.clone())
    }

    pub fn ended_cache(&self, hit: bool) {
        self.ended_cache.with_label_values(&[if hit { "hit" } else { "miss" }]).inc();
    }

    /// Everything, with the pool's gauges read now.
    pub fn render(&self, pool: &PgPool) -> String {
        let idle = i64::try_from(pool.num_idle()).unwrap_or(i64::MAX);
        let open = i64::from(pool.size());
        self.pool.with_label_values(&["idle"]).set(idle);
        self.pool.with_label_values(&["in_use"]).set((open - idle).max(0));
        shared::metrics::render(&self.registry)
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}
