//! What the `api` and `worker` binaries share: the job model, the job types,
//! configuration, and access to Postgres and RabbitMQ.
//!
//! # Layout
//!
//! - [`batch`]: timer-less batching of database writes.
//! - [`cli`]: argument parsing with one-line usage errors.
//! - [`config`]: layered settings (defaults, file, environment), validated once.
//! - [`job`]: the job model: states, the stored job, failures, and what the API, workers and storage pass each other.
//! - [`kinds`]: the job types and their registry.
//! - [`metrics`]: registering and rendering Prometheus metrics.
//! - [`db`]: the storage layer: every SQL statement, checked at compile time, and its error type.
//! - [`outbox`]: publishing committed jobs and recording the confirms, in batches.
//! - [`scope`]: what a token may do.
//! - [`redact`]: passwords kept out of logs and errors.
//! - [`queue`]: the RabbitMQ message, topology, publisher, and the deliveries a worker consumes.
//! - [`signal`]: SIGINT/SIGTERM handling.
//! - [`spans`]: OTLP export of the API's and workers' spans (feature `otlp`).
//! - [`telemetry`]: logging set-up.
//! - [`trace`]: W3C `traceparent`, carried from the HTTP request to the worker.
//! - `testing` (feature `test-util`): per-test namespaces for integration tests.

pub mod batch;
pub mod cli;
pub mod config;
pub mod db;
pub mod job;
pub mod kinds;
pub mod metrics;
pub mod number;
pub mod outbox;
pub mod queue;
pub mod redact;
pub mod scope;
pub mod signal;
pub mod spans;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod trace;

/// Lower-case hexadecimal of `bytes` (digests, key secrets).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}
