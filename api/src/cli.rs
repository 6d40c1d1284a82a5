//! The `api` command line: `serve` (the default) and admin subcommands (SPEC §7).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Conveyor API server and admin CLI.
#[derive(Debug, Parser)]
#[command(name = "api", version)]
pub struct Cli {
    /// TOML configuration file, layered over the built-in defaults.
    #[arg(long, global = true, env = "CONVEYOR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Create the database if missing and apply pending migrations.
    Migrate,
}
