//! Configuration (README, "Configuration"): built-in defaults, then an optional TOML file, then
//! `CONVEYOR__…` environment variables, then `DATABASE_URL` / `AMQP_URL`.
//!
//! Loading validates everything once, so a bad value stops start-up with one
//! line naming the key instead of surfacing later as a confusing runtime error.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::job::JobStatus;

/// The defaults, documented key by key; the README points here.
pub const DEFAULTS: &str = include_str!("../config.default.toml");

/// Most `amqp.lanes`: every worker consumes every lane of its queues.
pub const MAX_LANES: u16 = 64;

/// Most `amqp.jobs_per_message`: 64 ids keep a message under the 4 KiB below
/// which RabbitMQ stores it with its queue index rather than in its message store.
pub const MAX_JOBS_PER_MESSAGE: u16 = 64;

/// Longest `jobs.idempotency_ttl_seconds` accepted: a year.
const MAX_IDEMPOTENCY_TTL_SECONDS: u64 = 366 * 24 * 3600;

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// `message` must start with the key it is about.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub http: HttpSettings,
    pub auth: AuthSettings,
    pub jobs: JobSettings,
    pub queues: BTreeMap<String, QueueSettings>,
    pub worker: WorkerSettings,
    pub rate_limit: RateLimitSettings,
    pub tenants: TenantSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub events: EventsSettings,
    pub retention: RetentionSettings,
}

/// The longest retention: far beyond any use, short enough for date arithmetic.
pub const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long ended jobs are kept before the workers' leader deletes them
/// (the work of `api prune`, done continuously). 0: kept until pruned by hand.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    pub succeeded_seconds: u64,
    pub failed_seconds: u64,
    pub cancelled_seconds: u64,
}

impl RetentionSettings {
    /// Each ended status with a retention, and how long its jobs are kept.
    pub fn rules(&self) -> Vec<(JobStatus, Duration)> {
        [
            (JobStatus::Succeeded, self.succeeded_seconds),
            (JobStatus::Failed, self.failed_seconds),
            (JobStatus::Cancelled, self.cancelled_seconds),
        ]
        .into_iter()
        .filter(|(_, seconds)| *seconds > 0)
        .map(|(status, seconds)| (status, Duration::from_secs(seconds)))
        .collect()
    }
}

/// Server-sent events (`GET /v1/jobs/{id}/events`, `GET /v1/events`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// How long an API process keeps the changes it heard, so that a client
    /// reconnecting with `Last-Event-ID` misses none.
    pub replay_seconds: u64,
    /// The most changes kept for that, whatever their age: bounds memory
    /// (about 100 bytes each) when jobs change fast.
    pub replay_changes: usize,
    /// A quiet stream sends a heartbeat this often, so that proxies and load
    /// balancers do not close it as idle.
    pub heartbeat_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP/HTTP collector base URL (`http://collector:4318`); spans go to
    /// its `/v1/traces`. Empty: no export.
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Jobs of one tenant running at once across all workers; 0: no cap.
    pub max_running: u32,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub migrate_on_start: bool,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: String,
    pub namespace: String,
    pub confirm_timeout_ms: u64,
    pub heartbeat_seconds: u16,
    /// RabbitMQ queues per Conveyor queue, tenants spread over them.
    pub lanes: u16,
    /// Jobs of one batch submission carried by one message, at most.
    pub jobs_per_message: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub body_limit_bytes: usize,
    pub ended_cache_seconds: u32,
    pub ended_cache_bytes: usize,
    pub list_page_bytes: usize,
    /// Requests worked on at once per API process; 0: derived from the pool
    /// size (see [`Settings::max_in_flight`]).
    pub max_in_flight: usize,
    /// Addresses (CIDRs) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// On SIGTERM, how long connections already open are still served
    /// (each answer closing its connection) before the server stops.
    pub drain_ms: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub jwt_hs256_secret: String,
    pub jwt_rs256_public_key_file: String,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub key_cache_ttl_ms: u64,
}

/// Hand-written so that the URL's password never reaches a log.
impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &crate::redact::secrets(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

/// Hand-written so that the URL's password never reaches a log.
impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &crate::redact::secrets(&self.url))
            .field("namespace", &self.namespace)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .field("heartbeat_seconds", &self.heartbeat_seconds)
            .field("lanes", &self.lanes)
            .field("jobs_per_message", &self.jobs_per_message)
            .finish()
    }
}

/// Hand-written so that the JWT secret never reaches a log.
impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("jwt_hs256_secret", &if self.jwt_hs256_secret.is_empty() { "" } else { "***" })
            .field("jwt_rs256_public_key_file", &self.jwt_rs256_public_key_file)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("key_cache_ttl_ms", &self.key_cache_ttl_ms)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    pub default_max_attempts: i32,
    pub default_timeout_seconds: i32,
    pub max_attempts_limit: i32,
    pub timeout_seconds_limit: i32,
    pub retry_backoff_base_ms: u64,
    pub retry_backoff_cap_ms: u64,
    pub payload_max_bytes: usize,
    pub result_max_bytes: usize,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl_seconds: u64,
    pub http: HttpJobSettings,
}

/// What `http` jobs may reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpJobSettings {
    /// CIDRs or `host:port` admitted beside public addresses.
    pub allow: Vec<String>,
}

/// A queue's settings; both keys may be left out (a queue is then declared by
/// naming it alone, e.g. `CONVEYOR__QUEUES__CRITICAL__WEIGHT=2`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    pub max_depth: u64,
    pub weight: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self { max_depth: 1_000_000, weight: 1 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub queues: Vec<String>,
    pub concurrency: u16,
    pub shutdown_grace_seconds: u64,
    pub heartbeat_seconds: u32,
    pub lease_seconds: u32,
    pub reconcile_interval_ms: u64,
    pub leader_ttl_seconds: u32,
    pub outbox_grace_seconds: u32,
    /// The worker's health and metrics port (`/healthz`, `/readyz`,
    /// `/metrics`) on `http.host`; 0: none.
    pub http_port: u16,
}

/// Where tenant rate-limit buckets live.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    /// In each API process: a tenant gets the limit once per replica.
    Local,
    /// In Redis, shared by every replica.
    Redis,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub tenant_per_second: u32,
    pub tenant_burst: u32,
    pub ip_per_second: u32,
    pub ip_burst: u32,
    pub backend: RateLimitBackend,
    pub redis_url: String,
}

impl std::fmt::Debug for RateLimitSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitSettings")
            .field("tenant_per_second", &self.tenant_per_second)
            .field("tenant_burst", &self.tenant_burst)
            .field("ip_per_second", &self.ip_per_second)
            .field("ip_burst", &self.ip_burst)
            .field("backend", &self.backend)
            .field("redis_url", &crate::redact::secrets(&self.redis_url))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// In-flight requests per pooled database connection, for the default
/// `http.max_in_flight`: enough to keep every connection busy with batched
/// inserts, few enough that an accepted request does not queue behind many.
pub const IN_FLIGHT_PER_CONNECTION: usize = 8;

impl Settings {
    /// `http.max_in_flight`, or when it is 0, [`IN_FLIGHT_PER_CONNECTION`] per
    /// `database.max_connections` (128 with the default 16).
    pub fn max_in_flight(&self) -> usize {
        match self.http.max_in_flight {
            0 => (self.database.max_connections as usize).saturating_mul(IN_FLIGHT_PER_CONNECTION),
            n => n,
        }
    }

    /// Loads every layer: defaults, `file` (or `CONVEYOR_CONFIG`), the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os("CONVEYOR_CONFIG");
        let file = file.or(env_file.as_deref().map(Path::new));
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::from_layers(file, &vars)
    }

    /// The built-in defaults alone, ignoring the environment: what tests start from.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::from_layers(None, &[])
    }

    /// Builds settings from the defaults, an optional file and the given
    /// environment (passed in, so that tests need not mutate the process's).
    pub fn from_layers(file: Option<&Path>, vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError(format!("config file {} does not exist", file.display())));
            }
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let env: config::Map<String, String> =
            vars.iter().filter(|(key, _)| key.starts_with("CONVEYOR__")).cloned().collect();
        builder = builder.add_source(
            config::Environment::with_prefix("CONVEYOR")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("worker.queues")
                .with_list_parse_key("jobs.http.allow")
                .with_list_parse_key("http.trusted_proxies")
                .source(Some(env)),
        );
        // The conventional names win over everything, as in most twelve-factor tools.
        for (alias, key) in [("DATABASE_URL", "database.url"), ("AMQP_URL", "amqp.url")] {
            if let Some((_, value)) = vars.iter().find(|(name, _)| name == alias) {
                builder =
                    builder.set_override(key, value.as_str()).map_err(|e| ConfigError(format!("{alias}: {e}")))?;
            }
        }
        let settings: Settings =
            builder.build().and_then(config::Config::try_deserialize).map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot say. Each message names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<(), ConfigError> {
            if ok { Ok(()) } else { Err(ConfigError(msg())) }
        }
        check(self.database.url.starts_with("postgres"), || "database.url must be a postgres:// URL".into())?;
        check(self.database.max_connections >= 1, || "database.max_connections must be at least 1".into())?;
        check(self.database.acquire_timeout_ms >= 1, || "database.acquire_timeout_ms must be at least 1".into())?;
        check(self.amqp.url.starts_with("amqp"), || "amqp.url must be an amqp:// URL".into())?;
        if let Err(e) = self.amqp.url.parse::<lapin::uri::AMQPUri>() {
            return Err(ConfigError(format!("amqp.url is not a valid AMQP URL: {e}")));
        }
        check(is_name(&self.amqp.namespace), || {
            format!("amqp.namespace {:?} must be 1-64 of [a-zA-Z0-9_-]", self.amqp.namespace)
        })?;
        check(self.amqp.confirm_timeout_ms >= 1, || "amqp.confirm_timeout_ms must be at least 1".into())?;
        check(self.amqp.heartbeat_seconds >= 1, || {
            "amqp.heartbeat_seconds must be at least 1: without heartbeats a frozen worker keeps its messages".into()
        })?;
        check((1..=MAX_LANES).contains(&self.amqp.lanes), || format!("amqp.lanes must be between 1 and {MAX_LANES}"))?;
        check((1..=MAX_JOBS_PER_MESSAGE).contains(&self.amqp.jobs_per_message), || {
            format!("amqp.jobs_per_message must be between 1 and {MAX_JOBS_PER_MESSAGE}")
        })?;
        check(self.http.body_limit_bytes >= 1024, || "http.body_limit_bytes must be at least 1024".into())?;
        check(self.http.list_page_bytes >= 1024, || "http.list_page_bytes must be at least 1024".into())?;
        check(self.auth.jwt_hs256_secret.is_empty() || self.auth.jwt_hs256_secret.len() >= 32, || {
            "auth.jwt_hs256_secret must be at least 32 bytes (or empty to turn HS256 off)".into()
        })?;
        check(self.auth.key_cache_ttl_ms <= 60_000, || {
            "auth.key_cache_ttl_ms must be at most 60000: it bounds how long a revoked key still works".into()
        })?;
        for (status, keep) in self.retention.rules() {
            check(keep <= MAX_RETENTION, || {
                format!("retention.{status}_seconds must be at most {} (100 years)", MAX_RETENTION.as_secs())
            })?;
        }
        let jobs = &self.jobs;
        check(jobs.max_attempts_limit >= 1, || "jobs.max_attempts_limit must be at least 1".into())?;
        check(jobs.timeout_seconds_limit >= 1, || "jobs.timeout_seconds_limit must be at least 1".into())?;
        check((1..=jobs.max_attempts_limit).contains(&jobs.default_max_attempts), || {
            "jobs.default_max_attempts must be between 1 and jobs.max_attempts_limit".into()
        })?;
        check((1..=jobs.timeout_seconds_limit).contains(&jobs.default_timeout_seconds), || {
            "jobs.default_timeout_seconds must be between 1 and jobs.timeout_seconds_limit".into()
        })?;
        check(jobs.retry_backoff_base_ms >= 1 && jobs.retry_backoff_base_ms <= jobs.retry_backoff_cap_ms, || {
            "jobs.retry_backoff_base_ms must be at least 1 and at most jobs.retry_backoff_cap_ms".into()
        })?;
        check(jobs.payload_max_bytes >= 2, || "jobs.payload_max_bytes must be at least 2 (`{}`)".into())?;
        check(jobs.result_max_bytes >= 4, || "jobs.result_max_bytes must be at least 4 (`null`)".into())?;
        check(jobs.result_max_bytes <= i32::MAX as usize, || "jobs.result_max_bytes must be below 2 GiB".into())?;
        check((1..=MAX_IDEMPOTENCY_TTL_SECONDS).contains(&jobs.idempotency_ttl_seconds), || {
            format!("jobs.idempotency_ttl_seconds must be between 1 and {MAX_IDEMPOTENCY_TTL_SECONDS} (a year)")
        })?;
        if let Err(e) = crate::kinds::http::destination::Allow::parse(&jobs.http.allow) {
            return Err(ConfigError(format!("jobs.http.allow: {e}")));
        }
        for proxy in &self.http.trusted_proxies {
            let entry = proxy.trim();
            let parses = entry.parse::<ipnet::IpNet>().is_ok() || entry.parse::<std::net::IpAddr>().is_ok();
            check(parses, || format!("http.trusted_proxies: {entry:?} is neither an address nor a CIDR"))?;
        }
        let rate = &self.rate_limit;
        check(rate.backend == RateLimitBackend::Local || rate.redis_url.starts_with("redis://"), || {
            "rate_limit.redis_url must be a redis:// URL".into()
        })?;
        check(!self.queues.is_empty(), || "queues must name at least one queue".into())?;
        for (name, queue) in &self.queues {
            check(is_name(name), || format!("queues.{name}: a queue name must be 1-64 of [a-zA-Z0-9_-]"))?;
            check(queue.weight >= 1, || format!("queues.{name}.weight must be at least 1"))?;
        }
        check(self.events.heartbeat_seconds >= 1, || "events.heartbeat_seconds must be at least 1".into())?;
        check(self.events.replay_changes >= 1, || "events.replay_changes must be at least 1".into())?;
        self.check_worker_queues(&self.worker.queues)?;
        let worker = &self.worker;
        check(worker.concurrency >= 1, || "worker.concurrency must be at least 1".into())?;
        check(worker.heartbeat_seconds >= 1, || "worker.heartbeat_seconds must be at least 1".into())?;
        check(worker.lease_seconds >= worker.heartbeat_seconds.saturating_mul(2), || {
            "worker.lease_seconds must be at least 2 × worker.heartbeat_seconds, or healthy workers lose their jobs"
                .into()
        })?;
        check(worker.reconcile_interval_ms >= 1, || "worker.reconcile_interval_ms must be at least 1".into())?;
        check(worker.leader_ttl_seconds >= 1, || "worker.leader_ttl_seconds must be at least 1".into())?;
        check(worker.reconcile_interval_ms.saturating_mul(2) <= u64::from(worker.leader_ttl_seconds) * 1000, || {
            "worker.reconcile_interval_ms must be at most half of worker.leader_ttl_seconds: \
             the active reconciler renews its leadership at every pass"
                .into()
        })?;
        Ok(())
    }

    /// A worker may only consume queues that are configured.
    pub fn check_worker_queues(&self, queues: &[String]) -> Result<(), ConfigError> {
        if queues.is_empty() {
            return Err(ConfigError("worker.queues must name at least one queue".into()));
        }
        match queues.iter().find(|q| !self.queues.contains_key(*q)) {
            Some(unknown) => Err(ConfigError(format!(
                "worker.queues: queue {unknown:?} is not configured (known: {})",
                self.queues.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
            None => Ok(()),
        }
    }
}

impl DatabaseSettings {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }
}

impl JobSettings {
    /// How long a job waits before attempt `attempt + 1`, after attempt `attempt` failed.
    pub fn retry_delay(&self, attempt: i32) -> Duration {
        crate::job::retry_delay(
            attempt,
            Duration::from_millis(self.retry_backoff_base_ms),
            Duration::from_millis(self.retry_backoff_cap_ms),
        )
    }
}

impl AmqpSettings {
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }
}

impl WorkerSettings {
    pub fn leader_ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.leader_ttl_seconds))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(u64::from(self.heartbeat_seconds))
    }
}

/// Queue and namespace names end up in RabbitMQ names and URLs: keep them plain.
pub fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn error_of(pairs: &[(&str, &str)]) -> String {
        match Settings::from_layers(None, &env(pairs)) {
            Ok(_) => panic!("{pairs:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_load_and_work_on_localhost() {
        let s = Settings::defaults().expect("defaults are valid");
        assert_eq!(s.database.url, "postgres://postgres@127.0.0.1:5432/conveyor");
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.jobs.default_max_attempts, 5);
        assert_eq!(s.jobs.default_timeout_seconds, 300);
        assert_eq!(s.http.body_limit_bytes, 1024 * 1024);
        assert!(s.queues.contains_key("default"));
    }

    #[test]
    fn environment_overrides_defaults_and_aliases_win() {
        let s = Settings::from_layers(
            None,
            &env(&[
                ("CONVEYOR__HTTP__PORT", "9999"),
                ("CONVEYOR__WORKER__QUEUES", "critical,default"),
                ("CONVEYOR__JOBS__HTTP__ALLOW", "127.0.0.1/32,hooks.internal:8080"),
                ("CONVEYOR__QUEUES__CRITICAL__WEIGHT", "3"),
                ("CONVEYOR__DATABASE__URL", "postgres://ignored/db"),
                ("DATABASE_URL", "postgres://u@h/db"),
                ("AMQP_URL", "amqp://h:5672/v"),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(s.http.port, 9999);
        assert_eq!(s.worker.queues, ["critical", "default"]);
        assert_eq!(s.jobs.http.allow, ["127.0.0.1/32", "hooks.internal:8080"]);
        assert_eq!(s.queues["critical"].weight, 3);
        assert_eq!(s.queues["critical"].max_depth, 1_000_000, "left-out keys take their defaults");
        assert_eq!(s.database.url, "postgres://u@h/db");
        assert_eq!(s.amqp.url, "amqp://h:5672/v");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        assert!(error_of(&[("CONVEYOR__HTTP__PORT", "eighty")]).contains("http.port"));
        assert!(error_of(&[("CONVEYOR__HTTP__PORT", "70000")]).contains("http.port"));
        // Zero intervals would panic a background loop; a lease near the heartbeat would lapse.
        assert!(error_of(&[("CONVEYOR__WORKER__HEARTBEAT_SECONDS", "0")]).contains("worker.heartbeat_seconds"));
        assert!(error_of(&[("CONVEYOR__WORKER__RECONCILE_INTERVAL_MS", "0")]).contains("reconcile_interval_ms"));
        assert!(error_of(&[("CONVEYOR__WORKER__LEASE_SECONDS", "9")]).contains("worker.lease_seconds"));
        assert!(error_of(&[("CONVEYOR__WORKER__CONCURRENCY", "0")]).contains("worker.concurrency"));
        assert!(error_of(&[("CONVEYOR__WORKER__LEADER_TTL_SECONDS", "0")]).contains("worker.leader_ttl_seconds"));
        // A leader passing less often than half its lease would let it lapse between passes.
        assert!(
            error_of(&[
                ("CONVEYOR__WORKER__LEADER_TTL_SECONDS", "2"),
                ("CONVEYOR__WORKER__RECONCILE_INTERVAL_MS", "1500")
            ])
            .contains("worker.reconcile_interval_ms")
        );
        assert!(error_of(&[("CONVEYOR__AMQP__HEARTBEAT_SECONDS", "0")]).contains("amqp.heartbeat_seconds"));
        assert!(error_of(&[("CONVEYOR__AMQP__HEARTBEAT_SECONDS", "70000")]).contains("amqp.heartbeat_seconds"));
        assert!(error_of(&[("CONVEYOR__LOG__FORMAT", "xml")]).contains("log.format"));
        assert!(error_of(&[("CONVEYOR__WORKER__QUEUES", "nope")]).contains("worker.queues"));
        assert!(error_of(&[("DATABASE_URL", "mysql://x")]).contains("database.url"));
        assert!(error_of(&[("AMQP_URL", "amqp://h:port/v")]).contains("amqp.url"));
        assert!(error_of(&[("CONVEYOR__JOBS__HTTP__ALLOW", "10.0.0.0/8,intranet")]).contains("jobs.http.allow"));
        // Beyond any date Postgres or chrono could subtract it from.
        let forever = u64::MAX.to_string();
        assert!(error_of(&[("CONVEYOR__RETENTION__FAILED_SECONDS", &forever)]).contains("retention.failed_seconds"));
    }

    #[test]
    fn retention_rules_name_only_the_statuses_with_one() {
        let s =
            Settings::from_layers(None, &env(&[("CONVEYOR__RETENTION__SUCCEEDED_SECONDS", "86400")])).expect("valid");
        assert_eq!(s.retention.rules(), [(JobStatus::Succeeded, Duration::from_secs(86_400))]);
        assert!(Settings::defaults().expect("valid").retention.rules().is_empty(), "kept forever by default");
    }

    #[test]
    fn settings_printed_for_debugging_show_no_password() {
        let s = Settings::from_layers(
            None,
            &env(&[
                ("DATABASE_URL", "postgres://app:pg-s3cret@db/conveyor"),
                ("AMQP_URL", "amqp://app:mq-s3cret@mq/%2f"),
            ]),
        )
        .expect("valid");
        let printed = format!("{s:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("postgres://app:***@db/conveyor") && printed.contains("amqp://app:***@mq/%2f"));
    }

    #[test]
    fn an_unknown_key_is_refused_not_ignored() {
        assert!(error_of(&[("CONVEYOR__HTTP__PROT", "80")]).contains("prot"));
    }

    /// Every key of the defaults file, dotted (`http.port`).
    fn default_keys() -> Vec<String> {
        fn walk(prefix: &str, value: config::Value, out: &mut Vec<String>) {
            match value.into_table() {
                Ok(table) => {
                    for (key, value) in table {
                        let path = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                        walk(&path, value, out);
                    }
                }
                Err(_) => out.push(prefix.to_owned()),
            }
        }
        let defaults = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.cache.into_table())
            .expect("defaults parse");
        let mut keys = Vec::new();
        walk("", config::Value::from(defaults), &mut keys);
        keys
    }

    #[test]
    fn the_readme_documents_every_key() {
        let readme = include_str!("../../README.md");
        let keys = default_keys();
        assert!(keys.len() > 15, "{keys:?}");
        for key in keys {
            let documented = key.replacen("queues.default.", "queues.<name>.", 1);
            assert!(readme.contains(&format!("| `{documented}` |")), "README lacks a row for {documented}");
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err =
            Settings::from_layers(Some(Path::new("/nonexistent/conveyor.toml")), &[]).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("/nonexistent/conveyor.toml")));
    }
}
