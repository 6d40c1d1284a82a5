//! SIGKILL and SIGTERM on worker processes with jobs in flight: every job
//! still ends exactly once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use shared::job::JobStatus;
use shared::testing::db;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use crate::helpers::{Harness, signal};

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn jobs_of_a_worker_killed_with_sigkill_are_finished_by_another(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    let mut doomed = h.spawn_process(4, 30);
    let ids = h.submit(4, "sleep", json!({"ms": 3000})).await;
    h.wait(Duration::from_secs(20), "the doomed worker runs all four", async || {
        h.count(JobStatus::Running, &ids).await == 4
    })
    .await;

    signal(&doomed, "-KILL");
    let _ = doomed.wait().await;
    let (stop, survivor) = h.spawn_in_process(4);

    h.wait(Duration::from_secs(30), "every job succeeds", async || h.count(JobStatus::Succeeded, &ids).await == 4)
        .await;
    // Each was rescued once (its lost attempt counted) and then ran to completion once.
    assert_eq!(h.attempts(&ids).await, BTreeMap::from([(2, 4)]));
    let kinds = db::error_kinds(&h.pool, &ids).await;
    assert!(kinds.iter().all(|k| k.as_deref() == Some("lease_expired")), "{kinds:?}");
    stop.cancel();
    survivor.await.expect("joined").expect("clean stop");
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_worker_stopped_with_sigterm_finishes_short_jobs_and_hands_back_the_rest(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    // Grace of 2 s: the 1 s jobs finish, the 6 s jobs do not.
    let mut stopping = h.spawn_process(4, 2);
    let short = h.submit(2, "sleep", json!({"ms": 1000})).await;
    let long = h.submit(2, "sleep", json!({"ms": 6_000})).await;
    let all: Vec<Uuid> = short.iter().chain(&long).copied().collect();
    h.wait(Duration::from_secs(20), "the worker runs all four", async || h.count(JobStatus::Running, &all).await == 4)
        .await;
    // More work arrives that the stopping worker has prefetched but not started.
    let waiting = h.submit(3, "noop", json!({})).await;
    h.wait(Duration::from_secs(10), "the worker holds the three", async || {
        db::held(&h.pool, "default").await == [Some(3)]
    })
    .await;

    let stopped_at = Instant::now();
    signal(&stopping, "-TERM");
    let exit = tokio::time::timeout(Duration::from_secs(15), stopping.wait()).await.expect("it exits").expect("status");
    assert!(exit.success(), "a clean exit: {exit:?}");
    let took = stopped_at.elapsed();
    assert!(took < Duration::from_secs(6), "it stopped within its grace period: {took:?}");
    assert_eq!(h.count(JobStatus::Succeeded, &short).await, 2, "short jobs finished during the grace period");
    assert_eq!(h.count(JobStatus::Queued, &long).await, 2, "long jobs were handed back");
    assert_eq!(db::outbox_len(&h.pool, None).await, 0, "and republished, their confirms recorded before it exited");
    assert_eq!(h.attempts(&long).await, BTreeMap::from([(0, 2)]), "the interrupted attempt is not counted");

    let (stop, survivor) = h.spawn_in_process(4);
    let everything: Vec<Uuid> = all.iter().chain(&waiting).copied().collect();
    h.wait(Duration::from_secs(40), "every job succeeds", async || {
        h.count(JobStatus::Succeeded, &everything).await == everything.len()
    })
    .await;
    assert_eq!(h.attempts(&everything).await, BTreeMap::from([(1, 7)]), "none ran twice to completion");
    stop.cancel();
    survivor.await.expect("joined").expect("clean stop");
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_worker_cut_off_from_postgres_stops_handlers_whose_leases_lapsed(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let postgres = tokio::net::lookup_host((connect.get_host(), connect.get_port()))
        .await
        .ok()
        .and_then(|mut addresses| addresses.next())
        .expect("the test's Postgres resolves");
    let proxy = shared::testing::Proxy::start(postgres).await;
    let h = Harness::with(connect, |s| s.database.url = proxy.url_for(&s.database.url)).await;
    let (_worker, logs) = h.spawn_logged(1);
    let job = h.submit(1, "sleep", json!({"ms": 60_000})).await;
    h.wait(Duration::from_secs(20), "the worker runs the job", async || h.count(JobStatus::Running, &job).await == 1)
        .await;

    let mark = logs.mark();
    proxy.cut();
    let lease = h.settings.worker.lease_seconds;
    // Past the lease, the job may run elsewhere: this copy must stop.
    let bound = Duration::from_secs(u64::from(lease) + 2 * u64::from(h.settings.worker.heartbeat_seconds) + 3);
    logs.wait_for(bound, mark, "leases lapsed unrenewed").await;
    logs.wait_for(Duration::from_secs(5), mark, "lease lost while running").await;
    proxy.restore();
    h.close().await;
}

/// A batch's jobs travel 16 to a message, and a worker claims them only as
/// its slots free up: killed while it holds all three messages of a batch of
/// 40 and runs 4 of the jobs, the other 36 are still queued, its messages go
/// back, and another worker runs every job, each to completion once.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_batch_held_by_a_worker_killed_with_sigkill_is_finished_by_another(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    let mut doomed = h.spawn_process(4, 30);
    let ids = h.submit_batch(40, "sleep", json!({"ms": 3000})).await;
    h.wait(Duration::from_secs(20), "the doomed worker runs four and holds every message", async || {
        h.count(JobStatus::Running, &ids).await == 4 && db::held(&h.pool, "default").await == [Some(3)]
    })
    .await;
    assert_eq!(h.count(JobStatus::Queued, &ids).await, 36, "nothing claimed beyond the free slots");

    signal(&doomed, "-KILL");
    let _ = doomed.wait().await;
    let (stop, survivor) = h.spawn_in_process(40);

    h.wait(Duration::from_secs(30), "every job succeeds", async || h.count(JobStatus::Succeeded, &ids).await == 40)
        .await;
    // The four it ran were rescued (their lost attempt counted); the rest ran once.
    assert_eq!(h.attempts(&ids).await, BTreeMap::from([(1, 36), (2, 4)]));
    assert_eq!(h.amqp.dead_letters().await, 0);
    stop.cancel();
    survivor.await.expect("joined").expect("clean stop");
    h.close().await;
}
