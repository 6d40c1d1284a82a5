//! Queued jobs whose messages RabbitMQ lost after confirming them (a purged
//! queue, a classic queue lost with its node) are found and published again.

use std::time::Duration;

use serde_json::json;
use shared::job::JobStatus;
use shared::testing::db;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::Harness;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_purged_queue_heals_by_itself(_: sqlx::postgres::PgPoolOptions, connect: PgConnectOptions) {
    let h = Harness::with(connect, |s| s.worker.outbox_grace_seconds = 1).await;
    let ids = h.submit(100, "noop", json!({})).await;
    assert_eq!(h.amqp.purge("default").await, 100, "every message gone, every job still queued");

    let _worker = h.spawn_process(8, 30);
    let took = h
        .wait(Duration::from_secs(30), "all 100 succeed", async || h.count(JobStatus::Succeeded, &ids).await == 100)
        .await;
    eprintln!("a purged queue of 100 jobs healed in {took:?} (heartbeat 1 s, grace 1 s)");
    assert_eq!(h.attempts(&ids).await, [(1, 100)].into(), "each ran exactly once");
    assert_eq!(h.amqp.dead_letters().await, 0);
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn messages_a_worker_holds_are_not_taken_for_lost(_: sqlx::postgres::PgPoolOptions, connect: PgConnectOptions) {
    let h = Harness::with(connect, |s| s.worker.outbox_grace_seconds = 0).await;
    h.submit(5, "noop", json!({})).await;
    // A worker took all five and holds them, unacknowledged; it says so at its heartbeat.
    let holding = h.amqp.hold("default", 5).await;
    assert_eq!(h.amqp.depth("default").await, 0);
    db::fake_worker(&h.pool, json!({"default": 5})).await;

    let mut reconciler = h.reconciler();
    let lead = reconciler.elect().await.expect("query").expect("nobody leads yet");
    for _ in 0..3 {
        reconciler.find_lost_messages(&lead).await.expect("look");
    }
    assert_eq!(h.amqp.depth("default").await, 0, "nothing republished while the worker holds them");

    // The worker now holds none (its messages were lost with it, say): one look is not enough…
    db::set_held(&h.pool, json!({})).await;
    reconciler.find_lost_messages(&lead).await.expect("look");
    assert_eq!(h.amqp.depth("default").await, 0, "a shortfall seen once may be a race");
    // …a second confirms it.
    reconciler.find_lost_messages(&lead).await.expect("look");
    assert_eq!(h.amqp.depth("default").await, 5, "all five published again");
    drop(holding);
    h.close().await;
}

/// A batch's jobs share messages: the reconciler counts messages, not jobs,
/// so 40 jobs in 3 messages are not taken for 37 lost; when the messages are
/// lost, the jobs are published again together, and each runs once.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn jobs_sharing_a_message_are_counted_once(_: sqlx::postgres::PgPoolOptions, connect: PgConnectOptions) {
    let h = Harness::with(connect, |s| s.worker.outbox_grace_seconds = 0).await;
    let ids = h.submit_batch(40, "noop", json!({})).await;
    assert_eq!(h.amqp.depth("default").await, 3, "16 + 16 + 8");

    let mut reconciler = h.reconciler();
    let lead = reconciler.elect().await.expect("query").expect("nobody leads yet");
    for _ in 0..3 {
        reconciler.find_lost_messages(&lead).await.expect("look");
    }
    assert_eq!(h.amqp.depth("default").await, 3, "nothing republished while every message is there");

    assert_eq!(h.amqp.purge("default").await, 3);
    reconciler.find_lost_messages(&lead).await.expect("look");
    reconciler.find_lost_messages(&lead).await.expect("look again");
    assert_eq!(h.amqp.depth("default").await, 3, "published again, as they were");

    let _worker = h.spawn_process(8, 30);
    h.wait(Duration::from_secs(30), "all 40 succeed", async || h.count(JobStatus::Succeeded, &ids).await == 40).await;
    assert_eq!(h.attempts(&ids).await, [(1, 40)].into(), "each ran exactly once");
    h.close().await;
}
