//! What an operator sees of the API: `/metrics` counting exactly what
//! happened, one log line per request, and one trace id from a client's
//! `traceparent` to the worker's log lines about the job it submitted.

use std::collections::BTreeMap;
use std::time::Duration;

use api::auth::{Scope, Scopes};
use serde_json::json;
use shared::db::api_keys::KeyRate;
use shared::job::{Job, JobStatus};
use shared::queue::Message;
use shared::testing::scrape::{parses_as_prometheus, samples};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{
    TestApp, client_with, key, spawn_app_with, spawn_logged_api_process, spawn_logged_worker_process, wait_until,
};
use crate::submit::PgPoolOptionsUnused;

/// `/metrics` of `app`, checked to parse as Prometheus reads it.
async fn scrape(app: &TestApp) -> String {
    let response = reqwest::get(app.url("/metrics")).await.expect("scraped");
    assert_eq!(response.status(), 200, "/metrics needs no token");
    assert!(response.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/plain"));
    let text = response.text().await.expect("text");
    // The rejection and cache counters, the pool's gauges, and what has been counted since.
    assert!(parses_as_prometheus(&text) >= 3);
    text
}

/// How each series of `family` moved from `before` to `after` (only those that did).
fn moved(before: &str, after: &str, family: &str) -> BTreeMap<String, f64> {
    let was = samples(before, family);
    samples(after, family)
        .into_iter()
        .map(|(labels, now)| {
            let delta = now - was.get(&labels).copied().unwrap_or(0.0);
            (labels, delta)
        })
        .filter(|(_, delta)| *delta != 0.0)
        .collect()
}

fn series(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(labels, n)| ((*labels).to_owned(), *n)).collect()
}

/// A known mix of requests moves each API counter by exactly that mix:
/// requests by route template and status, submissions by queue and type,
/// refusals by reason, and reads of the job cache.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn metrics_count_exactly_the_requests_that_came(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app_with(connect, |settings| {
        settings.queues.get_mut("critical").expect("the critical queue").max_depth = 1;
    })
    .await;
    let reader = client_with(&key(&app.pool, "default", &[Scope::JobsRead]).await);
    let (_, slow) = api::auth::keys::create(
        &app.pool,
        "default",
        Some("slow"),
        Scopes::of(&[Scope::JobsRead]),
        Some(KeyRate { per_second: 1, burst: 1 }),
    )
    .await
    .expect("key");
    let slow = client_with(&slow);
    let noop = json!({"type": "noop"});
    let before = scrape(&app).await;

    let mut submitted = Vec::new();
    for _ in 0..3 {
        submitted.push(app.submit_ok(&noop).await);
    }
    let post = |client: &reqwest::Client, body: &'static str| {
        client.post(app.url("/v1/jobs")).header("content-type", "application/json").body(body).send()
    };
    let status = |response: Result<reqwest::Response, reqwest::Error>| response.expect("sent").status().as_u16();
    assert_eq!(status(post(&app.client, r#"{"type": "no-such-type"}"#).await), 422);
    assert_eq!(status(post(&app.client, "{").await), 400);
    assert_eq!(status(post(&reqwest::Client::new(), r#"{"type": "noop"}"#).await), 401);
    assert_eq!(status(post(&reader, r#"{"type": "noop"}"#).await), 403);
    let first = submitted[0].id;
    let job_url = app.url(&format!("/v1/jobs/{first}"));
    assert_eq!(status(slow.get(&job_url).send().await), 200);
    assert_eq!(status(slow.get(&job_url).send().await), 429);
    let raw_path = format!("/nope/{first}");
    assert_eq!(status(app.client.get(app.url(&raw_path)).send().await), 404);
    // `critical` holds one job; its depth is read once a second.
    let mut critical = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let response = app.submit(&json!({"type": "noop", "queue": "critical"})).await;
        if response.status() == 503 {
            break;
        }
        assert_eq!(response.status(), 202);
        critical.push(response.json::<Job>().await.expect("a job").id);
        assert!(tokio::time::Instant::now() < deadline, "the full queue never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = scrape(&app).await;

    let k = critical.len() as f64;
    assert_eq!(
        moved(&before, &after, "conveyor_api_requests_total"),
        series(&[
            (r#"method="GET",route="/metrics",status="200""#, 1.0),
            (r#"method="GET",route="/v1/jobs/{id}",status="200""#, 1.0),
            (r#"method="GET",route="/v1/jobs/{id}",status="429""#, 1.0),
            (r#"method="GET",route="unmatched",status="404""#, 1.0),
            (r#"method="POST",route="/v1/jobs",status="202""#, 3.0 + k),
            (r#"method="POST",route="/v1/jobs",status="400""#, 1.0),
            (r#"method="POST",route="/v1/jobs",status="401""#, 1.0),
            (r#"method="POST",route="/v1/jobs",status="403""#, 1.0),
            (r#"method="POST",route="/v1/jobs",status="422""#, 1.0),
            (r#"method="POST",route="/v1/jobs",status="503""#, 1.0),
        ])
    );
    assert_eq!(
        moved(&before, &after, "conveyor_api_request_duration_seconds_count"),
        series(&[
            (r#"method="GET",route="/metrics""#, 1.0),
            (r#"method="GET",route="/v1/jobs/{id}""#, 2.0),
            (r#"method="GET",route="unmatched""#, 1.0),
            (r#"method="POST",route="/v1/jobs""#, 8.0 + k),
        ])
    );
    assert_eq!(
        moved(&before, &after, "conveyor_api_requests_rejected_total"),
        series(&[
            (r#"reason="admission""#, 1.0),
            (r#"reason="auth""#, 2.0),
            (r#"reason="rate_limit""#, 1.0),
            (r#"reason="validation""#, 2.0),
        ])
    );
    // Every reason is there from the start, at 0 when nothing was refused for it.
    assert_eq!(samples(&before, "conveyor_api_requests_rejected_total").len(), 5);
    assert_eq!(
        moved(&before, &after, "conveyor_api_jobs_submitted_total"),
        series(&[(r#"queue="critical",type="noop""#, k), (r#"queue="default",type="noop""#, 3.0)])
    );
    // Labels are templates, never ids or raw paths.
    assert!(!after.contains(&first.to_string()) && !after.contains("/nope"), "{after}");
    let pool = samples(&after, "conveyor_api_db_connections");
    assert_eq!(pool.keys().cloned().collect::<Vec<_>>(), [r#"state="idle""#, r#"state="in_use""#]);
    assert!(pool.values().sum::<f64>() >= 1.0, "{pool:?}");

    // Reads: a job comes from memory once read, until it changes.
    app.spawn_worker(&["default"], 2);
    app.wait_terminal(first).await;
    // The outcome's notification may reach the API after the read that saw
    // it, and forget that read: read until the job stays in memory.
    let in_memory = || async {
        let response = app.client.get(app.url(&format!("/v1/jobs/{first}"))).send().await.expect("sent");
        response.headers().contains_key("age")
    };
    assert!(crate::helpers::wait_until(Duration::from_secs(5), in_memory).await, "the ended job is kept");
    let before = scrape(&app).await;
    for id in [first, first, critical[0], critical[0]] {
        assert_eq!(status(app.client.get(app.url(&format!("/v1/jobs/{id}"))).send().await), 200);
    }
    let after = scrape(&app).await;
    assert_eq!(
        moved(&before, &after, "conveyor_api_ended_cache_lookups_total"),
        series(&[(r#"result="hit""#, 3.0), (r#"result="miss""#, 1.0)])
    );
    app.stop().await;
}

/// The trace of a client's `traceparent` is continued by the API, whose span
/// is stored with the job and, as the trace is sampled, carried in its
/// message's headers.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_requests_span_is_stored_with_the_job_and_carried_in_its_message(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |_| ()).await;
    let sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response =
        app.client.post(app.url("/v1/jobs")).header("traceparent", sent).json(&json!({"type": "noop"})).send().await;
    let job: Job = response.expect("sent").json().await.expect("a job");
    let stored = shared::testing::db::traceparent(&app.pool, job.id).await.expect("a traceparent is stored");
    let fields: Vec<&str> = stored.split('-').collect();
    assert_eq!(fields[..2], ["00", "0af7651916cd43dd8448eb211c80319c"], "the client's trace: {stored}");
    assert_ne!(fields[2], "b7ad6b7169203331", "the API's own span, a child of the client's");
    assert_eq!(fields[3], "01");
    let (body, properties) = app.amqp.take("default").await.expect("a message");
    assert_eq!(serde_json::from_slice::<Message>(&body).expect("a message"), Message::RunJob { job_id: job.id });
    let headers = properties.headers().as_ref().expect("headers");
    let carried = headers.inner().get("traceparent").and_then(|value| value.as_long_string());
    assert_eq!(carried.map(ToString::to_string), Some(stored));

    // Without one (or with one that is not valid), a trace is started: not
    // sampled, as nobody records it, so it is stored but the message carries
    // no header (a headers table costs the broker dearly).
    for header in [None, Some("00-zz-b7-01")] {
        let mut request = app.client.post(app.url("/v1/jobs")).json(&json!({"type": "noop"}));
        if let Some(header) = header {
            request = request.header("traceparent", header);
        }
        let job: Job = request.send().await.expect("sent").json().await.expect("a job");
        let started = shared::testing::db::traceparent(&app.pool, job.id).await.expect("a traceparent is stored");
        let parsed = shared::trace::TraceParent::parse(&started).expect("a valid traceparent");
        assert!(!parsed.sampled() && !started.contains("0af7651916cd43dd8448eb211c80319c"), "{started}");
        let (_, properties) = app.amqp.take("default").await.expect("a message");
        assert!(properties.headers().is_none(), "{header:?}: {properties:?}");
    }
    app.stop().await;
}

/// From the HTTP request to the job's outcome in another process: the API's
/// line for the request and the worker's line for the job carry the trace id
/// the client sent, and no line carries the token.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn one_trace_id_from_the_clients_request_to_the_workers_log_line(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |_| ()).await;
    let (_api, address, api_logs) = spawn_logged_api_process(&app.settings).await;
    let (_worker, worker_logs) = spawn_logged_worker_process(&app.settings);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .client
        .post(format!("http://{address}/v1/jobs"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&json!({"type": "noop"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 202);
    let request_id = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let job: Job = response.json().await.expect("a job");
    let api_span = shared::testing::db::traceparent(&app.pool, job.id).await.expect("stored");
    let api_span_id = api_span.split('-').nth(2).expect("a span id").to_owned();

    let line = api_logs
        .wait_for_line(Duration::from_secs(10), 0, "the request's line", |line| {
            line["target"] == "conveyor::http" && line["trace_id"] == trace
        })
        .await;
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["route"], "/v1/jobs");
    assert_eq!(line["status"], 202);
    assert_eq!(line["tenant"], "default");
    assert_eq!(line["request_id"], request_id.as_str());
    assert!(line["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{line}");

    let outcome = worker_logs
        .wait_for_line(Duration::from_secs(20), 0, "the job's outcome", |line| {
            line["message"] == "job finished" && line["span"]["job.id"] == job.id.to_string().as_str()
        })
        .await;
    assert_eq!(outcome["span"]["trace_id"], trace, "{outcome}");
    assert_eq!(outcome["span"]["parent_span_id"], api_span_id.as_str(), "{outcome}");
    assert_eq!(outcome["span"]["request_id"], request_id.as_str(), "{outcome}");
    let done =
        wait_until(Duration::from_secs(5), || async { app.get_job(job.id).await.status == JobStatus::Succeeded }).await;
    assert!(done);
    for logs in [&api_logs, &worker_logs] {
        assert!(!logs.raw_since(0).contains(&app.token), "a token was logged");
    }
    app.stop().await;
}

fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root")
}

/// `promtool` as `scripts/setup` unpacks it (or `$PROMTOOL`).
fn promtool(args: &[&str]) -> String {
    let tool = std::env::var_os("PROMTOOL").map_or_else(|| root().join("target/tools/promtool"), Into::into);
    let output = std::process::Command::new(&tool)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{} runs (scripts/setup unpacks it): {e}", tool.display()));
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {args:?} failed:\n{said}");
    said
}

/// The shipped Prometheus configuration and alert rules are valid, and each
/// alert fires on the series of deploy/alerts.test.yml that should wake
/// someone, and stays quiet on a healthy platform's.
#[test]
fn prometheus_config_and_alerts_pass_promtool() {
    promtool(&["check", "config", "deploy/prometheus.yml"]);
    let rules = promtool(&["check", "rules", "deploy/alerts.yml"]);
    assert!(rules.contains("8 rules found"), "{rules}");
    promtool(&["test", "rules", "deploy/alerts.test.yml"]);
}

/// The `conveyor_…` names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("conveyor_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Every metric the dashboard and the alerts query exists in a real scrape
/// of an API and a worker that have done some work: a renamed metric breaks
/// this test, not a dashboard nobody looks at until the night it matters.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn every_metric_the_dashboard_and_alerts_query_is_scraped(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let worker_port = crate::helpers::free_port();
    let mut app = spawn_app_with(connect, |settings| {
        settings.jobs.retry_backoff_base_ms = 10;
        settings.jobs.retry_backoff_cap_ms = 20;
    })
    .await;
    let mut worker_settings = app.settings.clone();
    worker_settings.worker.http_port = worker_port;
    app.spawn_worker_with(worker_settings, &["default"], 4);
    let ok = app.submit_ok(&json!({"type": "noop"})).await;
    let failed = app.submit_ok(&json!({"type": "fail", "payload": {"times": 5}, "max_attempts": 2})).await;
    app.wait_terminal(ok.id).await;
    assert_eq!(app.wait_terminal(failed.id).await.status, JobStatus::Failed);
    let worker_metrics = format!("http://127.0.0.1:{worker_port}/metrics");
    let scrape_worker = async || reqwest::get(&worker_metrics).await.expect("scraped").text().await.expect("text");
    let led = wait_until(Duration::from_secs(10), || async {
        scrape_worker().await.contains("conveyor_outbox_oldest_age_seconds")
    })
    .await;
    assert!(led, "the worker leads and exports the platform's gauges");
    let scraped = format!("{}\n{}", scrape(&app).await, scrape_worker().await);
    let exported: std::collections::BTreeSet<&str> = scraped
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/conveyor.json")).expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queried: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            let title = panel["title"].as_str().unwrap_or_default();
            queried.extend(metric_names(expr).into_iter().map(|name| (name, format!("panel {title:?}"))));
        }
    }
    let panels = dashboard["panels"].as_array().map_or(0, Vec::len);
    let alerts = std::fs::read_to_string(root().join("deploy/alerts.yml")).expect("the alerts");
    queried.extend(metric_names(&alerts).into_iter().map(|name| (name, "deploy/alerts.yml".to_owned())));
    assert!(panels >= 8 && queried.len() >= 20, "{panels} panels, {} queries", queried.len());
    let missing: Vec<_> = queried.iter().filter(|(name, _)| !exported.contains(name.as_str())).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\nexported: {exported:?}");
    app.stop().await;
}

/// With `telemetry.otlp_endpoint`, the API's span for a request and the
/// worker's span for the job's attempt reach an OTLP collector (a fake one
/// here, decoding what it gets as a real one does) with the ids of the logs:
/// the worker's span a child of the API's, the API's a child of the client's.
#[cfg(feature = "otlp")]
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn spans_reach_the_otlp_collector_as_one_trace(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message as _;

    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<ExportTraceServiceRequest>::new()));
    let collector = {
        let received = actix_web::web::Data::new(received.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = listener.local_addr().expect("its address").port();
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new().app_data(received.clone()).route(
                "/v1/traces",
                actix_web::web::post().to(
                    |body: actix_web::web::Bytes,
                     received: actix_web::web::Data<
                        std::sync::Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>,
                    >| async move {
                        let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        received.lock().expect("lock").push(request);
                        actix_web::HttpResponse::Ok().content_type("application/x-protobuf").body(Vec::new())
                    },
                ),
            )
        })
        .workers(1)
        .listen(listener)
        .expect("listens")
        .run();
        tokio::spawn(server);
        format!("http://127.0.0.1:{port}")
    };
    let mut app = spawn_app_with(connect, |settings| settings.telemetry.otlp_endpoint = collector).await;
    app.spawn_worker(&["default"], 2);
    let client_trace = "0af7651916cd43dd8448eb211c80319c";
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .header("traceparent", format!("00-{client_trace}-b7ad6b7169203331-01"))
        .json(&json!({"type": "noop"}))
        .send()
        .await
        .expect("sent");
    let job: Job = response.json().await.expect("a job");
    let untraced = app.submit_ok(&json!({"type": "noop"})).await;
    app.wait_terminal(job.id).await;
    app.wait_terminal(untraced.id).await;

    // (name, trace id, span id, parent span id, attributes) of every span received.
    type Seen = (String, String, String, String, BTreeMap<String, String>);
    let spans = || -> Vec<Seen> {
        let hex = |bytes: &[u8]| shared::hex(bytes);
        let received = received.lock().expect("lock");
        let mut seen = Vec::new();
        for request in received.iter() {
            for resource in &request.resource_spans {
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        let attributes = span
                            .attributes
                            .iter()
                            .map(|kv| {
                                let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Any::StringValue(s)) => s.clone(),
                                    Some(Any::IntValue(n)) => n.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (kv.key.clone(), value)
                            })
                            .collect();
                        seen.push((
                            span.name.clone(),
                            hex(&span.trace_id),
                            hex(&span.span_id),
                            hex(&span.parent_span_id),
                            attributes,
                        ));
                    }
                }
            }
        }
        seen
    };
    let job_span = |id: uuid::Uuid| {
        spans().into_iter().find(|(name, .., attributes)| {
            name == "job noop" && attributes.get("conveyor.job.id") == Some(&id.to_string())
        })
    };
    let arrived =
        wait_until(Duration::from_secs(10), || async { job_span(job.id).is_some() && job_span(untraced.id).is_some() })
            .await;
    assert!(arrived, "the worker's spans never arrived: {:?}", spans());

    // The client's trace: client span → the API's span (stored with the job) → the attempt.
    let stored = shared::testing::db::traceparent(&app.pool, job.id).await.expect("stored");
    let api_span_id = stored.split('-').nth(2).expect("a span id").to_owned();
    let request = spans()
        .into_iter()
        .find(|(name, trace, ..)| name == "POST /v1/jobs" && trace == client_trace)
        .expect("the API's span for the request");
    assert_eq!((request.2.as_str(), request.3.as_str()), (api_span_id.as_str(), "b7ad6b7169203331"));
    assert_eq!(request.4["http.route"], "/v1/jobs");
    assert_eq!(request.4["http.response.status_code"], "202");
    let attempt = job_span(job.id).expect("the attempt's span");
    assert_eq!((attempt.1.as_str(), attempt.3.as_str()), (client_trace, api_span_id.as_str()));
    assert_eq!(attempt.4["conveyor.job.outcome"], "succeeded");
    assert_eq!(attempt.4["messaging.destination.name"], "default");

    // A request without a trace starts one, recorded since spans are exported.
    let stored = shared::testing::db::traceparent(&app.pool, untraced.id).await.expect("stored");
    let started = shared::trace::TraceParent::parse(&stored).expect("valid");
    assert!(started.sampled(), "a trace started by a process that records spans is sampled: {stored}");
    let attempt = job_span(untraced.id).expect("the attempt's span");
    assert_eq!(attempt.1, started.trace_id());
    let root =
        spans().into_iter().find(|(_, trace, span, ..)| *trace == started.trace_id() && *span == started.span_id());
    assert_eq!(root.map(|root| root.3), Some(String::new()), "the API's span is the trace's root");
    app.stop().await;
}
