//! The `api` command line: `serve` (the default) and the admin commands (the
//! README's "Admin CLI"). Every command exits 0 on success and otherwise prints one line on
//! stderr and exits non-zero.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use shared::job::JobStatus;
use uuid::Uuid;

use crate::auth::Scopes;

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
    /// Put failed or cancelled jobs back in their queues, attempts restarted.
    Requeue(RequeueArgs),
    /// Inspect jobs, across tenants.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Delete finished jobs older than a given age.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["ids", "status"]))]
pub struct RequeueArgs {
    /// Jobs to requeue, by id. All must exist and be failed or cancelled, or nothing is changed.
    #[arg(conflicts_with_all = ["status", "kind", "queue", "tenant", "since", "limit"])]
    pub ids: Vec<Uuid>,
    /// Requeue every job in this status (failed or cancelled) that matches the filters.
    #[arg(long, value_parser = requeueable_status)]
    pub status: Option<JobStatus>,
    /// Only jobs of this type.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Only jobs of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only jobs of this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only jobs that finished within this long (e.g. 30m, 24h, 7d).
    #[arg(long, value_parser = parse_age)]
    pub since: Option<chrono::Duration>,
    /// At most this many jobs.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Show what would be requeued; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON (with every id) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        #[arg(long, value_parser = parse_status)]
        status: Option<JobStatus>,
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one job.
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the token alone on stdout (it is never shown again).
    Create {
        #[arg(long, value_parser = parse_tenant)]
        tenant: String,
        /// A label for people.
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated: jobs:read, jobs:write, admin.
        #[arg(long, default_value = "jobs:read,jobs:write")]
        scopes: Scopes,
        /// Requests per second for this key, in a bucket of its own instead
        /// of its tenant's (`rate_limit.tenant_per_second`).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate_limit: Option<u32>,
        /// Requests at once for this key [default: 2 × --rate-limit].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
        burst: Option<u32>,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key; API replicas refuse it within `auth.key_cache_ttl_ms`.
    Revoke { key_id: Uuid },
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Delete jobs that finished longer ago than this (e.g. 7d, 12h).
    #[arg(long, value_parser = parse_age)]
    pub older_than: chrono::Duration,
    /// Only these terminal statuses, comma-separated [default: all three].
    #[arg(long, value_delimiter = ',', value_parser = terminal_status)]
    pub status: Vec<JobStatus>,
    /// Count what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_status(s: &str) -> Result<JobStatus, String> {
    s.parse().map_err(|e| format!("{e}"))
}

fn requeueable_status(s: &str) -> Result<JobStatus, String> {
    match parse_status(s)? {
        status @ (JobStatus::Failed | JobStatus::Cancelled) => Ok(status),
        other => Err(format!("only failed or cancelled jobs can be requeued, not {other}")),
    }
}

fn terminal_status(s: &str) -> Result<JobStatus, String> {
    match parse_status(s)? {
        status if status.is_terminal() => Ok(status),
        other => Err(format!("only finished jobs (succeeded, failed, cancelled) are pruned, not {other}")),
    }
}

fn parse_tenant(s: &str) -> Result<String, String> {
    if shared::config::is_name(s) { Ok(s.to_owned()) } else { Err("a tenant is 1-64 of [a-zA-Z0-9_-]".to_owned()) }
}

/// `90s`, `30m`, `24h`, `7d`, `2w`.
pub fn parse_age(s: &str) -> Result<chrono::Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: i64 = number.parse().map_err(|_| format!("{s:?} is not an age like 30m, 24h or 7d"))?;
    let age = match unit {
        "s" => chrono::Duration::try_seconds(n),
        "m" => chrono::Duration::try_minutes(n),
        "h" => chrono::Duration::try_hours(n),
        "d" => chrono::Duration::try_days(n),
        "w" => chrono::Duration::try_weeks(n),
        _ => return Err(format!("{s:?} has no unit: use s, m, h, d or w (e.g. 24h)")),
    };
    let age =
        age.filter(|age| *age > chrono::Duration::zero()).ok_or_else(|| format!("{s:?} is not a positive age"))?;
    // Far enough back for any history, near enough that `now - age` is a time.
    if age > chrono::Duration::days(MAX_AGE_DAYS) {
        return Err(format!("{s:?} is longer than {MAX_AGE_DAYS} days"));
    }
    Ok(age)
}

/// The longest age taken: a century.
const MAX_AGE_DAYS: i64 = 36_525;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_take_a_number_and_a_unit() {
        assert_eq!(parse_age("90s"), Ok(chrono::Duration::seconds(90)));
        assert_eq!(parse_age("24h"), Ok(chrono::Duration::hours(24)));
        assert_eq!(parse_age("7d"), Ok(chrono::Duration::days(7)));
        for bad in ["", "7", "d", "7y", "-1d", "0h", "1.5h", "99999999d", "99999999999999999999s", "36526d"] {
            assert!(parse_age(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn requeue_needs_ids_or_a_status_but_not_both() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["api", "requeue"], args].concat());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--status", "succeeded"]).is_err());
        assert!(parse(&["--status", "failed", "--since", "24h", "--dry-run"]).is_ok());
        let id = Uuid::now_v7().to_string();
        assert!(parse(&[&id]).is_ok());
        assert!(parse(&[&id, "--status", "failed"]).is_err());
        assert!(parse(&["not-a-uuid"]).is_err());
    }
}
