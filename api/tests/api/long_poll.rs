//! `GET /v1/jobs/{id}?wait=N`: an answer the moment the job changes, at the
//! deadline otherwise, and at once when the server stops.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use shared::job::{Job, JobStatus};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{TestApp, spawn_app};
use crate::submit::PgPoolOptionsUnused;

/// Starts a long-poll of `id` (with `etag` as `If-None-Match` when given) and
/// returns its eventual status code and body, with when it was answered.
fn long_poll(
    app: &TestApp,
    id: uuid::Uuid,
    wait: u64,
    etag: Option<String>,
) -> tokio::task::JoinHandle<(u16, Option<Job>, Instant)> {
    let mut request = app.client.get(app.url(&format!("/v1/jobs/{id}?wait={wait}")));
    if let Some(etag) = etag {
        request = request.header("If-None-Match", etag);
    }
    tokio::spawn(async move {
        let response = request.send().await.expect("answered");
        let answered = Instant::now();
        let status = response.status().as_u16();
        let job = if status == 200 { Some(response.json::<Job>().await.expect("a job")) } else { None };
        (status, job, answered)
    })
}

async fn etag_of(app: &TestApp, id: uuid::Uuid) -> String {
    let response = app.client.get(app.url(&format!("/v1/jobs/{id}"))).send().await.expect("sent");
    response.headers()["etag"].to_str().expect("ascii").to_owned()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_long_poll_answers_the_moment_the_job_ends(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 300}})).await;
    let waiting = long_poll(&app, job.id, 20, None);
    app.spawn_worker(&["default"], 1);
    let (status, ended, answered) = waiting.await.expect("joined");
    assert_eq!(status, 200);
    let ended = ended.expect("the job");
    assert_eq!(ended.status, JobStatus::Succeeded);
    // From the outcome's commit (Postgres' clock, the same machine's) to the answer.
    let finished = ended.finished_at.expect("finished");
    let late = (Utc::now() - finished).to_std().unwrap_or_default().saturating_sub(answered.elapsed());
    eprintln!("long-poll answered {} ms after the job ended", late.as_millis());
    assert!(late < Duration::from_millis(500), "answered {late:?} after the job ended");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_change_wakes_a_revalidating_long_poll_and_a_cancel_ends_one(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let mut app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 1500}})).await;
    let queued = etag_of(&app, job.id).await;
    // With the queued job's ETag: any change answers, here its start.
    let waiting = long_poll(&app, job.id, 20, Some(queued.clone()));
    let started = Instant::now();
    app.spawn_worker(&["default"], 1);
    let (status, running, _) = waiting.await.expect("joined");
    assert_eq!(status, 200);
    assert_eq!(running.expect("the job").status, JobStatus::Running);
    assert!(started.elapsed() < Duration::from_secs(10));

    // A cancel of a queued job answers a waiter without an ETag at once.
    let other = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 60_000}, "queue": "critical"})).await;
    let waiting = long_poll(&app, other.id, 20, None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancelled = Instant::now();
    let response = app.client.post(app.url(&format!("/v1/jobs/{}/cancel", other.id))).send().await.expect("sent");
    assert_eq!(response.status(), 200);
    let (status, job, answered) = waiting.await.expect("joined");
    assert_eq!((status, job.map(|job| job.status)), (200, Some(JobStatus::Cancelled)));
    assert!(answered.duration_since(cancelled) < Duration::from_secs(1));
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn without_a_change_a_long_poll_answers_at_its_deadline(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop", "queue": "critical"})).await;
    let etag = etag_of(&app, job.id).await;
    let asked = Instant::now();
    let (status, body, answered) = long_poll(&app, job.id, 1, Some(etag)).await.expect("joined");
    let took = answered.duration_since(asked);
    assert_eq!((status, body.is_none()), (304, true), "the client's ETag still holds");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "{took:?}");
    let asked = Instant::now();
    let (status, body, answered) = long_poll(&app, job.id, 1, None).await.expect("joined");
    let took = answered.duration_since(asked);
    assert_eq!((status, body.map(|job| job.status)), (200, Some(JobStatus::Queued)), "the job as it is");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "{took:?}");

    for wait in ["31", "-1", "soon"] {
        let response = app.client.get(app.url(&format!("/v1/jobs/{}?wait={wait}", job.id))).send().await.expect("sent");
        assert_eq!(response.status(), 400, "wait={wait}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.expect("problem");
        assert!(problem["detail"].as_str().unwrap_or_default().contains("wait"), "{problem}");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn stopping_the_server_answers_long_polls_at_once(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop", "queue": "critical"})).await;
    let waiting = long_poll(&app, job.id, 30, None);
    // Until the server stops, it waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    let stopping = Instant::now();
    app.stop().await;
    let (status, body, answered) = waiting.await.expect("joined");
    assert_eq!((status, body.map(|job| job.status)), (200, Some(JobStatus::Queued)));
    assert!(answered.duration_since(stopping) < Duration::from_secs(2), "the drain did not wait for it");
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

/// SIGTERM, as an orchestrator sends it, to the real binary: its long-polls
/// are answered at once and the process exits cleanly soon after.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn sigterm_answers_long_polls_and_the_process_exits(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop", "queue": "critical"})).await;
    let (mut server, address) = crate::helpers::spawn_api_process(&app.settings).await;
    let request = app.client.get(format!("http://{address}/v1/jobs/{}?wait=30", job.id)).send();
    let waiting = tokio::spawn(async move { request.await.expect("answered").status().as_u16() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "it waits until the job changes");
    let pid = server.id().expect("running").to_string();
    let signalled = Instant::now();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let status =
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("answered at once").expect("joined");
    assert_eq!(status, 200);
    let exit = tokio::time::timeout(Duration::from_secs(10), server.wait()).await.expect("exits").expect("waited");
    assert!(exit.success(), "{exit:?}");
    eprintln!("SIGTERM to exit: {} ms", signalled.elapsed().as_millis());
    app.stop().await;
}

/// A thousand clients waiting on one API process cost Postgres no query
/// while they wait and the process a few MiB; one change answers them all.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_thousand_waiting_clients_cost_no_queries(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    const CLIENTS: usize = 1000;
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop", "queue": "critical"})).await;
    let (server, address) = crate::helpers::spawn_api_process(&app.settings).await;
    let pid = server.id().expect("running");
    let rss_kib = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
        let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS").to_owned();
        line.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()).expect("kiB")
    };
    let waiting_now = || async {
        let text =
            reqwest::get(format!("http://{address}/metrics")).await.expect("scraped").text().await.expect("text");
        shared::testing::scrape::samples(&text, "conveyor_api_long_polls_waiting").get("").copied().unwrap_or(0.0)
    };
    // Warm the process up first: its first requests allocate what every request reuses.
    for _ in 0..50 {
        let url = format!("http://{address}/v1/jobs/{}", job.id);
        assert_eq!(app.client.get(url).send().await.expect("sent").status(), 200);
    }
    let rss_before = rss_kib();
    // What the processes commit on their own (the statistics' reads, autovacuum).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = commits_in(&app, Duration::from_secs(3)).await;
    let url = format!("http://{address}/v1/jobs/{}?wait=30", job.id);
    // A hundred at a time: each holds an in-flight place until it starts
    // waiting, and a thousand arriving at once would be partly shed (503).
    let mut waiters = Vec::new();
    for step in 1..=CLIENTS / 100 {
        waiters.extend((0..100).map(|_| {
            let request = app.client.get(&url).send();
            tokio::spawn(async move { request.await.map(|response| response.status().as_u16()) })
        }));
        let waiting = crate::helpers::wait_until(Duration::from_secs(20), || async {
            waiting_now().await == (step * 100) as f64
        })
        .await;
        assert!(waiting, "{} of {} waiting", waiting_now().await, step * 100);
    }
    let rss_waiting = rss_kib();

    // Statistics reach pg_stat_database within a second of the transaction.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = commits_in(&app, Duration::from_secs(3)).await;
    eprintln!(
        "{CLIENTS} long-polls: {during} transactions in 3 s (idle: {idle}); API RSS {} → {} MiB",
        rss_before / 1024,
        rss_waiting / 1024
    );
    // Polling once a second, they would have made 3,000; a read each, 1,000.
    // What the database does on its own (autovacuum, under the other tests'
    // load) varies by a few either way, hence the margin.
    let waiter_count = i64::try_from(CLIENTS).unwrap_or(i64::MAX);
    assert!(during < idle + waiter_count / 10, "{during} transactions while {CLIENTS} clients waited, {idle} idle");
    assert!(rss_waiting.saturating_sub(rss_before) < 64 * 1024, "{rss_before} → {rss_waiting} kiB");

    let cancelled = Instant::now();
    let response = app.client.post(app.url(&format!("/v1/jobs/{}/cancel", job.id))).send().await.expect("sent");
    assert_eq!(response.status(), 200);
    for waiter in waiters {
        assert_eq!(waiter.await.expect("joined").expect("answered"), 200);
    }
    eprintln!("{CLIENTS} long-polls answered {} ms after the cancel", cancelled.elapsed().as_millis());
    assert!(cancelled.elapsed() < Duration::from_secs(10));
    assert_eq!(waiting_now().await, 0.0);
    drop(server);
    app.stop().await;
}

/// Transactions committed in the test's database during `span`.
async fn commits_in(app: &TestApp, span: Duration) -> i64 {
    let commits = || async {
        sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&app.pool)
            .await
            .expect("stats")
    };
    let before = commits().await;
    tokio::time::sleep(span).await;
    commits().await - before
}
