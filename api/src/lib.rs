//! Conveyor's API: the actix-web server and the admin CLI's commands.
//!
//! # Layout
//!
//! - [`cli`]: the command line; [`commands`]: the admin commands behind it.
//! - [`startup`]: building, binding and running the server and its background tasks.
//! - [`state`]: what every handler can reach.
//! - [`routes`]: the HTTP routes (thin: read the request, call the service, answer).
//! - [`observe`]: request ids, trace context, the metrics and the log line of every request.
//! - [`metrics`]: the API's Prometheus metrics (`GET /metrics`).
//! - [`service`]: the job service: validate → insert → publish → record, reads, cancels, requeues.
//! - [`submission`]: the submit body and its validation.
//! - [`admission`]: refusing submissions to a queue past its `max_depth`.
//! - [`overload`]: shedding requests beyond `http.max_in_flight`.
//! - [`rate_limit`]: per-address and per-tenant rate limits (local or Redis buckets).
//! - [`caching`]: ETag, Cache-Control and Retry-After of job reads.
//! - [`cache`]: jobs served from memory until they change, kept coherent by Postgres NOTIFY.
//! - [`changes`]: the process's one `LISTEN`: job changes for long-polls, event streams and the cache.
//! - [`events`]: server-sent events of job changes (`/v1/jobs/{id}/events`, `/v1/events`).
//! - [`auth`]: API keys, JWTs, and the scope-checking extractor [`auth::Authorized`].
//! - [`body`]: JSON request bodies with precise errors.
//! - [`openapi`]: the OpenAPI description (`/openapi.json`) and its page (`/docs`).
//! - [`error`]: [`error::ApiError`] and problem+json.
//!
//! One submission travels `routes::jobs::submit` → `body::read_json` →
//! `service::JobService::submit` (`submission` validates; `shared::db::jobs`
//! inserts, batched; `shared::outbox` publishes and records the confirm).

pub mod admission;
pub mod auth;
pub mod body;
pub mod cache;
pub mod caching;
pub mod changes;
pub mod cli;
pub mod commands;
pub mod error;
pub mod events;
pub mod metrics;
pub mod observe;
pub mod openapi;
pub mod overload;
pub mod rate_limit;
pub mod routes;
pub mod service;
pub mod startup;
pub mod state;
pub mod submission;
