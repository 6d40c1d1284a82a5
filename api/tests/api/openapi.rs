//! `GET /openapi.json` describes every route as it behaves, and
//! Schemathesis, a fuzzer driven by that description, finds nothing wrong.

use std::time::Duration;

use serde_json::{Value, json};
use shared::scope::Scope;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{client_with, key, spawn_app, spawn_app_with};
use crate::submit::PgPoolOptionsUnused;

/// Every route of the API, as `(method, path)`.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("post", "/v1/jobs/batch"),
    ("get", "/v1/jobs/{id}"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("post", "/v1/jobs/{id}/requeue"),
    ("get", "/v1/jobs/{id}/events"),
    ("get", "/v1/events"),
    ("get", "/v1/queues"),
    ("get", "/v1/workers"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/docs/"),
];

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_description_covers_every_route_answer_header_and_scope(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    // No token needed, as for the probes.
    let response = reqwest::get(app.url("/openapi.json")).await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let doc: Value = response.json().await.expect("JSON");
    assert!(doc["openapi"].as_str().is_some_and(|version| version.starts_with("3.1")), "{}", doc["openapi"]);

    let paths = doc["paths"].as_object().expect("paths");
    let documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object().into_iter().flatten().map(move |(method, _)| (method.clone(), path.clone()))
        })
        .collect();
    for (method, path) in ROUTES {
        assert!(documented.contains(&((*method).to_owned(), (*path).to_owned())), "{method} {path} undocumented");
    }
    assert_eq!(documented.len(), ROUTES.len(), "documented: {documented:?}");

    let operation = |method: &str, path: &str| doc["paths"][path][method].clone();
    for (method, path) in ROUTES.iter().filter(|(_, path)| path.starts_with("/v1/")) {
        let op = operation(method, path);
        let scopes = &op["security"][0]["bearer"];
        assert!(scopes.as_array().is_some_and(|scopes| scopes.len() == 1), "{method} {path}: {scopes}");
        for status in ["401", "403", "429", "503", "500"] {
            let answer = &op["responses"][status];
            assert!(answer["content"]["application/problem+json"].is_object(), "{method} {path} {status}");
        }
        let limited = &op["responses"]["429"]["headers"];
        for header in ["Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"] {
            assert!(limited[header].is_object(), "{method} {path}: 429 lacks {header}");
        }
    }
    assert_eq!(operation("post", "/v1/jobs")["security"][0]["bearer"], json!(["jobs:write"]));
    assert_eq!(operation("post", "/v1/jobs/{id}/requeue")["security"][0]["bearer"], json!(["admin"]));
    assert_eq!(operation("get", "/v1/queues")["security"][0]["bearer"], json!(["operator"]));
    let submit = operation("post", "/v1/jobs");
    let params: Vec<&str> =
        submit["parameters"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(params, ["Idempotency-Key"]);
    for status in ["400", "409", "413", "415", "422"] {
        assert!(submit["responses"][status]["content"]["application/problem+json"].is_object(), "submit {status}");
    }
    assert!(submit["responses"]["202"]["headers"]["Location"].is_object());
    let get = operation("get", "/v1/jobs/{id}");
    for header in ["ETag", "Cache-Control", "Retry-After", "RateLimit-Remaining"] {
        assert!(get["responses"]["200"]["headers"][header].is_object(), "GET job lacks {header}");
    }
    assert!(get["responses"]["304"].is_object());
    let events = operation("get", "/v1/jobs/{id}/events");
    assert!(events["responses"]["200"]["content"]["text/event-stream"].is_object());

    // The submit body: one shape per job type, with this server's queues and limits.
    let submit_body = &doc["components"]["schemas"]["SubmitRequest"];
    let variants = submit_body["oneOf"].as_array().expect("one shape per type");
    let types: Vec<&str> = variants.iter().filter_map(|v| v["properties"]["type"]["const"].as_str()).collect();
    let known: Vec<&str> = shared::kinds::KINDS.iter().map(|kind| kind.name).collect();
    assert_eq!(types, known);
    let sleep = variants.iter().find(|v| v["title"] == "sleep").expect("sleep");
    assert_eq!(sleep["properties"]["payload"]["properties"]["ms"]["maximum"], json!(86_400_000));
    assert_eq!(sleep["properties"]["queue"]["enum"], json!(["critical", "default", null]));
    assert_eq!(sleep["required"], json!(["type", "payload"]), "its payload has a required field");
    let http = variants.iter().find(|v| v["title"] == "http").expect("http");
    let url = &http["properties"]["payload"]["properties"]["url"];
    assert!(url["pattern"].as_str().is_some_and(|p| p.starts_with("^http://")), "{url}");
    assert_eq!(url["format"], "http-url");
    assert_eq!(sleep["properties"]["max_attempts"]["maximum"], json!(app.settings.jobs.max_attempts_limit));
    for problem in ["type", "title", "status", "detail"] {
        assert!(doc["components"]["schemas"]["Problem"]["properties"][problem].is_object());
    }

    // Undocumented methods are refused as such, saying which are taken.
    let refused = app.client.delete(app.url("/v1/jobs")).send().await.expect("answered");
    assert_eq!(refused.status(), 405);
    assert_eq!(refused.headers()["allow"], "GET, POST");

    // The page for people, from the binary, at /docs and /docs/ (no redirect).
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    for path in ["/docs", "/docs/"] {
        let page = plain.get(app.url(path)).send().await.expect("answered");
        assert_eq!(page.status(), 200, "{path}");
        assert!(page.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with("text/html")));
        let html = page.text().await.expect("text");
        assert!(html.contains(r#"<base href="/docs/">"#) && html.contains("swagger-ui-bundle.js"), "{html}");
    }
    let css = plain.get(app.url("/docs/swagger-ui.css")).send().await.expect("answered");
    assert_eq!(css.status(), 200);
    let init = reqwest::get(app.url("/docs/swagger-initializer.js")).await.expect("answered");
    assert!(init.text().await.expect("text").contains("/openapi.json"));
    app.stop().await;
}

/// Schemathesis (scripts/setup installs it) against the running API, with
/// every check on: statuses, content types, headers and bodies must be as
/// described, bad input refused, valid input accepted, no 5xx.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn schemathesis_finds_nothing_wrong(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app_with(connect, |settings| {
        // Its requests come fast, from one address and one tenant.
        settings.rate_limit.tenant_per_second = 1_000_000;
        settings.rate_limit.tenant_burst = 2_000_000;
        settings.rate_limit.ip_per_second = 0;
    })
    .await;
    let token = key(&app.pool, "fuzz", &[Scope::JobsRead, Scope::JobsWrite, Scope::Admin, Scope::Operator]).await;
    let _ = client_with(&token);
    // More with SCHEMATHESIS_MAX_EXAMPLES=200 (say) in the environment.
    let examples = std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "30".to_owned());
    // Its own directory: Schemathesis keeps a cache of past failures where it runs.
    let scratch = std::env::temp_dir().join(format!("conveyor-schemathesis-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&scratch).expect("a scratch directory");
    let command = tokio::process::Command::new(schemathesis())
        .current_dir(&scratch)
        .args(["run", &app.url("/openapi.json"), "--checks", "all", "--max-examples", &examples, "--workers", "2"])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        // Streams never end on their own: a fuzzer's request would wait out its timeout.
        .args(["--exclude-path-regex", "/events$"])
        // A long-poll (`?wait=`, up to 30 s) is slow on purpose.
        .args(["--request-timeout", "40", "--max-response-time", "35"])
        .args(["--generation-database", "none", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis_hooks.py"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), command).await.expect("done in time").expect("runs");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{said}");
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(output.status.success(), "Schemathesis found problems:\n{said}");
    app.stop().await;
}

/// The `schemathesis` command scripts/setup installs.
fn schemathesis() -> std::path::PathBuf {
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/schemathesis/bin/schemathesis");
    assert!(tools.exists(), "run scripts/setup: it installs Schemathesis into target/tools");
    tools
}
