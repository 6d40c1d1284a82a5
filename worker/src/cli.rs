//! The `worker` command line.

use std::path::PathBuf;

use clap::Parser;

/// Conveyor worker: runs the jobs of the given queues until SIGINT or SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
pub struct Cli {
    /// TOML configuration file, layered over the built-in defaults.
    #[arg(long, env = "CONVEYOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Queues to consume, comma-separated [default: worker.queues].
    #[arg(long, value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Jobs run at once; also the prefetch [default: worker.concurrency].
    #[arg(long)]
    pub concurrency: Option<u16>,
}
