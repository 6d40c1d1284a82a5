//! Admission control: a queue past its `max_depth` refuses submissions with
//! 503 until it drains; other queues are unaffected.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::spawn_app_with;
use crate::submit::PgPoolOptionsUnused;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_full_queue_refuses_submissions_until_it_drains(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |settings| {
        settings.queues.get_mut("default").expect("the default queue").max_depth = 5;
    })
    .await;
    let job = json!({"type": "noop"});
    for _ in 0..5 {
        app.submit_ok(&job).await;
    }

    // Depths are read once a second: within a few, the queue is seen full.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let response = app.submit(&job).await;
        if response.status() == 503 {
            break response;
        }
        assert_eq!(response.status(), 202);
        assert!(tokio::time::Instant::now() < deadline, "the full queue never refused a submission");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    let problem: Value = refused.json().await.expect("problem+json");
    assert!(problem["detail"].as_str().expect("detail").contains("max_depth"), "{problem}");

    // Refused means nothing written; a batch touching the queue is refused too.
    let written = app.job_count().await;
    assert_eq!(app.submit(&job).await.status(), 503);
    let batch = json!({"jobs": [{"type": "noop", "queue": "critical"}, {"type": "noop"}]});
    let response = app.client.post(app.url("/v1/jobs/batch")).json(&batch).send().await.expect("sent");
    assert_eq!(response.status(), 503);
    assert_eq!(app.job_count().await, written);

    // Another queue is unaffected.
    app.submit_ok(&json!({"type": "noop", "queue": "critical"})).await;

    // Workers drain the queue; submissions are admitted again.
    app.spawn_worker(&["default"], 4);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = app.submit(&job).await;
        if response.status() == 202 {
            break;
        }
        assert_eq!(response.status(), 503);
        assert!(tokio::time::Instant::now() < deadline, "the drained queue never admitted again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}
