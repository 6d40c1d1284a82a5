//! `api`: serves the HTTP API (the default) and runs admin commands.

use std::process::ExitCode;

use anyhow::Context as _;
use api::cli::{Cli, Command};
use api::commands;
use api::startup::Application;
use shared::config::Settings;
use shared::db;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match shared::cli::parse::<Cli>("api") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("api: {}", shared::redact::secrets(&line));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    let command = cli.command.unwrap_or(Command::Serve);
    if matches!(command, Command::Serve) {
        shared::telemetry::init(settings.log.format);
    } else {
        // Commands print their results; only warnings and errors are logged.
        shared::telemetry::init_quiet(settings.log.format);
    }
    if let Command::Serve = command {
        let app = Application::build(settings).await?;
        return app.run_until_stopped().await.context("HTTP server failed");
    }
    let pool = db::pool(&settings.database).context("Failed to configure the database pool")?;
    let mut out = std::io::stdout().lock();
    match command {
        Command::Serve => unreachable!("served above"),
        Command::Migrate => {
            db::migrate(&settings.database, &pool).await?;
            println!("migrated {}", db::redact(&settings.database.url));
        }
        Command::Requeue(args) => commands::requeue(&settings, &pool, args, &mut out).await?,
        Command::Jobs(command) => commands::jobs(&pool, command, &mut out).await?,
        Command::Keys(command) => commands::keys(&pool, command, &mut out).await?,
        Command::Prune(args) => commands::prune(&pool, args, &mut out).await?,
    }
    pool.close().await;
    Ok(())
}
