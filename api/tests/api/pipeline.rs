//! The pipeline as a whole: many jobs through several workers, and what a
//! worker does with messages it should not run.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::json;
use shared::job::JobStatus;
use shared::queue::Message;
use shared::testing::db;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{spawn_app, spawn_app_with, wait_until};
use crate::submit::PgPoolOptionsUnused;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_thousand_jobs_through_four_workers_each_run_exactly_once(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    const JOBS: usize = 1000;
    // No outbox sweep during the test: only the API's recording may empty it.
    let mut app = spawn_app_with(connect, |s| s.worker.outbox_grace_seconds = 600).await;
    for _ in 0..4 {
        app.spawn_worker(&["default"], 8);
    }

    // Submit from 16 clients at once while the workers consume.
    let app = Arc::new(app);
    let submitters: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                for _ in 0..JOBS / 16 + 1 {
                    app.submit_ok(&json!({"type": "noop"})).await;
                }
            })
        })
        .collect();
    for submitter in submitters {
        submitter.await.expect("submitter");
    }
    let submitted = app.job_count().await;
    assert!(submitted >= JOBS as i64);

    let all_done =
        wait_until(Duration::from_secs(120), || async { app.count_in(JobStatus::Succeeded).await == submitted }).await;
    assert!(all_done, "only {} of {submitted} succeeded", app.count_in(JobStatus::Succeeded).await);
    // Each ran once: one claim each (attempt 1), by one of the four workers.
    assert_eq!(db::attempts(&app.pool, None).await.into_keys().collect::<Vec<_>>(), [1]);
    assert_eq!(db::lease_holders(&app.pool).await, 0, "finished jobs hold no lease");
    assert_eq!(app.amqp.depth("default").await, 0, "every message consumed");
    // Every confirm was recorded: nothing is left for the outbox sweep to republish.
    let recorded = wait_until(Duration::from_secs(5), || async { db::outbox_len(&app.pool, None).await == 0 }).await;
    assert!(recorded, "the outbox kept rows of published jobs");
    // Four workers, four reconcilers, one active: the leadership is held, by one of them.
    let leader = shared::db::leadership::current(&app.pool, shared::db::leadership::RECONCILER).await.expect("query");
    let workers = db::worker_ids(&app.pool).await;
    assert!(
        leader.is_some_and(|(term, live)| live && workers.contains(&term.holder)),
        "exactly one reconciler is active: {leader:?} among {workers:?}"
    );
    let app = Arc::into_inner(app).expect("submitters are done");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_worker_runs_at_most_its_concurrency_at_once(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    for _ in 0..6 {
        app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 400}})).await;
    }
    let started = std::time::Instant::now();
    app.spawn_worker(&["default"], 2);

    let peak = AtomicI64::new(0);
    let done = wait_until(Duration::from_secs(30), || async {
        peak.fetch_max(app.count_in(JobStatus::Running).await, Ordering::SeqCst);
        app.count_in(JobStatus::Succeeded).await == 6
    })
    .await;
    assert!(done);
    // Six handlers of 400 ms, two at a time: at least three rounds. (Three
    // at a time would be done in two.)
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1200), "six 400 ms jobs done in {took:?}: more than two ran at once");
    // Both slots used. Postgres may also show, for the moment its outcome
    // takes to commit, a job whose handler has returned (README, Workers):
    // up to two more.
    let peak = peak.load(Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "{peak} running at the peak");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_unparseable_message_is_dead_lettered_not_dropped(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 2);
    // Declared by the worker; wait until it consumes, then feed it garbage.
    let job = app.submit_ok(&json!({"type": "noop"})).await;
    app.wait_terminal(job.id).await;

    app.amqp.publish_raw("default", b"{not json").await;
    app.amqp.publish_raw("default", br#"{"kind":"launch_rockets"}"#).await;

    assert!(wait_until(Duration::from_secs(10), || async { app.amqp.dead_letters().await == 2 }).await);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_duplicate_message_is_dropped_and_one_for_an_unknown_job_dead_lettered(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 2);
    let job = app.submit_ok(&json!({"type": "echo", "payload": {"n": 1}})).await;
    let first = app.wait_terminal(job.id).await;

    // A second message for the finished job (as a republish would make).
    let duplicate = serde_json::to_vec(&Message::RunJob { job_id: job.id }).expect("json");
    app.amqp.publish_raw("default", &duplicate).await;
    let unknown = serde_json::to_vec(&Message::RunJob { job_id: uuid::Uuid::now_v7() }).expect("json");
    app.amqp.publish_raw("default", &unknown).await;

    assert!(wait_until(Duration::from_secs(10), || async { app.amqp.dead_letters().await == 1 }).await);
    assert!(wait_until(Duration::from_secs(10), || async { app.amqp.depth("default").await == 0 }).await);
    assert_eq!(app.get_job(job.id).await, first, "the duplicate did not run the job again");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn two_messages_for_one_job_arriving_together_run_it_once(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, crate::helpers::allow_loopback).await;
    let endpoint = crate::helpers::Endpoint::start(200).await;
    // Each job's message is in the queue twice (as after a republish), side by side.
    let mut ids = Vec::new();
    for _ in 0..5 {
        let job = app.submit_ok(&json!({"type": "http", "payload": {"url": endpoint.url}})).await;
        let duplicate = serde_json::to_vec(&Message::RunJob { job_id: job.id }).expect("json");
        app.amqp.publish_raw("default", &duplicate).await;
        ids.push(job.id);
    }
    assert_eq!(app.amqp.depth("default").await, 10);

    // Many slots: the duplicates are claimed in the same batches as their originals.
    app.spawn_worker(&["default"], 16);
    for id in &ids {
        assert_eq!(app.wait_terminal(*id).await.status, JobStatus::Succeeded);
    }
    assert!(wait_until(Duration::from_secs(10), || async { app.amqp.depth("default").await == 0 }).await);
    assert_eq!(endpoint.received().len(), 5, "each webhook was delivered once");
    endpoint.stop().await;
    app.stop().await;
}
