//! The worker: consumes job messages from RabbitMQ, claims each job in
//! Postgres, runs its handler and records the outcome.
//!
//! # Layout
//!
//! - [`cli`]: the command line.
//! - [`runner`]: the consume loop, concurrency limit and shutdown.
//! - [`execute`]: one job from claim to recorded outcome; lease bookkeeping.
//! - [`outcomes`]: job outcomes written in batches.
//! - [`reconciler`]: due jobs, expired leases, the outbox (one active at a time).

pub mod cli;
pub mod execute;
pub mod outcomes;
pub mod reconciler;
pub mod runner;

pub use runner::{Worker, WorkerConfig};
