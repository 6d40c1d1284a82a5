//! The worker: consumes job messages from RabbitMQ, claims each job in
//! Postgres, runs its handler and records the outcome.
//!
//! # Layout
//!
//! - [`cli`]: the command line.
//! - [`runner`]: the consume loop, concurrency limit and shutdown.
//! - [`execute`]: one job from claim to recorded outcome.

pub mod cli;
pub mod execute;
pub mod runner;

pub use runner::{Worker, WorkerConfig};
