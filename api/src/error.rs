//! Errors of the HTTP layer and their problem+json bodies (RFC 9457).
//!
//! Which error goes where: `shared` returns its own errors ([`shared::db::Error`]
//! from storage, `PublishError` from RabbitMQ, `FieldError` from job types);
//! routes and the job service return [`ApiError`], the one type a route
//! answers with. Client mistakes become 4xx with a `detail` that says what to
//! change. Whether a database failure is a 503 (retry later) or a 500 is
//! decided in one place, `From<db::Error>`; a 500 logs its whole cause chain
//! and sends none of it.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use shared::db;

use crate::metrics::Rejection;

/// A problem with one field of the request, for 422's `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldProblem {
    /// Dotted path from the body's root (`payload.ms`) or the query parameter's name.
    pub field: String,
    pub message: String,
}

impl FieldProblem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be read (malformed JSON, id or query string).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one that is malformed, unknown, revoked or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a valid token without the scope the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such route, or no such job for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the job is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// 410: what the request resumes from is no longer held (an event
    /// stream's `Last-Event-ID` past its replay window).
    #[error("{0}")]
    Gone(String),
    /// 413: the body is larger than `http.body_limit_bytes`.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: the body is not declared as JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: the request is well-formed but some fields are invalid.
    #[error("the request has invalid fields")]
    Validation(Vec<FieldProblem>),
    /// 429: over a rate limit (the client's address, the tenant or the key).
    #[error(
        "rate limit exceeded for {whose}: {burst} requests at once, {per_second} per second; retry in {retry} s",
        whose = .0.whose,
        burst = .0.rate.burst,
        per_second = .0.rate.per_second,
        retry = crate::rate_limit::ceil_seconds(.0.decision.retry_after).max(1)
    )]
    RateLimited(Box<crate::rate_limit::Refusal>),
    /// 503: a dependency is down; retry after a moment.
    #[error("{0}")]
    Unavailable(String),
    /// 503: refused for load, not for a failure: a queue at its `max_depth`
    /// ([`Rejection::Admission`]) or this replica at `http.max_in_flight`
    /// ([`Rejection::Overload`]). Same answer as [`Self::Unavailable`];
    /// counted apart.
    #[error("{1}")]
    Saturated(Rejection, String),
    /// 500: a failure whose cause is logged, not shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<db::Error> for ApiError {
    fn from(e: db::Error) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            Self::Unavailable("the database is unavailable; retry shortly".to_owned())
        } else {
            Self::Internal(anyhow::Error::new(e))
        }
    }
}

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "1";

impl ApiError {
    /// Why the request was refused, when it was refused rather than failed.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            Self::BadRequest(_) | Self::PayloadTooLarge(_) | Self::UnsupportedMediaType(_) | Self::Validation(_) => {
                Some(Rejection::Validation)
            }
            Self::Unauthorized(_) | Self::Forbidden(_) => Some(Rejection::Auth),
            Self::RateLimited(_) => Some(Rejection::RateLimit),
            Self::Saturated(reason, _) => Some(*reason),
            Self::NotFound(_)
            | Self::MethodNotAllowed
            | Self::Conflict(_)
            | Self::Gone(_)
            | Self::Unavailable(_)
            | Self::Internal(_) => None,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad-request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::Conflict(_) => "conflict",
            Self::Gone(_) => "gone",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::Validation(_) => "validation-error",
            Self::RateLimited(_) => "rate-limited",
            Self::Unavailable(_) | Self::Saturated(..) => "service-unavailable",
            Self::Internal(_) => "internal-error",
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldProblem]>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::Saturated(..) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let detail = match self {
            Self::Internal(cause) => {
                tracing::error!(error = %format!("{cause:#}"), "internal error");
                "internal error".to_owned()
            }
            Self::Validation(errors) => {
                let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
                format!("invalid fields: {}", fields.join(", "))
            }
            other => other.to_string(),
        };
        let errors = match self {
            Self::Validation(errors) => Some(errors.as_slice()),
            _ => None,
        };
        let problem = Problem {
            kind: format!("/problems/{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            errors,
        };
        let mut response = HttpResponse::build(status);
        if let Some(reason) = self.rejection() {
            // For the metrics, which see only the answer.
            response.extensions_mut().insert(reason);
        }
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json")));
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: tell the client which scheme to use.
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS)));
        }
        if let Self::RateLimited(refusal) = self {
            let wait = crate::rate_limit::ceil_seconds(refusal.decision.retry_after).max(1);
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(wait)));
            for (name, value) in refusal.decision.headers() {
                response.insert_header((name, value));
            }
        }
        response.body(serde_json::to_vec(&problem).unwrap_or_default())
    }
}
