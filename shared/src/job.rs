//! The job model: a job's states, its stored record and its error, and the
//! values the API, the workers and the storage layer pass each other about
//! jobs (what was queued, what was claimed, how a run ended, filters).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

/// Where a job is in its life. Moves between states are guarded updates in
/// [`crate::db::jobs`]; the allowed moves are these:
///
/// ```text
/// scheduled -> queued -> running -> succeeded
///                          |-> retrying -> queued     (attempts left)
///                          |-> failed                 (exhausted, permanent, timeout on the last attempt)
/// scheduled | queued | retrying -> cancelled
/// running -> cancelled                                (cooperative: the handler is told)
/// failed | cancelled -> queued                        (an operator's requeue)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for its `run_at`; the reconciler queues it when that comes.
    Scheduled,
    /// Committed and published (or about to be republished by the outbox):
    /// waiting for a worker to claim it.
    Queued,
    /// Claimed by a worker, which holds a lease on it while the handler runs.
    Running,
    /// An attempt failed and attempts remain; queued again at `run_at`, after its backoff.
    Retrying,
    /// Terminal: the handler returned a result.
    Succeeded,
    /// Terminal: attempts exhausted, or a non-retryable error.
    Failed,
    /// Terminal: cancelled before it ran, or stopped cooperatively while running.
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] =
        [Self::Scheduled, Self::Queued, Self::Running, Self::Retrying, Self::Succeeded, Self::Failed, Self::Cancelled];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Terminal jobs never change again (unless an operator requeues them).
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown job status {0:?}")]
pub struct UnknownStatus(String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl TryFrom<String> for JobStatus {
    type Error = UnknownStatus;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// JSON kept as text: a payload or a result as it arrived (or as Postgres
/// gives it back), never parsed into a tree. A tree of small values costs
/// many times its text (a 1 MiB `[0,0,…]` is ~16 MiB as a `Value`), so the
/// API and workers carry the text and only a handler parses it, into its own
/// payload type.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

/// Any JSON value: what a job type makes of it is the job type's business.
impl utoipa::PartialSchema for RawJson {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::Object::new().into()
    }
}

impl utoipa::ToSchema for RawJson {}

impl RawJson {
    /// `text` if it is one JSON value.
    pub fn from_text(text: String) -> serde_json::Result<Self> {
        RawValue::from_string(text).map(Self)
    }

    /// `value` as JSON text.
    pub fn of(value: &impl Serialize) -> serde_json::Result<Self> {
        serde_json::value::to_raw_value(value).map(Self)
    }

    /// `{}`, the payload of a job submitted without one.
    pub fn empty_object() -> Self {
        Self::from_text("{}".to_owned()).unwrap_or_else(|_| unreachable!("{{}} is JSON"))
    }

    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Its size in bytes, as text.
    pub fn len(&self) -> usize {
        self.0.get().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.get().is_empty()
    }

    /// Whether it is a JSON object.
    pub fn is_object(&self) -> bool {
        self.0.get().trim_start().starts_with('{')
    }

    /// Parses it into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.0.get())
    }

    /// As a tree: for tests and small values only.
    pub fn value(&self) -> Value {
        self.parse().unwrap_or(Value::Null)
    }
}

impl PartialEq for RawJson {
    /// Equal when they say the same, however they are spaced.
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.value() == other.value()
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

impl std::fmt::Display for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

/// Why an attempt failed, as stored in `jobs.error` and shown to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobFailure {
    pub message: String,
    pub kind: FailureKind,
    pub attempt: i32,
}

/// The class of a failure: what an operator filters on and what decides a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler failed in a way that may pass on another attempt.
    Retryable,
    /// The handler failed in a way no retry can fix (bad input, a 4xx answer).
    Permanent,
    /// The handler ran past the job's `timeout_seconds` and was stopped.
    Timeout,
    /// The handler panicked; treated like a retryable failure.
    Panic,
    /// The stored payload no longer matches the job type (e.g. after a type changed).
    InvalidPayload,
    /// The job type is not known to this worker.
    UnknownType,
    /// The handler stopped because the job was cancelled.
    Cancelled,
    /// The worker running the attempt was lost (its lease expired); retried.
    LeaseExpired,
}

impl FailureKind {
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Retryable | Self::Panic | Self::Timeout | Self::LeaseExpired)
    }
}

/// A job as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub tenant: String,
    pub queue: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// As submitted.
    #[schema(value_type = Object)]
    pub payload: RawJson,
    pub status: JobStatus,
    pub priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_seconds: i32,
    pub run_at: DateTime<Utc>,
    /// 0 to 100, as the handler reports it.
    #[schema(minimum = 0, maximum = 100)]
    pub progress: Option<i16>,
    /// What the handler returned, once it succeeded.
    #[schema(value_type = Option<Value>)]
    pub result: Option<RawJson>,
    /// Why the last attempt failed.
    pub error: Option<JobFailure>,
    pub idempotency_key: Option<String>,
    /// `X-Request-Id` of the submission.
    pub request_id: Option<String>,
    /// Times an operator requeued the job after it failed or was cancelled.
    pub requeue_count: i32,
    /// Set when a client asked to cancel the job while it was running.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// A job as a list shows it: its payload and result only when small enough to
/// fit the page, else `null` and named in `omitted` (GET the job for them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListedJob {
    pub id: Uuid,
    pub tenant: String,
    pub queue: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Option<Object>)]
    pub payload: Option<RawJson>,
    pub status: JobStatus,
    pub priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_seconds: i32,
    pub run_at: DateTime<Utc>,
    #[schema(minimum = 0, maximum = 100)]
    pub progress: Option<i16>,
    #[schema(value_type = Option<Value>)]
    pub result: Option<RawJson>,
    pub error: Option<JobFailure>,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
    pub requeue_count: i32,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The fields left out of this item for their size: `payload`, `result`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub omitted: Vec<String>,
    /// Sizes of the payload and result as JSON text (0 for no result).
    #[serde(skip)]
    pub payload_bytes: i32,
    #[serde(skip)]
    pub result_bytes: i32,
}

impl ListedJob {
    /// Leaves the payload or the result out of the item.
    pub fn omit(&mut self, field: &str) {
        match field {
            "payload" => self.payload = None,
            "result" => self.result = None,
            _ => return,
        }
        self.omitted.push(field.to_owned());
    }
}

/// A validated submission, ready to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub tenant: String,
    pub queue: String,
    pub kind: String,
    pub payload: RawJson,
    pub priority: i16,
    pub max_attempts: i32,
    pub timeout_seconds: i32,
    /// `None` runs the job now; a time in the future makes it `scheduled`.
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
    /// Its tenant's lane (see [`crate::db::lanes`]).
    pub lane: i16,
    /// The message that will carry it with others of its batch (the first
    /// one's id); `None`: a message of its own. See [`stamp_messages`].
    pub message_id: Option<Uuid>,
    /// W3C `traceparent` of the request that submitted it (see [`crate::trace`]).
    pub traceparent: Option<String>,
}

/// Groups jobs submitted together (one batch, or single submissions inserted
/// in one statement) into messages of up to `per_message` jobs, by what a
/// message has one of: queue, priority, lane, and the trace of the request
/// when it is sampled (the message's `traceparent` header; unsampled traces
/// are not sent, so they do not split messages). Each job's `message_id` is
/// the id of its message's first job. Scheduled jobs are left alone; they
/// are published when due, each on its own.
pub fn stamp_messages(jobs: &mut [NewJob], per_message: usize) {
    if per_message <= 1 {
        return;
    }
    type Key = (String, i16, i16, Option<String>);
    let mut open: HashMap<Key, (Uuid, usize)> = HashMap::new();
    for job in jobs.iter_mut().filter(|job| job.run_at.is_none()) {
        let trace = job.traceparent.clone().filter(|tp| crate::trace::is_sampled(tp));
        let slot = open.entry((job.queue.clone(), job.priority, job.lane, trace)).or_insert((job.id, 0));
        if slot.1 == per_message {
            *slot = (job.id, 0);
        }
        slot.1 += 1;
        job.message_id = Some(slot.0);
    }
}

/// A job made `queued` whose message must be published: what the outbox and
/// the publisher need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub id: Uuid,
    pub queue: String,
    pub priority: i16,
    /// Its tenant's lane: which of the queue's RabbitMQ queues carries it.
    pub lane: i16,
    /// The message it shares with others of its batch (see [`NewJob::message_id`]).
    pub message_id: Option<Uuid>,
    /// Its `traceparent`, for the message's headers.
    pub traceparent: Option<String>,
    /// When the statement that queued it ran (the job's `updated_at` then, and
    /// its outbox row's `created_at`): tells this queued stint from later ones.
    pub queued_at: DateTime<Utc>,
}

impl Enqueued {
    pub fn outbox_row(&self) -> OutboxRow {
        OutboxRow { job_id: self.id, queued_at: self.queued_at }
    }
}

impl Enqueued {
    /// A job as returned by the statement that queued it, in `lane`, carried
    /// by message `message_id` (see [`NewJob::message_id`]), submitted by a
    /// request whose span is `traceparent`.
    pub fn of(job: &Job, lane: i16, message_id: Option<Uuid>, traceparent: Option<&str>) -> Self {
        Self {
            id: job.id,
            queue: job.queue.clone(),
            priority: job.priority,
            lane,
            message_id,
            traceparent: traceparent.map(str::to_owned),
            queued_at: job.updated_at,
        }
    }
}

/// A job's row in the outbox: which job, and which queued stint of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxRow {
    pub job_id: Uuid,
    pub queued_at: DateTime<Utc>,
}

/// What a worker needs to run a job it has just claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub tenant: String,
    pub queue: String,
    pub kind: String,
    pub payload: RawJson,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_seconds: i32,
    pub request_id: Option<String>,
    /// The submitting request's span (W3C `traceparent`): the parent of the
    /// worker's span for this run. `None` for jobs stored before it was kept.
    pub traceparent: Option<String>,
    /// Fresh at every claim; every later write about this run must present it.
    pub lease_token: Uuid,
    /// When it became ready to run (submitted, due, retried or requeued):
    /// its pickup latency ends at the claim.
    pub run_at: DateTime<Utc>,
}

impl Claimed {
    pub fn lease(&self) -> Lease {
        Lease { id: self.id, token: self.lease_token }
    }
}

/// A running job's lease, as its worker holds it: the fence of every write
/// about that run (progress, renewal, outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: Uuid,
    pub token: Uuid,
}

/// How a running attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(RawJson),
    /// Failed with attempts left: waits in `retrying` until `retry_at`.
    Retrying {
        error: JobFailure,
        retry_at: DateTime<Utc>,
    },
    Failed(JobFailure),
    Cancelled(JobFailure),
}

impl Outcome {
    pub fn status(&self) -> JobStatus {
        match self {
            Self::Succeeded(_) => JobStatus::Succeeded,
            Self::Retrying { .. } => JobStatus::Retrying,
            Self::Failed(_) => JobStatus::Failed,
            Self::Cancelled(_) => JobStatus::Cancelled,
        }
    }
}

/// The result of asking to cancel a job.
#[derive(Debug)]
pub enum Cancel {
    /// It was scheduled, queued or retrying, and is now cancelled.
    Cancelled(Job),
    /// It is running; its worker has been asked to stop it.
    Requested(Job),
    /// It had already ended.
    Terminal(Job),
    NotFound,
    /// It kept moving between states while being cancelled (claimed, failed,
    /// retried in between every look): the caller may simply try again.
    KeptChanging,
}

/// Which jobs a list shows; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    /// Keyset cursor: only jobs older (smaller id) than this one.
    pub before: Option<Uuid>,
}

/// Which jobs a bulk requeue (or its dry run) takes.
#[derive(Debug, Clone)]
pub struct RequeueFilter {
    /// `failed` or `cancelled`.
    pub status: JobStatus,
    pub kind: Option<String>,
    pub queue: Option<String>,
    pub tenant: Option<String>,
    /// Only jobs that finished at or after this time.
    pub finished_since: Option<DateTime<Utc>>,
}

/// Why a requeue by ids changed nothing: it is all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequeueRefused {
    /// No job has this id.
    Missing(Uuid),
    /// This job is neither failed nor cancelled.
    NotEnded(Uuid, JobStatus),
}

/// The tenant every job belongs to until API keys bring real tenants.
pub const DEFAULT_TENANT: &str = "default";

/// Highest priority a job may have; RabbitMQ queues are declared with it as `x-max-priority`.
pub const MAX_PRIORITY: i16 = 9;

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base * 2^(attempt-1))]`.
/// Full jitter spreads a burst of failures out the most for the same mean wait
/// (see AWS's "Exponential Backoff and Jitter").
pub fn retry_delay(attempt: i32, base: Duration, cap: Duration) -> Duration {
    let ceiling = retry_ceiling(attempt, base, cap);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=millis))
}

/// The upper bound of [`retry_delay`] for `attempt`.
pub fn retry_ceiling(attempt: i32, base: Duration, cap: Duration) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0);
    2u32.checked_pow(doublings).map_or(cap, |factor| base.saturating_mul(factor).min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(queue: &str, priority: i16, run_at: Option<DateTime<Utc>>) -> NewJob {
        NewJob {
            id: Uuid::now_v7(),
            tenant: "t".to_owned(),
            queue: queue.to_owned(),
            kind: "noop".to_owned(),
            payload: RawJson::empty_object(),
            priority,
            max_attempts: 1,
            timeout_seconds: 1,
            run_at,
            idempotency_key: None,
            request_id: None,
            lane: 0,
            message_id: None,
            traceparent: None,
        }
    }

    #[test]
    fn a_batch_shares_messages_by_queue_and_priority_up_to_the_limit() {
        let mut jobs = vec![
            job("a", 0, None),
            job("b", 0, None),
            job("a", 5, None),
            job("a", 0, None),
            job("a", 0, Some(Utc::now())),
            job("a", 0, None),
        ];
        stamp_messages(&mut jobs, 2);
        let messages: Vec<_> = jobs.iter().map(|job| job.message_id).collect();
        let id = |i: usize| Some(jobs[i].id);
        assert_eq!(
            messages,
            [id(0), id(1), id(2), id(0), None, id(5)],
            "the third of queue a, priority 0, starts a message"
        );

        let mut alone = vec![job("a", 0, None), job("a", 0, None)];
        stamp_messages(&mut alone, 1);
        assert!(alone.iter().all(|job| job.message_id.is_none()), "1: a message per job");

        // Single submissions inserted together: several tenants' lanes, and
        // traces, sampled (sent with the message) or not (not sent).
        let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let mut together: Vec<_> = [(0, None), (1, None), (0, Some(unsampled)), (0, Some(sampled)), (0, None)]
            .into_iter()
            .map(|(lane, trace)| NewJob { lane, traceparent: trace.map(str::to_owned), ..job("a", 0, None) })
            .collect();
        stamp_messages(&mut together, 16);
        let messages: Vec<_> = together.iter().map(|job| job.message_id).collect();
        let id = |i: usize| Some(together[i].id);
        assert_eq!(messages, [id(0), id(1), id(0), id(3), id(0)], "by lane; a sampled trace alone");
    }

    #[test]
    fn retry_delays_grow_exponentially_within_the_cap() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(retry_ceiling(1, base, cap), Duration::from_secs(1));
        assert_eq!(retry_ceiling(2, base, cap), Duration::from_secs(2));
        assert_eq!(retry_ceiling(5, base, cap), Duration::from_secs(16));
        assert_eq!(retry_ceiling(13, base, cap), Duration::from_secs(3600));
        assert_eq!(retry_ceiling(1000, base, cap), Duration::from_secs(3600));
        for attempt in 1..20 {
            let delay = retry_delay(attempt, base, cap);
            assert!(delay <= retry_ceiling(attempt, base, cap), "attempt {attempt}: {delay:?}");
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().ok(), Some(status));
            assert_eq!(serde_json::to_value(status).ok(), Some(Value::from(status.as_str())));
        }
        assert!("done".parse::<JobStatus>().is_err());
    }

    #[test]
    fn only_succeeded_failed_and_cancelled_are_terminal() {
        let terminal: Vec<_> = JobStatus::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, [JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled]);
    }
}
