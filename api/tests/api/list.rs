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

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn large_payloads_and_results_are_left_out_of_a_page_with_a_marker(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    // A page carries 16 KiB of payload and result text; a field over 1 KiB is never inlined.
    let mut app = crate::helpers::spawn_app_with(connect, |s| s.http.list_page_bytes = 16 * 1024).await;
    app.spawn_worker(&["default"], 4);
    let echo = |bytes: usize| json!({"type": "echo", "payload": {"blob": "x".repeat(bytes)}});
    let large = app.submit_ok(&echo(4000)).await.id;
    let mut medium = Vec::new();
    for _ in 0..12 {
        medium.push(app.submit_ok(&echo(900)).await.id);
    }
    for id in medium.iter().chain([&large]) {
        assert_eq!(app.wait_terminal(*id).await.status, JobStatus::Succeeded);
    }

    let listed = page(&app, "limit=50").await;
    let jobs = listed["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 13);
    let by_id = |id: Uuid| jobs.iter().find(|job| job["id"] == id.to_string()).expect("listed");
    // Over the per-field bound: left out, said so, the rest of the item is there.
    let item = by_id(large);
    assert_eq!((&item["payload"], &item["result"]), (&Value::Null, &Value::Null));
    assert_eq!(item["omitted"], json!(["payload", "result"]));
    assert_eq!(item["status"], "succeeded");
    // Medium ones fill the page, newest first (each ~1.8 KiB of payload and
    // result: eight fit in 16 KiB), then are left out too.
    let inlined: Vec<bool> = medium.iter().rev().map(|id| by_id(*id).get("omitted").is_none()).collect();
    assert_eq!(inlined.iter().filter(|inlined| **inlined).count(), 8, "{inlined:?}");
    assert!(inlined.windows(2).all(|w| w[0] || !w[1]), "the newest are inlined first: {inlined:?}");
    for id in &medium {
        let item = by_id(*id);
        if item.get("omitted").is_none() {
            assert_eq!(item["payload"]["blob"].as_str().map(str::len), Some(900));
        }
    }
    // GET has them whole.
    let whole = app.get_job(large).await;
    assert_eq!(whole.result.map(|r| r.len() > 4000), Some(true));
    app.stop().await;
}
