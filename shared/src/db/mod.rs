//! Postgres access: the pool, the migrations, every query on the jobs table
//! ([`jobs`]), on the workers table ([`workers`]) and on the reconciler's
//! leadership ([`leadership`]).

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::config::DatabaseSettings;

pub mod jobs;
pub mod leadership;
pub mod workers;

/// The `NOTIFY` channel on which the API announces that a running job was
/// cancelled; the payload is the job id.
pub const CANCEL_CHANNEL: &str = "conveyor_cancel";

/// The `NOTIFY` channel on which Postgres itself (a trigger) announces that an
/// ended job changed or was deleted: a requeue or a prune. No payload.
pub const ENDED_CHANGED_CHANNEL: &str = "conveyor_ended_changed";

/// Whether `e` means Postgres could not be reached (answered 503 by the API,
/// retried by workers), as opposed to a statement it refused.
pub fn unavailable(e: &sqlx::Error) -> bool {
    // Listed in full so a new variant is a conscious choice, not a silent 500.
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            // Class 08: connection exception; 57P01-03: admin shutdown, crash, cannot connect now.
            db.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P"))
        }
        _ => false,
    }
}

/// The migrations in `migrations/`, compiled in so a binary can migrate alone.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Opens a pool sized and bounded by `settings`. Connections are made lazily,
/// so a process starts (and answers `/healthz`) while Postgres is down.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = settings.url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        // Bounded waits: a request never queues for a connection longer than this,
        // it gets a 503 instead (SPEC §4).
        .acquire_timeout(settings.acquire_timeout())
        // No ping per acquire: a broken connection fails the query that uses it,
        // which is answered like any other database error, and the round trip is saved.
        .test_before_acquire(false)
        .connect_lazy_with(options.application_name("conveyor")))
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
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
    }
}
