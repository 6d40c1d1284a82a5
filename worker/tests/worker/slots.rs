//! A worker's slots bound the handlers running, not the bookkeeping after
//! them: a job's slot is free as soon as its handler returns, while its
//! outcome is still being written, and at most `concurrency` outcomes wait
//! for their write that way.

use std::time::Duration;

use serde_json::json;
use shared::job::JobStatus;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use crate::helpers::Harness;

/// Holds job `id`'s row locked until the returned transaction ends: the
/// worker's outcome write for it waits until then.
async fn lock_row(h: &Harness, id: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = h.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *lock).await.expect("lock");
    lock
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_slow_outcome_write_does_not_hold_the_slot_and_outcomes_in_waiting_are_bounded(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    // Leases far longer than the locks below: nothing is rescued meanwhile.
    let h = Harness::with(connect, |settings| settings.worker.lease_seconds = 30).await;
    let (stop, worker) = h.spawn_in_process(1);
    // `hash` reports no progress, whose writes would wait for the locks too.
    let first = h.submit(1, "hash", json!({"input": "a", "iterations": 1_000_000})).await;
    h.wait(Duration::from_secs(10), "the first job runs", async || h.count(JobStatus::Running, &first).await == 1)
        .await;
    // Its outcome will wait for this lock.
    let first_lock = lock_row(&h, first[0]).await;

    // With the only slot held through the outcome write, this one could not
    // start until the lock goes.
    let second = h.submit(1, "hash", json!({"input": "b", "iterations": 200_000})).await;
    h.wait(Duration::from_secs(10), "the second job runs while the first's outcome waits", async || {
        h.count(JobStatus::Running, &second).await == 1
    })
    .await;
    assert_eq!(h.count(JobStatus::Running, &first).await, 1, "the first's outcome is not written yet");
    let second_lock = lock_row(&h, second[0]).await;

    // The second's handler returns within ~0.2 s; one outcome already waits
    // (the bound, at concurrency 1), so it keeps its slot and the third waits.
    let third = h.submit(1, "noop", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.count(JobStatus::Queued, &third).await, 1, "a third job started past the bound");

    first_lock.rollback().await.expect("unlock");
    second_lock.rollback().await.expect("unlock");
    let all: Vec<Uuid> = first.iter().chain(&second).chain(&third).copied().collect();
    h.wait(Duration::from_secs(10), "all three succeed", async || h.count(JobStatus::Succeeded, &all).await == 3).await;
    assert_eq!(h.attempts(&all).await, [(1, 3)].into(), "each ran once");
    stop.cancel();
    worker.await.expect("joined").expect("clean stop");
    h.close().await;
}
