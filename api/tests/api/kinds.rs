//! Each built-in job type, end to end: submitted over HTTP, run by a worker,
//! outcome read back over HTTP.

use std::time::Duration;

use serde_json::json;
use shared::job::{FailureKind, JobStatus};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{Endpoint, allow_loopback, free_port, spawn_app, spawn_app_with};
use crate::submit::PgPoolOptionsUnused;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn noop_and_echo_succeed_with_their_results(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 4);

    let noop = app.submit_ok(&json!({"type": "noop"})).await;
    let payload = json!({"nested": {"list": [1, "two", null]}, "n": 1.5});
    let echo = app.submit_ok(&json!({"type": "echo", "payload": payload})).await;

    let noop = app.wait_terminal(noop.id).await;
    assert_eq!((noop.status, noop.attempt, noop.result), (JobStatus::Succeeded, 1, None), "noop returns nothing");
    assert!(noop.started_at.is_some() && noop.finished_at.is_some());
    let echo = app.wait_terminal(echo.id).await;
    assert_eq!((echo.status, echo.result.map(|r| r.value())), (JobStatus::Succeeded, Some(payload)));
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn sleep_reports_progress_while_running_and_succeeds(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 1);

    let job = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 1500}})).await;

    let midway = app
        .wait_for(job.id, Duration::from_secs(10), |job| {
            job.status == JobStatus::Running && job.progress.is_some_and(|p| p > 0 && p < 100)
        })
        .await;
    assert_eq!(midway.attempt, 1);
    let done = app.wait_terminal(job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.progress, Some(100));
    assert_eq!(done.result.map(|r| r.value()), Some(json!({"slept_ms": 1500})));
    let ran = done.finished_at.zip(done.started_at).map(|(f, s)| (f - s).num_milliseconds());
    assert!(ran.is_some_and(|ms| ms >= 1500), "slept for real: {ran:?}");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_sleep_past_its_timeout_is_stopped_and_fails_with_kind_timeout(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 1);

    let job = app
        .submit_ok(&json!({"type": "sleep", "payload": {"ms": 60000}, "timeout_seconds": 1, "max_attempts": 1}))
        .await;

    let done = app.wait_terminal(job.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    let error = done.error.expect("an error");
    assert_eq!((error.kind, error.attempt), (FailureKind::Timeout, 1));
    let ran = done.finished_at.zip(done.started_at).map(|(f, s)| (f - s).num_milliseconds());
    assert!(ran.is_some_and(|ms| (1000..5000).contains(&ms)), "stopped at its timeout: {ran:?}");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn fail_fails_permanently_or_waits_for_a_retry(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, hold_retries).await;
    app.spawn_worker(&["default"], 2);

    let permanent =
        app.submit_ok(&json!({"type": "fail", "payload": {"message": "bad input", "retryable": false}})).await;
    let retryable = app.submit_ok(&json!({"type": "fail", "payload": {"message": "flaky"}, "max_attempts": 3})).await;
    let exhausted = app.submit_ok(&json!({"type": "fail", "max_attempts": 1})).await;
    let enough = app.submit_ok(&json!({"type": "fail", "payload": {"times": 0}})).await;

    let permanent = app.wait_terminal(permanent.id).await;
    assert_eq!((permanent.status, permanent.attempt), (JobStatus::Failed, 1));
    let error = permanent.error.expect("error kept");
    assert_eq!((error.message.as_str(), error.kind, error.attempt), ("bad input", FailureKind::Permanent, 1));

    let retrying = app.wait_for(retryable.id, Duration::from_secs(30), |j| j.status == JobStatus::Retrying).await;
    let error = retrying.error.clone().expect("error kept");
    assert_eq!((error.message.as_str(), error.kind, error.attempt), ("flaky", FailureKind::Retryable, 1));
    assert!(retrying.finished_at.is_none());
    // First retry: full jitter within [0, base] after the failure.
    let wait = (retrying.run_at - retrying.updated_at).num_milliseconds();
    assert!((0..=60_000).contains(&wait), "backoff within bounds: {wait} ms");

    let exhausted = app.wait_terminal(exhausted.id).await;
    assert_eq!(exhausted.status, JobStatus::Failed);
    assert_eq!(exhausted.error.map(|e| e.kind), Some(FailureKind::Retryable), "retryable, but no attempts left");

    let enough = app.wait_terminal(enough.id).await;
    assert_eq!(
        (enough.status, enough.result.map(|r| r.value())),
        (JobStatus::Succeeded, Some(json!({"succeeded_on_attempt": 1})))
    );
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn hash_returns_the_iterated_sha256(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 2);

    let expected = [
        (1, "ce8da97457ff05c19252776bfca37126f97b14a0781335ddc9bf19caa9b54b89"),
        (2, "11f3ccb17977dd910dab96cd860f197a1eeba9c5ff2a9a4d406f9db1abda2c6c"),
        (1000, "6ae5911b4b78f4b4e8d9ce3e0a8a3db6d306f37c25cba3d100b8cef29b05959e"),
    ];
    for (iterations, digest) in expected {
        let job =
            app.submit_ok(&json!({"type": "hash", "payload": {"input": "conveyor", "iterations": iterations}})).await;
        let done = app.wait_terminal(job.id).await;
        assert_eq!(done.status, JobStatus::Succeeded);
        assert_eq!(done.result.map(|r| r.value()), Some(json!({"digest": digest})), "{iterations} iterations");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn http_makes_a_real_request_and_classifies_the_answer(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |s| {
        hold_retries(s);
        allow_loopback(s);
    })
    .await;
    app.spawn_worker(&["default"], 2);
    let endpoint = Endpoint::start(200).await;

    let job = app
        .submit_ok(&json!({"type": "http", "payload": {
            "url": format!("{}/hooks/1", endpoint.url), "method": "put",
            "headers": {"X-Signature": "abc"}, "body": {"event": "done"}
        }}))
        .await;
    let done = app.wait_terminal(job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.result.map(|r| r.value()), Some(json!({"status": 200, "body": "answered 200"})));
    let received = endpoint.received();
    assert_eq!(received.len(), 1);
    assert_eq!((received[0].method.as_str(), received[0].path.as_str()), ("PUT", "/hooks/1"));
    assert!(received[0].headers.contains(&("x-signature".to_owned(), "abc".to_owned())));
    assert_eq!(received[0].body, r#"{"event":"done"}"#);

    // 4xx: asking again will not help.
    endpoint.answer(404);
    let job = app.submit_ok(&json!({"type": "http", "payload": {"url": endpoint.url}})).await;
    let done = app.wait_terminal(job.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    let error = done.error.expect("error");
    assert_eq!(error.kind, FailureKind::Permanent);
    assert!(error.message.contains("404"), "{}", error.message);

    // 5xx and network errors are retried.
    endpoint.answer(503);
    let job = app.submit_ok(&json!({"type": "http", "payload": {"url": endpoint.url}})).await;
    let retrying = app.wait_for(job.id, Duration::from_secs(30), |j| j.status == JobStatus::Retrying).await;
    assert_eq!(retrying.error.map(|e| e.kind), Some(FailureKind::Retryable));
    let closed = format!("http://127.0.0.1:{}", free_port());
    let job = app.submit_ok(&json!({"type": "http", "payload": {"url": closed, "timeout_ms": 2000}})).await;
    let retrying = app.wait_for(job.id, Duration::from_secs(30), |j| j.status == JobStatus::Retrying).await;
    assert_eq!(retrying.error.map(|e| e.kind), Some(FailureKind::Retryable));

    endpoint.stop().await;
    app.stop().await;
}

/// Keeps failed jobs in `retrying` long enough to look at: a one-minute
/// backoff, and a reconciler that passes once at start and then once a minute.
fn hold_retries(settings: &mut shared::config::Settings) {
    settings.jobs.retry_backoff_base_ms = 60_000;
    settings.jobs.retry_backoff_cap_ms = 60_000;
    settings.worker.reconcile_interval_ms = 60_000;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_result_over_its_limit_fails_the_job_for_good(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |s| s.jobs.result_max_bytes = 1000).await;
    app.spawn_worker(&["default"], 1);
    let job = app.submit_ok(&json!({"type": "echo", "payload": {"blob": "x".repeat(2000)}})).await;
    let done = app.wait_terminal(job.id).await;
    assert_eq!((done.status, done.attempt, done.result), (JobStatus::Failed, 1, None));
    let error = done.error.expect("an error");
    assert_eq!(error.kind, FailureKind::Permanent);
    assert!(error.message.contains("jobs.result_max_bytes"), "{}", error.message);
    let fits = app.submit_ok(&json!({"type": "echo", "payload": {"blob": "x".repeat(900)}})).await;
    assert_eq!(app.wait_terminal(fits.id).await.status, JobStatus::Succeeded);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_answer_holding_u0000_is_stored_not_retried_forever(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, allow_loopback).await;
    app.spawn_worker(&["default"], 1);
    let endpoint = Endpoint::start(200).await;
    endpoint.answer_with(b"before\0after");
    let job = app.submit_ok(&json!({"type": "http", "payload": {"url": endpoint.url}})).await;
    let done = app.wait_terminal(job.id).await;
    assert_eq!((done.status, done.attempt), (JobStatus::Succeeded, 1));
    assert_eq!(done.result.map(|r| r.value()), Some(json!({"status": 200, "body": "before\u{FFFD}after"})));
    endpoint.stop().await;
    app.stop().await;
}
