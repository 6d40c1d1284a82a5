//! Logging set-up shared by both binaries: `tracing` to stderr, pretty or
//! JSON by configuration, filtered by `RUST_LOG` (default `info`, Postgres notices at `warn`),
//! passwords in URLs masked.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call more than once (tests do): later calls are no-ops.
pub fn init(format: LogFormat) {
    // sqlx relays every Postgres NOTICE at info, including the harmless "already
    // exists, skipping" of each idempotent migration run: quiet by default.
    install(format, "info,sqlx::postgres::notice=warn");
}

/// Like [`init`], but only warnings and errors unless `RUST_LOG` says more:
/// for CLI commands, whose output is their result.
pub fn init_quiet(format: LogFormat) {
    install(format, "warn");
}

fn install(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Every line passes through the password filter: errors from sqlx or lapin
    // may quote the URL they were given.
    let writer = || crate::redact::Redacting(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
