//! Operator routes: `/v1/queues` and `/v1/workers`.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;

use api::auth::Scope;

use crate::helpers::{TestApp, client_with, key, spawn_app_with, wait_until};
use crate::submit::PgPoolOptionsUnused;

/// GET as an operator (the test app's own key is a tenant's admin).
async fn get(app: &TestApp, path: &str) -> Value {
    let operator = client_with(&key(&app.pool, "ops", &[Scope::Operator]).await);
    let response = operator.get(app.url(path)).send().await.expect("sent");
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.expect("json")
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn platform_views_need_the_operator_scope_which_sees_no_jobs(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |_| {}).await;
    // The app's own client is the `default` tenant's admin.
    for path in ["/v1/queues", "/v1/workers"] {
        let response = app.client.get(app.url(path)).send().await.expect("sent");
        assert_eq!(response.status(), 403, "{path}");
        let problem: Value = response.json().await.expect("problem");
        assert!(problem["detail"].as_str().is_some_and(|d| d.contains("--scopes operator")), "{problem}");
    }
    let operator = client_with(&key(&app.pool, "ops", &[Scope::Operator]).await);
    assert_eq!(operator.get(app.url("/v1/queues")).send().await.expect("sent").status(), 200);
    for (method, path) in [("GET", "/v1/jobs"), ("POST", "/v1/jobs")] {
        let request = if method == "GET" {
            operator.get(app.url(path))
        } else {
            operator.post(app.url(path)).json(&json!({"type": "noop"}))
        };
        assert_eq!(request.send().await.expect("sent").status(), 403, "{method} {path}");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn queues_show_depth_consumers_and_jobs_by_status(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |_| {}).await;
    for _ in 0..3 {
        app.submit_ok(&json!({"type": "noop"})).await;
    }
    for _ in 0..2 {
        app.submit_ok(&json!({"type": "noop", "delay_seconds": 600})).await;
    }

    let queues = get(&app, "/v1/queues").await;
    let default = &queues["queues"].as_array().and_then(|q| q.iter().find(|q| q["name"] == "default").cloned());
    let default = default.as_ref().expect("default listed");
    assert_eq!(default["depth"], 3);
    assert_eq!(default["consumers"], 0);
    assert_eq!(default["jobs"], json!({"queued": 3, "scheduled": 2}));
    assert_eq!((default["max_depth"].as_u64(), default["weight"].as_u64()), (Some(1_000_000), Some(1)));
    let critical = queues["queues"].as_array().and_then(|q| q.iter().find(|q| q["name"] == "critical").cloned());
    assert_eq!(critical.map(|c| (c["depth"].clone(), c["jobs"].clone())), Some((json!(0), json!({}))));

    app.spawn_worker(&["default"], 2);
    let drained = wait_until(Duration::from_secs(20), || async {
        let queues = get(&app, "/v1/queues").await;
        queues["queues"][1]["jobs"] == json!({"succeeded": 3, "scheduled": 2}) && queues["queues"][1]["consumers"] == 1
    })
    .await;
    assert!(drained, "{}", get(&app, "/v1/queues").await);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn workers_are_listed_while_they_live(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |settings| settings.worker.heartbeat_seconds = 1).await;
    assert_eq!(get(&app, "/v1/workers").await["workers"], json!([]));

    app.spawn_worker(&["default", "critical"], 3);
    for _ in 0..2 {
        app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 3000}})).await;
    }
    let busy = wait_until(Duration::from_secs(10), || async {
        get(&app, "/v1/workers").await["workers"][0]["in_flight"] == 2
    })
    .await;
    let workers = get(&app, "/v1/workers").await["workers"].clone();
    assert!(busy, "{workers}");
    assert_eq!(workers.as_array().map(Vec::len), Some(1));
    let worker = &workers[0];
    assert_eq!(worker["queues"], json!(["default", "critical"]));
    assert_eq!(worker["concurrency"], 3);
    assert!(worker["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(worker["id"].as_str().and_then(|id| id.parse::<uuid::Uuid>().ok()).is_some());
    for field in ["started_at", "last_heartbeat_at"] {
        assert!(worker[field].as_str().is_some(), "{field}");
    }

    // A worker that stops cleanly deregisters.
    app.stop_workers().await;
    assert_eq!(get(&app, "/v1/workers").await["workers"], json!([]));
    app.stop().await;
}
