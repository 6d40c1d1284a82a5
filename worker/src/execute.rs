//! One job, from message to recorded outcome: parse the message, claim the job
//! (queued → running), acknowledge the message, run the handler under its
//! timeout, and write the outcome fenced by the attempt number.

use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::Value;
use shared::config::JobSettings;
use shared::db::jobs::{self, Claimed, Outcome};
use shared::job::{FailureKind, JobFailure};
use shared::kinds::{self, JobContext, JobError};
use shared::queue::Message;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

/// Seconds a lease outlives the job's own timeout: room for the worker to
/// notice the timeout and record it before anyone may rescue the job.
const LEASE_MARGIN_SECONDS: i32 = 30;

/// How long to wait before handing a message back when Postgres is unreachable,
/// so a database outage does not turn into a hot redelivery loop.
const DB_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Outcome writes are retried this many times before the lease is left to expire.
const FINISH_ATTEMPTS: u32 = 5;

/// Runs jobs for one worker process.
pub struct Executor {
    worker_id: Uuid,
    pool: PgPool,
    settings: JobSettings,
    /// Parent of every running job's token: cancelled when the worker must stop
    /// jobs it could not finish within its grace period.
    stopping: CancellationToken,
}

/// How a handler run ended, before it is turned into an [`Outcome`].
#[derive(Debug)]
enum Ran {
    Returned(Result<Value, JobError>),
    Panicked(String),
    TimedOut,
}

impl Executor {
    pub fn new(worker_id: Uuid, pool: PgPool, settings: JobSettings) -> Self {
        Self {
            worker_id,
            pool,
            settings,
            stopping: CancellationToken::new(),
        }
    }

    /// Tells every running handler to stop (cooperatively).
    pub fn stop_all(&self) {
        self.stopping.cancel();
    }

    /// Handles one delivery to the end. Never panics and never returns an error:
    /// whatever happens is acknowledged, dead-lettered or handed back, and logged.
    pub async fn handle(&self, delivery: Delivery) {
        let message: Message = match serde_json::from_slice(&delivery.data) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, routing_key = %delivery.routing_key, "unparseable message; dead-lettering it");
                reject(&delivery, false).await;
                return;
            }
        };
        match message {
            Message::RunJob { job_id } => self.run_job(job_id, delivery).await,
        }
    }

    async fn run_job(&self, job_id: Uuid, delivery: Delivery) {
        let claimed = match jobs::claim(&self.pool, job_id, self.worker_id, LEASE_MARGIN_SECONDS).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(job.id = %job_id, error = %e, "could not claim job; handing the message back");
                tokio::time::sleep(DB_ERROR_BACKOFF).await;
                reject(&delivery, true).await;
                return;
            }
        };
        let Some(job) = claimed else {
            self.drop_unclaimable(job_id, &delivery).await;
            return;
        };
        // The claim is committed: from here on Postgres holds the job (its lease),
        // so the message has done its work. If this ack is lost, the redelivered
        // message finds the job running and is dropped.
        if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
            tracing::warn!(job.id = %job_id, error = %e, "could not acknowledge a claimed job's message");
        }
        let request_id = job.request_id.clone().unwrap_or_default();
        let span = tracing::info_span!("job", job.id = %job.id, job.kind = %job.kind, job.attempt = job.attempt, request_id = %request_id);
        self.execute(job).instrument(span).await;
    }

    /// A message whose job is not queued: a duplicate (already claimed), or for
    /// a job finished or cancelled meanwhile. Dropped. A message for a job that
    /// does not exist at all is dead-lettered, to be looked at.
    async fn drop_unclaimable(&self, job_id: Uuid, delivery: &Delivery) {
        match jobs::status(&self.pool, job_id).await {
            Ok(Some(status)) => {
                tracing::debug!(job.id = %job_id, %status, "job is not queued; dropping its message");
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(job.id = %job_id, error = %e, "could not acknowledge a message");
                }
            }
            Ok(None) => {
                tracing::warn!(job.id = %job_id, "message for a job that does not exist; dead-lettering it");
                reject(delivery, false).await;
            }
            Err(e) => {
                tracing::warn!(job.id = %job_id, error = %e, "could not read job status; handing the message back");
                tokio::time::sleep(DB_ERROR_BACKOFF).await;
                reject(delivery, true).await;
            }
        }
    }

    async fn execute(&self, job: Claimed) {
        let started = std::time::Instant::now();
        let ran = match kinds::find(&job.kind) {
            Some(kind) => self.run_handler(kind, &job).await,
            None => Ran::Returned(Err(JobError::Permanent(format!("unknown job type {:?}", job.kind)))),
        };
        let outcome = self.outcome(&job, ran);
        let status = outcome.status();
        for attempt in 1..=FINISH_ATTEMPTS {
            match jobs::finish(&self.pool, job.id, job.attempt, &outcome).await {
                Ok(true) => {
                    tracing::info!(%status, elapsed_ms = started.elapsed().as_millis() as u64, "job finished");
                    return;
                }
                Ok(false) => {
                    // Our attempt is no longer the running one (the lease expired and
                    // the job was rescued, or it was cancelled): our outcome is void.
                    tracing::warn!(%status, "outcome discarded: this attempt no longer owns the job");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, try_ = attempt, "could not record outcome; retrying");
                    tokio::time::sleep(DB_ERROR_BACKOFF * attempt).await;
                }
            }
        }
        tracing::error!(%status, "could not record outcome; the lease will expire and the job be rescued");
    }

    async fn run_handler(&self, kind: &'static kinds::Kind, job: &Claimed) -> Ran {
        let cancel = self.stopping.child_token();
        let (progress_tx, mut progress_rx) = watch::channel(None);
        let ctx = JobContext::new(job.id, job.attempt, cancel.clone(), progress_tx);
        // A task of its own: a panic in the handler ends that task, not the worker,
        // and a timed-out handler can be aborted.
        let mut handler = tokio::spawn(kind.run(job.payload.clone(), ctx));

        let (pool, id, attempt) = (self.pool.clone(), job.id, job.attempt);
        let progress = tokio::spawn(async move {
            // Ends when the handler drops its context (the sender).
            while progress_rx.changed().await.is_ok() {
                let Some(percent) = *progress_rx.borrow_and_update() else {
                    continue;
                };
                if let Err(e) = jobs::set_progress(&pool, id, attempt, i16::from(percent)).await {
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

    fn outcome(&self, job: &Claimed, ran: Ran) -> Outcome {
        let failure = |kind: FailureKind, message: String| JobFailure {
            message,
            kind,
            attempt: job.attempt,
        };
        let (kind, message) = match ran {
            Ran::Returned(Ok(result)) => return Outcome::Succeeded(result),
            Ran::Returned(Err(JobError::Cancelled)) if self.stopping.is_cancelled() => {
                // Stopped by our own shutdown, not by a client: run it again elsewhere.
                (FailureKind::Retryable, "interrupted by worker shutdown".to_owned())
            }
            Ran::Returned(Err(JobError::Cancelled)) => {
                return Outcome::Cancelled(failure(FailureKind::Cancelled, "cancelled".to_owned()));
            }
            Ran::Returned(Err(JobError::Retryable(message))) => (FailureKind::Retryable, message),
            Ran::Returned(Err(JobError::Permanent(message))) => (FailureKind::Permanent, message),
            Ran::Panicked(message) => (FailureKind::Panic, format!("handler panicked: {message}")),
            Ran::TimedOut => (
                FailureKind::Timeout,
                format!("timed out after {} s", job.timeout_seconds),
            ),
        };
        let error = failure(kind, message);
        if kind.is_retryable() && job.attempt < job.max_attempts {
            let delay = self.settings.retry_delay(job.attempt);
            let retry_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            Outcome::Retrying { error, retry_at }
        } else {
            Outcome::Failed(error)
        }
    }
}

/// Nacks a delivery: back to its queue (`requeue`) or to the dead-letter queue.
async fn reject(delivery: &Delivery, requeue: bool) {
    let options = BasicNackOptions {
        requeue,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.acker.nack(options).await {
        tracing::warn!(error = %e, requeue, "could not reject a message");
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map_or_else(|| "non-string panic".to_owned(), |s| (*s).to_owned()),
    }
}
