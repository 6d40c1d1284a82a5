//! The admin CLI, run as the real `api` binary against the test's database
//! and RabbitMQ namespace: what it prints, its exit codes, what it changes.

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use shared::job::{FailureKind, JobStatus};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{Endpoint, TestApp, allow_loopback, api_cli as api, client_with, spawn_app, spawn_app_with};
use crate::submit::PgPoolOptionsUnused;

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts failure with exactly one line on stderr, containing `needle`.
fn fails_with(output: &Output, needle: &str) {
    assert!(!output.status.success(), "succeeded: {}", stdout(output));
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

async fn status_of(app: &TestApp, id: uuid::Uuid) -> JobStatus {
    app.get_job(id).await.status
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_operator_requeues_a_failed_webhook_after_the_endpoint_is_fixed(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let mut app = spawn_app_with(connect, allow_loopback).await;
    app.spawn_worker(&["default"], 2);
    let endpoint = Endpoint::start(400).await;

    // The endpoint refuses the delivery: 4xx is permanent, the job fails.
    let job = app.submit_ok(&json!({"type": "http", "payload": {"url": format!("{}/hook", endpoint.url)}})).await;
    let failed = app.wait_terminal(job.id).await;
    assert_eq!(failed.status, JobStatus::Failed);
    let error = failed.error.clone().expect("error");
    assert_eq!(error.kind, FailureKind::Permanent);

    // A dry run changes nothing.
    let id = job.id.to_string();
    let dry = api(&app, &["requeue", &id, "--dry-run"]).await;
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(stdout(&dry), "would requeue 1 job\n");
    assert_eq!(app.get_job(job.id).await, failed);

    // The endpoint is fixed; the operator requeues the job.
    endpoint.answer(200);
    let requeued = api(&app, &["requeue", &id]).await;
    assert!(requeued.status.success(), "{}", stderr(&requeued));
    assert_eq!(stdout(&requeued), "requeued 1 job\n");
    let done = app.wait_terminal(job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!((done.attempt, done.requeue_count), (1, 1), "attempts restarted, requeue counted");
    assert_eq!(done.error, Some(error), "the previous error is kept");
    assert_eq!(endpoint.received().len(), 2);

    // A succeeded job cannot be requeued; an unknown id is a clear error; neither changes anything.
    fails_with(&api(&app, &["requeue", &id]).await, "is succeeded");
    let unknown = uuid::Uuid::now_v7().to_string();
    fails_with(&api(&app, &["requeue", &unknown]).await, &format!("no job {unknown}"));
    fails_with(&api(&app, &["requeue", "not-an-id"]).await, "not-an-id");
    assert_eq!(app.get_job(job.id).await, done);
    endpoint.stop().await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn bulk_requeue_takes_only_matching_jobs(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default", "critical"], 4);
    let mut fails = Vec::new();
    for queue in ["default", "default", "critical"] {
        let body = json!({"type": "fail", "queue": queue, "payload": {"retryable": false}});
        fails.push(app.submit_ok(&body).await.id);
    }
    let hash_fail = app
        .submit_ok(&json!({"type": "sleep", "payload": {"ms": 5000}, "timeout_seconds": 1, "max_attempts": 1}))
        .await
        .id;
    for id in fails.iter().chain([&hash_fail]) {
        assert_eq!(app.wait_terminal(*id).await.status, JobStatus::Failed);
    }

    let dry = api(&app, &["requeue", "--status", "failed", "--type", "fail", "--dry-run", "--json"]).await;
    assert!(dry.status.success(), "{}", stderr(&dry));
    let dry: Value = serde_json::from_str(&stdout(&dry)).expect("json");
    assert_eq!(dry["would_requeue"], 3);
    assert_eq!(app.count_in(JobStatus::Failed).await, 4, "a dry run changes nothing");

    let bulk = api(&app, &["requeue", "--status", "failed", "--type", "fail", "--queue", "default", "--json"]).await;
    assert!(bulk.status.success(), "{}", stderr(&bulk));
    let bulk: Value = serde_json::from_str(&stdout(&bulk)).expect("json");
    assert_eq!(bulk["requeued"], 2);
    let mut ids: Vec<String> = serde_json::from_value(bulk["ids"].clone()).expect("ids");
    ids.sort();
    let mut expected: Vec<String> = fails[..2].iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(bulk["unpublished"], json!([]));
    // They ran again (and, being `fail` jobs, failed again on their new first attempt).
    for id in &fails[..2] {
        let again =
            app.wait_for(*id, Duration::from_secs(30), |j| j.requeue_count == 1 && j.status.is_terminal()).await;
        assert_eq!((again.status, again.attempt), (JobStatus::Failed, 1));
    }
    assert_eq!(status_of(&app, fails[2]).await, JobStatus::Failed, "other queue untouched");
    assert_eq!(status_of(&app, hash_fail).await, JobStatus::Failed, "other type untouched");

    let limited = api(&app, &["requeue", "--status", "failed", "--limit", "1", "--since", "1h"]).await;
    assert_eq!(stdout(&limited), "requeued 1 job\n");
    fails_with(&api(&app, &["requeue", "--status", "running"]).await, "only failed or cancelled");
    fails_with(&api(&app, &["requeue", "--status", "failed", "--since", "soon"]).await, "soon");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn keys_are_created_listed_and_revoked_from_the_cli(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;

    let created = api(&app, &["keys", "create", "--tenant", "acme", "--name", "ci", "--scopes", "jobs:read"]).await;
    assert!(created.status.success(), "{}", stderr(&created));
    let out = stdout(&created);
    assert_eq!(out.lines().count(), 1, "the token alone: {out:?}");
    let token = out.trim();
    assert!(token.starts_with("cvk_"));
    let client = client_with(token);
    assert_eq!(client.get(app.url("/v1/jobs")).send().await.expect("sent").status(), 200);
    let submit = client.post(app.url("/v1/jobs")).json(&json!({"type": "noop"})).send().await.expect("sent");
    assert_eq!(submit.status(), 403, "read-only");

    let listed = api(&app, &["keys", "list", "--json"]).await;
    let keys: Value = serde_json::from_str(&stdout(&listed)).expect("json");
    let acme = keys.as_array().and_then(|keys| keys.iter().find(|k| k["tenant"] == "acme")).expect("listed");
    assert_eq!(acme["name"], "ci");
    assert_eq!(acme["scopes"], json!(["jobs:read"]));
    assert!(!stdout(&listed).contains(&token[token.len() - 64..]), "no secret in the list");
    let table = stdout(&api(&app, &["keys", "list"]).await);
    assert!(table.starts_with("ID") && table.contains("acme") && table.contains("active"), "{table}");

    let key_id = acme["id"].as_str().expect("id");
    let revoked = api(&app, &["keys", "revoke", key_id]).await;
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    assert!(stdout(&revoked).starts_with(&format!("revoked key {key_id}")));
    let gone = crate::helpers::wait_until(Duration::from_secs(10), || async {
        client.get(app.url("/v1/jobs")).send().await.expect("sent").status() == 401
    })
    .await;
    assert!(gone, "the revoked key still works");

    fails_with(&api(&app, &["keys", "revoke", &uuid::Uuid::now_v7().to_string()]).await, "no key");
    fails_with(&api(&app, &["keys", "create", "--tenant", "acme", "--scopes", "jobs:delete"]).await, "jobs:delete");
    fails_with(&api(&app, &["keys", "create", "--tenant", "a b"]).await, "tenant");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn jobs_are_listed_shown_and_pruned_from_the_cli(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    app.spawn_worker(&["default"], 2);
    let echo = app.submit_ok(&json!({"type": "echo", "payload": {"k": "v"}})).await;
    let later = app.submit_ok(&json!({"type": "noop", "delay_seconds": 600})).await;
    app.wait_terminal(echo.id).await;

    let table = stdout(&api(&app, &["jobs", "list"]).await);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.lines().nth(1).is_some_and(|l| l.starts_with(&later.id.to_string())), "newest first: {table}");
    let listed: Value =
        serde_json::from_str(&stdout(&api(&app, &["jobs", "list", "--status", "succeeded", "--json"]).await))
            .expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let shown = stdout(&api(&app, &["jobs", "show", &echo.id.to_string()]).await);
    assert!(shown.contains("status:        succeeded") && shown.contains(r#"result:        {"k": "v"}"#), "{shown}");
    let shown: Value =
        serde_json::from_str(&stdout(&api(&app, &["jobs", "show", &echo.id.to_string(), "--json"]).await))
            .expect("json");
    assert_eq!(shown["id"], echo.id.to_string());
    fails_with(&api(&app, &["jobs", "show", &uuid::Uuid::now_v7().to_string()]).await, "no job");

    // Nothing finished a day ago; age the finished job, then prune.
    assert_eq!(stdout(&api(&app, &["prune", "--older-than", "1d"]).await), "deleted 0 jobs\n");
    shared::testing::db::end(&app.pool, echo.id, JobStatus::Succeeded, chrono::Duration::days(2)).await;
    assert_eq!(stdout(&api(&app, &["prune", "--older-than", "1d", "--dry-run"]).await), "would delete 1 job\n");
    assert_eq!(app.job_count().await, 2);
    assert_eq!(stdout(&api(&app, &["prune", "--older-than", "1d", "--status", "failed"]).await), "deleted 0 jobs\n");
    assert_eq!(stdout(&api(&app, &["prune", "--older-than", "1d"]).await), "deleted 1 job\n");
    assert_eq!(app.job_count().await, 1, "the scheduled job stays");
    fails_with(&api(&app, &["prune", "--older-than", "1d", "--status", "queued"]).await, "only finished jobs");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_password_in_the_database_url_stays_out_of_errors(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    for url in ["postgres://conveyor:s3cr3t-db@127.0.0.1:1/x", "postgres://conveyor:s3cr3t-db@127.0.0.1:notaport/x"] {
        for args in [&["migrate"][..], &["jobs", "list"][..]] {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
                .args(args)
                .env_clear()
                .envs(shared::testing::child_env(&app.settings))
                .env("DATABASE_URL", url)
                .env("CONVEYOR__DATABASE__ACQUIRE_TIMEOUT_MS", "500")
                .output()
                .await
                .expect("the CLI runs");
            assert!(!output.status.success(), "{args:?} with {url}");
            let everything = format!("{}{}", stdout(&output), stderr(&output));
            assert!(!everything.contains("s3cr3t-db"), "{args:?}: {everything}");
            assert!(!everything.is_empty());
        }
    }
    app.stop().await;
}
