//! One job, from message to recorded outcome: parse the message, claim the job
//! (queued → running, with a fresh lease token), acknowledge the message, run
//! the handler under its timeout, and write the outcome fenced by the lease.
//!
//! The [`Executor`] also knows every job it runs, so that its heartbeat can
//! renew their leases and stop a handler whose job was cancelled by a client,
//! whose lease was lost, or that the worker must hand back at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use shared::config::JobSettings;
use shared::db::jobs::{self, Released};
use shared::job::{Claimed, FailureKind, JobFailure, Lease, Outcome, RawJson};
use shared::kinds::{self, JobContext, JobError, Resources};
use shared::outbox::Outbox;
use shared::queue::Delivery;
use shared::spans::{self, Attribute, Spans};
use shared::trace::TraceParent;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::batch::{Claimer, OutcomeWriter};
use crate::envelope::{Claim, Envelope};
use crate::metrics::{JobEvent, Metrics};

/// How long to wait before handing a message back when Postgres is unreachable,
/// so a database outage does not turn into a hot redelivery loop.
const DB_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Outcome writes are retried this many times before the lease is left to expire.
const FINISH_ATTEMPTS: u32 = 5;

/// The connections claims are written on: their commits do not wait for
/// the WAL to reach the disk ([`shared::db::unflushed`]). A claim is not
/// what makes a job durable (its row, committed at submission, is), and a
/// claim lost to a Postgres crash is recovered: its job is `queued` again
/// with its message already acknowledged, which the reconciler's lost-message
/// check publishes again; and the outcome of a run cannot be durable without
/// its claim, since the outcome's own (synchronous) commit flushes the WAL in
/// order. Two connections: the claimer runs one statement at a time.
fn claim_pool(pool: &PgPool) -> PgPool {
    shared::db::unflushed(pool, 2)
}

/// Why a running handler was told to stop. The first reason given wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stop {
    /// A client cancelled the job: it ends `cancelled`.
    Cancelled = 1,
    /// The worker is shutting down: the job is handed back, unfinished.
    Shutdown = 2,
    /// The lease is no longer ours (expired and rescued): write nothing.
    LeaseLost = 3,
}

impl Stop {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Cancelled),
            2 => Some(Self::Shutdown),
            3 => Some(Self::LeaseLost),
            _ => None,
        }
    }
}

/// A job this worker is running.
struct Running {
    token: Uuid,
    cancel: CancellationToken,
    stop: Arc<AtomicU8>,
}

/// Runs jobs for one worker process.
pub struct Executor {
    pool: PgPool,
    outbox: Outbox,
    claimer: Claimer,
    outcomes: OutcomeWriter,
    settings: JobSettings,
    resources: Resources,
    lease_seconds: i32,
    running: Mutex<HashMap<Uuid, Running>>,
    /// See [`Limits::finishing`].
    finishing: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// Cancel requests for jobs not running here (yet): a notification can
    /// arrive between a job's claim and its registration here, and must not
    /// wait for the next heartbeat. Requests for other workers' jobs land here
    /// too; each is kept for [`PENDING_CANCEL_TTL`].
    pending_cancels: Mutex<HashMap<Uuid, std::time::Instant>>,
    /// Where each attempt's span goes (nowhere unless `telemetry.otlp_endpoint`).
    spans: Spans,
}

/// How long a cancel request for a job not running here is kept.
const PENDING_CANCEL_TTL: Duration = Duration::from_secs(10);

/// Pending cancel requests kept at most (a flood of cancels for other
/// workers' jobs must not grow without bound).
const PENDING_CANCELS_MAX: usize = 10_000;

/// How a handler run ended, before it is turned into an [`Outcome`].
#[derive(Debug)]
enum Ran {
    Returned(Result<RawJson, JobError>),
    Panicked(String),
    TimedOut,
}

/// What to write after a run.
/// The bounds an executor claims jobs within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `worker.lease_seconds`.
    pub lease_seconds: u32,
    /// `tenants.max_running`; 0: no cap.
    pub max_running: u32,
    /// Jobs whose handler has returned and whose outcome is still being
    /// written, at most (the worker's concurrency). Past it a finished job
    /// keeps its slot until its outcome is written, so a slow database slows
    /// the claims too instead of piling up outcomes.
    pub finishing: usize,
}

#[derive(Debug)]
enum After {
    Finish(Outcome),
    /// Hand the job back to the queue (shutdown).
    Release,
    /// Nothing: the lease is gone.
    Abandon,
}

impl Executor {
    /// An executor for worker `worker_id`; its batching tasks run on `tasks`
    /// and end once the executor is dropped.
    pub fn new(
        worker_id: Uuid,
        pool: PgPool,
        outbox: Outbox,
        settings: JobSettings,
        limits: Limits,
        resources: Resources,
        tasks: &TaskTracker,
    ) -> Self {
        let lease_seconds = i32::try_from(limits.lease_seconds).unwrap_or(i32::MAX);
        let max_running = i32::try_from(limits.max_running).unwrap_or(i32::MAX);
        let metrics = Arc::new(Metrics::new());
        Self {
            resources,
            claimer: Claimer::spawn(tasks, claim_pool(&pool), worker_id, lease_seconds, max_running, metrics.clone()),
            outcomes: OutcomeWriter::spawn(tasks, pool.clone(), metrics.clone()),
            pool,
            outbox,
            settings,
            lease_seconds,
            running: Mutex::new(HashMap::new()),
            finishing: Arc::new(Semaphore::new(limits.finishing.max(1))),
            metrics,
            pending_cancels: Mutex::new(HashMap::new()),
            spans: Spans::off(),
        }
    }

    /// Exports each attempt's span to `spans`.
    pub fn with_spans(mut self, spans: Spans) -> Self {
        self.spans = spans;
        self
    }

    /// What it counts (see [`Metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Jobs running now.
    pub fn in_flight(&self) -> usize {
        self.running.lock().map_or(0, |running| running.len())
    }

    /// Tells the handler of job `id`, if it runs here (the run holding
    /// `token`, when given), to stop for `why`.
    fn stop(&self, id: Uuid, token: Option<Uuid>, why: Stop) {
        if let Ok(running) = self.running.lock()
            && let Some(job) = running.get(&id)
            && token.is_none_or(|token| token == job.token)
        {
            let _ = job.stop.compare_exchange(0, why as u8, Ordering::SeqCst, Ordering::SeqCst);
            job.cancel.cancel();
        }
    }

    /// A client asked to cancel job `id`.
    pub fn cancel(&self, id: Uuid) {
        let running = self.running.lock().is_ok_and(|running| running.contains_key(&id));
        if running {
            // Whichever run it is: a cancel is of the job, not of one run.
            self.stop(id, None, Stop::Cancelled);
        } else if let Ok(mut pending) = self.pending_cancels.lock() {
            if pending.len() >= PENDING_CANCELS_MAX {
                pending.retain(|_, at| at.elapsed() < PENDING_CANCEL_TTL);
                if pending.len() >= PENDING_CANCELS_MAX {
                    pending.clear();
                }
            }
            pending.insert(id, std::time::Instant::now());
        }
    }

    /// Whether a cancel of `id` arrived before it ran here.
    fn cancel_pending(&self, id: Uuid) -> bool {
        self.pending_cancels
            .lock()
            .ok()
            .and_then(|mut pending| pending.remove(&id))
            .is_some_and(|at| at.elapsed() < PENDING_CANCEL_TTL)
    }

    /// Stops every running handler whose lease can no longer be renewed: past
    /// the lease, the job may be rescued and run elsewhere, and two copies of
    /// it must not run for long. Their outcomes will be discarded.
    pub fn abandon_all(&self) {
        let ids: Vec<Uuid> = self.running.lock().map(|r| r.keys().copied().collect()).unwrap_or_default();
        for id in ids {
            self.stop(id, None, Stop::LeaseLost);
        }
    }

    /// Tells every running handler to stop so that its job can be handed back.
    pub fn stop_all(&self) {
        let ids: Vec<Uuid> = self.running.lock().map(|r| r.keys().copied().collect()).unwrap_or_default();
        for id in ids {
            self.stop(id, None, Stop::Shutdown);
        }
    }

    /// Renews the leases of every running job, and stops the handlers of jobs
    /// that were cancelled meanwhile or whose lease is gone.
    pub async fn renew_leases(&self) -> shared::db::Result<()> {
        let leases: Vec<Lease> = match self.running.lock() {
            Ok(running) => running.iter().map(|(id, job)| Lease { id: *id, token: job.token }).collect(),
            Err(_) => return Ok(()),
        };
        if leases.is_empty() {
            return Ok(());
        }
        let held = jobs::renew(&self.pool, &leases, self.lease_seconds).await?;
        // By lease, not by job id: the job may have ended meanwhile and a new
        // run of it started here, which this answer says nothing about.
        for lease in &leases {
            match held.iter().find(|(id, _)| *id == lease.id) {
                Some((_, true)) => self.stop(lease.id, Some(lease.token), Stop::Cancelled),
                Some((_, false)) => {}
                None => self.stop(lease.id, Some(lease.token), Stop::LeaseLost),
            }
        }
        Ok(())
    }

    /// Handles one delivery to the end, its jobs one after another (the
    /// worker's loop starts them as slots free up instead: see
    /// [`crate::envelope::Turns`]). Never panics and never returns an error:
    /// whatever happens is acknowledged, dead-lettered or handed back, and logged.
    pub async fn handle(&self, delivery: Delivery) {
        let Some(envelope) = Envelope::open(delivery).await else { return };
        let envelope = Arc::new(envelope);
        while let Some(job_id) = envelope.next_job() {
            self.run_one(&envelope, job_id, None).await;
        }
    }

    /// Claims job `job_id` of `envelope` and runs it to its outcome. A job
    /// that is not queued (a duplicate message, or ended meanwhile) is skipped.
    ///
    /// `slot` (the worker's permit to run a job) is given back as soon as the
    /// handler returns, not when the outcome is written: the write is batched
    /// with others and takes a commit, and a slot held through it would leave
    /// the worker idle between short jobs. At most [`Limits::finishing`]
    /// outcomes wait for their write that way.
    pub async fn run_one(&self, envelope: &Envelope, job_id: Uuid, slot: Option<OwnedSemaphorePermit>) {
        let claimed = match self.claimer.claim(job_id).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(job.id = %job_id, error = %e, "could not claim job; handing the message back");
                tokio::time::sleep(DB_ERROR_BACKOFF).await;
                envelope.give_back().await;
                return;
            }
        };
        let Some(job) = claimed else {
            match jobs::status(&self.pool, job_id).await {
                Ok(Some(status)) => {
                    tracing::debug!(job.id = %job_id, %status, "job is not queued; dropping it from its message");
                    envelope.resolved(Claim::Done).await;
                }
                Ok(None) => {
                    tracing::warn!(job.id = %job_id, "message names a job that does not exist");
                    envelope.resolved(Claim::Missing).await;
                }
                Err(e) => {
                    tracing::warn!(job.id = %job_id, error = %e, "could not read job status; handing the message back");
                    tokio::time::sleep(DB_ERROR_BACKOFF).await;
                    envelope.give_back().await;
                }
            }
            return;
        };
        // The claim is committed: from here on Postgres holds the job (its
        // lease), so the message has done its work for it (and once every job
        // it names is claimed, it is acknowledged). If the ack is lost, the
        // redelivered message finds the job running and drops it. The job does
        // not wait for the ack: on a connection that just died an ack can hang
        // (bounded, but seconds), and a claimed job that does not run or renew
        // its lease is only rescued when the lease expires.
        let trace = JobTrace::of(&job, self.spans.recording());
        let span = trace.span(&job);
        tokio::join!(envelope.resolved(Claim::Done), self.execute(job, trace, slot).instrument(span));
    }

    async fn execute(&self, job: Claimed, trace: JobTrace, slot: Option<OwnedSemaphorePermit>) {
        let started = std::time::Instant::now();
        let started_at = std::time::SystemTime::now();
        let lease = job.lease();
        let cancel = CancellationToken::new();
        let stop = Arc::new(AtomicU8::new(0));
        self.metrics.job(&job.queue, &job.kind, JobEvent::Started);
        let waited = Utc::now().signed_duration_since(job.run_at);
        self.metrics.picked_up(&job.queue, waited.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6);
        if let Ok(mut running) = self.running.lock() {
            running.insert(job.id, Running { token: job.lease_token, cancel: cancel.clone(), stop: stop.clone() });
            self.metrics.set_in_flight(running.len());
        }
        if self.cancel_pending(job.id) {
            self.stop(job.id, Some(job.lease_token), Stop::Cancelled);
        }
        let ran = match kinds::find(&job.kind) {
            Some(kind) => self.run_handler(kind, &job, lease, cancel).await,
            None => Ran::Returned(Err(JobError::Permanent(format!("unknown job type {:?}", job.kind)))),
        };
        if let Ok(mut running) = self.running.lock()
            && running.get(&job.id).is_some_and(|run| run.token == job.lease_token)
        {
            running.remove(&job.id);
            self.metrics.set_in_flight(running.len());
        }
        let elapsed = started.elapsed();
        self.metrics.ran(&job.queue, &job.kind, elapsed.as_secs_f64());
        let elapsed_ms = elapsed.as_millis() as u64;
        let after = self.after(&job, ran, Stop::from_u8(stop.load(Ordering::SeqCst)));
        if self.spans.recording() {
            self.spans.record(trace.finished(&job, &after, started_at));
        }
        let _finishing = self.finishing.clone().acquire_owned().await;
        drop(slot);
        match after {
            After::Finish(outcome) => self.finish(&job, outcome, elapsed_ms).await,
            After::Release => self.release(lease).await,
            After::Abandon => tracing::warn!(elapsed_ms, "lease lost while running; the outcome is discarded"),
        }
    }

    async fn finish(&self, job: &Claimed, mut outcome: Outcome, elapsed_ms: u64) {
        let (lease, attempt) = (job.lease(), job.attempt);
        let mut status = outcome.status();
        for try_ in 1..=FINISH_ATTEMPTS {
            match self.outcomes.write(lease, outcome.clone()).await {
                Ok(true) => {
                    tracing::info!(%status, elapsed_ms, "job finished");
                    self.count_outcome(job, &outcome);
                    return;
                }
                Ok(false) => {
                    // The lease is no longer ours (it expired and the job was
                    // rescued, possibly claimed again): our outcome is void.
                    tracing::warn!(%status, "outcome discarded: this run no longer holds the job's lease");
                    return;
                }
                // Postgres will not store this outcome (a value it cannot hold):
                // writing it again cannot help, and leaving it would run the job
                // again and again. The attempt fails for good, saying why.
                Err(e @ shared::db::Error::Refused(_)) if !matches!(outcome, Outcome::Failed(_)) => {
                    tracing::warn!(error = %e, "the outcome cannot be stored; failing the job");
                    let message = format!("the job's outcome could not be stored: {e}");
                    outcome = Outcome::Failed(JobFailure { message, kind: FailureKind::Permanent, attempt });
                    status = outcome.status();
                }
                Err(e) => {
                    tracing::warn!(error = %e, try_, "could not record outcome; retrying");
                    tokio::time::sleep(DB_ERROR_BACKOFF * try_).await;
                }
            }
        }
        tracing::error!(%status, "could not record outcome; the lease will expire and the job be retried");
    }

    fn count_outcome(&self, job: &Claimed, outcome: &Outcome) {
        let (event, failure) = match outcome {
            Outcome::Succeeded(_) => (JobEvent::Succeeded, None),
            Outcome::Retrying { error, .. } => (JobEvent::Retried, Some(error)),
            Outcome::Failed(error) => (JobEvent::Failed, Some(error)),
            Outcome::Cancelled(error) => (JobEvent::Cancelled, Some(error)),
        };
        self.metrics.job(&job.queue, &job.kind, event);
        if failure.is_some_and(|failure| failure.kind == FailureKind::Timeout) {
            self.metrics.job(&job.queue, &job.kind, JobEvent::TimedOut);
        }
    }

    /// Hands an interrupted job back: queued again and published at once.
    async fn release(&self, lease: Lease) {
        match jobs::release(&self.pool, lease).await {
            Ok(Some(Released::Queued(job))) => {
                tracing::info!("handed back unfinished at shutdown");
                self.outbox.publish(vec![job]).await;
            }
            Ok(Some(Released::Cancelled)) => tracing::info!("stopped at shutdown, and cancelled as requested"),
            Ok(None) => tracing::warn!("could not hand back: this run no longer holds the job's lease"),
            Err(e) => tracing::warn!(error = %e, "could not hand back; the lease will expire and the job be retried"),
        }
    }

    async fn run_handler(
        &self,
        kind: &'static kinds::Kind,
        job: &Claimed,
        lease: Lease,
        cancel: CancellationToken,
    ) -> Ran {
        let (progress_tx, mut progress_rx) = watch::channel(None);
        let ctx = JobContext::new(job.id, job.attempt, cancel.clone(), progress_tx, self.resources.clone());
        // A task of its own: a panic in the handler ends that task, not the worker,
        // and a timed-out handler can be aborted.
        let mut handler = tokio::spawn(kind.run(job.payload.clone(), ctx));

        let pool = self.pool.clone();
        let progress = tokio::spawn(async move {
            // Ends when the handler drops its context (the sender).
            while progress_rx.changed().await.is_ok() {
                let Some(percent) = *progress_rx.borrow_and_update() else {
                    continue;
                };
                if let Err(e) = jobs::set_progress(&pool, lease, i16::from(percent)).await {
                    tracing::debug!(error = %e, "could not record progress");
                }
            }
        });

        let timeout = Duration::from_secs(u64::try_from(job.timeout_seconds).unwrap_or(1));
        let ran = match tokio::time::timeout(timeout, &mut handler).await {
            Ok(Ok(returned)) => Ran::Returned(returned),
            Ok(Err(e)) if e.is_panic() => Ran::Panicked(panic_message(e.into_panic())),
            Ok(Err(e)) => Ran::Panicked(e.to_string()),
            Err(_) => {
                cancel.cancel();
                handler.abort();
                Ran::TimedOut
            }
        };
        // Let the last progress write land before the outcome, so it cannot
        // arrive after it (it would be fenced out anyway).
        let _ = progress.await;
        ran
    }

    fn after(&self, job: &Claimed, ran: Ran, stop: Option<Stop>) -> After {
        let failure = |kind: FailureKind, message: String| JobFailure { message, kind, attempt: job.attempt };
        // A result too large to keep fails the attempt for good: running it
        // again would make the same result.
        let max = self.settings.result_max_bytes;
        let ran = match ran {
            Ran::Returned(Ok(result)) if result.len() > max => Ran::Returned(Err(JobError::Permanent(format!(
                "the result is {} bytes, more than jobs.result_max_bytes ({max})",
                result.len()
            )))),
            ran => ran,
        };
        // A handler that finished its work before it noticed a stop keeps its result.
        let ran = match (ran, stop) {
            (Ran::Returned(Ok(result)), _) => return After::Finish(Outcome::Succeeded(result)),
            (_, Some(Stop::LeaseLost)) => return After::Abandon,
            (_, Some(Stop::Shutdown)) => return After::Release,
            (_, Some(Stop::Cancelled)) => {
                let cancelled = failure(FailureKind::Cancelled, "cancelled by request while running".to_owned());
                return After::Finish(Outcome::Cancelled(cancelled));
            }
            (ran, None) => ran,
        };
        let (kind, message) = match ran {
            Ran::Returned(Ok(result)) => return After::Finish(Outcome::Succeeded(result)),
            // Only a stop makes a handler return Cancelled; without one, it is a bug
            // in the handler, and retrying is the safe reading.
            Ran::Returned(Err(JobError::Cancelled)) => {
                (FailureKind::Retryable, "the handler stopped without being asked to".to_owned())
            }
            Ran::Returned(Err(JobError::Retryable(message))) => (FailureKind::Retryable, message),
            Ran::Returned(Err(JobError::Permanent(message))) => (FailureKind::Permanent, message),
            Ran::Panicked(message) => (FailureKind::Panic, format!("handler panicked: {message}")),
            Ran::TimedOut => (FailureKind::Timeout, format!("timed out after {} s", job.timeout_seconds)),
        };
        let error = failure(kind, message);
        if kind.is_retryable() && job.attempt < job.max_attempts {
            let delay = self.settings.retry_delay(job.attempt);
            let retry_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            After::Finish(Outcome::Retrying { error, retry_at })
        } else {
            After::Finish(Outcome::Failed(error))
        }
    }
}

/// Waits for a settlement of a delivery, logging one that failed: the message
/// then stays with RabbitMQ, which delivers it again.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => panic.downcast_ref::<&str>().map_or_else(|| "non-string panic".to_owned(), |s| (*s).to_owned()),
    }
}

/// This attempt's place in the trace of the request that submitted the job:
/// a child of the API's span for it. A job stored without a `traceparent`
/// starts a trace of its own (sampled when spans are exported).
#[derive(Debug, Clone, Copy)]
struct JobTrace {
    run: TraceParent,
    parent: Option<TraceParent>,
}

impl JobTrace {
    fn of(job: &Claimed, recording: bool) -> Self {
        let parent = job.traceparent.as_deref().and_then(TraceParent::parse);
        let root = if recording { TraceParent::sampled_root } else { TraceParent::root };
        Self { run: parent.map_or_else(root, |parent| parent.child()), parent }
    }

    /// The span every log line about this attempt is in: the job's id, type,
    /// attempt and request id, and `trace_id`, `span_id` (this attempt's)
    /// and `parent_span_id` (the API's span for the request).
    fn span(&self, job: &Claimed) -> tracing::Span {
        tracing::info_span!(
            "job",
            job.id = %job.id,
            job.kind = %job.kind,
            job.attempt = job.attempt,
            request_id = job.request_id.as_deref().unwrap_or_default(),
            trace_id = self.run.trace_id(),
            span_id = self.run.span_id(),
            parent_span_id = self.parent.map(|parent| parent.span_id()),
        )
    }

    /// The attempt as an exported span, from `started` to now.
    fn finished(&self, job: &Claimed, after: &After, started: std::time::SystemTime) -> spans::Finished {
        let (outcome, error) = match after {
            After::Finish(outcome) => {
                let error = match outcome {
                    Outcome::Succeeded(_) => None,
                    Outcome::Retrying { error, .. } | Outcome::Failed(error) | Outcome::Cancelled(error) => {
                        Some(error.message.clone())
                    }
                };
                (outcome.status().as_str(), error)
            }
            After::Release => ("released", None),
            After::Abandon => ("abandoned", Some("the lease was lost while running".to_owned())),
        };
        spans::Finished {
            name: format!("job {}", job.kind),
            kind: spans::Kind::Consumer,
            span: self.run,
            parent: self.parent,
            start: started,
            end: std::time::SystemTime::now(),
            attributes: vec![
                ("messaging.system", Attribute::Text("rabbitmq".to_owned())),
                ("messaging.destination.name", Attribute::Text(job.queue.clone())),
                ("conveyor.job.id", Attribute::Text(job.id.to_string())),
                ("conveyor.job.type", Attribute::Text(job.kind.clone())),
                ("conveyor.job.attempt", Attribute::Int(i64::from(job.attempt))),
                ("conveyor.job.outcome", Attribute::Text(outcome.to_owned())),
            ],
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The claim connections, and only they, commit without waiting for the disk.
    #[sqlx::test(migrations = false)]
    async fn claims_commit_without_waiting_for_the_disk(pool: PgPool) {
        let setting = |pool: PgPool| async move {
            sqlx::query_scalar::<_, String>("SHOW synchronous_commit").fetch_one(&pool).await.expect("query")
        };
        assert_eq!(setting(claim_pool(&pool)).await, "off");
        assert_eq!(setting(pool).await, "on");
    }
}
