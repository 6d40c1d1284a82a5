//! `GET /v1/jobs`: order, filters and keyset pagination.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use shared::job::JobStatus;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app, wait_until};
use crate::submit::PgPoolOptionsUnused;

async fn page(app: &TestApp, query: &str) -> Value {
    let response = app.client.get(app.url(&format!("/v1/jobs?{query}"))).send().await.expect("sent");
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.expect("a page")
}

fn ids(page: &Value) -> Vec<Uuid> {
    page["jobs"]
        .as_array()
        .expect("jobs array")
        .iter()
        .map(|job| job["id"].as_str().and_then(|id| id.parse().ok()).expect("an id"))
        .collect()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn paging_visits_every_job_once_newest_first(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let mut submitted = Vec::new();
    for i in 0..23 {
        submitted.push(app.submit_ok(&json!({"type": "echo", "payload": {"i": i}})).await.id);
    }

    let mut seen = Vec::new();
    let mut query = "limit=5".to_owned();
    let mut pages = 0;
    loop {
        let page = page(&app, &query).await;
        pages += 1;
        let ids = ids(&page);
        assert!(ids.len() <= 5);
        seen.extend(ids);
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("limit=5&cursor={cursor}"),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }

    assert_eq!(pages, 5);
    let mut newest_first = submitted.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "every job exactly once, newest first");
    // A page that ends exactly at the last job says so.
    let all = page(&app, "limit=23").await;
    assert_eq!(ids(&all).len(), 23);
    assert!(all["next_cursor"].is_null());
    // The default page size is 50.
    assert_eq!(ids(&page(&app, "").await).len(), 23);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn filters_select_by_status_type_and_queue(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    let failed = app.submit_ok(&json!({"type": "fail", "payload": {"retryable": false}})).await.id;
    let echoed = app.submit_ok(&json!({"type": "echo"})).await.id;
    let critical = app.submit_ok(&json!({"type": "noop", "queue": "critical"})).await.id;
    let scheduled = app.submit_ok(&json!({"type": "noop", "delay_seconds": 600})).await.id;
    app.spawn_worker(&["default", "critical"], 2);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            app.count_in(JobStatus::Failed).await == 1 && app.count_in(JobStatus::Succeeded).await == 2
        })
        .await
    );

    let set = |page: Value| ids(&page).into_iter().collect::<HashSet<_>>();
    assert_eq!(set(page(&app, "status=failed").await), HashSet::from([failed]));
    assert_eq!(set(page(&app, "status=succeeded").await), HashSet::from([echoed, critical]));
    assert_eq!(set(page(&app, "status=scheduled").await), HashSet::from([scheduled]));
    assert_eq!(set(page(&app, "type=noop").await), HashSet::from([critical, scheduled]));
    assert_eq!(set(page(&app, "queue=critical").await), HashSet::from([critical]));
    assert_eq!(set(page(&app, "type=noop&queue=default").await), HashSet::from([scheduled]));
    assert!(set(page(&app, "status=running").await).is_empty());
    assert!(set(page(&app, "type=unknown").await).is_empty());
    app.stop().await;
}
