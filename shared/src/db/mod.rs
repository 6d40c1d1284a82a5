//! The storage layer: every SQL statement of Conveyor lives in this module,
//! one submodule per table or concern, each statement written whole and
//! checked against the schema at compile time (`sqlx::query!`, with the
//! offline data in `.sqlx/`). Callers get domain types ([`crate::job`]) and
//! one error type, [`Error`].
//!
//! - [`jobs`]: the job lifecycle: insert, claim, renew, finish, cancel, requeue, list, prune.
//! - [`outbox`]: publishes waiting for RabbitMQ's confirm, and the sweep of those that never got one.
//! - [`api_keys`]: API keys, stored as hashes.
//! - [`idempotency`]: idempotency keys and what their first request created.
//! - [`workers`]: worker registration, heartbeats and what they hold.
//! - [`leadership`]: the reconciler's leadership and its fencing term.
//! - [`notify`]: `LISTEN` for cancel requests and job changes.
//! - [`queues`]: counts across queues for operators.

use std::sync::Arc;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::config::DatabaseSettings;

pub mod api_keys;
pub mod idempotency;
pub mod jobs;
pub mod lanes;
pub mod leadership;
pub mod notify;
pub mod outbox;
pub mod queues;
mod types;
pub mod workers;

/// The `NOTIFY` channel on which the API announces that a running job was
/// cancelled; the payload is the job id.
pub const CANCEL_CHANNEL: &str = "conveyor_cancel";

/// The `NOTIFY` channel on which Postgres itself (a trigger) announces that an
/// ended job changed or was deleted: a requeue or a prune. No payload.
pub const ENDED_CHANGED_CHANNEL: &str = "conveyor_ended_changed";

/// The `NOTIFY` channel on which Postgres (triggers, see the migrations
/// `job_changes`, `job_change_events` and `job_created_events`) announces how jobs
/// changed in a way a client sees (created, status, progress, a cancel
/// request): a number, then a line per job. Long-polls, the job cache and
/// event streams follow it.
pub const JOB_CHANGED_CHANNEL: &str = "conveyor_job_changed";

/// A failed call to Postgres. Cloneable, so that one failed statement can
/// answer every request batched into it; the cause is kept, never flattened
/// into a string.
#[derive(Debug, Clone)]
pub enum Error {
    /// Postgres cannot be reached, or no pooled connection came free in time:
    /// worth retrying shortly (the API answers 503, workers hand messages back).
    Unavailable(Arc<sqlx::Error>),
    /// Postgres refused the statement: a constraint, a value it cannot store.
    Refused(Arc<sqlx::Error>),
    /// Anything else: a statement that no longer fits the schema, a row that
    /// does not decode, a batching task that stopped. A bug, not a condition.
    Other(Arc<dyn std::error::Error + Send + Sync>),
}

/// The result of a database call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether retrying later may succeed (the API's 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    fn cause(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Unavailable(e) | Self::Refused(e) => &**e,
            Self::Other(e) => &**e,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self {
            Self::Unavailable(_) => "Postgres is unavailable",
            Self::Refused(_) => "Postgres refused the statement",
            Self::Other(_) => "database call failed",
        };
        // The cause is part of the message (logs print `%e`); its own causes
        // follow as this error's source.
        write!(f, "{what}: {}", self.cause())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause().source()
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        // Listed in full so a new variant is a conscious choice, not a silent 500.
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                Self::Unavailable(Arc::new(e))
            }
            // Class 08: connection exception; 57P01-03: admin shutdown, crash, cannot connect now.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) => {
                Self::Unavailable(Arc::new(e))
            }
            sqlx::Error::Database(_) => Self::Refused(Arc::new(e)),
            _ => Self::Other(Arc::new(e)),
        }
    }
}

impl From<crate::batch::BatchFailure> for Error {
    fn from(failure: crate::batch::BatchFailure) -> Self {
        Self::Other(Arc::new(failure))
    }
}

/// Whether Postgres answers (readiness probes).
pub async fn ping(db: &PgPool) -> Result<()> {
    sqlx::query!("SELECT 1 AS one").fetch_one(db).await?;
    Ok(())
}

/// The migrations in `migrations/`, compiled in so a binary can migrate alone.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Opens a pool sized and bounded by `settings`. Connections are made lazily,
/// so a process starts (and answers `/healthz`) while Postgres is down.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = settings.url.parse()?;
    Ok(bounded(settings, options.application_name("conveyor")))
}

/// [`pool`] for the API server, whose statements are all lookups by key and
/// walks of one index chosen by the statement's shape (the listings), so the
/// right plan never depends on the values: each statement is planned once
/// per connection (`plan_cache_mode = force_generic_plan`). Left to itself,
/// Postgres plans a listing again at every execution once the table is
/// large (its generic estimate for an unknown tenant looks worse than a
/// custom plan), which cost ~0.2 ms of a ~0.6 ms page at 10 million jobs.
pub fn server_pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = settings.url.parse()?;
    let options = options.application_name("conveyor").options([("plan_cache_mode", "force_generic_plan")]);
    Ok(bounded(settings, options))
}

fn bounded(settings: &DatabaseSettings, options: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        // Bounded waits: a request never queues for a connection longer than this,
        // it gets a 503 instead.
        .acquire_timeout(settings.acquire_timeout())
        // No ping per acquire: a broken connection fails the query that uses it,
        // which is answered like any other database error, and the round trip is saved.
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// A pool of `connections` beside `pool` (same database, options and waits)
/// whose commits do not wait for the WAL to reach the disk
/// (`synchronous_commit = off`): for writes a Postgres crash may undo because
/// something else repairs them (the worker's claims). Such a commit is
/// visible at once, and durable with the next commit that waits, or within
/// a fraction of a second by the WAL writer.
pub fn unflushed(pool: &PgPool, connections: u32) -> PgPool {
    let options = (*pool.connect_options()).clone().options([("synchronous_commit", "off")]);
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .test_before_acquire(pool.options().get_test_before_acquire())
        .connect_lazy_with(options)
}

/// Creates the database named in `url` if it does not exist yet.
pub async fn ensure_database(url: &str) -> Result<bool, sqlx::Error> {
    if Postgres::database_exists(url).await? {
        return Ok(false);
    }
    match Postgres::create_database(url).await {
        Ok(()) => Ok(true),
        // Two replicas starting together may race to create it; losing that race is fine.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates the database if needed and applies pending migrations. Migrations
/// take an advisory lock, so replicas starting at once apply them one at a time.
pub async fn migrate(settings: &DatabaseSettings, pool: &PgPool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    ensure_database(&settings.url)
        .await
        .with_context(|| format!("Failed to create the database of {}", redact(&settings.url)))?;
    MIGRATOR.run(pool).await.context("Failed to apply migrations")?;
    Ok(())
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    crate::redact::secrets(url).into_owned()
}
