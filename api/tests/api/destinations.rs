//! `http` jobs cannot reach the platform's own network: every way of naming a
//! loopback, private or link-local address is refused before anything is
//! sent, unless the operator's allowlist admits it; redirects are not
//! followed; the tenant cannot set `Host`. Each refusal is a job that fails
//! for good with a message saying what was refused, never what a private
//! port answered.

use serde_json::json;
use shared::job::{FailureKind, JobStatus};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{Endpoint, TestApp, allow_loopback, spawn_app, spawn_app_with};
use crate::submit::PgPoolOptionsUnused;

/// Submits an `http` job to `url`, waits for its end, and returns its error message.
async fn refused(app: &TestApp, url: &str) -> String {
    let job = app.submit_ok(&json!({"type": "http", "payload": {"url": url, "timeout_ms": 2000}})).await;
    let done = app.wait_terminal(job.id).await;
    assert_eq!(done.status, JobStatus::Failed, "{url} was not refused: {done:?}");
    assert_eq!(done.attempt, 1, "{url}: a refusal is not retried");
    let error = done.error.expect("an error");
    assert_eq!(error.kind, FailureKind::Permanent, "{url}");
    assert!(error.message.contains("refused") && error.message.contains("jobs.http.allow"), "{url}: {}", error.message);
    assert!(!error.message.contains("answered"), "{url}: the answer leaked: {}", error.message);
    error.message
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn every_way_of_naming_this_machine_is_refused_by_default(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 8);
    let endpoint = Endpoint::start(200).await;
    let port = endpoint.port;
    for url in [
        format!("http://127.0.0.1:{port}/"),
        // A name that resolves to 127.0.0.1: checked on the address connected to.
        format!("http://localhost:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://0.0.0.0:{port}/"),
        format!("http://[::1]:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1:6379/".to_owned(),
    ] {
        let message = refused(&app, &url).await;
        if url.contains("localhost") {
            assert!(message.contains("127.0.0.1 is a loopback address"), "{message}");
        }
    }
    assert!(endpoint.received().is_empty(), "a refused job reached the endpoint: {:?}", endpoint.received());
    endpoint.stop().await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_allowlisted_network_is_reached_but_no_redirect_is_followed(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let mut app = spawn_app_with(connect, allow_loopback).await;
    app.spawn_worker(&["default"], 2);
    let (first, second) = (Endpoint::start(200).await, Endpoint::start(200).await);

    let job =
        app.submit_ok(&json!({"type": "http", "payload": {"url": format!("http://localhost:{}/", first.port)}})).await;
    assert_eq!(app.wait_terminal(job.id).await.status, JobStatus::Succeeded, "127.0.0.1/32 admits localhost");

    first.redirect_to(&format!("{}/elsewhere", second.url));
    let job = app.submit_ok(&json!({"type": "http", "payload": {"url": first.url}})).await;
    let done = app.wait_terminal(job.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    let message = done.error.expect("an error").message;
    assert!(message.contains("302") && message.contains("redirects are not followed"), "{message}");
    assert_eq!(first.received().len(), 2);
    assert!(second.received().is_empty(), "the redirect was followed");
    first.stop().await;
    second.stop().await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_host_port_entry_admits_that_host_and_port_only(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let (admitted, other) = (Endpoint::start(200).await, Endpoint::start(200).await);
    let entry = format!("localhost:{}", admitted.port);
    let mut app = spawn_app_with(connect, |s| s.jobs.http.allow = vec![entry]).await;
    app.spawn_worker(&["default"], 2);

    let job = app
        .submit_ok(&json!({"type": "http", "payload": {"url": format!("http://localhost:{}/", admitted.port)}}))
        .await;
    assert_eq!(app.wait_terminal(job.id).await.status, JobStatus::Succeeded);
    refused(&app, &format!("http://localhost:{}/", other.port)).await;
    refused(&app, &format!("http://127.0.0.1:{}/", admitted.port)).await;
    assert_eq!((admitted.received().len(), other.received().len()), (1, 0));
    admitted.stop().await;
    other.stop().await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn host_and_hop_by_hop_headers_are_refused_at_submission(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    for header in ["Host", "Connection", "Transfer-Encoding", "Proxy-Authorization"] {
        let response = app
            .submit(&json!({"type": "http", "payload": {"url": "http://example.com/", "headers": {header: "x"}}}))
            .await;
        assert_eq!(response.status(), 422, "{header}");
        let problem: serde_json::Value = response.json().await.expect("problem");
        assert_eq!(problem["errors"][0]["field"], format!("payload.headers.{header}"), "{problem}");
    }
    assert_eq!(app.job_count().await, 0);
    app.stop().await;
}
