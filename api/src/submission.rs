//! A submission: the body of `POST /v1/jobs`, and its validation against the
//! job type and the configuration, every problem reported at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use shared::config::Settings;
use shared::job::{MAX_PRIORITY, NewJob, RawJson};
use shared::kinds;
use shared::number::optional_whole;
use uuid::Uuid;

use crate::error::{ApiError, FieldProblem};

/// The body of `POST /v1/jobs`. Only `type` is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    #[serde(rename = "type")]
    pub kind: String,
    /// Kept as text: checked for size and for U+0000 by a scan of the text,
    /// then read into the job type's own payload type; never a JSON tree.
    pub payload: Option<RawJson>,
    pub queue: Option<String>,
    #[serde(default, deserialize_with = "optional_whole")]
    pub priority: Option<i64>,
    #[serde(default, deserialize_with = "optional_whole")]
    pub max_attempts: Option<i64>,
    #[serde(default, deserialize_with = "optional_whole")]
    pub timeout_seconds: Option<i64>,
    pub run_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "optional_whole")]
    pub delay_seconds: Option<u64>,
}

/// The body of `POST /v1/jobs/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub jobs: Vec<SubmitRequest>,
}

/// Most jobs one batch may hold.
pub const MAX_BATCH_JOBS: usize = 1000;

impl BatchRequest {
    /// Validates every job (all or nothing), reporting every problem at once
    /// with its job's place: `jobs[3].payload.ms`.
    pub fn validate(self, settings: &Settings, tenant: &str) -> Result<Vec<NewJob>, ApiError> {
        let count = self.jobs.len();
        if !(1..=MAX_BATCH_JOBS).contains(&count) {
            let message = format!("must hold 1 to {MAX_BATCH_JOBS} jobs; it holds {count}");
            return Err(ApiError::Validation(vec![FieldProblem::new("jobs", message)]));
        }
        let mut problems = Vec::new();
        let mut valid = Vec::with_capacity(count);
        for (i, request) in self.jobs.into_iter().enumerate() {
            match request.validate(settings, tenant.to_owned()) {
                Ok(job) => valid.push(job),
                Err(ApiError::Validation(found)) => problems
                    .extend(found.into_iter().map(|p| FieldProblem::new(format!("jobs[{i}].{}", p.field), p.message))),
                Err(other) => return Err(other),
            }
        }
        if problems.is_empty() { Ok(valid) } else { Err(ApiError::Validation(problems)) }
    }
}

/// Where `json` (valid JSON text) holds an escaped U+0000 (`\u0000`), which
/// Postgres' jsonb cannot store: one pass over the bytes, whatever the shape
/// of the value. A raw U+0000 cannot occur, JSON strings escape control
/// characters; a backslash only occurs in strings, where it starts an escape.
fn nul_escape(json: &str) -> Option<usize> {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1..i + 6) == Some(&b"u0000"[..]) {
                return Some(i);
            }
            // Past the escaped character: `\\` must not start another escape.
            i += 2;
        } else {
            i += 1;
        }
    }
    None
}

/// The path of the first string or key of `payload` holding U+0000, for the
/// error (only called once [`nul_escape`] found one). One walk with a stack
/// of path segments; a path string is only built for the one found.
fn nul_path(payload: &RawJson) -> String {
    enum Segment<'a> {
        Key(&'a str),
        Index(usize),
    }
    fn walk<'a>(value: &'a serde_json::Value, path: &mut Vec<Segment<'a>>) -> bool {
        match value {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                path.push(Segment::Index(i));
                let found = walk(item, path);
                if !found {
                    path.pop();
                }
                found
            }),
            serde_json::Value::Object(fields) => fields.iter().any(|(key, field)| {
                path.push(Segment::Key(key));
                let found = key.contains('\0') || walk(field, path);
                if !found {
                    path.pop();
                }
                found
            }),
            _ => false,
        }
    }
    let value: serde_json::Value = payload.parse().unwrap_or_default();
    let mut path = Vec::new();
    walk(&value, &mut path);
    let mut text = "payload".to_owned();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                text.push('.');
                text.push_str(key);
            }
            Segment::Index(i) => text.push_str(&format!("[{i}]")),
        }
    }
    text
}

/// A request's fingerprint, to tell a retry from a different request under
/// one `Idempotency-Key`: SHA-256 of its fields as given, with objects' keys
/// sorted, so spacing and key order do not matter but any value does.
/// `route` keeps a batch and a single submission apart.
pub fn fingerprint<'a>(route: &str, requests: impl IntoIterator<Item = &'a SubmitRequest>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(route.as_bytes());
    for request in requests {
        // serde_json's maps are sorted (no `preserve_order`): the text is canonical.
        let canonical = serde_json::json!([
            request.kind,
            request.payload.as_ref().map(RawJson::value),
            request.queue,
            request.priority,
            request.max_attempts,
            request.timeout_seconds,
            request.run_at,
            request.delay_seconds,
        ]);
        hash.update(b"\n");
        hash.update(canonical.to_string().as_bytes());
    }
    hash.finalize().into()
}

/// Longest `delay_seconds` accepted: a year. Further out is a mistake, not a schedule.
pub const MAX_DELAY_SECONDS: u64 = 366 * 24 * 3600;

impl SubmitRequest {
    /// Checks every field against the job type and the configuration, reporting
    /// all problems at once.
    pub fn validate(self, settings: &Settings, tenant: String) -> Result<NewJob, ApiError> {
        let mut problems = Vec::new();
        let kind = kinds::find(&self.kind);
        if kind.is_none() {
            let known: Vec<_> = kinds::KINDS.iter().map(|k| k.name).collect();
            problems.push(FieldProblem::new("type", format!("unknown job type; known: {}", known.join(", "))));
        }
        let payload = self.payload.unwrap_or_else(RawJson::empty_object);
        let max = settings.jobs.payload_max_bytes;
        if !payload.is_object() {
            problems.push(FieldProblem::new("payload", "must be a JSON object"));
        } else if payload.len() > max {
            let message = format!("is {} bytes, more than jobs.payload_max_bytes ({max})", payload.len());
            problems.push(FieldProblem::new("payload", message));
        } else if nul_escape(payload.get()).is_some() {
            // Postgres' jsonb cannot store U+0000; say so now rather than fail the insert.
            let message = "contains U+0000, which cannot be stored; remove it (binary data travels better as base64)";
            problems.push(FieldProblem::new(nul_path(&payload), message));
        } else if let Some(kind) = kind
            && let Err(e) = kind.validate(&payload)
        {
            let field = if e.path.is_empty() { "payload".to_owned() } else { format!("payload.{}", e.path) };
            problems.push(FieldProblem::new(field, e.message));
        }
        let queue = self.queue.unwrap_or_else(|| "default".to_owned());
        if !settings.queues.contains_key(&queue) {
            let known: Vec<_> = settings.queues.keys().map(String::as_str).collect();
            problems.push(FieldProblem::new("queue", format!("unknown queue; known: {}", known.join(", "))));
        }
        let mut bounded = |field: &str, value: Option<i64>, default: i32, (min, max): (i64, i64)| {
            let value = value.unwrap_or(i64::from(default));
            if (min..=max).contains(&value) {
                // In range, so the conversion is lossless.
                i32::try_from(value).unwrap_or(default)
            } else {
                problems.push(FieldProblem::new(field, format!("must be between {min} and {max}")));
                default
            }
        };
        let jobs = &settings.jobs;
        let priority = bounded("priority", self.priority, 0, (0, i64::from(MAX_PRIORITY)));
        let max_attempts = bounded(
            "max_attempts",
            self.max_attempts,
            jobs.default_max_attempts,
            (1, i64::from(jobs.max_attempts_limit)),
        );
        let timeout_seconds = bounded(
            "timeout_seconds",
            self.timeout_seconds,
            jobs.default_timeout_seconds,
            (1, i64::from(jobs.timeout_seconds_limit)),
        );
        let run_at = match (self.run_at, self.delay_seconds) {
            (Some(_), Some(_)) => {
                problems.push(FieldProblem::new("delay_seconds", "give run_at or delay_seconds, not both"));
                None
            }
            (Some(at), None) => Some(at),
            (None, Some(delay)) if delay > MAX_DELAY_SECONDS => {
                problems.push(FieldProblem::new("delay_seconds", format!("must be at most {MAX_DELAY_SECONDS}")));
                None
            }
            (None, Some(delay)) => Some(Utc::now() + Duration::from_secs(delay)),
            (None, None) => None,
        };
        if !problems.is_empty() {
            return Err(ApiError::Validation(problems));
        }
        Ok(NewJob {
            id: Uuid::now_v7(),
            tenant,
            queue,
            kind: self.kind,
            payload,
            priority: i16::try_from(priority).unwrap_or_default(),
            max_attempts,
            timeout_seconds,
            run_at,
            idempotency_key: None,
            request_id: None,
            // Given by the service, which knows the tenant's lane.
            lane: 0,
            message_id: None,
            traceparent: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_escaped_nul_is_found_and_an_escaped_backslash_is_not_one() {
        assert_eq!(nul_escape(r#"{"a": "x\u0000y"}"#), Some(8));
        assert_eq!(nul_escape(r#"{"a\u0000": 1}"#), Some(3));
        assert_eq!(nul_escape(r#"{"a": "\\u0000"}"#), None, "a backslash, then the text u0000");
        assert_eq!(nul_escape(r#"{"a": "\\\u0000"}"#), Some(9));
        assert_eq!(nul_escape(r#"{"a": "\u00001"}"#), Some(7));
        assert_eq!(nul_escape(r#"{"a": "\u0001"}"#), None);
    }
}
