//! `worker`: consumes Conveyor queues and runs jobs until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context as _;
use shared::config::Settings;
use tokio_util::sync::CancellationToken;
use worker::cli::Cli;
use worker::{Worker, WorkerConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match shared::cli::parse::<Cli>("worker") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("worker: {}", shared::redact::secrets(&line));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    shared::telemetry::init(settings.log.format);
    let mut config = WorkerConfig::from_settings(&settings);
    if let Some(queues) = cli.queues {
        config.queues = queues;
    }
    if let Some(concurrency) = cli.concurrency {
        config.concurrency = concurrency;
    }
    let pool = shared::db::pool(&settings.database).context("Failed to configure the database pool")?;
    let worker = Worker::new(settings, pool, config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::signal::cancel_on_signal(shutdown.clone()));
    worker.run(shutdown).await
}
