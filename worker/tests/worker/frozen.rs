//! A frozen worker (SIGSTOP: a paused VM, a swap storm; its sockets stay
//! open) holds nothing up for long: not the reconciler's leadership, not the
//! jobs it was running, not the messages it had prefetched.

use std::time::{Duration, Instant};

use serde_json::json;
use shared::db::jobs;
use shared::job::JobStatus;
use shared::testing::db;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{Harness, signal};

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_frozen_leader_is_replaced_and_its_job_finishes_elsewhere(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    // RabbitMQ may hand the frozen worker new messages until it drops its
    // connection, which the heartbeat bounds (the other test's subject).
    let h = Harness::with(connect, |s| s.amqp.heartbeat_seconds = 2).await;
    let (lease, ttl) = (h.settings.worker.lease_seconds, h.settings.worker.leader_ttl_seconds);

    // Worker A alone: it leads the reconcilers and runs the job.
    let (frozen, logs) = h.spawn_logged(1);
    let job = h.submit(1, "sleep", json!({"ms": 3000})).await[0];
    h.wait(Duration::from_secs(20), "A runs the job", async || h.count(JobStatus::Running, &[job]).await == 1).await;
    let a = h.lease_owner(job).await.expect("a running job has a lease owner");
    h.wait(Duration::from_secs(10), "A leads", async || h.leader().await.is_some_and(|t| t.holder == a)).await;
    let _b_process = h.spawn_process(4, 30);
    h.wait(Duration::from_secs(20), "B registers", async || h.workers().await.len() == 2).await;
    let b = *h.workers().await.iter().find(|id| **id != a).expect("B's id");

    signal(&frozen, "-STOP");
    let froze = Instant::now();
    // Work for the reconciler that comes due while A is frozen.
    let mut later = shared::testing::new_job("noop", json!({}));
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::seconds(1));
    let later = jobs::insert(&h.pool, &later).await.expect("insert").id;

    let took = h
        .wait(Duration::from_secs(u64::from(ttl) + 2), "B leads", async || {
            h.leader().await.is_some_and(|t| t.holder == b)
        })
        .await;
    eprintln!("new leader {took:?} after the old one froze (leader_ttl_seconds = {ttl})");
    assert!(took <= Duration::from_secs(u64::from(ttl)) + Duration::from_millis(500), "took {took:?}");

    // Rescued once the lease lapses, then run again from the start (3 s) on B.
    let bound = Duration::from_secs(u64::from(lease + ttl) + 3 + 3);
    h.wait(bound, "B finishes A's job", async || h.count(JobStatus::Succeeded, &[job]).await == 1).await;
    eprintln!("A's job succeeded on B {:?} after A froze", froze.elapsed());
    assert_eq!(h.attempts(&[job]).await, [(2, 1)].into(), "the frozen attempt counts, the second succeeded");
    h.wait(Duration::from_secs(10), "the scheduled job runs", async || {
        h.count(JobStatus::Succeeded, &[later]).await == 1
    })
    .await;
    let settled = db::change_of(&h.pool, job).await;

    // A wakes up: it finds it no longer leads, and its late outcome is refused.
    let woke = logs.mark();
    signal(&frozen, "-CONT");
    logs.wait_for(Duration::from_secs(10), woke, "reconciler lost its leadership").await;
    logs.wait_for(Duration::from_secs(10), woke, "discarded").await;
    assert_eq!(db::change_of(&h.pool, job).await, settled, "the job's row is as B left it");
    assert_eq!(h.leader().await.map(|t| t.holder), Some(b), "B still leads");
    let work = ["queued due jobs", "rescued jobs", "republishing"];
    let since = logs.messages_since(woke);
    assert!(
        !since.iter().any(|m| work.iter().any(|w| m.contains(w))),
        "A did reconciler work after waking: {since:#?}"
    );
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn messages_prefetched_by_a_frozen_worker_return_within_the_heartbeat_bound(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::with(connect, |s| {
        s.amqp.heartbeat_seconds = 2;
        // Only RabbitMQ's heartbeat may bring the messages back here: the
        // reconciler's search for lost messages ignores jobs this young.
        s.worker.outbox_grace_seconds = 60;
    })
    .await;
    let heartbeat = h.settings.amqp.heartbeat_seconds;

    // A runs two long jobs, and holds two more messages it cannot start yet.
    let (frozen, _logs) = h.spawn_logged(2);
    let long = h.submit(2, "sleep", json!({"ms": 60_000})).await;
    h.wait(Duration::from_secs(20), "A runs both", async || h.count(JobStatus::Running, &long).await == 2).await;
    let waiting = h.submit(2, "noop", json!({})).await;
    h.wait(Duration::from_secs(10), "A reports holding two messages", async || {
        db::held(&h.pool, "default").await == [Some(2)]
    })
    .await;
    assert_eq!(h.amqp.depth("default").await, 0, "nothing left in the queue for anyone else");
    let _b_process = h.spawn_process(4, 30);
    h.wait(Duration::from_secs(20), "B is up", async || h.workers().await.len() == 2).await;

    signal(&frozen, "-STOP");
    let froze = Instant::now();
    let bound = Duration::from_secs(3 * u64::from(heartbeat) + 2);
    h.wait(bound, "the held jobs finish on B", async || h.count(JobStatus::Succeeded, &waiting).await == 2).await;
    eprintln!("held messages ran on B {:?} after A froze (amqp.heartbeat_seconds = {heartbeat})", froze.elapsed());
    assert_eq!(h.attempts(&waiting).await, [(1, 2)].into(), "each ran once");
    h.close().await;
}
