//! The failure contract, shown by breaking things: retries, schedules,
//! cancellation, a lost publish, and connections cut to RabbitMQ and
//! Postgres mid-stream. (The storage layer's own fences, a zombie worker's
//! writes among them, are shown in `shared/tests/db`.)

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::config::Settings;
use shared::job::{FailureKind, Job, JobStatus};
use shared::testing::{Proxy, db};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{TestApp, spawn_api_process, spawn_app_with, wait_until};
use crate::submit::PgPoolOptionsUnused;

/// Fast retries and a brisk reconciler, so retry tests take milliseconds.
fn fast(settings: &mut Settings) {
    settings.jobs.retry_backoff_base_ms = 20;
    settings.jobs.retry_backoff_cap_ms = 200;
    settings.worker.reconcile_interval_ms = 50;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_failing_twice_succeeds_on_its_third_attempt(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, fast).await;
    app.spawn_worker(&["default"], 2);

    let flaky = app.submit_ok(&json!({"type": "fail", "payload": {"times": 2, "message": "flaky"}})).await;
    let permanent = app.submit_ok(&json!({"type": "fail", "payload": {"retryable": false}})).await;

    let flaky = app.wait_terminal(flaky.id).await;
    assert_eq!(flaky.status, JobStatus::Succeeded);
    assert_eq!(flaky.attempt, 3);
    assert_eq!(flaky.result.map(|r| r.value()), Some(json!({"succeeded_on_attempt": 3})));
    assert_eq!(flaky.error.map(|e| (e.kind, e.attempt)), Some((FailureKind::Retryable, 2)), "the last failure is kept");
    let permanent = app.wait_terminal(permanent.id).await;
    assert_eq!((permanent.status, permanent.attempt), (JobStatus::Failed, 1), "not retryable: one attempt");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn retry_delays_grow_and_stay_within_their_jitter_bounds(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let base_ms = 300;
    let mut app = spawn_app_with(connect, |s| {
        s.jobs.retry_backoff_base_ms = base_ms;
        s.jobs.retry_backoff_cap_ms = 60_000;
        s.worker.reconcile_interval_ms = 20;
    })
    .await;
    app.spawn_worker(&["default"], 1);
    let job = app.submit_ok(&json!({"type": "fail", "payload": {"times": 3}, "max_attempts": 4})).await;

    // Watch every retrying stint: its delay is run_at minus the moment it failed.
    let mut delays = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let seen = app.get_job(job.id).await;
        if seen.status == JobStatus::Retrying && delays.last().is_none_or(|(attempt, _)| *attempt != seen.attempt) {
            delays.push((seen.attempt, (seen.run_at - seen.updated_at).num_milliseconds()));
        }
        if seen.status.is_terminal() || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!((done.status, done.attempt), (JobStatus::Succeeded, 4));
    assert!(!delays.is_empty(), "no retrying stint was observed");
    for (attempt, delay) in &delays {
        let ceiling = i64::try_from(base_ms).unwrap_or_default() << (attempt - 1);
        assert!((0..=ceiling).contains(delay), "attempt {attempt}: waited {delay} ms, ceiling {ceiling} ms");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_scheduled_job_runs_at_its_time_not_before(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |_| {}).await;
    app.spawn_worker(&["default"], 2);

    let job = app.submit_ok(&json!({"type": "noop", "delay_seconds": 2})).await;
    assert_eq!(job.status, JobStatus::Scheduled);
    let done = app.wait_terminal(job.id).await;

    let started = done.started_at.expect("started");
    assert!(started >= done.run_at, "started {started} before its run_at {}", done.run_at);
    let late = (started - done.run_at).num_milliseconds();
    assert!(late < 1500, "started {late} ms after its time");
    app.stop().await;
}

async fn cancel(app: &TestApp, id: uuid::Uuid) -> reqwest::Response {
    app.client.post(app.url(&format!("/v1/jobs/{id}/cancel"))).send().await.expect("sent")
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn cancel_works_in_every_state(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |s| {
        // Failed attempts wait a minute in `retrying`.
        s.jobs.retry_backoff_base_ms = 60_000;
        s.jobs.retry_backoff_cap_ms = 60_000;
    })
    .await;
    // Only `default` is consumed: jobs in `critical` stay queued.
    app.spawn_worker(&["default"], 4);
    let scheduled = app.submit_ok(&json!({"type": "noop", "delay_seconds": 600})).await;
    let queued = app.submit_ok(&json!({"type": "noop", "queue": "critical"})).await;
    let retrying = app.submit_ok(&json!({"type": "fail"})).await;
    let running = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 60_000}})).await;
    let finished = app.submit_ok(&json!({"type": "noop"})).await;
    app.wait_for(retrying.id, Duration::from_secs(10), |j| j.status == JobStatus::Retrying).await;
    app.wait_for(running.id, Duration::from_secs(10), |j| j.status == JobStatus::Running).await;
    app.wait_terminal(finished.id).await;

    for job in [&scheduled, &queued, &retrying] {
        let response = cancel(&app, job.id).await;
        assert_eq!(response.status(), 200);
        let body: Job = response.json().await.expect("job");
        assert_eq!(body.status, JobStatus::Cancelled, "cancelled at once from {:?}", job.status);
        assert_eq!(body.error.map(|e| e.kind), Some(FailureKind::Cancelled));
        assert!(body.finished_at.is_some());
    }

    // Running: the request is recorded, the handler told, and it stops promptly.
    let asked = Instant::now();
    let response = cancel(&app, running.id).await;
    assert_eq!(response.status(), 200);
    let body: Job = response.json().await.expect("job");
    assert_eq!(body.status, JobStatus::Running);
    assert!(body.cancel_requested_at.is_some());
    let stopped = app.wait_for(running.id, Duration::from_secs(10), |j| j.status.is_terminal()).await;
    assert_eq!(stopped.status, JobStatus::Cancelled);
    assert!(asked.elapsed() < Duration::from_secs(1), "sleep stopped {:?} after the request", asked.elapsed());

    // Ended jobs cannot be cancelled.
    for job in [&finished, &running] {
        let response = cancel(&app, job.id).await;
        assert_eq!(response.status(), 409);
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    // The cancelled queued job's message is dropped when it is finally consumed.
    app.spawn_worker(&["critical"], 1);
    assert!(wait_until(Duration::from_secs(10), || async { app.amqp.depth("critical").await == 0 }).await);
    let still = app.get_job(queued.id).await;
    assert_eq!((still.status, still.attempt), (JobStatus::Cancelled, 0), "it never ran");
    app.stop().await;
}

/// A proxy to the test's Postgres, and connect options that go through it.
async fn postgres_proxy(connect: &PgConnectOptions) -> (Proxy, PgConnectOptions) {
    let postgres = tokio::net::lookup_host((connect.get_host(), connect.get_port()))
        .await
        .ok()
        .and_then(|mut addresses| addresses.next())
        .expect("the test's Postgres resolves");
    let proxy = Proxy::start(postgres).await;
    let proxied = connect.clone().host("127.0.0.1").port(proxy.port);
    (proxy, proxied)
}

/// An API that reaches RabbitMQ through a proxy that is cut: its publishes
/// fail after the row is committed. The outbox is swept after 1 s.
async fn app_behind_cut_broker(connect: PgConnectOptions) -> (TestApp, Proxy) {
    let rabbit: std::net::SocketAddr = "127.0.0.1:5672".parse().expect("addr");
    let proxy = Proxy::start(rabbit).await;
    proxy.cut();
    let proxied = proxy.url_for(&shared::testing::amqp_url());
    let app = spawn_app_with(connect, |s| {
        s.amqp.url = proxied;
        s.amqp.confirm_timeout_ms = 500;
        s.worker.outbox_grace_seconds = 1;
    })
    .await;
    (app, proxy)
}

/// The app's settings with a direct connection to RabbitMQ, for its workers.
fn direct_to_broker(app: &TestApp) -> Settings {
    let mut direct = app.settings.clone();
    direct.amqp.url = shared::testing::amqp_url();
    direct
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_whose_publish_failed_is_published_by_the_reconciler(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let (mut app, _proxy) = app_behind_cut_broker(connect).await;
    let started = Instant::now();
    let job = app.submit_ok(&json!({"type": "echo", "payload": {"n": 1}})).await;
    assert!(started.elapsed() < Duration::from_secs(3), "the submission was not held up: {:?}", started.elapsed());
    assert_eq!(db::outbox_len(&app.pool, Some(job.id)).await, 1, "the publish failed, so the job is in the outbox");

    app.spawn_worker_with(direct_to_broker(&app), &["default"], 1);
    let done = app.wait_terminal(job.id).await;
    assert_eq!((done.status, done.attempt), (JobStatus::Succeeded, 1));
    assert_eq!(done.result.map(|r| r.value()), Some(json!({"n": 1})));
    let emptied = wait_until(Duration::from_secs(5), || async { db::outbox_len(&app.pool, None).await == 0 }).await;
    assert!(emptied, "the outbox is empty once the job is published");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_cancelled_before_its_publish_was_confirmed_is_not_published(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let (mut app, proxy) = app_behind_cut_broker(connect).await;
    let job = app.submit_ok(&json!({"type": "noop"})).await;
    let cancelled = app.client.post(app.url(&format!("/v1/jobs/{}/cancel", job.id))).send().await.expect("sent");
    assert_eq!(cancelled.status(), 200);

    // A worker on another queue: its reconciler sweeps the outbox, and nothing
    // consumes `default`, so a wrongly published message would stay there.
    app.spawn_worker_with(direct_to_broker(&app), &["critical"], 1);
    let swept = wait_until(Duration::from_secs(10), || async { db::outbox_len(&app.pool, None).await == 0 }).await;
    assert!(swept, "the cancelled job's outbox row is dropped");
    // Let the API reach RabbitMQ again, so that it declares `default`.
    proxy.restore();
    let ready = wait_until(Duration::from_secs(10), || async {
        app.client.get(app.url("/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready);
    assert_eq!(app.amqp.depth("default").await, 0, "and its message never published");
    assert_eq!(app.get_job(job.id).await.status, JobStatus::Cancelled);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn jobs_survive_the_broker_connection_being_cut_mid_stream(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let rabbit: std::net::SocketAddr = "127.0.0.1:5672".parse().expect("addr");
    let proxy = Proxy::start(rabbit).await;
    let proxied = proxy.url_for(&shared::testing::amqp_url());
    let mut app = spawn_app_with(connect, |s| {
        s.amqp.url = proxied;
        s.amqp.confirm_timeout_ms = 1000;
        s.worker.outbox_grace_seconds = 1;
    })
    .await;
    app.spawn_worker(&["default"], 4);
    let submit_all = |n: usize| {
        let app = &app;
        async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let started = Instant::now();
                let response = app.submit(&json!({"type": "sleep", "payload": {"ms": 50 + i}})).await;
                assert!(started.elapsed() < Duration::from_secs(5), "a submission hung: {:?}", started.elapsed());
                assert_eq!(response.status(), 202);
                let job: Value = response.json().await.expect("job");
                ids.push(job["id"].as_str().and_then(|id| id.parse::<uuid::Uuid>().ok()).expect("id"));
            }
            ids
        }
    };
    let mut ids = submit_all(10).await;
    // Cut while those run: every AMQP connection (API and worker) drops.
    proxy.cut();
    ids.extend(submit_all(5).await);
    let ready = app.client.get(app.url("/readyz")).send().await.expect("sent");
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.expect("json");
    assert_eq!((body["postgres"].as_str(), body["rabbitmq"].as_str()), (Some("up"), Some("down")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    ids.extend(submit_all(10).await);

    let all_done =
        wait_until(Duration::from_secs(60), || async { app.count_in(JobStatus::Succeeded).await == ids.len() as i64 })
            .await;
    assert!(all_done, "not every job succeeded: {:?}", db::statuses(&app.pool).await);
    let attempts: Vec<i32> = db::attempts(&app.pool, None).await.into_keys().collect();
    assert_eq!(attempts, [1], "each job ran to completion exactly once");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn requests_fail_fast_with_503_while_postgres_is_cut_off(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let (proxy, proxied) = postgres_proxy(&connect).await;
    let app = spawn_app_with(proxied, |s| s.database.acquire_timeout_ms = 1000).await;
    let job = app.submit_ok(&json!({"type": "noop", "delay_seconds": 600})).await;

    proxy.cut();
    for _ in 0..3 {
        let started = Instant::now();
        let response = app.client.get(app.url(&format!("/v1/jobs/{}", job.id))).send().await.expect("sent");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    }
    let ready = app.client.get(app.url("/readyz")).send().await.expect("sent");
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.expect("json");
    assert_eq!((body["postgres"].as_str(), body["rabbitmq"].as_str()), (Some("down"), Some("up")));

    proxy.restore();
    let back = wait_until(Duration::from_secs(10), || async {
        app.client.get(app.url(&format!("/v1/jobs/{}", job.id))).send().await.expect("sent").status() == 200
    })
    .await;
    assert!(back, "the API did not recover after Postgres came back");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn unknown_keys_and_readiness_are_answered_from_memory_for_a_moment(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let (proxy, proxied) = postgres_proxy(&connect).await;
    let app = spawn_app_with(proxied, |s| s.database.acquire_timeout_ms = 1000).await;
    let made_up = |byte: char| format!("cvk_{}_{}", byte.to_string().repeat(12), "0".repeat(64));
    let status_with = |token: String| {
        let app = &app;
        async move { crate::helpers::client_with(&token).get(app.url("/v1/jobs")).send().await.expect("sent").status() }
    };
    assert_eq!(status_with(made_up('a')).await, 401);
    assert_eq!(app.client.get(app.url("/readyz")).send().await.expect("sent").status(), 200);

    // Postgres goes away: what was just learnt is still known, without it.
    proxy.cut();
    assert_eq!(status_with(made_up('a')).await, 401, "a known-unknown key costs no query");
    assert_eq!(app.client.get(app.url("/readyz")).send().await.expect("sent").status(), 200, "readiness from memory");
    assert_eq!(status_with(made_up('b')).await, 503, "a new key is looked up, and Postgres is away");
    let noticed = wait_until(Duration::from_secs(5), || async {
        app.client.get(app.url("/readyz")).send().await.expect("sent").status() == 503
    })
    .await;
    assert!(noticed, "readiness kept its old answer");
    proxy.restore();
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn workers_carry_on_after_postgres_comes_back(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    // The workers reach Postgres through a proxy; the API and the test directly.
    let (proxy, proxied) = postgres_proxy(&connect).await;
    let mut app = spawn_app_with(connect, fast).await;
    let worker_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(proxied);
    app.spawn_worker_on(worker_pool.clone(), &["default"], 4);

    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 300}})).await.id);
    }
    // Cut while jobs run: each worker slot holds one.
    let running = wait_until(Duration::from_secs(10), || async { app.count_in(JobStatus::Running).await == 4 }).await;
    assert!(running, "the worker started four sleep jobs");
    proxy.cut();
    for _ in 0..5 {
        ids.push(app.submit_ok(&json!({"type": "noop"})).await.id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    for _ in 0..5 {
        ids.push(app.submit_ok(&json!({"type": "noop"})).await.id);
    }

    // Jobs cut off mid-run lose their lease and are retried; the rest run once.
    let all_done =
        wait_until(Duration::from_secs(60), || async { app.count_in(JobStatus::Succeeded).await == ids.len() as i64 })
            .await;
    assert!(all_done, "not every job succeeded: {:?}", db::statuses(&app.pool).await);
    app.stop().await;
    worker_pool.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn sigterm_lets_the_api_finish_requests_in_flight(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let app = spawn_app_with(connect, |_| {}).await;
    let (mut server, address) = spawn_api_process(&app.settings).await;

    // A submission in flight when SIGTERM arrives: its head is sent and the
    // server has taken it up (it answered `100 Continue`), its body not yet.
    let body = br#"{"type": "noop"}"#;
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        app.token,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).await.expect("an interim answer");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    let pid = server.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    // Once the server refuses new connections it is shutting down: only then
    // does the rest of the in-flight request arrive.
    let stopping =
        wait_until(Duration::from_secs(10), || async { tokio::net::TcpStream::connect(&address).await.is_err() }).await;
    assert!(stopping, "the server kept accepting connections after SIGTERM");
    stream.write_all(body).await.expect("the body");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    let exit = tokio::time::timeout(Duration::from_secs(35), server.wait()).await.expect("it exits").expect("status");
    assert!(exit.success(), "{exit:?}");
    assert_eq!(app.job_count().await, 1);
    assert_eq!(db::outbox_len(&app.pool, None).await, 0, "its confirm was recorded before the API exited");
    app.stop().await;
}
