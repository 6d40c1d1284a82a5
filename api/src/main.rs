//! `api`: serves the HTTP API (the default) and runs admin commands.

use std::process::ExitCode;

use anyhow::Context as _;
use api::cli::{Cli, Command};
use api::startup::Application;
use clap::Parser as _;
use shared::config::Settings;
use shared::db;

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
