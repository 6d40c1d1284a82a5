//! Integration tests of the API and workers, over HTTP, against the real
//! Postgres (a fresh database per test, by `#[sqlx::test]`) and RabbitMQ (a
//! fresh namespace per test).

mod admin;
mod admission;
mod auth;
mod batch;
mod caching;
mod cli;
mod compose;
mod destinations;
mod errors;
mod events;
mod fairness;
mod helpers;
mod idempotency;
mod k8s;
mod kinds;
mod list;
mod long_poll;
mod observability;
mod openapi;
mod overload;
mod pipeline;
mod rate_limits;
mod reliability;
mod scale_out;
mod submit;
