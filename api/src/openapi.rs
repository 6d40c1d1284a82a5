//! The API's OpenAPI 3.1 description (`GET /openapi.json`) and its page for
//! people (`GET /docs`: Swagger UI, served from the binary, offline).
//!
//! Generated from the code, so that it cannot drift: each handler carries its
//! `#[utoipa::path]`, each body type derives its schema, each job type gives
//! its payload's ([`shared::kinds::JobKind::payload_schema`]). What depends on
//! the configuration (the queues, the bounds of attempts and timeouts) is
//! filled in from the settings when the server starts. The answers every
//! `/v1` route can give (401, 403, 429, 503, 500, and the `RateLimit-*`
//! headers) are added to each of them here, once, as the middleware that
//! gives them applies to all of them.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use serde_json::{Map, Value, json};
use shared::config::Settings;
use shared::job::{FailureKind, Job, JobFailure, JobStatus, ListedJob};
use shared::kinds::KINDS;
use utoipa::OpenApi;

use crate::error::{ApiError, FieldProblem};
use crate::routes::{admin, health, jobs};
use crate::service::JobPage;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Conveyor",
        description = "Asynchronous jobs: submit one (`202` with its id), then poll it, long-poll it \
                       (`?wait=`) or follow its events. Every `/v1` route takes `Authorization: Bearer \
                       <token>` (an API key or a JWT) and shows only the caller's own jobs. Errors are \
                       RFC 9457 problem details."
    ),
    paths(
        jobs::submit,
        jobs::submit_batch,
        jobs::list,
        jobs::get,
        jobs::cancel,
        jobs::requeue,
        crate::events::job,
        crate::events::tenant,
        admin::queues,
        admin::workers,
        health::healthz,
        health::readyz,
        health::metrics,
        description,
        docs,
    ),
    components(schemas(
        Job,
        ListedJob,
        JobStatus,
        JobFailure,
        FailureKind,
        JobPage,
        Problem,
        FieldProblem,
        crate::events::ChangeEvent<'_>
    )),
    tags(
        (name = "jobs", description = "Submit, read, list, cancel and requeue jobs"),
        (name = "events", description = "Job changes as server-sent events"),
        (name = "operations", description = "Platform views (operator scope) and probes"),
    )
)]
struct ApiDoc;

/// An RFC 9457 problem: every error answer's body.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `/problems/<slug>`, e.g. `/problems/validation-error`.
    #[serde(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    detail: String,
    /// The invalid fields (422 only).
    errors: Option<Vec<FieldProblem>>,
}

/// The description as served: built once at start, from the code and `settings`.
pub struct Description(Bytes);

impl Description {
    pub fn new(settings: &Settings) -> Self {
        let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        configure(&mut document, settings);
        Self(Bytes::from(serde_json::to_vec(&document).unwrap_or_default()))
    }

    pub fn json(&self) -> &Bytes {
        &self.0
    }
}

/// `GET /openapi.json`: this API's OpenAPI 3.1 description.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", content_type = "application/json", body = Object)))]
pub async fn description(description: web::Data<Description>) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(description.json().clone())
}

/// Swagger UI's configuration: our description, no call home.
pub struct DocsConfig(Arc<utoipa_swagger_ui::Config<'static>>);

impl Default for DocsConfig {
    fn default() -> Self {
        Self(Arc::new(utoipa_swagger_ui::Config::from("/openapi.json").validator_url("none")))
    }
}

/// `GET /docs`: the description for people (Swagger UI), from the binary.
#[utoipa::path(get, path = "/docs/", operation_id = "docs", tag = "operations", security(()),
    responses((status = 200, description = "A page describing this API (Swagger UI)", content_type = "text/html", body = String)))]
pub async fn docs(req: HttpRequest, config: web::Data<DocsConfig>) -> Result<HttpResponse, ApiError> {
    let path = req.match_info().get("file").unwrap_or_default();
    match utoipa_swagger_ui::serve(path, config.0.clone()) {
        Ok(Some(file)) => {
            let mut response = HttpResponse::Ok();
            response.content_type(file.content_type);
            if file.gzpipped {
                response.insert_header((header::CONTENT_ENCODING, "gzip"));
                return Ok(response.body(file.bytes.into_owned()));
            }
            let mut body = file.bytes.into_owned();
            if path.is_empty() {
                // The page is also `/docs` itself, without the slash: its
                // relative links must still lead under /docs/.
                let page = String::from_utf8_lossy(&body).replacen("<head>", r#"<head><base href="/docs/">"#, 1);
                body = page.into_bytes();
            }
            Ok(response.body(body))
        }
        Ok(None) => Err(ApiError::NotFound(format!("no such file under /docs: {path}"))),
        Err(e) => Err(ApiError::Internal(anyhow::anyhow!("serving /docs/{path}: {e}"))),
    }
}

/// What depends on the settings, and what every `/v1` route shares.
fn configure(document: &mut Value, settings: &Settings) {
    let schemas = &mut document["components"]["schemas"];
    schemas["SubmitRequest"] = submit_request(settings);
    schemas["Json"] = json!({
        "description": "Any JSON value without U+0000 in its strings (Postgres cannot store it)",
        "anyOf": [
            {"type": ["null", "boolean", "number"]},
            {"type": "string", "pattern": shared::kinds::STORABLE_TEXT},
            {"type": "array", "items": {"$ref": shared::kinds::JSON_SCHEMA}},
            {"type": "object", "propertyNames": {"pattern": shared::kinds::STORABLE_TEXT},
             "additionalProperties": {"$ref": shared::kinds::JSON_SCHEMA}},
        ],
    });
    schemas["BatchRequest"] = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["jobs"],
        "properties": {"jobs": {
            "type": "array",
            "minItems": 1,
            "maxItems": crate::submission::MAX_BATCH_JOBS,
            "items": {"$ref": "#/components/schemas/SubmitRequest"},
        }},
    });
    document["components"]["securitySchemes"] = json!({
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "An API key (`api keys create`) or a JWT; scopes: jobs:read, jobs:write, admin, operator"},
    });
    let Some(paths) = document["paths"].as_object_mut() else { return };
    for (path, item) in paths.iter_mut() {
        let Some(operations) = item.as_object_mut() else { continue };
        for operation in operations.values_mut() {
            if operation["requestBody"].is_object() {
                operation["requestBody"]["required"] = json!(true);
            }
            let responses = &mut operation["responses"];
            // Errors named by a handler get their problem body here.
            for (status, answer) in responses.as_object_mut().into_iter().flatten() {
                if status.starts_with('4') {
                    *answer = problem_response(status);
                }
            }
            if path.starts_with("/v1/") {
                for status in ["401", "403", "429"] {
                    responses[status] = problem_response(status);
                }
                for (status, answer) in responses.as_object_mut().into_iter().flatten() {
                    if status.starts_with('2') || status == "304" {
                        if !answer["headers"].is_object() {
                            answer["headers"] = json!({});
                        }
                        if let (Some(headers), Value::Object(limits)) =
                            (answer["headers"].as_object_mut(), rate_limit_headers())
                        {
                            headers.extend(limits);
                        }
                    }
                }
            }
            // Shed under load (`http.max_in_flight`) anywhere but the probes.
            if !matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics") {
                responses["503"] = problem_response("503");
            }
            responses["500"] = problem_response("500");
        }
    }
}

/// The body of `POST /v1/jobs`: one shape per job type, told apart by `type`.
fn submit_request(settings: &Settings) -> Value {
    let jobs = &settings.jobs;
    let mut queues: Vec<Value> = settings.queues.keys().map(|queue| json!(queue)).collect();
    // Every field but `type` may be null, which means absent.
    queues.push(Value::Null);
    let variants: Vec<Value> = KINDS
        .iter()
        .map(|kind| {
            let payload = (kind.payload_schema)();
            // A payload with required fields cannot be left out (it defaults to `{}`).
            let needs_payload = payload["required"].as_array().is_some_and(|fields| !fields.is_empty());
            let (required, payload) = if needs_payload {
                (json!(["type", "payload"]), payload)
            } else {
                (json!(["type"]), json!({"anyOf": [payload, {"type": "null"}], "default": {}}))
            };
            json!({
                "type": "object",
                "title": kind.name,
                "additionalProperties": false,
                "required": required,
                "properties": {
                    "type": {"const": kind.name},
                    "payload": payload,
                    "queue": {"enum": queues, "default": "default"},
                    "priority": {"type": ["integer", "null"], "minimum": 0, "maximum": shared::job::MAX_PRIORITY,
                                 "default": 0, "description": "Higher runs first within the queue."},
                    "max_attempts": {"type": ["integer", "null"], "minimum": 1, "maximum": jobs.max_attempts_limit,
                                     "default": jobs.default_max_attempts},
                    "timeout_seconds": {"type": ["integer", "null"], "minimum": 1, "maximum": jobs.timeout_seconds_limit,
                                        "default": jobs.default_timeout_seconds},
                    "run_at": {"type": ["string", "null"], "format": "date-time",
                               "description": "Not before then (RFC 3339); not with delay_seconds."},
                    "delay_seconds": {"type": ["integer", "null"], "minimum": 0,
                                      "maximum": crate::submission::MAX_DELAY_SECONDS,
                                      "description": "Not before this many seconds from now; not with run_at."},
                },
                "not": {"required": ["run_at", "delay_seconds"]},
            })
        })
        .collect();
    json!({
        "description": "A job to run. Only `type` is required; `payload` defaults to `{}` and is checked against the type.",
        "oneOf": variants,
        "discriminator": {"propertyName": "type"},
    })
}

fn problem_response(status: &str) -> Value {
    let description = match status {
        "400" => "The request cannot be read (malformed JSON, id or query parameter)",
        "401" => "No token, or one that is unknown, revoked or expired (`WWW-Authenticate: Bearer`)",
        "403" => "The token lacks the scope this route needs",
        "404" => "No such job for this tenant",
        "409" => "The job's state does not allow this",
        "413" => "The body is larger than the server takes",
        "415" => "The body is not declared as JSON",
        "422" => "Invalid fields, each named in `errors`",
        "429" => "Over a rate limit; retry after `Retry-After` seconds",
        "503" => "Overloaded, a queue full, or a dependency down; retry after `Retry-After` seconds",
        _ => "An internal error; its cause is logged",
    };
    let mut headers = Map::new();
    if matches!(status, "429" | "503") {
        headers.insert("Retry-After".into(), json!({"description": "Seconds to wait", "schema": {"type": "integer"}}));
    }
    if let ("429", Value::Object(limits)) = (status, rate_limit_headers()) {
        headers.extend(limits);
    }
    json!({
        "description": description,
        "headers": headers,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    })
}

/// The caller's rate limit, on every answer to an authenticated request.
fn rate_limit_headers() -> Value {
    let header = |description: &str| json!({"description": description, "schema": {"type": "integer", "minimum": 0}});
    json!({
        "RateLimit-Limit": header("Requests allowed at once (the burst)"),
        "RateLimit-Remaining": header("Requests left now"),
        "RateLimit-Reset": header("Seconds until the limit is whole again"),
    })
}
