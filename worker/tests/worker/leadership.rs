//! The reconciler's leadership: one holder at a time, taken over when it
//! lapses, and fenced, so that a holder that lost it changes nothing.

use std::time::Duration;

use serde_json::json;
use shared::db::jobs;
use shared::job::JobStatus;
use shared::queue::Message;
use shared::testing::db;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;
use worker::reconciler::Interrupted;

use crate::helpers::Harness;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_reconciler_that_lost_its_leadership_changes_nothing(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::with(connect, |s| s.worker.outbox_grace_seconds = 0).await;
    let pool = &h.pool;
    // Work of every kind a reconciler does: a queued job whose confirmed
    // message RabbitMQ lost (the oldest, as lost messages are),
    let lost_message = h.submit(1, "noop", json!({})).await[0];
    assert_eq!(h.amqp.purge("default").await, 1);
    // a scheduled job that has come due,
    let mut due = shared::testing::new_job("noop", json!({}));
    due.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let due = jobs::insert(pool, &due).await.expect("insert").id;
    db::make_due(pool, due).await;
    // a running job whose worker was lost,
    let lost_worker = jobs::insert(pool, &shared::testing::new_job("noop", json!({}))).await.expect("insert").id;
    db::clear_outbox(pool).await;
    jobs::claim(pool, lost_worker, Uuid::now_v7(), 30).await.expect("claim").expect("queued");
    db::expire_lease(pool, lost_worker).await;
    // and a queued job whose publish was never confirmed.
    let unpublished = jobs::insert(pool, &shared::testing::new_job("noop", json!({}))).await.expect("insert").id;

    let mut a = h.reconciler();
    let mut stale = a.elect().await.expect("query").expect("nobody leads yet");
    // A stalls past its term; B takes over.
    db::lapse_leadership(pool).await;
    let mut b = h.reconciler();
    let mut lead = b.elect().await.expect("query").expect("a lapsed leadership is free");

    let before = (db::snapshot(pool).await, db::outbox_len(pool, None).await);

    // Each of A's statements, made as if it froze just before them, is refused by its term.
    assert!(jobs::queue_due(pool, stale.term, 10).await.expect("query").is_empty());
    assert_eq!(jobs::rescue_expired(pool, stale.term, 10).await.expect("query"), 0);
    assert!(shared::db::outbox::sweep(pool, stale.term, 0, 10).await.expect("query").is_empty());
    assert!(jobs::longest_queued(pool, stale.term, "default", 0, 10).await.expect("query").is_empty());
    // A whole pass stops at its first renewal.
    assert!(matches!(a.pass(&mut stale).await, Err(Interrupted::Lost)));
    assert_eq!((db::snapshot(pool).await, db::outbox_len(pool, None).await), before, "nothing changed");
    assert_eq!(h.amqp.depth("default").await, 0, "nothing was published");

    // B, the leader, does all of it.
    // The looks first: once the passes have run, the sweep (no grace period
    // here) may have published a duplicate of a job whose confirm was not
    // recorded yet, and a duplicate hides a lost message from the count.
    b.find_lost_messages(&lead).await.expect("look");
    b.find_lost_messages(&lead).await.expect("look again");
    b.pass(&mut lead).await.expect("pass");
    b.pass(&mut lead).await.expect("pass again: the rescued job is due now");
    h.wait(Duration::from_secs(5), "every confirm is recorded", async || db::outbox_len(pool, None).await == 0).await;
    // A message for each job: due, rescued then due, unconfirmed, lost.
    let mut published = Vec::new();
    while let Some((body, _)) = h.amqp.take("default").await {
        match serde_json::from_slice::<Message>(&body) {
            Ok(message) => published.extend_from_slice(message.job_ids()),
            Err(e) => panic!("not a job message: {e}"),
        }
    }
    // With no grace period the sweep may publish again a job whose confirm the
    // same pass has not recorded yet: a duplicate, which workers drop.
    published.sort();
    published.dedup();
    let mut expected = vec![due, lost_worker, unpublished, lost_message];
    expected.sort();
    assert_eq!(published, expected);
    assert_eq!(jobs::status(pool, lost_worker).await.expect("query"), Some(JobStatus::Queued));
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_leader_that_stops_cleanly_hands_over_without_waiting_for_its_term(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::with(connect, |s| s.worker.leader_ttl_seconds = 30).await;
    let (stop_a, a) = h.spawn_in_process(1);
    h.wait(Duration::from_secs(10), "A leads", async || h.leader().await.is_some()).await;
    let first = h.leader().await.expect("a leader");
    let (stop_b, b) = h.spawn_in_process(1);
    h.wait(Duration::from_secs(10), "B registers", async || h.workers().await.len() == 2).await;

    stop_a.cancel();
    a.await.expect("joined").expect("clean stop");
    let took = h
        .wait(Duration::from_secs(5), "B leads", async || h.leader().await.is_some_and(|t| t.holder != first.holder))
        .await;
    assert!(took < Duration::from_secs(2), "handed over in {took:?}, not after the 30 s term");
    stop_b.cancel();
    b.await.expect("joined").expect("clean stop");
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_leader_forgets_expired_idempotency_keys(_: sqlx::postgres::PgPoolOptions, connect: PgConnectOptions) {
    use shared::db::idempotency;
    let h = Harness::with(connect, |_| {}).await;
    let job = || shared::testing::new_job("noop", json!({}));
    idempotency::submit(&h.pool, "default", "lapsed", &[0; 32], 0, &[job()]).await.expect("keyed");
    idempotency::submit(&h.pool, "default", "live", &[0; 32], 3600, &[job()]).await.expect("keyed");

    let mut reconciler = h.reconciler();
    let mut lead = reconciler.elect().await.expect("query").expect("nobody leads yet");
    reconciler.pass(&mut lead).await.expect("pass");

    let keys: Vec<String> =
        sqlx::query_scalar("SELECT key FROM idempotency_keys").fetch_all(&h.pool).await.expect("keys");
    assert_eq!(keys, ["live"]);
}
