//! The admin commands behind [`crate::cli`]. Each writes its result to `out`
//! (stdout in the binary) and returns an error for the caller to print as one
//! line; none changes anything when its input is bad.

use std::io::Write;

use anyhow::{Context as _, bail};
use chrono::Utc;
use serde_json::json;
use shared::config::Settings;
use shared::db::api_keys::{self, KeyRate};
use shared::db::jobs;
use shared::job::{Enqueued, Job, JobStatus, ListFilter, ListedJob, RequeueFilter, RequeueRefused};
use shared::outbox::Outbox;
use shared::queue::Publisher;
use sqlx::PgPool;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::keys;
use crate::cli::{JobsCommand, KeysCommand, PruneArgs, RequeueArgs};

/// Rows per statement in bulk requeue and prune: large enough to be quick,
/// small enough that no transaction or reply grows with the number of jobs.
pub const BATCH: i64 = 1000;

/// What a requeue did (or, in a dry run, would do).
#[derive(Debug, Default)]
struct Requeued {
    count: usize,
    /// Every id, kept only when they are printed (`--json`), so that memory
    /// stays flat however many jobs a bulk requeue moves.
    ids: Vec<Uuid>,
    /// Requeued, but not yet confirmed by RabbitMQ: left to the reconciler.
    unpublished: Vec<Uuid>,
}

impl Requeued {
    fn add(&mut self, ids: Vec<Uuid>, unpublished: Vec<Uuid>, keep_ids: bool) {
        self.count += ids.len();
        if keep_ids {
            self.ids.extend(ids);
        }
        self.unpublished.extend(unpublished);
    }
}

pub async fn requeue(
    settings: &Settings,
    pool: &PgPool,
    args: RequeueArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let publisher = Publisher::new(&settings.amqp, settings.queues.keys().cloned().collect(), "conveyor-cli");
    let tasks = TaskTracker::new();
    let outbox = Outbox::new(publisher, pool.clone(), &tasks);
    let done = if args.ids.is_empty() {
        requeue_matching(&outbox, pool, &args).await
    } else {
        requeue_ids(&outbox, pool, &args.ids, args.dry_run).await
    };
    // Records the confirms before the process ends (else the sweep republishes them).
    drop(outbox);
    tasks.close();
    tasks.wait().await;
    let done = done?;
    let Requeued { count, ids, unpublished } = done;
    match (args.json, args.dry_run) {
        (true, true) => writeln!(out, "{}", json!({"dry_run": true, "would_requeue": count, "ids": ids}))?,
        (true, false) => writeln!(out, "{}", json!({"requeued": count, "ids": ids, "unpublished": unpublished}))?,
        (false, true) => writeln!(out, "would requeue {count} job{}", plural(count))?,
        (false, false) => {
            writeln!(out, "requeued {count} job{}", plural(count))?;
            if !unpublished.is_empty() {
                writeln!(
                    out,
                    "{} of them could not be published yet; the reconciler will publish them",
                    unpublished.len()
                )?;
            }
        }
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// By id: all or nothing. Every id must name a failed or cancelled job; they
/// are checked and moved in one transaction.
async fn requeue_ids(outbox: &Outbox, pool: &PgPool, ids: &[Uuid], dry_run: bool) -> anyhow::Result<Requeued> {
    let moved = match jobs::requeue_exactly(pool, ids, dry_run).await.context("Failed to requeue")? {
        Ok(moved) => moved,
        Err(RequeueRefused::Missing(id)) => {
            bail!("no job {id}; nothing was requeued (`api jobs list --status failed` shows candidates)")
        }
        Err(RequeueRefused::NotEnded(id, status)) => {
            bail!("job {id} is {status}; only failed or cancelled jobs can be requeued (nothing was requeued)")
        }
    };
    let mut done = Requeued::default();
    if dry_run {
        done.add(ids.to_vec(), Vec::new(), true);
        return Ok(done);
    }
    let (ids, unpublished) = publish(outbox, moved).await;
    done.add(ids, unpublished, true);
    Ok(done)
}

/// By filter, in batches of [`BATCH`], each its own short statement.
async fn requeue_matching(outbox: &Outbox, pool: &PgPool, args: &RequeueArgs) -> anyhow::Result<Requeued> {
    let Some(status) = args.status else { bail!("give job ids or --status") };
    let filter = RequeueFilter {
        status,
        kind: args.kind.clone(),
        queue: args.queue.clone(),
        tenant: args.tenant.clone(),
        finished_since: args.since.map(|age| Utc::now() - age),
    };
    let mut remaining = args.limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let mut done = Requeued::default();
    let mut after = None;
    while remaining > 0 {
        let batch = BATCH.min(remaining);
        let (ids, unpublished) = if args.dry_run {
            let ids = jobs::requeue_preview(pool, &filter, after, batch).await.context("Failed to read the jobs")?;
            (ids, Vec::new())
        } else {
            let moved = jobs::requeue_batch(pool, &filter, after, batch).await.context("Failed to requeue")?;
            publish(outbox, moved).await
        };
        after = ids.iter().max().copied().or(after);
        let taken = i64::try_from(ids.len()).unwrap_or(i64::MAX);
        remaining -= taken;
        done.add(ids, unpublished, args.json);
        if taken < batch {
            break;
        }
    }
    Ok(done)
}

/// Publishes requeued jobs; returns (all ids, the ids whose publish failed).
async fn publish(outbox: &Outbox, moved: Vec<Enqueued>) -> (Vec<Uuid>, Vec<Uuid>) {
    let ids: Vec<Uuid> = moved.iter().map(|job| job.id).collect();
    if moved.is_empty() {
        return (ids, Vec::new());
    }
    let report = outbox.publish(moved).await;
    (ids, report.failed.into_iter().map(|(id, _)| id).collect())
}

pub async fn jobs(pool: &PgPool, command: JobsCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        JobsCommand::List { status, kind, queue, tenant, limit, json } => {
            let filter = ListFilter { status, kind, queue, before: None };
            // Operators see every field; a page of 1 MiB results is still only `limit` of them.
            let jobs =
                jobs::list(pool, tenant.as_deref(), &filter, limit, i32::MAX).await.context("Failed to list jobs")?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&jobs)?)?;
            } else {
                write_table(out, &jobs)?;
            }
        }
        JobsCommand::Show { id, json } => {
            let Some(job) = jobs::get_scoped(pool, None, id).await.context("Failed to read the job")? else {
                bail!("no job {id} (`api jobs list` shows the newest)");
            };
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&job)?)?;
            } else {
                write_job(out, &job)?;
            }
        }
    }
    Ok(())
}

fn write_table(out: &mut impl Write, jobs: &[ListedJob]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<36}  {:<12}  {:<9}  {:<10}  {:<10}  {:>7}  CREATED",
        "ID", "TENANT", "STATUS", "TYPE", "QUEUE", "ATTEMPT"
    )?;
    for job in jobs {
        writeln!(
            out,
            "{:<36}  {:<12}  {:<9}  {:<10}  {:<10}  {:>3}/{:<3}  {}",
            job.id,
            job.tenant,
            job.status,
            job.kind,
            job.queue,
            job.attempt,
            job.max_attempts,
            job.created_at.format("%Y-%m-%d %H:%M:%S")
        )?;
    }
    Ok(())
}

fn write_job(out: &mut impl Write, job: &Job) -> std::io::Result<()> {
    let time = |t: Option<chrono::DateTime<Utc>>| t.map_or("-".to_owned(), |t| t.to_rfc3339());
    writeln!(out, "id:            {}", job.id)?;
    writeln!(out, "tenant:        {}", job.tenant)?;
    writeln!(out, "type:          {}", job.kind)?;
    writeln!(out, "queue:         {}", job.queue)?;
    writeln!(out, "status:        {}", job.status)?;
    writeln!(out, "attempt:       {} of {}", job.attempt, job.max_attempts)?;
    writeln!(out, "priority:      {}", job.priority)?;
    writeln!(out, "requeued:      {} times", job.requeue_count)?;
    writeln!(out, "run at:        {}", job.run_at.to_rfc3339())?;
    writeln!(out, "created:       {}", job.created_at.to_rfc3339())?;
    writeln!(out, "started:       {}", time(job.started_at))?;
    writeln!(out, "finished:      {}", time(job.finished_at))?;
    writeln!(out, "payload:       {}", job.payload)?;
    if let Some(progress) = job.progress {
        writeln!(out, "progress:      {progress}%")?;
    }
    if let Some(result) = &job.result {
        writeln!(out, "result:        {result}")?;
    }
    if let Some(error) = &job.error {
        writeln!(out, "error:         {} ({:?}, attempt {})", error.message, error.kind, error.attempt)?;
    }
    Ok(())
}

pub async fn keys(pool: &PgPool, command: KeysCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create { tenant, name, scopes, rate_limit, burst } => {
            if scopes.names().is_empty() {
                bail!("--scopes must name at least one of jobs:read, jobs:write, admin");
            }
            let rate_limit = match (rate_limit, burst) {
                (Some(per_second), burst) => Some(KeyRate { per_second, burst: burst.unwrap_or(per_second * 2) }),
                (None, Some(_)) => bail!("--burst needs --rate-limit"),
                (None, None) => None,
            };
            let (_, token) = keys::create(pool, &tenant, name.as_deref(), scopes, rate_limit)
                .await
                .context("Failed to create the key")?;
            writeln!(out, "{token}")?;
        }
        KeysCommand::List { json } => {
            let keys = api_keys::list(pool).await.context("Failed to list keys")?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&keys)?)?;
            } else {
                writeln!(
                    out,
                    "{:<36}  {:<12}  {:<16}  {:<12}  {:<28}  {:<16}  STATUS",
                    "ID", "TENANT", "NAME", "PREFIX", "SCOPES", "RATE LIMIT"
                )?;
                for key in keys {
                    let status =
                        key.revoked_at.map_or("active".to_owned(), |at| format!("revoked {}", at.format("%Y-%m-%d")));
                    writeln!(
                        out,
                        "{:<36}  {:<12}  {:<16}  {:<12}  {:<28}  {:<16}  {status}",
                        key.id,
                        key.tenant,
                        key.name.as_deref().unwrap_or("-"),
                        key.prefix,
                        key.scopes.names().join(","),
                        key.rate_limit.map_or("tenant's".to_owned(), |r| format!("{}/s, {}", r.per_second, r.burst)),
                    )?;
                }
            }
        }
        KeysCommand::Revoke { key_id } => match api_keys::revoke(pool, key_id).await.context("Failed to revoke")? {
            Some(key) => writeln!(out, "revoked key {} (tenant {}, prefix {})", key.id, key.tenant, key.prefix)?,
            None => bail!("no key {key_id} (`api keys list` shows them)"),
        },
    }
    Ok(())
}

pub async fn prune(pool: &PgPool, args: PruneArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let statuses = if args.status.is_empty() {
        vec![JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled]
    } else {
        args.status
    };
    let before = Utc::now() - args.older_than;
    if args.dry_run {
        let count = jobs::prune_count(pool, &statuses, before).await.context("Failed to count jobs")?;
        writeln!(out, "would delete {count} job{}", plural(usize::try_from(count).unwrap_or(0)))?;
        return Ok(());
    }
    let mut deleted = 0u64;
    for status in statuses {
        let mut from = None;
        loop {
            let batch = jobs::prune_batch(pool, status, before, from, BATCH).await.context("Failed to delete jobs")?;
            deleted += batch.deleted;
            if batch.deleted < BATCH as u64 {
                break;
            }
            from = batch.last;
        }
    }
    writeln!(out, "deleted {deleted} job{}", plural(usize::try_from(deleted).unwrap_or(0)))?;
    Ok(())
}
