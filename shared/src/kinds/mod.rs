//! Job types: each is a name, a payload type, an output type and a
//! handler. The API validates submissions with [`Kind::validate`]; the worker
//! runs [`Kind::run`].
//!
//! # Adding a job type
//!
//! Write a module with a type implementing [`JobKind`], then add one line to
//! [`KINDS`]. Nothing else changes: the API accepts the new `type` and workers
//! built from the same code run it.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::job::RawJson;

pub mod echo;
pub mod fail;
pub mod hash;
pub mod http;
pub mod noop;
pub mod sleep;

/// Every job type this build knows, by name.
pub static KINDS: &[Kind] = &[
    Kind::of::<noop::Noop>(),
    Kind::of::<echo::Echo>(),
    Kind::of::<sleep::Sleep>(),
    Kind::of::<fail::Fail>(),
    Kind::of::<hash::Hash>(),
    Kind::of::<http::Http>(),
];

/// Where the API's description defines "any JSON value without U+0000 in its
/// strings" (Postgres' jsonb cannot store U+0000, so no payload may hold it),
/// for payload schemas to refer to.
pub const JSON_SCHEMA: &str = "#/components/schemas/Json";

/// The pattern of text that may be stored: anything but U+0000.
pub const STORABLE_TEXT: &str = "^[^\\x00]*$";

/// Looks a job type up by its `type` name.
pub fn find(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|kind| kind.name == name)
}

/// A job type, written once per type.
pub trait JobKind: 'static {
    /// The `type` clients submit.
    const NAME: &'static str;
    /// The `payload`, checked by serde at submission (422 with the field path on mismatch).
    type Payload: DeserializeOwned + utoipa::PartialSchema + Send + 'static;
    /// What the job returns; stored as the job's `result`.
    type Output: Serialize;

    /// Checks what serde cannot (ranges, URL schemes). Runs in the API before
    /// anything is written, and again in the worker.
    fn validate(_payload: &Self::Payload) -> Result<(), FieldError> {
        Ok(())
    }

    /// The payload's JSON Schema, in the API's OpenAPI description: what the
    /// payload type derives (`utoipa::ToSchema`), ranges included.
    fn payload_schema() -> serde_json::Value {
        serde_json::to_value(<Self::Payload as utoipa::PartialSchema>::schema()).unwrap_or_default()
    }

    /// Runs one attempt.
    fn run(payload: Self::Payload, ctx: JobContext) -> impl Future<Output = Result<Self::Output, JobError>> + Send;
}

/// A payload problem, with the path of the offending field inside `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path below `payload` (`"ms"`, `"headers.x-a"`); empty for the payload itself.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

/// How an attempt ended badly. The variant decides what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// May pass on a later attempt (a 5xx answer, a dropped connection): retried while attempts remain.
    #[error("{0}")]
    Retryable(String),
    /// No retry can fix it (a 4xx answer, a rejected input): the job fails now.
    #[error("{0}")]
    Permanent(String),
    /// The handler saw [`JobContext::cancelled`] and stopped.
    #[error("cancelled")]
    Cancelled,
}

/// What handlers share, made once per worker process from its settings.
#[derive(Debug, Clone)]
pub struct Resources {
    /// The clients of `http` jobs, bound by `jobs.http.allow`.
    pub http: http::Clients,
}

impl Resources {
    pub fn new(settings: &crate::config::JobSettings) -> Result<Self, crate::config::ConfigError> {
        let allow = http::destination::Allow::parse(&settings.http.allow)
            .map_err(|e| crate::config::ConfigError::new(format!("jobs.http.allow: {e}")))?;
        Ok(Self { http: http::Clients::new(allow) })
    }
}

/// What a handler gets besides its payload.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub job_id: Uuid,
    pub attempt: i32,
    cancel: CancellationToken,
    progress: watch::Sender<Option<u8>>,
    resources: Resources,
}

impl JobContext {
    /// `progress` receives every [`report_progress`](Self::report_progress); the
    /// worker writes the latest value to the job.
    pub fn new(
        job_id: Uuid,
        attempt: i32,
        cancel: CancellationToken,
        progress: watch::Sender<Option<u8>>,
        resources: Resources,
    ) -> Self {
        Self { job_id, attempt, cancel, progress, resources }
    }

    /// The process's shared clients.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// Resolves when the job should stop: cancelled by a client, or its worker is
    /// shutting down. Long handlers select on it.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Records progress (0–100, clamped). Cheap: only the latest value is kept and
    /// written, however often this is called.
    pub fn report_progress(&self, percent: u8) {
        self.progress.send_replace(Some(percent.min(100)));
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A job type with its types erased, so that all of them fit in one table.
pub struct Kind {
    pub name: &'static str,
    /// The payload's JSON Schema.
    pub payload_schema: fn() -> serde_json::Value,
    validate: fn(&RawJson) -> Result<(), FieldError>,
    run: fn(RawJson, JobContext) -> BoxFuture<Result<RawJson, JobError>>,
}

impl Kind {
    pub const fn of<K: JobKind>() -> Self {
        Self { name: K::NAME, payload_schema: K::payload_schema, validate: validate_erased::<K>, run: run_erased::<K> }
    }

    /// Checks a submitted payload against the type.
    pub fn validate(&self, payload: &RawJson) -> Result<(), FieldError> {
        (self.validate)(payload)
    }

    /// Runs one attempt; a payload that no longer fits the type fails permanently.
    pub fn run(&self, payload: RawJson, ctx: JobContext) -> BoxFuture<Result<RawJson, JobError>> {
        (self.run)(payload, ctx)
    }
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kind").field("name", &self.name).finish()
    }
}

/// The typed payload, straight from the text: no tree is built on the way.
fn parse<K: JobKind>(payload: &RawJson) -> Result<K::Payload, FieldError> {
    let mut text = serde_json::Deserializer::from_str(payload.get());
    let payload: K::Payload = serde_path_to_error::deserialize(&mut text).map_err(|e| {
        let path = field_path(e.path(), e.inner());
        FieldError::new(path, e.into_inner().to_string())
    })?;
    K::validate(&payload)?;
    Ok(payload)
}

/// The dotted path of the field a serde error is about. A missing field is
/// reported at its parent, with the field's own name only in the message; a
/// client wants to be pointed at the field itself.
pub fn field_path(path: &serde_path_to_error::Path, error: &impl std::fmt::Display) -> String {
    let parent = path.to_string();
    let parent = if parent == "." { String::new() } else { parent };
    let message = error.to_string();
    let named = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
    match named {
        Some(field) if parent.is_empty() => field.to_owned(),
        Some(field) => format!("{parent}.{field}"),
        None => parent,
    }
}

fn validate_erased<K: JobKind>(payload: &RawJson) -> Result<(), FieldError> {
    parse::<K>(payload).map(drop)
}

fn run_erased<K: JobKind>(payload: RawJson, ctx: JobContext) -> BoxFuture<Result<RawJson, JobError>> {
    Box::pin(async move {
        let payload = parse::<K>(&payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload at {:?}: {}", e.path, e.message)))?;
        let output = K::run(payload, ctx).await?;
        RawJson::of(&output).map_err(|e| JobError::Permanent(format!("result is not JSON: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_unique_name() {
        let mut names: Vec<_> = KINDS.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KINDS.len());
        assert!(find("sleep").is_some());
        assert!(find("nope").is_none());
    }

    #[test]
    fn a_payload_mismatch_names_the_field() {
        let payload = RawJson::of(&serde_json::json!({"ms": "soon"})).expect("json");
        let sleep = find("sleep").map(|k| k.validate(&payload));
        let Some(Err(err)) = sleep else { panic!("accepted: {sleep:?}") };
        assert_eq!(err.path, "ms");
    }
}
