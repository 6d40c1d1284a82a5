//! `http`: one real HTTP request, the model of webhook delivery. An answer of
//! 5xx or a network error is retryable; 4xx is not (asking again will not help).
//!
//! Tenants choose the URL, so the request is the platform's own network
//! reaching out on their behalf: it goes only where [`destination`] admits,
//! checked on the addresses it connects to; redirects are not followed (a
//! webhook is delivered to the URL it was given, as Stripe and GitHub do);
//! `Host` and hop-by-hop headers are the client's, not the tenant's; system
//! proxy settings are ignored (a proxy would connect on our behalf, unchecked).
//!
//! Plain `http://` only: this build carries no TLS stack (see the README).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{FieldError, JobContext, JobError, JobKind};

pub mod destination;

use destination::{Allow, GuardedResolver, Refused};

pub struct Http;

const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const MAX_TIMEOUT_MS: u64 = 300_000;
/// The part of the answer's body kept in the job's result.
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpPayload {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A string is sent as it is; anything else is sent as JSON.
    pub body: Option<Value>,
    #[serde(default = "default_timeout_ms", deserialize_with = "crate::number::whole")]
    pub timeout_ms: u64,
    /// The status that counts as success; any 2xx when absent.
    #[serde(default, deserialize_with = "crate::number::optional_whole")]
    pub expect_status: Option<u16>,
}

fn default_method() -> String {
    "POST".to_owned()
}

const fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

#[derive(Debug, Serialize)]
pub struct HttpOutput {
    pub status: u16,
    /// The answer's body as text, cut at 64 KiB (U+0000 replaced: it cannot be stored).
    pub body: String,
}

/// Headers a tenant may not set: `Host` picks the virtual host the platform
/// connects to, and hop-by-hop headers belong to the connection, not the
/// request (RFC 9110 §7.6.1).
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// The clients `http` jobs send with, made once per worker process from
/// `jobs.http.allow` (each keeps a connection pool).
#[derive(Debug, Clone)]
pub struct Clients {
    allow: Arc<Allow>,
    /// For every request whose host the allowlist does not name: connects only
    /// to admitted addresses.
    guarded: reqwest::Client,
    /// For requests to a `host:port` the allowlist names.
    admitted: reqwest::Client,
}

impl Clients {
    pub fn new(allow: Allow) -> Self {
        let allow = Arc::new(allow);
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("conveyor/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
        };
        let guarded = builder().dns_resolver(Arc::new(GuardedResolver { allow: allow.clone() })).build();
        Self { guarded: guarded.unwrap_or_default(), admitted: builder().build().unwrap_or_default(), allow }
    }

    /// The client for `url`, or why nothing may be sent to it.
    fn for_url(&self, url: &Url) -> Result<&reqwest::Client, Refused> {
        let port = url.port_or_known_default().unwrap_or(80);
        let Some(host) = url.host_str() else {
            return Err(Refused { host: url.to_string(), why: "it has no host".to_owned() });
        };
        if self.allow.admits_host(host, port) {
            return Ok(&self.admitted);
        }
        // The URL parser has already normalised every way of writing an
        // address (2130706433, 0x7f.1, [::ffff:7f00:1]) into its usual form.
        match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            Ok(ip) => destination::check_literal(ip, port, &self.allow).map(|()| &self.guarded),
            Err(_) => Ok(&self.guarded),
        }
    }
}

struct Request {
    url: Url,
    method: Method,
    headers: HeaderMap,
}

fn request(payload: &HttpPayload) -> Result<Request, FieldError> {
    let url = Url::parse(&payload.url).map_err(|e| FieldError::new("url", format!("not a URL: {e}")))?;
    if url.scheme() != "http" {
        return Err(FieldError::new("url", "only http:// URLs are supported by this build"));
    }
    let method = Method::from_bytes(payload.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| FieldError::new("method", "not an HTTP method"))?;
    let mut headers = HeaderMap::new();
    for (name, value) in &payload.headers {
        let path = format!("headers.{name}");
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| FieldError::new(path.clone(), "not a valid header name"))?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(FieldError::new(path, "set by the platform, not by a job (Host and hop-by-hop headers)"));
        }
        let value = HeaderValue::from_str(value).map_err(|_| FieldError::new(path, "not a valid header value"))?;
        headers.insert(name, value);
    }
    Ok(Request { url, method, headers })
}

impl JobKind for Http {
    const NAME: &'static str = "http";
    type Payload = HttpPayload;
    type Output = HttpOutput;

    /// Written out rather than derived: the rules of [`request`] (token
    /// characters, reserved headers, visible ASCII values) as patterns.
    fn payload_schema() -> Value {
        // Reserved names in any case: `[Hh][Oo][Ss][Tt]`.
        let reserved: Vec<String> = RESERVED_HEADERS
            .iter()
            .map(|name| {
                name.chars()
                    .map(|c| {
                        if c.is_ascii_alphabetic() {
                            format!("[{}{}]", c.to_ascii_uppercase(), c)
                        } else {
                            c.to_string()
                        }
                    })
                    .collect()
            })
            .collect();
        let token = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+";
        serde_json::json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "format": "http-url", "pattern": "^http://[^/?#\\x00][^\\x00]*$",
                        "description": "An http:// URL (no https in this build)."},
                "method": {"type": "string", "pattern": format!("^{token}$"), "default": "POST"},
                "headers": {
                    "type": "object",
                    "description": "Request headers; Host and hop-by-hop headers are the platform's.",
                    "propertyNames": {"pattern": format!("^(?!(?:{})$){token}$", reserved.join("|"))},
                    "additionalProperties": {"type": "string", "pattern": "^[^\\x00-\\x08\\x0a-\\x1f\\x7f]*$"},
                },
                "body": {"$ref": super::JSON_SCHEMA, "description": "A string is sent as it is; anything else as JSON."},
                "timeout_ms": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS, "default": DEFAULT_TIMEOUT_MS},
                "expect_status": {"type": ["integer", "null"], "minimum": 100, "maximum": 599,
                                  "description": "The status that counts as success; any 2xx when absent."},
            },
        })
    }

    fn validate(payload: &HttpPayload) -> Result<(), FieldError> {
        if !(1..=MAX_TIMEOUT_MS).contains(&payload.timeout_ms) {
            return Err(FieldError::new("timeout_ms", format!("must be between 1 and {MAX_TIMEOUT_MS}")));
        }
        if let Some(status) = payload.expect_status
            && !(100..=599).contains(&status)
        {
            return Err(FieldError::new("expect_status", "must be an HTTP status (100-599)"));
        }
        request(payload).map(drop)
    }

    async fn run(payload: HttpPayload, ctx: JobContext) -> Result<HttpOutput, JobError> {
        let Request { url, method, headers } = request(&payload).map_err(|e| JobError::Permanent(e.message))?;
        let client = ctx.resources().http.for_url(&url).map_err(|refused| JobError::Permanent(refused.to_string()))?;
        let mut builder =
            client.request(method, url).headers(headers).timeout(Duration::from_millis(payload.timeout_ms));
        builder = match payload.body {
            Some(Value::String(text)) => builder.body(text),
            Some(json) => builder.json(&json),
            None => builder,
        };
        let send = async {
            let mut response = builder.send().await.map_err(|e| failed(&e))?;
            let status = response.status();
            let mut body = Vec::new();
            while body.len() < MAX_BODY_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(e) => return Err(failed(&e)),
                }
            }
            body.truncate(MAX_BODY_BYTES);
            Ok((status, String::from_utf8_lossy(&body).replace('\0', "\u{FFFD}")))
        };
        let (status, body) = tokio::select! {
            () = ctx.cancelled() => return Err(JobError::Cancelled),
            answer = send => answer?,
        };
        let ok = payload.expect_status.map_or(status.is_success(), |want| status.as_u16() == want);
        if ok {
            return Ok(HttpOutput { status: status.as_u16(), body });
        }
        let mut message = format!("HTTP {status}: {}", body.chars().take(200).collect::<String>());
        if status.is_redirection() {
            message.push_str(" (redirects are not followed: send the job to the final URL)");
        }
        if status.is_server_error() { Err(JobError::Retryable(message)) } else { Err(JobError::Permanent(message)) }
    }
}

/// A failed send: a refused destination fails for good (asking again will not
/// change it); anything else on the way is worth retrying.
fn failed(e: &reqwest::Error) -> JobError {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<Refused>() {
            return JobError::Permanent(refused.to_string());
        }
        source = cause.source();
    }
    JobError::Retryable(network_error(e))
}

/// reqwest's Display stops at the outermost layer ("error sending request");
/// the cause (connection refused, timed out) is what an operator needs.
fn network_error(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
