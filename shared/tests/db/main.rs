//! The storage layer against a real Postgres, a fresh database per test
//! (`#[sqlx::test]`): the guarded moves and fences each statement promises.

mod idempotency;
mod jobs;
mod leadership;
mod migrate;
mod outbox;
