//! Every way a request can be wrong: the status, the problem+json body, and
//! that nothing was written or published.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{TestApp, spawn_app, spawn_app_with};
use crate::submit::PgPoolOptionsUnused;

/// Sends a request and checks the answer is a problem+json with `status`;
/// returns the problem.
async fn problem(app: &TestApp, request: reqwest::RequestBuilder, status: StatusCode) -> Value {
    let response = request.send().await.expect("sent");
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.expect("a JSON problem");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["title"], status.canonical_reason().unwrap_or_default());
    assert!(body["type"].as_str().is_some_and(|t| t.starts_with("/problems/")), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
    assert_eq!(app.job_count().await, 0, "a refused request wrote a job");
    body
}

fn post_raw(app: &TestApp, content_type: Option<&str>, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
    let request = app.client.post(app.url("/v1/jobs")).body(body);
    match content_type {
        Some(content_type) => request.header("content-type", content_type),
        None => request,
    }
}

/// The field paths of a 422.
pub fn fields(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .map(|errors| errors.iter().filter_map(|e| e["field"].as_str()).collect())
        .unwrap_or_default()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn malformed_json_is_400(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    for body in ["{\"type\": ", "not json", "{\"type\":\"noop\"} trailing", ""] {
        let p = problem(&app, post_raw(&app, Some("application/json"), body), StatusCode::BAD_REQUEST).await;
        assert!(p["detail"].as_str().is_some_and(|d| d.contains("malformed JSON")), "{p}");
    }
    assert_eq!(app.amqp.depth("default").await, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_body_not_declared_as_json_is_415(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let body = r#"{"type":"noop"}"#;
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        problem(&app, post_raw(&app, content_type, body), StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    }
    // JSON with parameters or a +json suffix is still JSON.
    for content_type in ["application/json; charset=utf-8", "application/vnd.conveyor+json"] {
        let response = post_raw(&app, Some(content_type), body).send().await.expect("sent");
        assert_eq!(response.status(), 202, "{content_type}");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_body_over_the_limit_is_413(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    // The body limit alone: payloads may be as large as the body here.
    let app = spawn_app_with(connect, |s| s.jobs.payload_max_bytes = s.http.body_limit_bytes).await;
    let limit = app.settings.http.body_limit_bytes;
    assert_eq!(limit, 1024 * 1024, "the default limit is 1 MiB");
    // A valid job whose payload pushes the body one byte past the limit.
    let prefix = r#"{"type":"echo","payload":{"blob":""#;
    let suffix = r#""}}"#;
    let blob = "x".repeat(limit + 1 - prefix.len() - suffix.len());
    let body = format!("{prefix}{blob}{suffix}");
    assert_eq!(body.len(), limit + 1);
    problem(&app, post_raw(&app, Some("application/json"), body.clone()), StatusCode::PAYLOAD_TOO_LARGE).await;

    // The same without Content-Length (chunked): refused while reading.
    let answer = chunked_post(&app, body.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert_eq!(app.job_count().await, 0);

    // One byte less is fine.
    let fits = format!("{prefix}{}{suffix}", "x".repeat(limit - prefix.len() - suffix.len()));
    assert_eq!(post_raw(&app, Some("application/json"), fits).send().await.expect("sent").status(), 202);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_payload_over_its_own_limit_is_422_within_the_body_limit(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let max = app.settings.jobs.payload_max_bytes;
    assert_eq!(max, 256 * 1024, "the default payload limit is 256 KiB");
    let payload = |len: usize| json!({"blob": "x".repeat(len - r#"{"blob":""}"#.len())});
    let body = problem(
        &app,
        app.client.post(app.url("/v1/jobs")).json(&json!({"type": "echo", "payload": payload(max + 1)})),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "payload");
    assert!(body["errors"][0]["message"].as_str().is_some_and(|m| m.contains("jobs.payload_max_bytes")), "{body}");
    assert_eq!(app.job_count().await, 0);
    let fits = app.submit(&json!({"type": "echo", "payload": payload(max)})).await;
    assert_eq!(fits.status(), 202);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn invalid_fields_are_422_with_their_paths(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let cases: &[(Value, &[&str])] = &[
        (json!({}), &["type"]),
        (json!({"type": "nope"}), &["type"]),
        (json!({"type": 5}), &["type"]),
        (json!({"type": "noop", "queue": "elsewhere"}), &["queue"]),
        (json!({"type": "noop", "priority": 10}), &["priority"]),
        (json!({"type": "noop", "priority": -1}), &["priority"]),
        (json!({"type": "noop", "max_attempts": 0}), &["max_attempts"]),
        (json!({"type": "noop", "timeout_seconds": 0}), &["timeout_seconds"]),
        (json!({"type": "noop", "run_at": "tomorrow"}), &["run_at"]),
        (json!({"type": "noop", "run_at": "2030-01-01T00:00:00Z", "delay_seconds": 5}), &["delay_seconds"]),
        (json!({"type": "noop", "colour": "red"}), &["colour"]),
        (json!({"type": "noop", "payload": [1, 2]}), &["payload"]),
        (json!({"type": "noop", "payload": {"unexpected": true}}), &["payload.unexpected"]),
        (json!({"type": "sleep", "payload": {}}), &["payload.ms"]),
        (json!({"type": "sleep", "payload": {"ms": "soon"}}), &["payload.ms"]),
        (json!({"type": "sleep", "payload": {"ms": 999_999_999_999u64}}), &["payload.ms"]),
        (json!({"type": "hash", "payload": {"input": "a", "iterations": 0}}), &["payload.iterations"]),
        (json!({"type": "http", "payload": {"url": "ftp://x"}}), &["payload.url"]),
        (
            json!({"type": "http", "payload": {"url": "http://x", "headers": {"bad header": "v"}}}),
            &["payload.headers.bad header"],
        ),
        (json!({"type": "nope", "priority": 99, "queue": "x"}), &["type", "queue", "priority"]),
        // Postgres cannot store U+0000 in jsonb: refused here, not by a failed insert.
        (json!({"type": "echo", "payload": {"a": [1, {"b": "x\u{0}y"}]}}), &["payload.a[1].b"]),
    ];
    for (body, expected) in cases {
        let p = problem(&app, app.client.post(app.url("/v1/jobs")).json(body), StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(p["type"], "/problems/validation-error");
        assert_eq!(&fields(&p), expected, "for {body}: {p}");
        assert!(
            p["errors"]
                .as_array()
                .is_some_and(|errors| { errors.iter().all(|e| e["message"].as_str().is_some_and(|m| !m.is_empty())) })
        );
    }
    assert_eq!(app.amqp.depth("default").await, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_malformed_id_is_400_and_an_unknown_one_404(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    problem(&app, app.client.get(app.url("/v1/jobs/12345")), StatusCode::BAD_REQUEST).await;
    let unknown = uuid::Uuid::now_v7();
    let p = problem(&app, app.client.get(app.url(&format!("/v1/jobs/{unknown}"))), StatusCode::NOT_FOUND).await;
    assert_eq!(p["type"], "/problems/not-found");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn unknown_routes_and_methods_answer_problems(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    problem(&app, app.client.get(app.url("/v2/jobs")), StatusCode::NOT_FOUND).await;
    problem(&app, app.client.request(Method::DELETE, app.url("/v1/jobs")), StatusCode::METHOD_NOT_ALLOWED).await;
    let id = uuid::Uuid::now_v7();
    problem(&app, app.client.put(app.url(&format!("/v1/jobs/{id}"))), StatusCode::METHOD_NOT_ALLOWED).await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn bad_list_parameters_are_400(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    for query in ["status=done", "limit=0", "limit=501", "limit=ten", "cursor=xyz", "type=%00", "queue=a%00b"] {
        let p = problem(&app, app.client.get(app.url(&format!("/v1/jobs?{query}"))), StatusCode::BAD_REQUEST).await;
        let name = query.split('=').next().unwrap_or_default();
        assert!(p["detail"].as_str().is_some_and(|d| d.contains(name)), "{query}: {p}");
    }
    app.stop().await;
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no Content-Length) over a
/// raw connection, and returns the head of the answer.
async fn chunked_post(app: &TestApp, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.token
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    for chunk in body.chunks(64 * 1024) {
        // The server may answer and close before the whole body is sent.
        if stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err()
            || stream.write_all(chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = vec![0; 4096];
    let n = stream.read(&mut answer).await.expect("an answer");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}
