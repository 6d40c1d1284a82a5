//! `api`: serves the HTTP API (the default) and runs admin commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use api::startup::Application;
use clap::{Parser, Subcommand};
use shared::config::Settings;
use shared::db;

/// Conveyor API server and admin CLI.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file, layered over the built-in defaults.
    #[arg(long, global = true, env = "CONVEYOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Create the database if missing and apply pending migrations.
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    shared::telemetry::init(settings.log.format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(settings).await?;
            app.run_until_stopped().await.context("HTTP server failed")
        }
        Command::Migrate => {
            let pool = db::pool(&settings.database).context("Failed to configure the database pool")?;
            db::migrate(&settings.database, &pool).await?;
            println!("migrated {}", db::redact(&settings.database.url));
            Ok(())
        }
    }
}
