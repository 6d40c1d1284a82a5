//! A submission: the body of `POST /v1/jobs`, and its validation against the
//! job type and the configuration, every problem reported at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use shared::config::Settings;
use shared::job::{MAX_PRIORITY, NewJob};
use shared::kinds;
use uuid::Uuid;

use crate::error::{ApiError, FieldProblem};

/// The body of `POST /v1/jobs`. Only `type` is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    #[serde(rename = "type")]
    pub kind: String,
    pub payload: Option<Value>,
    pub queue: Option<String>,
    pub priority: Option<i64>,
    pub max_attempts: Option<i64>,
    pub timeout_seconds: Option<i64>,
    pub run_at: Option<DateTime<Utc>>,
    pub delay_seconds: Option<u64>,
}

/// The path of the first string (or key) in `value` holding U+0000.
fn nul_in(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_owned()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| nul_in(item, &format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(key, field)| {
            let here = format!("{path}.{key}");
            if key.contains('\0') { Some(here) } else { nul_in(field, &here) }
        }),
        _ => None,
    }
}

/// Longest `delay_seconds` accepted: a year. Further out is a mistake, not a schedule.
const MAX_DELAY_SECONDS: u64 = 366 * 24 * 3600;

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
        let payload = self.payload.unwrap_or_else(|| Value::Object(Map::new()));
        if !payload.is_object() {
            problems.push(FieldProblem::new("payload", "must be a JSON object"));
        } else if let Some(path) = nul_in(&payload, "payload") {
            // Postgres' jsonb cannot store U+0000; say so now rather than fail the insert.
            problems.push(FieldProblem::new(path, "contains U+0000, which cannot be stored; remove or escape it"));
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
        })
    }
}
