//! The worker: consumes job messages from RabbitMQ, claims each job in
//! Postgres, runs its handler and records the outcome.
//!
//! # Layout
//!
//! - [`runner`]: the consume loop, concurrency limit and shutdown.
//! - [`execute`]: one job from claim to recorded outcome.

pub mod execute;
pub mod runner;

pub use runner::{Worker, WorkerConfig};
