//! `Idempotency-Key`: a retried submission gets its original job back, a
//! different request under a used key is refused, and a key is only taken by
//! a submission that succeeded.

use std::time::Duration;

use serde_json::{Value, json};
use shared::job::Job;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{TestApp, client_with, key, spawn_app, spawn_app_with};
use crate::submit::PgPoolOptionsUnused;
use api::auth::Scope;

async fn submit_keyed(app: &TestApp, client: &reqwest::Client, key: &str, body: &str) -> reqwest::Response {
    client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", key)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request sent")
}

fn replayed(response: &reqwest::Response) -> Option<&str> {
    response.headers().get("idempotent-replayed").map(|v| v.to_str().expect("ascii"))
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_retry_with_the_same_key_and_body_gets_the_original_job(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;

    let first =
        submit_keyed(&app, &app.client, "order-42", r#"{"type": "echo", "payload": {"a": 1, "b": [1, 2]}}"#).await;
    assert_eq!(first.status(), 202);
    assert_eq!(replayed(&first), None);
    let original: Job = first.json().await.expect("a job");
    assert_eq!(original.idempotency_key.as_deref(), Some("order-42"));

    // The same request, spaced and ordered differently: the same request.
    let again = submit_keyed(&app, &app.client, "order-42", r#"{"payload":{"b":[1,2],"a":1},"type":"echo"}"#).await;
    assert_eq!(again.status(), 202);
    assert_eq!(replayed(&again), Some("true"));
    assert_eq!(again.headers()["location"], format!("/v1/jobs/{}", original.id).as_str());
    let replay: Job = again.json().await.expect("a job");
    assert_eq!(replay.id, original.id);

    // One job, published once.
    assert_eq!(app.job_count().await, 1);
    assert_eq!(app.amqp.depth("default").await, 1);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_same_key_with_a_different_body_is_a_conflict_and_keys_belong_to_a_tenant(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app(connect).await;
    let job = submit_keyed(&app, &app.client, "k1", r#"{"type": "echo", "payload": {"a": 1}}"#).await;
    assert_eq!(job.status(), 202);

    for different in [
        r#"{"type": "echo", "payload": {"a": 2}}"#,
        r#"{"type": "echo", "payload": {"a": 1}, "priority": 3}"#,
        r#"{"type": "noop"}"#,
    ] {
        let response = submit_keyed(&app, &app.client, "k1", different).await;
        assert_eq!(response.status(), 409, "{different}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.expect("problem+json");
        assert!(problem["detail"].as_str().expect("detail").contains("Idempotency-Key"), "{problem}");
    }
    assert_eq!(app.job_count().await, 1);

    // Another tenant's key space is its own.
    let other = client_with(&key(&app.pool, "other", &[Scope::JobsWrite]).await);
    let theirs = submit_keyed(&app, &other, "k1", r#"{"type": "noop"}"#).await;
    assert_eq!(theirs.status(), 202);
    assert_eq!(replayed(&theirs), None);
    assert_eq!(app.job_count().await, 2);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn twenty_concurrent_requests_with_one_key_create_one_job(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let body = r#"{"type": "sleep", "payload": {"ms": 1}}"#;

    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let request = app.client.post(app.url("/v1/jobs")).header("Idempotency-Key", "same-for-all");
        let request = request.header("Content-Type", "application/json").body(body);
        requests.spawn(request.send());
    }
    let responses = requests.join_all().await;

    let mut ids = Vec::new();
    let mut replays = 0;
    for response in responses {
        let response = response.expect("request sent");
        assert_eq!(response.status(), 202);
        replays += usize::from(replayed(&response) == Some("true"));
        ids.push(response.json::<Job>().await.expect("a job").id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every answer names the one job");
    assert_eq!(replays, 19, "one request created it, the others were replays");
    assert_eq!(app.job_count().await, 1);
    assert_eq!(app.amqp.depth("default").await, 1);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_failed_submission_does_not_take_its_key(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let body = r#"{"type": "noop"}"#;

    // A validation error: nothing written, the key still free.
    let invalid = submit_keyed(&app, &app.client, "try-1", r#"{"type": "noop", "priority": 99}"#).await;
    assert_eq!(invalid.status(), 422);

    // A failure inside the transaction, after the key was written: Postgres
    // refuses the first insert of a job (a sequence, which a rollback does not undo).
    sqlx::raw_sql(
        "CREATE SEQUENCE inserts;
         CREATE FUNCTION fail_first() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF nextval('inserts') = 1 THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER fail_first BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION fail_first();",
    )
    .execute(&app.pool)
    .await
    .expect("trigger installed");
    let failed = submit_keyed(&app, &app.client, "try-1", body).await;
    assert!(failed.status().is_server_error(), "{}", failed.status());
    assert_eq!(app.job_count().await, 0);

    // The client's retry with the same key is a first submission.
    let retried = submit_keyed(&app, &app.client, "try-1", body).await;
    assert_eq!(retried.status(), 202);
    assert_eq!(replayed(&retried), None);
    assert_eq!(app.job_count().await, 1);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_expired_key_may_be_used_for_a_new_job(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |settings| settings.jobs.idempotency_ttl_seconds = 1).await;
    let first = submit_keyed(&app, &app.client, "short-lived", r#"{"type": "noop"}"#).await;
    assert_eq!(first.status(), 202);
    let first: Job = first.json().await.expect("a job");
    assert_eq!(submit_keyed(&app, &app.client, "short-lived", r#"{"type": "echo"}"#).await.status(), 409);

    // Once the key lapses, a different request takes it and makes a new job.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let second = loop {
        let response = submit_keyed(&app, &app.client, "short-lived", r#"{"type": "echo"}"#).await;
        if response.status() == 202 {
            break response.json::<Job>().await.expect("a job");
        }
        assert_eq!(response.status(), 409);
        assert!(tokio::time::Instant::now() < deadline, "the key never lapsed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(second.id, first.id);
    assert_eq!(second.kind, "echo");
    assert_eq!(app.job_count().await, 2);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_malformed_key_is_a_400_and_writes_nothing(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let longest = "k".repeat(255);
    assert_eq!(submit_keyed(&app, &app.client, &longest, r#"{"type": "noop"}"#).await.status(), 202);

    let too_long = "k".repeat(256);
    let response = submit_keyed(&app, &app.client, &too_long, r#"{"type": "noop"}"#).await;
    assert_eq!(response.status(), 400);
    let problem: Value = response.json().await.expect("problem+json");
    assert!(problem["detail"].as_str().expect("detail").contains("255"), "{problem}");
    let empty = submit_keyed(&app, &app.client, "", r#"{"type": "noop"}"#).await;
    assert_eq!(empty.status(), 400);
    let twice = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .json(&json!({"type": "noop"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(twice.status(), 400);
    assert_eq!(app.job_count().await, 1);
    app.stop().await;
}
