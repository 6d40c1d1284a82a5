//! `GET /v1/jobs/{id}` caching: `ETag` and `If-None-Match`,
//! `Cache-Control` by state, and the API's memory of the jobs it read, which
//! must never outlive a change, a requeue or a prune made anywhere.

use std::time::Duration;

use api::auth::Scope;
use reqwest::{Response, StatusCode, header};
use serde_json::json;
use shared::db::jobs;
use shared::job::{Job, JobStatus};
use shared::testing::db;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use crate::helpers::{TestApp, client_with, key, spawn_app, wait_until, waiting_for_jobs_table};
use crate::submit::PgPoolOptionsUnused;

const BOUND: Duration = Duration::from_secs(5);

async fn get(app: &TestApp, id: Uuid, if_none_match: Option<&str>) -> Response {
    let mut request = app.client.get(app.url(&format!("/v1/jobs/{id}")));
    if let Some(tag) = if_none_match {
        request = request.header(header::IF_NONE_MATCH, tag);
    }
    request.send().await.expect("sent")
}

fn header_of(response: &Response, name: header::HeaderName) -> Option<&str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Whether the API answered from its memory (it then sends `Age`).
fn from_memory(response: &Response) -> bool {
    response.headers().contains_key(header::AGE)
}

/// A cancelled job (ended without any worker), read until the API keeps it in memory.
async fn ended_job_in_memory(app: &TestApp) -> Job {
    let job = app.submit_ok(&json!({"type": "noop"})).await;
    let cancelled = app.client.post(app.url(&format!("/v1/jobs/{}/cancel", job.id))).send().await.expect("sent");
    assert_eq!(cancelled.status(), 200);
    // The cache stores only once its LISTEN is in place, shortly after start.
    let cached = wait_until(BOUND, || async { from_memory(&get(app, job.id, None).await) }).await;
    assert!(cached, "an ended job read twice is served from memory");
    app.get_job(job.id).await
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn etags_revalidate_and_live_jobs_are_not_cached(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop"})).await;

    let queued = get(&app, job.id, None).await;
    assert_eq!(queued.status(), 200);
    assert_eq!(header_of(&queued, header::CACHE_CONTROL), Some("no-cache"));
    assert_eq!(header_of(&queued, header::RETRY_AFTER), Some("1"));
    let tag = header_of(&queued, header::ETAG).expect("an ETag").to_owned();
    assert!(tag.starts_with('"') && tag.ends_with('"') && tag.len() == 34, "strong tag: {tag}");

    for matching in [tag.clone(), format!("W/{tag}"), format!("\"other\", {tag}"), "*".to_owned()] {
        let revalidated = get(&app, job.id, Some(&matching)).await;
        assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED, "If-None-Match: {matching}");
        assert_eq!(header_of(&revalidated, header::ETAG), Some(tag.as_str()));
        assert!(revalidated.bytes().await.expect("body").is_empty());
    }
    let other = get(&app, job.id, Some("\"other\"")).await;
    assert_eq!(other.status(), 200);
    assert_eq!(other.json::<Job>().await.expect("job").id, job.id);

    // A job waiting for its time says when to look again.
    let scheduled = app.submit_ok(&json!({"type": "noop", "delay_seconds": 30})).await;
    let response = get(&app, scheduled.id, None).await;
    let retry_after: u32 = header_of(&response, header::RETRY_AFTER).and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!((28..=30).contains(&retry_after), "Retry-After {retry_after} for a job due in 30 s");

    // Once ended, the old tag no longer matches, and the job may be cached.
    app.spawn_worker(&["default"], 2);
    app.wait_terminal(job.id).await;
    let ended = get(&app, job.id, Some(&tag)).await;
    assert_eq!(ended.status(), 200, "a changed job is sent again");
    assert_eq!(header_of(&ended, header::CACHE_CONTROL), Some("private, max-age=60"));
    assert_eq!(header_of(&ended, header::RETRY_AFTER), None);
    let new_tag = header_of(&ended, header::ETAG).expect("an ETag").to_owned();
    assert_ne!(new_tag, tag);
    assert_eq!(ended.json::<Job>().await.expect("job").status, JobStatus::Succeeded);
    assert_eq!(get(&app, job.id, Some(&new_tag)).await.status(), StatusCode::NOT_MODIFIED);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_in_memory_is_the_same_job_for_its_tenant_only(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = ended_job_in_memory(&app).await;

    let hit = get(&app, job.id, None).await;
    assert!(from_memory(&hit));
    let tag = header_of(&hit, header::ETAG).expect("an ETag").to_owned();
    assert_eq!(header_of(&hit, header::CACHE_CONTROL), Some("private, max-age=60"));
    assert_eq!(hit.json::<Job>().await.expect("job"), job, "memory serves the job as stored");
    let revalidated = get(&app, job.id, Some(&tag)).await;
    assert_eq!((revalidated.status(), from_memory(&revalidated)), (StatusCode::NOT_MODIFIED, true));

    let other_tenant = client_with(&key(&app.pool, "other", &[Scope::JobsRead]).await);
    let response = other_tenant.get(app.url(&format!("/v1/jobs/{}", job.id))).send().await.expect("sent");
    assert_eq!(response.status(), 404, "another tenant's job stays unknown, cached or not");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn requeue_prune_and_truncate_elsewhere_reach_every_api(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;

    // A requeue made outside this API (another replica, the CLI): only
    // Postgres' notification can tell the API.
    let requeued = ended_job_in_memory(&app).await;
    let moved = jobs::requeue_one(&app.pool, "default", requeued.id).await.expect("requeue");
    assert!(moved.is_some());
    let seen = wait_until(BOUND, || async { app.get_job(requeued.id).await.status == JobStatus::Queued }).await;
    assert!(seen, "the requeued job is not served as cancelled from memory");

    let pruned = ended_job_in_memory(&app).await;
    let before = chrono::Utc::now() + chrono::Duration::seconds(1);
    let deleted = jobs::prune_batch(&app.pool, JobStatus::Cancelled, before, None, 100).await.expect("prune").deleted;
    assert_eq!(deleted, 1);
    let gone = wait_until(BOUND, || async { get(&app, pruned.id, None).await.status() == 404 }).await;
    assert!(gone, "a pruned job is not served from memory");

    let truncated = ended_job_in_memory(&app).await;
    db::truncate_jobs(&app.pool).await;
    let gone = wait_until(BOUND, || async { get(&app, truncated.id, None).await.status() == 404 }).await;
    assert!(gone, "nor is one truncated away by hand");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn requeue_through_this_api_is_seen_at_once(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = ended_job_in_memory(&app).await;
    let response = app.client.post(app.url(&format!("/v1/jobs/{}/requeue", job.id))).send().await.expect("sent");
    assert_eq!(response.status(), 200);
    // No waiting: the caller's very next read must not be the cancelled job.
    let next = get(&app, job.id, None).await;
    assert!(!from_memory(&next));
    assert_eq!(next.json::<Job>().await.expect("job").status, JobStatus::Queued);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn memory_is_dropped_while_its_listen_connection_is_lost(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = ended_job_in_memory(&app).await;

    // A change whose notification is lost: the trigger is off, and the
    // listening connection is cut. The API must not trust its memory after
    // losing the connection, since it cannot know what it missed.
    db::disable_change_triggers(&app.pool).await;
    jobs::requeue_one(&app.pool, "default", job.id).await.expect("requeue");
    assert!(from_memory(&get(&app, job.id, None).await), "nothing told the API yet");
    let cut = db::cut_listeners(&app.pool, shared::db::ENDED_CHANGED_CHANNEL).await;
    assert_eq!(cut, 1, "one listening connection");

    let seen = wait_until(BOUND, || async { app.get_job(job.id).await.status == JobStatus::Queued }).await;
    assert!(seen, "the cache was emptied when its connection was lost");
    // And it comes back: a new ended job is kept in memory again.
    ended_job_in_memory(&app).await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_polled_live_job_is_answered_from_memory_until_it_changes(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop"})).await;
    // Read once (once the cache listens, shortly after start), then from memory.
    assert!(wait_until(BOUND, || async { from_memory(&get(&app, job.id, None).await) }).await);
    let polled = get(&app, job.id, None).await;
    assert!(from_memory(&polled));
    assert_eq!(header_of(&polled, header::CACHE_CONTROL), Some("no-cache"), "still to be revalidated");
    assert_eq!(header_of(&polled, header::RETRY_AFTER), Some("1"));
    let tag = header_of(&polled, header::ETAG).expect("an ETag").to_owned();

    // A hundred polls: no read from Postgres (the API counts each one it makes).
    let reads = || async {
        let text = reqwest::get(app.url("/metrics")).await.expect("scraped").text().await.expect("text");
        shared::testing::scrape::samples(&text, "conveyor_api_ended_cache_lookups_total")
    };
    let before = reads().await;
    for _ in 0..100 {
        assert_eq!(get(&app, job.id, Some(&tag)).await.status(), StatusCode::NOT_MODIFIED);
    }
    let after = reads().await;
    let moved = |result: &str| after[&format!("result=\"{result}\"")] - before[&format!("result=\"{result}\"")];
    assert_eq!((moved("hit"), moved("miss")), (100.0, 0.0), "100 polls, none of them read from Postgres");

    // A change made elsewhere (here psql's) is seen as soon as it is heard.
    sqlx::query("UPDATE jobs SET progress = 40 WHERE id = $1").bind(job.id).execute(&app.pool).await.expect("updated");
    let changed = std::time::Instant::now();
    let seen = wait_until(BOUND, || async { app.get_job(job.id).await.progress == Some(40) }).await;
    assert!(seen, "the change was seen");
    eprintln!("a change made elsewhere seen after {} ms", changed.elapsed().as_millis());
    assert!(changed.elapsed() < Duration::from_secs(1));

    // The caller's own cancel is seen at once, by the replica that made it.
    assert!(from_memory(&get(&app, job.id, None).await));
    let cancel = app.client.post(app.url(&format!("/v1/jobs/{}/cancel", job.id))).send().await.expect("sent");
    assert_eq!(cancel.status(), 200);
    assert_eq!(app.get_job(job.id).await.status, JobStatus::Cancelled);
    app.stop().await;
}

/// Reads the cache cannot answer, arriving together, share one statement:
/// while the jobs table is locked, twenty clients' GETs of twenty jobs wait
/// in one query, not twenty; each still gets its own job, and a job of
/// another tenant read in the same statement stays unknown to the caller.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn reads_made_together_share_a_statement(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(app.submit_ok(&json!({"type": "noop"})).await.id);
    }
    let other_tenant = client_with(&key(&app.pool, "other", &[Scope::JobsRead]).await);
    // Nothing reads the table until this lock goes.
    let mut lock = app.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock");
    let reads: Vec<_> = ids
        .iter()
        .map(|id| tokio::spawn(app.client.get(app.url(&format!("/v1/jobs/{id}"))).send()))
        .chain([tokio::spawn(other_tenant.get(app.url(&format!("/v1/jobs/{}", ids[0]))).send())])
        .collect();
    let waiting = || waiting_for_jobs_table(&app.pool);
    assert!(wait_until(BOUND, || async { waiting().await > 0 }).await, "a read waits for the lock");
    // One statement at a time: the other reads wait for it in the API, not
    // in Postgres. (Each read its own statement: 21 would wait here within
    // milliseconds.)
    let more = wait_until(Duration::from_millis(500), || async { waiting().await > 1 }).await;
    assert!(!more, "{} reads wait in Postgres", waiting().await);
    lock.rollback().await.expect("unlock");

    let mut answers = Vec::new();
    for read in reads {
        answers.push(read.await.expect("joined").expect("sent"));
    }
    let denied = answers.pop().expect("the other tenant's read");
    assert_eq!(denied.status(), 404, "another tenant's job stays unknown");
    for (id, answer) in ids.iter().zip(answers) {
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.json::<Job>().await.expect("a job").id, *id, "each client gets its own job");
    }
    app.stop().await;
}
