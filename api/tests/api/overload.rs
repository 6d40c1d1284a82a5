//! Overload shedding: beyond `http.max_in_flight` requests in progress, the
//! API answers 503 at once, without waiting for the database.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::spawn_app_with;
use crate::submit::PgPoolOptionsUnused;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn requests_beyond_the_in_flight_bound_are_shed_at_once(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |settings| settings.http.max_in_flight = 2).await;
    // Requests that must not wait on the database fail the test instead of hanging it.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");

    // Two submissions held inside the API: the jobs table is locked.
    let mut lock = app.pool.begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.expect("locked");
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(app.client.post(app.url("/v1/jobs")).json(&json!({"type": "noop"})).send()))
        .collect();
    // Once both are inside, anything else is refused (a quick request shows when).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.get(app.url("/v1/no-such-route")).send().await.expect("answered").status() != 503 {
        assert!(tokio::time::Instant::now() < deadline, "the two held submissions never filled the API");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A third submission is refused without touching the locked table.
    let refused = client
        .post(app.url("/v1/jobs"))
        .bearer_auth(&app.token)
        .json(&json!({"type": "noop"}))
        .send()
        .await
        .expect("answered while the table is locked");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(refused.headers().contains_key("x-request-id"));
    let problem: Value = refused.json().await.expect("problem+json");
    assert!(problem["detail"].as_str().expect("detail").contains("capacity"), "{problem}");
    // Not even authentication is tried: a made-up token gets the same answer.
    let anonymous = client.get(app.url("/v1/jobs")).bearer_auth("made-up").send().await.expect("answered");
    assert_eq!(anonymous.status(), 503);
    // Probes are never shed.
    assert_eq!(client.get(app.url("/healthz")).send().await.expect("answered").status(), 200);

    // Released, the held submissions are accepted, and so is the next one.
    lock.rollback().await.expect("unlocked");
    for submission in held {
        assert_eq!(submission.await.expect("joined").expect("answered").status(), 202);
    }
    app.submit_ok(&json!({"type": "noop"})).await;
    assert_eq!(app.job_count().await, 3);
    app.stop().await;
}
