//! SPEC §3's guarantees, shown by breaking things: retries, schedules,
//! cancellation, a lost publish, a zombie worker, and connections cut to
//! RabbitMQ and Postgres mid-stream.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::config::Settings;
use shared::db::jobs::{self, Enqueued, Lease, Outcome};
use shared::job::{FailureKind, Job, JobStatus};
use shared::testing::Proxy;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{TestApp, spawn_app_with, wait_until};
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
    assert_eq!(flaky.result, Some(json!({"succeeded_on_attempt": 3})));
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
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE job_id = $1")
        .bind(job.id)
        .fetch_one(&app.pool)
        .await
        .expect("committed");
    assert_eq!(pending, 1, "the publish failed, so the job is in the outbox");

    app.spawn_worker_with(direct_to_broker(&app), &["default"], 1);
    let done = app.wait_terminal(job.id).await;
    assert_eq!((done.status, done.attempt), (JobStatus::Succeeded, 1));
    assert_eq!(done.result, Some(json!({"n": 1})));
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&app.pool).await.expect("count");
    assert_eq!(pending, 0, "the outbox is empty once the job is published");
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
    let swept = wait_until(Duration::from_secs(10), || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&app.pool).await.expect("count");
        pending == 0
    })
    .await;
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
async fn a_late_confirm_of_an_earlier_stint_leaves_the_job_in_the_outbox(pool: sqlx::PgPool) {
    let job = jobs::insert(&pool, &shared::testing::new_job("noop", json!({}))).await.expect("insert");
    let first = Enqueued::from(&job);
    // Queued again before the first stint's confirm is recorded.
    assert!(matches!(jobs::cancel(&pool, "default", job.id).await.expect("cancel"), jobs::Cancel::Cancelled(_)));
    let second = jobs::requeue(&pool, None, &[job.id]).await.expect("requeue");
    assert_eq!(second.len(), 1);
    let in_outbox = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE job_id = $1")
            .bind(job.id)
            .fetch_one(&pool)
            .await
            .expect("count")
    };

    jobs::mark_published(&pool, &[first.outbox_row()]).await.expect("record");
    assert_eq!(in_outbox().await, 1, "the requeued stint's message is not confirmed yet");
    jobs::mark_published(&pool, &[second[0].outbox_row()]).await.expect("record");
    assert_eq!(in_outbox().await, 0);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_postgres_refuses_fails_alone_not_its_whole_batch(pool: sqlx::PgPool) {
    // Validation keeps such values out of the API; this is the safety net under it.
    let good = shared::testing::new_job("echo", json!({"n": 1}));
    let refused = shared::testing::new_job("echo", json!({"s": "x\u{0}y"}));
    let also_good = shared::testing::new_job("echo", json!({"n": 2}));
    let each = jobs::insert_each_if_refused(&pool, &[good.clone(), refused, also_good.clone()]).await.expect("batch");
    let ok: Vec<bool> = each.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, false, true]);
    let stored: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs ORDER BY id").fetch_all(&pool).await.expect("query");
    assert_eq!(stored, [good.id, also_good.id]);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_whose_cancel_was_requested_is_never_retried(pool: sqlx::PgPool) {
    let pool = &pool;
    let worker = uuid::Uuid::now_v7();
    let running = || async {
        let job = jobs::insert(pool, &shared::testing::new_job("noop", json!({}))).await.expect("insert");
        let claimed = jobs::claim(pool, job.id, worker, 30).await.expect("claim").expect("queued");
        assert!(matches!(jobs::cancel(pool, "default", job.id).await.expect("cancel"), jobs::Cancel::Requested(_)));
        claimed
    };
    let status_of = |id| async move { jobs::status(pool, id).await.expect("status").expect("exists") };

    // Its handler failed retryably instead of stopping.
    let failed = running().await;
    let error =
        shared::job::JobFailure { message: "boom".to_owned(), kind: FailureKind::Retryable, attempt: failed.attempt };
    let outcome = Outcome::Retrying { error, retry_at: chrono::Utc::now() };
    let lease = Lease { id: failed.id, token: failed.lease_token };
    assert!(jobs::finish(pool, lease, &outcome).await.expect("finish"));
    assert_eq!(status_of(failed.id).await, JobStatus::Cancelled);

    // Its worker was lost.
    let lost = running().await;
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(lost.id)
        .execute(pool)
        .await
        .expect("expire the lease");
    let leader = shared::testing::lead(pool).await;
    assert_eq!(jobs::rescue_expired(pool, leader, 10).await.expect("rescue"), 1);
    assert_eq!(status_of(lost.id).await, JobStatus::Cancelled);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn each_outbox_sweep_reads_a_bounded_batch_oldest_first(pool: sqlx::PgPool) {
    // Oldest first: two cancelled jobs, then one still queued, all unconfirmed.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let job = jobs::insert(&pool, &shared::testing::new_job("noop", json!({}))).await.expect("insert");
        ids.push(job.id);
    }
    for id in &ids[..2] {
        assert!(matches!(jobs::cancel(&pool, "default", *id).await.expect("cancel"), jobs::Cancel::Cancelled(_)));
    }
    let pending =
        || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox").fetch_one(&pool).await.expect("count") };

    let leader = shared::testing::lead(&pool).await;
    let first = jobs::unpublished(&pool, leader, 0, 2).await.expect("sweep");
    assert!(first.is_empty(), "the two oldest rows are of cancelled jobs: {first:?}");
    assert_eq!(pending().await, 1, "and only those two were dropped");
    let second = jobs::unpublished(&pool, leader, 0, 2).await.expect("sweep");
    assert_eq!(second.iter().map(|job| job.id).collect::<Vec<_>>(), [ids[2]], "the queued one comes next");
    assert_eq!(pending().await, 1, "kept until its publish is confirmed");
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_zombie_workers_late_writes_are_rejected(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |_| {}).await;
    let job = app.submit_ok(&json!({"type": "echo", "payload": {"v": 1}})).await;
    let (zombie_worker, live_worker) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());

    // Worker Z claims the job, then goes silent: its lease expires and the job is rescued.
    let z = jobs::claim(&app.pool, job.id, zombie_worker, 30).await.expect("claim").expect("claimed");
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(job.id)
        .execute(&app.pool)
        .await
        .expect("expire");
    let leader = shared::testing::lead(&app.pool).await;
    assert_eq!(jobs::rescue_expired(&app.pool, leader, 10).await.expect("rescue"), 1);
    assert_eq!(jobs::queue_due(&app.pool, leader, 10).await.expect("due").len(), 1);
    // Worker L claims it again and finishes it.
    let l = jobs::claim(&app.pool, job.id, live_worker, 30).await.expect("claim").expect("claimed");
    assert_eq!((z.attempt, l.attempt), (1, 2), "the lost attempt counts");
    let zombie = Lease { id: job.id, token: z.lease_token };
    let live = Lease { id: job.id, token: l.lease_token };

    // Z wakes up: nothing it writes lands, before or after L's outcome.
    assert!(!jobs::set_progress(&app.pool, zombie, 50).await.expect("query"));
    assert!(!jobs::finish(&app.pool, zombie, &Outcome::Succeeded(json!("zombie"))).await.expect("query"));
    assert!(jobs::renew(&app.pool, &[zombie], 30).await.expect("query").is_empty(), "Z learns its lease is gone");
    assert!(jobs::finish(&app.pool, live, &Outcome::Succeeded(json!("live"))).await.expect("query"));
    assert!(!jobs::finish(&app.pool, zombie, &Outcome::Succeeded(json!("zombie"))).await.expect("query"));
    assert!(jobs::release(&app.pool, zombie).await.expect("query").is_none());

    let done = app.get_job(job.id).await;
    assert_eq!((done.status, done.attempt, done.result), (JobStatus::Succeeded, 2, Some(json!("live"))));
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
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status").fetch_all(&app.pool).await.expect("query");
    assert!(all_done, "not every job succeeded: {statuses:?}");
    let attempts: HashSet<i32> =
        sqlx::query_scalar("SELECT attempt FROM jobs").fetch_all(&app.pool).await.expect("query").into_iter().collect();
    assert_eq!(attempts, HashSet::from([1]), "each job ran to completion exactly once");
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
    let statuses: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT status, attempt, count(*) FROM jobs GROUP BY status, attempt")
            .fetch_all(&app.pool)
            .await
            .expect("query");
    assert!(all_done, "not every job succeeded: {statuses:?}");
    app.stop().await;
    worker_pool.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn sigterm_lets_the_api_finish_requests_in_flight(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let app = spawn_app_with(connect, |_| {}).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &app.settings.database.url)
        .env("AMQP_URL", &app.settings.amqp.url)
        .env("CONVEYOR__AMQP__NAMESPACE", &app.settings.amqp.namespace)
        .env("CONVEYOR__HTTP__PORT", port.to_string())
        .env("CONVEYOR__DATABASE__MIGRATE_ON_START", "false")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("api serve starts");
    let address = format!("127.0.0.1:{port}");
    let up =
        wait_until(Duration::from_secs(20), || async { tokio::net::TcpStream::connect(&address).await.is_ok() }).await;
    assert!(up, "the server did not start listening");

    // A submission whose body is still on its way when SIGTERM arrives.
    let body = br#"{"type": "noop"}"#;
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        app.token,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&body[..5]).await.expect("part of the body");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = server.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(&body[5..]).await.expect("rest of the body");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    let exit = tokio::time::timeout(Duration::from_secs(35), server.wait()).await.expect("it exits").expect("status");
    assert!(exit.success(), "{exit:?}");
    assert_eq!(app.job_count().await, 1);
    // New connections are refused once it has stopped.
    assert!(tokio::net::TcpStream::connect(&address).await.is_err());
    app.stop().await;
}
