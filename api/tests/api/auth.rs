//! Authentication, scopes and tenant isolation.

use std::time::Duration;

use api::auth::Scope;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{TestApp, client_with, key, spawn_app, spawn_app_with, wait_until};
use crate::submit::PgPoolOptionsUnused;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Checks a 401/403 answer: status, problem body, and for 401 the challenge.
async fn refused(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.expect("problem");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    body
}

async fn submit_with(app: &TestApp, client: &reqwest::Client) -> reqwest::Response {
    client.post(app.url("/v1/jobs")).json(&json!({"type": "noop"})).send().await.expect("sent")
}

fn jwt(claims: &Value, algorithm: Algorithm, key: &EncodingKey) -> String {
    encode(&Header::new(algorithm), claims, key).expect("signed")
}

fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn requests_without_a_valid_token_are_401(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let anonymous = reqwest::Client::new();
    let url = app.url("/v1/jobs");

    let body = refused(anonymous.get(&url).send().await.expect("sent"), StatusCode::UNAUTHORIZED).await;
    assert_eq!(body["type"], "/problems/unauthorized");
    for header in ["Basic dXNlcjpwdw==", "Bearer", "Bearer cvk_nope", "Bearer not.a.jwt", "token"] {
        let response = anonymous.get(&url).header("Authorization", header).send().await.expect("sent");
        refused(response, StatusCode::UNAUTHORIZED).await;
    }
    // A well-formed key that does not exist.
    let forged = format!("cvk_{}_{}", "ab".repeat(6), "cd".repeat(32));
    refused(submit_with(&app, &client_with(&forged)).await, StatusCode::UNAUTHORIZED).await;
    // A real key's prefix with another secret.
    let real = key(&app.pool, "default", &[Scope::JobsWrite]).await;
    let tampered = format!("{}{}", &real[..real.len() - 1], if real.ends_with('0') { '1' } else { '0' });
    refused(submit_with(&app, &client_with(&tampered)).await, StatusCode::UNAUTHORIZED).await;
    // Auth comes before reading the body: a bad body without a token is still 401.
    let response = anonymous.post(&url).body("{").send().await.expect("sent");
    refused(response, StatusCode::UNAUTHORIZED).await;
    // Probes stay open.
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(anonymous.get(app.url(probe)).send().await.expect("sent").status(), 200, "{probe}");
    }
    assert_eq!(app.job_count().await, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_read_only_key_reads_but_cannot_submit(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop"})).await;
    let reader = client_with(&key(&app.pool, "default", &[Scope::JobsRead]).await);
    let writer = client_with(&key(&app.pool, "default", &[Scope::JobsWrite]).await);

    let body = refused(submit_with(&app, &reader).await, StatusCode::FORBIDDEN).await;
    assert_eq!(body["type"], "/problems/forbidden");
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("jobs:write")), "{body}");
    assert_eq!(app.job_count().await, 1, "the refused submission wrote nothing");
    let read = reader.get(app.url(&format!("/v1/jobs/{}", job.id))).send().await.expect("sent");
    assert_eq!(read.status(), 200);
    assert_eq!(reader.get(app.url("/v1/jobs")).send().await.expect("sent").status(), 200);
    // Write does not imply read; admin grants the tenant's scopes.
    let read = writer.get(app.url(&format!("/v1/jobs/{}", job.id))).send().await.expect("sent");
    refused(read, StatusCode::FORBIDDEN).await;
    assert_eq!(submit_with(&app, &writer).await.status(), 202);
    // Platform-wide views need the operator scope, which no tenant key has.
    for path in ["/v1/queues", "/v1/workers"] {
        refused(reader.get(app.url(path)).send().await.expect("sent"), StatusCode::FORBIDDEN).await;
        refused(app.client.get(app.url(path)).send().await.expect("sent"), StatusCode::FORBIDDEN).await;
    }
    let requeue = writer.post(app.url(&format!("/v1/jobs/{}/requeue", job.id))).send().await.expect("sent");
    refused(requeue, StatusCode::FORBIDDEN).await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_revoked_key_is_refused_within_the_cache_ttl(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    // A second API replica on the same database, with its own key cache.
    let replica = api::startup::Application::build_with_pool(app.settings.clone(), app.pool.clone())
        .await
        .expect("replica starts");
    let replica_url = format!("http://127.0.0.1:{}/v1/jobs", replica.port());
    let replica_handle = replica.handle();
    tokio::spawn(replica.run_until_stopped());
    let token = key(&app.pool, "default", &[Scope::JobsRead]).await;
    let client = client_with(&token);
    let urls = [app.url("/v1/jobs"), replica_url];
    for url in &urls {
        // Both replicas have now verified, and cached, the key.
        assert_eq!(client.get(url).send().await.expect("sent").status(), 200);
    }

    let prefix = api::auth::keys::prefix_of(&token).expect("prefix");
    let keys = shared::db::api_keys::list(&app.pool).await.expect("keys");
    let id = keys.iter().find(|key| key.prefix == prefix).expect("the key is listed").id;
    shared::db::api_keys::revoke(&app.pool, id).await.expect("revoked");
    let revoked_at = std::time::Instant::now();

    let ttl = Duration::from_millis(app.settings.auth.key_cache_ttl_ms);
    for url in &urls {
        let refused_now = wait_until(ttl + Duration::from_secs(2), || async {
            client.get(url).send().await.expect("sent").status() == 401
        })
        .await;
        assert!(refused_now, "{url} still accepted the key {:?} after revocation", revoked_at.elapsed());
    }
    replica_handle.stop().await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn jwts_are_checked_for_signature_expiry_and_algorithm(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |settings| {
        settings.auth.jwt_hs256_secret = SECRET.to_owned();
        settings.auth.jwt_rs256_public_key_file = fixture("jwt-test-public.pem");
    })
    .await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let rs = EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt-test-private.pem")).expect("fixture")).expect("pem");
    let other_rs =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt-other-private.pem")).expect("fixture")).expect("pem");
    let good = json!({"sub": "acme", "scope": "jobs:write jobs:read", "exp": in_an_hour()});

    // Good tokens of both kinds are accepted, and `sub` is the tenant.
    for token in [jwt(&good, Algorithm::HS256, &hs), jwt(&good, Algorithm::RS256, &rs)] {
        let response = submit_with(&app, &client_with(&token)).await;
        assert_eq!(response.status(), 202);
        let job: Value = response.json().await.expect("job");
        assert_eq!(job["tenant"], "acme");
    }
    let wrong_secret = EncodingKey::from_secret(b"another-secret-that-is-at-least-32-bytes");
    let expired = json!({"sub": "acme", "scope": "jobs:write", "exp": chrono::Utc::now().timestamp() - 120});
    let no_exp = json!({"sub": "acme", "scope": "jobs:write"});
    let cases = [
        (jwt(&good, Algorithm::HS256, &wrong_secret), "signature"),
        (jwt(&good, Algorithm::RS256, &other_rs), "signature"),
        (jwt(&expired, Algorithm::HS256, &hs), "expired"),
        (jwt(&no_exp, Algorithm::HS256, &hs), "exp"),
        (jwt(&good, Algorithm::HS384, &EncodingKey::from_secret(SECRET.as_bytes())), "not accepted"),
    ];
    for (token, reason) in cases {
        let body = refused(submit_with(&app, &client_with(&token)).await, StatusCode::UNAUTHORIZED).await;
        assert!(body["detail"].as_str().is_some_and(|d| d.contains(reason)), "{reason}: {body}");
    }
    // A valid JWT without the scope is 403.
    let reader = json!({"sub": "acme", "scope": "jobs:read", "exp": in_an_hour()});
    refused(submit_with(&app, &client_with(&jwt(&reader, Algorithm::HS256, &hs))).await, StatusCode::FORBIDDEN).await;
    assert_eq!(app.job_count().await, 2);
    app.stop().await;
}

/// A change to a token's claims.
type Edit = dyn Fn(&mut serde_json::Map<String, Value>);

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_configured_issuer_and_audience_are_required_and_nbf_and_sub_are_checked(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |settings| {
        settings.auth.jwt_hs256_secret = SECRET.to_owned();
        settings.auth.jwt_issuer = "https://issuer.test".to_owned();
        settings.auth.jwt_audience = "conveyor".to_owned();
    })
    .await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let claims = |edit: &Edit| {
        let mut claims = json!({"sub": "acme", "scope": "jobs:write", "exp": in_an_hour(),
                                "iss": "https://issuer.test", "aud": "conveyor"});
        if let Some(map) = claims.as_object_mut() {
            edit(map);
        }
        jwt(&claims, Algorithm::HS256, &hs)
    };
    assert_eq!(submit_with(&app, &client_with(&claims(&|_| {}))).await.status(), 202);
    let cases: [(&Edit, &str); 6] = [
        (&|c| drop(c.remove("iss")), "lacks the iss claim"),
        (&|c| drop(c.remove("aud")), "lacks the aud claim"),
        (&|c| drop(c.insert("iss".into(), json!("https://elsewhere.test"))), "invalid JWT"),
        (&|c| drop(c.insert("nbf".into(), json!(in_an_hour()))), "not valid yet"),
        (&|c| drop(c.insert("sub".into(), json!("acme corp"))), "sub"),
        (&|c| drop(c.insert("sub".into(), json!(""))), "sub"),
    ];
    for (edit, reason) in cases {
        let body = refused(submit_with(&app, &client_with(&claims(edit))).await, StatusCode::UNAUTHORIZED).await;
        assert!(body["detail"].as_str().is_some_and(|d| d.contains(reason)), "{reason}: {body}");
    }
    assert_eq!(app.job_count().await, 1);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn jwts_are_refused_when_not_configured(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let claims = json!({"sub": "acme", "scope": "jobs:write", "exp": in_an_hour()});
    let token = jwt(&claims, Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()));
    refused(submit_with(&app, &client_with(&token)).await, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn another_tenants_job_is_not_found_anywhere(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let a = client_with(&key(&app.pool, "tenant-a", &[Scope::Admin]).await);
    let b = client_with(&key(&app.pool, "tenant-b", &[Scope::Admin]).await);
    let response = a.post(app.url("/v1/jobs")).json(&json!({"type": "noop"})).send().await.expect("sent");
    let job: Value = response.json().await.expect("job");
    assert_eq!(job["tenant"], "tenant-a");
    let id = job["id"].as_str().expect("id");
    // Make it cancelled, so that requeue would otherwise be allowed.
    let cancel = a.post(app.url(&format!("/v1/jobs/{id}/cancel"))).send().await.expect("sent");
    assert_eq!(cancel.status(), 200);

    let unknown = uuid::Uuid::now_v7();
    for (method, path) in [("GET", ""), ("POST", "/cancel"), ("POST", "/requeue")] {
        for target in [id.to_owned(), unknown.to_string()] {
            let url = app.url(&format!("/v1/jobs/{target}{path}"));
            let request = if method == "GET" { b.get(url) } else { b.post(url) };
            let response = request.send().await.expect("sent");
            let body = refused(response, StatusCode::NOT_FOUND).await;
            // Same answer for "someone else's" and "does not exist", but for the id.
            assert_eq!(body["detail"], format!("no job {target}"), "{method} {path}");
        }
    }
    let url = app.url("/v1/jobs");
    let listed = |client: reqwest::Client| {
        let url = url.clone();
        async move {
            let page: Value = client.get(url).send().await.expect("sent").json().await.expect("page");
            page["jobs"].as_array().map_or(0, Vec::len)
        }
    };
    assert_eq!(listed(b).await, 0, "B's list does not show A's job");
    assert_eq!(listed(a).await, 1);
    let statuses = shared::testing::db::statuses(&app.pool).await;
    assert_eq!(statuses, [("cancelled".to_owned(), 1)].into(), "tenant B's requests changed nothing");
    app.stop().await;
}
