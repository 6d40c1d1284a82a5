//! Fairness between tenants: one tenant's backlog in a queue does not hold
//! up another tenant's jobs in the same queue.

use std::time::{Duration, Instant};

use api::auth::Scope;
use serde_json::{Value, json};
use shared::job::{Job, JobStatus};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{TestApp, client_with, key, spawn_app_with, wait_until};
use crate::submit::PgPoolOptionsUnused;

/// Tenant A's backlog of 2,000 jobs of 200 ms, two workers of 16, and a job of
/// tenant B submitted once A's jobs run: B's is done within 2 s.
async fn noisy_neighbour(app: &mut TestApp) -> Duration {
    let backlog = json!({"jobs": vec![json!({"type": "sleep", "payload": {"ms": 200}}); 1000]});
    for _ in 0..2 {
        let answer = app.client.post(app.url("/v1/jobs/batch")).json(&backlog).send().await.expect("answered");
        assert_eq!(answer.status(), 202);
    }
    app.spawn_worker(&["default"], 16);
    app.spawn_worker(&["default"], 16);
    let busy = wait_until(Duration::from_secs(20), || async { app.count_in(JobStatus::Running).await >= 16 }).await;
    assert!(busy, "tenant A's jobs never started");

    let tenant_b = client_with(&key(&app.pool, "b", &[Scope::JobsRead, Scope::JobsWrite]).await);
    let submitted = Instant::now();
    let answer = tenant_b.post(app.url("/v1/jobs")).json(&json!({"type": "noop"})).send().await.expect("answered");
    assert_eq!(answer.status(), 202);
    let job: Job = answer.json().await.expect("the job");
    let done = wait_until(Duration::from_secs(30), || async {
        let answer = tenant_b.get(app.url(&format!("/v1/jobs/{}", job.id))).send().await.expect("answered");
        let job: Value = answer.json().await.expect("the job");
        job["status"] == "succeeded"
    })
    .await;
    let took = submitted.elapsed();
    assert!(done, "tenant B's job never ran");
    let left = app.count_in(JobStatus::Queued).await;
    assert!(left > 1000, "tenant A's backlog was mostly there all along ({left} queued when B's job was done)");
    took
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn one_tenants_backlog_does_not_hold_up_another_tenants_job(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |s| s.amqp.lanes = shared::testing::FAIRNESS_TEST_LANES).await;
    let took = noisy_neighbour(&mut app).await;
    assert!(took < Duration::from_secs(2), "tenant B's job took {took:?} behind tenant A's backlog");
    app.stop().await;
}

async fn running_of(app: &TestApp, tenant: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE tenant = $1 AND status = 'running'")
        .bind(tenant)
        .fetch_one(&app.pool)
        .await
        .expect("counted")
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_tenant_runs_at_most_max_running_jobs_across_workers(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |s| s.tenants.max_running = 2).await;
    let tenant_b = client_with(&key(&app.pool, "b", &[Scope::JobsRead, Scope::JobsWrite]).await);
    let sleep = json!({"type": "sleep", "payload": {"ms": 300}});
    let a = app.client.post(app.url("/v1/jobs/batch")).json(&json!({"jobs": vec![sleep.clone(); 10]})).send();
    assert_eq!(a.await.expect("answered").status(), 202);
    let b = tenant_b.post(app.url("/v1/jobs/batch")).json(&json!({"jobs": vec![sleep; 2]})).send();
    assert_eq!(b.await.expect("answered").status(), 202);
    app.spawn_worker(&["default"], 8);
    app.spawn_worker(&["default"], 8);

    // Sampled until every job is done: A never runs more than 2, and B runs
    // beside A at its cap (the cap is per tenant, not a global one).
    let (most_a, b_beside_full_a) = (std::cell::Cell::new(0), std::cell::Cell::new(false));
    let done = wait_until(Duration::from_secs(60), || async {
        let (running_a, running_b) = (running_of(&app, "default").await, running_of(&app, "b").await);
        most_a.set(most_a.get().max(running_a));
        b_beside_full_a.set(b_beside_full_a.get() || (running_a == 2 && running_b > 0));
        app.count_in(JobStatus::Succeeded).await == 12
    })
    .await;
    let (most_a, b_beside_full_a) = (most_a.get(), b_beside_full_a.get());
    assert!(done, "not every job ran: {:?}", shared::testing::db::statuses(&app.pool).await);
    assert_eq!(most_a, 2, "tenant A ran {most_a} jobs at once with tenants.max_running = 2");
    assert!(b_beside_full_a, "tenant B never ran while tenant A was at its cap");
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE parked_at IS NOT NULL")
        .fetch_one(&app.pool)
        .await
        .expect("counted");
    assert_eq!(parked, 0, "a finished job is not parked");
    app.stop().await;
}

/// A tenant's first submissions, many at once: each gets its 202 (the lane is
/// given once, and every concurrent request learns which).
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_tenants_concurrent_first_submissions_all_succeed(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |s| s.amqp.lanes = shared::testing::FAIRNESS_TEST_LANES).await;
    let mut requests = tokio::task::JoinSet::new();
    for tenant in ["x", "y", "z"] {
        let client = client_with(&key(&app.pool, tenant, &[Scope::JobsWrite]).await);
        for _ in 0..16 {
            let (client, url) = (client.clone(), app.url("/v1/jobs"));
            requests.spawn(async move {
                let answer = client.post(url).json(&json!({"type": "noop"})).send().await;
                answer.expect("answered").status().as_u16()
            });
        }
    }
    let codes = requests.join_all().await;
    assert!(codes.iter().all(|&code| code == 202), "answers: {codes:?}");
    let lanes: Vec<i32> =
        sqlx::query_scalar("SELECT lane FROM tenant_lanes ORDER BY lane").fetch_all(&app.pool).await.expect("lanes");
    assert_eq!(lanes, [0, 1, 2], "one lane each, round robin");
    app.stop().await;
}
