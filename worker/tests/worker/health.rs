//! The worker's health port: alive while the process lives, ready only while
//! Postgres answers and its consumers are up.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use shared::db::jobs;
use shared::job::{Cancel, JobStatus};
use shared::testing::Proxy;
use shared::testing::scrape::{parses_as_prometheus, samples};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::Harness;

/// A port nobody listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("an ephemeral port");
    listener.local_addr().expect("its address").port()
}

async fn probe(port: u16, path: &str) -> Option<(u16, Value)> {
    let answer = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.ok()?;
    let status = answer.status().as_u16();
    Some((status, answer.json().await.ok()?))
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn readyz_says_rabbitmq_is_down_while_the_connection_is_cut_and_recovers(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let port = free_port();
    let h = Harness::with(connect, |s| {
        s.amqp.url = proxy.url_for(&s.amqp.url);
        s.worker.http_port = port;
    })
    .await;
    let (stop, worker) = h.spawn_in_process(2);
    let ready = |postgres: &'static str, rabbitmq: &'static str, status: u16| async move {
        probe(port, "/readyz")
            .await
            .is_some_and(|(code, body)| code == status && body["postgres"] == postgres && body["rabbitmq"] == rabbitmq)
    };
    h.wait(Duration::from_secs(10), "ready", async || ready("up", "up", 200).await).await;
    assert_eq!(probe(port, "/healthz").await.map(|(code, _)| code), Some(200));

    proxy.cut();
    h.wait(Duration::from_secs(10), "503 naming RabbitMQ", async || ready("up", "down", 503).await).await;
    assert_eq!(probe(port, "/healthz").await.map(|(code, _)| code), Some(200), "alive all along");

    proxy.restore();
    h.wait(Duration::from_secs(20), "ready again", async || ready("up", "up", 200).await).await;

    stop.cancel();
    worker.await.expect("joined").expect("clean stop");
    assert!(probe(port, "/healthz").await.is_none(), "the port closes with the worker");
    h.close().await;
}

/// A known mix of jobs moves each counter by exactly that mix: 3 succeed, 2
/// fail after a retry each, 1 is cancelled while it runs.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn metrics_count_exactly_the_jobs_that_ran(_: sqlx::postgres::PgPoolOptions, connect: PgConnectOptions) {
    let port = free_port();
    let h = Harness::with(connect, |s| {
        s.worker.http_port = port;
        s.jobs.retry_backoff_base_ms = 10;
        s.jobs.retry_backoff_cap_ms = 20;
        // No rescue however slow a heartbeat: the counts are exactly the mix.
        s.worker.lease_seconds = 30;
    })
    .await;
    let (stop, worker) = h.spawn_in_process(8);
    let succeeding = h.submit(3, "noop", json!({})).await;
    let failing: Vec<_> = (0..2)
        .map(|_| {
            let mut job = shared::testing::new_job("fail", json!({"times": 10}));
            job.max_attempts = 2;
            job
        })
        .collect();
    let failing = h.submit_new(failing, 1).await;
    let cancelled = h.submit(1, "sleep", json!({"ms": 60_000})).await;
    h.wait(Duration::from_secs(10), "the sleep runs", async || h.count(JobStatus::Running, &cancelled).await == 1)
        .await;
    assert!(matches!(jobs::cancel(&h.pool, "default", cancelled[0]).await, Ok(Cancel::Requested(_))));
    let all: Vec<_> = succeeding.iter().chain(&failing).chain(&cancelled).copied().collect();
    h.wait(Duration::from_secs(20), "every job ends", async || {
        h.count(JobStatus::Succeeded, &all).await == 3
            && h.count(JobStatus::Failed, &all).await == 2
            && h.count(JobStatus::Cancelled, &all).await == 1
    })
    .await;

    // The leader's platform-wide gauges come with its periodic look at the queues.
    let scrape = async || {
        let answer = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.expect("scraped");
        assert_eq!(answer.status(), 200);
        answer.text().await.expect("text")
    };
    h.wait(Duration::from_secs(10), "the leader exports its gauges", async || {
        scrape().await.contains("conveyor_outbox_oldest_age_seconds")
    })
    .await;
    let text = scrape().await;
    let families = parses_as_prometheus(&text);
    assert!(families >= 5, "every family parsed: {families}");
    let jobs = samples(&text, "conveyor_worker_jobs_total");
    let expected: BTreeMap<String, f64> = [
        ("noop", "started", 3.0),
        ("noop", "succeeded", 3.0),
        ("fail", "started", 4.0),
        ("fail", "retried", 2.0),
        ("fail", "failed", 2.0),
        ("sleep", "started", 1.0),
        ("sleep", "cancelled", 1.0),
    ]
    .into_iter()
    .map(|(kind, outcome, n)| (format!("outcome=\"{outcome}\",queue=\"default\",type=\"{kind}\""), n))
    .collect();
    assert_eq!(jobs, expected, "{text}");
    assert_eq!(samples(&text, "conveyor_worker_jobs_in_flight").get(""), Some(&0.0));
    let runs: f64 = samples(&text, "conveyor_worker_job_run_seconds_count").values().sum();
    assert_eq!(runs, 8.0, "a run time for each attempt");
    let pickups: f64 = samples(&text, "conveyor_worker_job_pickup_seconds_count").values().sum();
    assert_eq!(pickups, 8.0, "a pickup latency for each claim");
    assert_eq!(samples(&text, "conveyor_worker_claim_batch_size_sum").get(""), Some(&8.0), "each claim in some batch");
    // 8 outcomes: 3 succeeded, 2 retrying, 2 failed, 1 cancelled.
    assert_eq!(samples(&text, "conveyor_worker_outcome_batch_size_sum").get(""), Some(&8.0), "each outcome in a batch");
    let depth = samples(&text, "conveyor_queue_messages_ready");
    assert!(depth.contains_key("queue=\"default\""), "the leader exports the depth: {text}");
    assert_eq!(samples(&text, "conveyor_workers_alive").get(""), Some(&1.0), "{text}");
    let oldest = samples(&text, "conveyor_outbox_oldest_age_seconds").get("").copied();
    assert!(oldest.is_some_and(|age| (0.0..5.0).contains(&age)), "publishes are confirmed at once: {oldest:?}");
    let actions = samples(&text, "conveyor_reconciler_actions_total");
    assert_eq!(actions.get("action=\"queued_due\""), Some(&2.0), "the two retries were queued when due: {text}");

    stop.cancel();
    worker.await.expect("joined").expect("clean stop");
    h.close().await;
}
