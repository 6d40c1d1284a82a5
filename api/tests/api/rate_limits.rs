//! Rate limits: per tenant (and per key with a rate of its own) after
//! authentication, per client address before it, in local or Redis buckets.

use std::time::{Duration, Instant};

use api::auth::{Scope, Scopes};
use reqwest::Response;
use serde_json::{Value, json};
use shared::config::{RateLimitBackend, Settings};
use shared::db::api_keys::KeyRate;
use shared::testing::Proxy;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{api_cli, client_with, key, spawn_api_process, spawn_app_with, wait_until};
use crate::submit::PgPoolOptionsUnused;

fn header(response: &Response, name: &str) -> String {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned()
}

fn tenant_limit(settings: &mut Settings, per_second: u32, burst: u32) {
    settings.rate_limit.tenant_per_second = per_second;
    settings.rate_limit.tenant_burst = burst;
}

/// A made-up key token with a prefix no key has.
fn made_up_token(i: u32) -> String {
    format!("cvk_{i:012x}_{}", "0".repeat(64))
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_tenant_over_its_limit_gets_429_and_recovers_while_another_is_unaffected(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    // One request a second: nothing refills while the test makes its burst.
    let app = spawn_app_with(connect, |s| tenant_limit(s, 1, 5)).await;
    let other = client_with(&key(&app.pool, "other", &[Scope::JobsRead, Scope::JobsWrite]).await);

    let mut remaining = Vec::new();
    for _ in 0..5 {
        let answer = app.submit(&json!({"type": "noop"})).await;
        assert_eq!(answer.status(), 202);
        assert_eq!(header(&answer, "ratelimit-limit"), "5");
        remaining.push(header(&answer, "ratelimit-remaining"));
    }
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);

    let refused = app.submit(&json!({"type": "noop"})).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "content-type"), "application/problem+json");
    assert_eq!(header(&refused, "ratelimit-limit"), "5");
    assert_eq!(header(&refused, "ratelimit-remaining"), "0");
    assert_eq!(header(&refused, "ratelimit-reset"), "5", "the bucket is full again in five seconds");
    let wait: u64 = header(&refused, "retry-after").parse().expect("Retry-After in seconds");
    assert_eq!(wait, 1);
    let problem: Value = refused.json().await.expect("problem+json");
    assert_eq!(problem["type"], "/problems/rate-limited");
    assert_eq!(problem["status"], 429);
    assert!(problem["detail"].as_str().is_some_and(|d| d.contains("this tenant")), "{problem}");
    assert_eq!(app.job_count().await, 5, "a refused submission writes nothing");

    // Reads count too, and another tenant has a bucket of its own.
    assert_eq!(app.client.get(app.url("/v1/jobs")).send().await.expect("answered").status(), 429);
    let answer = other.get(app.url("/v1/jobs")).send().await.expect("answered");
    assert_eq!(answer.status(), 200);
    assert_eq!(header(&answer, "ratelimit-remaining"), "4");

    // After Retry-After, the tenant is served again.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(app.submit(&json!({"type": "noop"})).await.status(), 202);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_key_with_a_rate_of_its_own_draws_from_its_own_bucket(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |s| tenant_limit(s, 100, 200)).await;
    let scopes = Scopes::of(&[Scope::JobsRead]);
    let (_, token) =
        api::auth::keys::create(&app.pool, "default", Some("slow"), scopes, Some(KeyRate { per_second: 1, burst: 2 }))
            .await
            .expect("key created");
    let slow = client_with(&token);
    let statuses: Vec<u16> = futures_statuses((0..3).map(|_| slow.get(app.url("/v1/jobs")).send())).await;
    assert_eq!(statuses, [200, 200, 429]);
    let refused = slow.get(app.url("/v1/jobs")).send().await.expect("answered");
    assert_eq!(header(&refused, "ratelimit-limit"), "2");
    let problem: Value = refused.json().await.expect("problem+json");
    assert!(problem["detail"].as_str().is_some_and(|d| d.contains("this API key")), "{problem}");

    // The tenant's other keys are untouched by it.
    let answer = app.client.get(app.url("/v1/jobs")).send().await.expect("answered");
    assert_eq!(answer.status(), 200);
    assert_eq!(header(&answer, "ratelimit-limit"), "200");
    assert_eq!(header(&answer, "ratelimit-remaining"), "199");

    // `api keys create --rate-limit` stores the key's own rate, shown by `keys list`.
    let created = api_cli(&app, &["keys", "create", "--tenant", "cli", "--rate-limit", "7"]).await;
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let listed = api_cli(&app, &["keys", "list", "--json"]).await;
    let keys: Value = serde_json::from_slice(&listed.stdout).expect("json");
    let cli = keys.as_array().and_then(|keys| keys.iter().find(|k| k["tenant"] == "cli")).expect("the new key");
    assert_eq!(cli["rate_limit"], json!({"per_second": 7, "burst": 14}));
    app.stop().await;
}

/// Sends one request after the other and collects the statuses.
async fn futures_statuses<F: Future<Output = reqwest::Result<Response>>>(
    requests: impl Iterator<Item = F>,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.expect("answered").status().as_u16());
    }
    statuses
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_batch_counts_its_jobs(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |s| tenant_limit(s, 1, 10)).await;
    let batch = |n: usize| json!({"jobs": vec![json!({"type": "noop"}); n]});
    let answer = app.client.post(app.url("/v1/jobs/batch")).json(&batch(8)).send().await.expect("answered");
    assert_eq!(answer.status(), 202);
    assert_eq!(header(&answer, "ratelimit-remaining"), "2");

    // Three more jobs do not fit in the two left: refused whole, nothing written.
    let refused = app.client.post(app.url("/v1/jobs/batch")).json(&batch(3)).send().await.expect("answered");
    assert_eq!(refused.status(), 429);
    assert_eq!(app.job_count().await, 8);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_batch_larger_than_the_burst_takes_a_full_bucket(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |s| tenant_limit(s, 1, 10)).await;
    let batch = json!({"jobs": vec![json!({"type": "noop"}); 50]});
    let answer = app.client.post(app.url("/v1/jobs/batch")).json(&batch).send().await.expect("answered");
    assert_eq!(answer.status(), 202);
    assert_eq!(header(&answer, "ratelimit-remaining"), "0");
    assert_eq!(app.submit(&json!({"type": "noop"})).await.status(), 429);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_address_limit_refuses_made_up_tokens_without_the_database(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |s| {
        s.rate_limit.ip_per_second = 1;
        s.rate_limit.ip_burst = 3;
    })
    .await;
    // Requests that would wait on the database fail the test instead of hanging it.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let get = |i: u32| client.get(app.url("/v1/jobs")).bearer_auth(made_up_token(i)).send();
    assert_eq!(futures_statuses((0..3).map(get)).await, [401, 401, 401]);

    // With the key table locked, a lookup would hang: refusals must not look.
    let mut lock = app.pool.begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.expect("locked");
    let started = Instant::now();
    let refused = get(100).await.expect("answered while the key table is locked");
    assert_eq!(refused.status(), 429);
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert_eq!(header(&refused, "ratelimit-limit"), "3");
    assert_eq!(header(&refused, "retry-after"), "1");
    let problem: Value = refused.json().await.expect("problem+json");
    assert!(problem["detail"].as_str().is_some_and(|d| d.contains("this client address")), "{problem}");
    assert_eq!(futures_statuses((101..110).map(get)).await, [429; 9]);

    // X-Forwarded-For from a peer that is not a trusted proxy changes nothing.
    let spoofed =
        client.get(app.url("/v1/jobs")).header("x-forwarded-for", "198.51.100.7").send().await.expect("answered");
    assert_eq!(spoofed.status(), 429);
    // Probes are never limited.
    assert_eq!(client.get(app.url("/healthz")).send().await.expect("answered").status(), 200);
    lock.rollback().await.expect("unlocked");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |s| {
        s.rate_limit.ip_per_second = 1;
        s.rate_limit.ip_burst = 2;
        s.http.trusted_proxies = vec!["127.0.0.1".to_owned()];
    })
    .await;
    let from = |client: &'static str| {
        app.client.get(app.url("/v1/jobs")).header("x-forwarded-for", format!("{client}, 127.0.0.1")).send()
    };
    let a: Vec<u16> = futures_statuses((0..3).map(|_| from("198.51.100.1"))).await;
    assert_eq!(a, [200, 200, 429]);
    // The client is the nearest untrusted hop, not the leftmost (forgeable) one.
    let b: Vec<u16> = futures_statuses((0..2).map(|_| from("203.0.113.9, 198.51.100.2"))).await;
    assert_eq!(b, [200, 200]);
    assert_eq!(from("198.51.100.1").await.expect("answered").status(), 429);
    app.stop().await;
}

/// The Redis the machine runs, for the shared buckets.
const REDIS: &str = "127.0.0.1:6379";

fn redis_backend(settings: &mut Settings, url: String) {
    settings.rate_limit.backend = RateLimitBackend::Redis;
    settings.rate_limit.redis_url = url;
}

async fn readyz(address: &str) -> Value {
    let answer = reqwest::get(format!("{address}/readyz")).await.expect("answered");
    assert_eq!(answer.status(), 200, "a limiter without Redis must not make the replica unready");
    answer.json().await.expect("json")
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn two_api_processes_with_redis_hold_a_tenant_to_its_limit_together(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |s| {
        tenant_limit(s, 1, 10);
        redis_backend(s, format!("redis://{REDIS}"));
    })
    .await;
    assert_eq!(readyz(&app.address).await["rate_limiter"], "redis");
    // A second API process of the same installation (namespace), sharing the tenant.
    let (_second, address) = spawn_api_process(&app.settings).await;
    let second = format!("http://{address}");
    let up = wait_until(Duration::from_secs(20), || async {
        reqwest::get(format!("{second}/readyz")).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(up, "the second API process did not become ready");
    assert_eq!(readyz(&second).await["rate_limiter"], "redis");

    // Alternating between the two, the tenant gets its burst once, not twice.
    let started = Instant::now();
    let mut admitted = [0u32; 2];
    for i in 0..30 {
        let base = if i % 2 == 0 { &app.address } else { &second };
        let answer = app.client.get(format!("{base}/v1/jobs")).send().await.expect("answered");
        match answer.status().as_u16() {
            200 => admitted[i % 2] += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    let refilled = started.elapsed().as_secs() as u32 + 1;
    let total = admitted[0] + admitted[1];
    assert!((10..=10 + refilled).contains(&total), "admitted {admitted:?} in {:?}", started.elapsed());
    assert!(admitted[0] > 0 && admitted[1] > 0, "both processes served: {admitted:?}");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn without_redis_traffic_flows_on_local_buckets_and_readyz_says_degraded(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let proxy = Proxy::start(REDIS.parse().expect("address")).await;
    proxy.cut();
    let app = spawn_app_with(connect, |s| {
        tenant_limit(s, 1, 5);
        redis_backend(s, format!("redis://127.0.0.1:{}", proxy.port));
    })
    .await;

    // Redis unreachable from the start: the API serves, on its own buckets.
    let ready = readyz(&app.address).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["rate_limiter"], "local (fallback)");
    assert!(ready["degraded"][0].as_str().is_some_and(|d| d.contains("redis")), "{ready}");
    let statuses = futures_statuses((0..6).map(|_| app.client.get(app.url("/v1/jobs")).send())).await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429], "the local bucket still limits");

    // Redis back: the API goes back to it within a few seconds.
    proxy.restore();
    let back = wait_until(Duration::from_secs(10), || async { readyz(&app.address).await["status"] == "ready" }).await;
    assert!(back, "the API never went back to Redis");
    assert_eq!(readyz(&app.address).await["rate_limiter"], "redis");
    let answer = app.client.get(app.url("/v1/jobs")).send().await.expect("answered");
    assert_eq!(answer.status(), 200, "a fresh bucket in Redis");

    // Lost mid-traffic: the next request falls back instead of failing.
    proxy.cut();
    let answer = app.client.get(app.url("/v1/jobs")).send().await.expect("answered");
    assert!(answer.status() == 200 || answer.status() == 429, "{}", answer.status());
    assert_ne!(answer.status(), 500);
    let degraded =
        wait_until(Duration::from_secs(5), || async { readyz(&app.address).await["status"] == "degraded" }).await;
    assert!(degraded, "readyz never said the limiter lost Redis");
    app.stop().await;
}
