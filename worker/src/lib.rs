//! The worker: consumes job messages from RabbitMQ, claims each job in
//! Postgres, runs its handler and records the outcome.
//!
//! # Layout
//!
//! - [`batch`]: claims and outcomes written in batches.
//! - [`cli`]: the command line.
//! - [`runner`]: the consume loop, concurrency limit and shutdown.
//! - [`envelope`]: a message's jobs, and which held message's job starts next.
//! - [`execute`]: one job from claim to recorded outcome; lease bookkeeping.
//! - [`health`]: the health port (`/healthz`, `/readyz`, `/metrics`).
//! - [`metrics`]: what the worker counts, for Prometheus.
//! - [`reconciler`]: due jobs, expired leases, the outbox, lost messages (one leader at a time).

pub mod batch;
pub mod cli;
pub mod envelope;
pub mod execute;
pub mod health;
pub mod metrics;
pub mod reconciler;
pub mod runner;

pub use runner::{Worker, WorkerConfig};
