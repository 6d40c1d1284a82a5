//! `worker`: consumes Conveyor queues and runs jobs until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use shared::config::Settings;
use tokio_util::sync::CancellationToken;
use worker::{Worker, WorkerConfig};

/// Conveyor worker: runs the jobs of the given queues.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file, layered over the built-in defaults.
    #[arg(long, env = "CONVEYOR_CONFIG")]
    config: Option<PathBuf>,
    /// Queues to consume, comma-separated [default: worker.queues].
    #[arg(long, value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// Jobs run at once [default: worker.concurrency].
    #[arg(long)]
    concurrency: Option<u16>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e:#}");
            std::process::ExitCode::FAILURE
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
