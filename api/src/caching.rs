//! How clients may cache what `GET /v1/jobs/{id}` answers, and how they
//! revalidate: a strong `ETag` (`If-None-Match` → `304`), `Cache-Control`,
//! and `Retry-After` as a polling hint for jobs still moving.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use chrono::Utc;
use shared::job::{Job, JobStatus};

use crate::cache::Rendered;

/// What a client may assume about a job it just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Immutable (short of an operator's requeue): cache it this long.
    Ended { max_age: u32 },
    /// Still moving: revalidate, and poll again after this many seconds.
    Live { retry_after: u32 },
}

impl Freshness {
    pub fn of(job: &Job, max_age: u32) -> Self {
        if job.status.is_terminal() {
            return Self::Ended { max_age };
        }
        // A job waiting for its time will not change before then (short of a
        // cancel): no point polling sooner, though never wait over a minute.
        let until_due = (job.run_at - Utc::now()).num_seconds().clamp(1, 60);
        let retry_after = match job.status {
            JobStatus::Scheduled | JobStatus::Retrying => until_due,
            _ => 1,
        };
        Self::Live { retry_after: u32::try_from(retry_after).unwrap_or(1) }
    }
}

/// The answer to a GET of `rendered`: `304` when the request's
/// `If-None-Match` already names it, else the job; caching headers either way.
pub fn respond(req: &HttpRequest, rendered: &Rendered, freshness: Freshness) -> HttpResponse {
    let not_modified = matches_etag(req, &rendered.etag);
    let mut response = if not_modified { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    response.insert_header((header::ETAG, rendered.etag.as_str()));
    match freshness {
        Freshness::Ended { max_age } => {
            response.insert_header((header::CACHE_CONTROL, format!("private, max-age={max_age}")));
        }
        Freshness::Live { retry_after } => {
            response.insert_header((header::CACHE_CONTROL, "no-cache"));
            response.insert_header((header::RETRY_AFTER, retry_after.to_string()));
        }
    }
    if not_modified {
        return response.finish();
    }
    response.content_type(header::ContentType::json()).body(rendered.body.clone())
}

/// Whether the request's `If-None-Match` names `etag` (weak comparison, as
/// RFC 9110 asks for this header) or is `*`.
pub fn matches_etag(req: &HttpRequest, etag: &str) -> bool {
    let Some(value) = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    value.split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    #[test]
    fn if_none_match_matches_weakly_in_a_list_or_by_star() {
        let etag = "\"abc\"";
        for header in ["\"abc\"", "W/\"abc\"", "\"x\", \"abc\"", "*"] {
            let req = TestRequest::default().insert_header((header::IF_NONE_MATCH, header)).to_http_request();
            assert!(matches_etag(&req, etag), "{header}");
        }
        let req = TestRequest::default().insert_header((header::IF_NONE_MATCH, "\"abd\"")).to_http_request();
        assert!(!matches_etag(&req, etag));
        assert!(!matches_etag(&TestRequest::default().to_http_request(), etag));
    }
}
