//! `POST /v1/jobs/batch`: many submissions in one request, all accepted or
//! none, in order, with the single submission's auth and idempotency.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};
use shared::job::{Job, JobStatus};
use shared::queue::Message;
use sqlx::postgres::PgConnectOptions;

use crate::errors::fields;
use crate::helpers::{TestApp, client_with, key, spawn_app, wait_until, waiting_for_jobs_table};
use crate::submit::PgPoolOptionsUnused;
use api::auth::Scope;

async fn post_batch(app: &TestApp, client: &reqwest::Client, body: &Value) -> reqwest::Response {
    client.post(app.url("/v1/jobs/batch")).json(body).send().await.expect("request sent")
}

async fn jobs_of(response: reqwest::Response) -> Vec<Job> {
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("a JSON body");
    serde_json::from_value(body["jobs"].clone()).expect("a list of jobs")
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_batch_is_committed_published_and_answered_in_order(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    let batch = json!({"jobs": [
        {"type": "echo", "payload": {"n": 0}},
        {"type": "noop", "queue": "critical", "priority": 5},
        {"type": "echo", "payload": {"n": 2}},
        {"type": "noop", "delay_seconds": 3600},
    ]});

    let jobs = jobs_of(post_batch(&app, &app.client, &batch).await).await;

    let kinds: Vec<_> = jobs.iter().map(|job| job.kind.as_str()).collect();
    assert_eq!(kinds, ["echo", "noop", "echo", "noop"]);
    assert_eq!(jobs[0].payload.value(), json!({"n": 0}));
    assert_eq!(jobs[2].payload.value(), json!({"n": 2}));
    assert_eq!((jobs[1].queue.as_str(), jobs[1].priority), ("critical", 5));
    let statuses: Vec<_> = jobs.iter().map(|job| job.status).collect();
    assert_eq!(statuses, [JobStatus::Queued, JobStatus::Queued, JobStatus::Queued, JobStatus::Scheduled]);
    // Committed and published before the answer (the scheduled one waits for
    // its time); the two jobs of `default` share a message.
    assert_eq!(app.job_count().await, 4);
    assert_eq!((app.amqp.depth("default").await, app.amqp.depth("critical").await), (1, 1));

    app.spawn_worker(&["default", "critical"], 4);
    for job in &jobs[..3] {
        assert_eq!(app.wait_terminal(job.id).await.status, JobStatus::Succeeded);
    }
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn one_bad_job_refuses_the_whole_batch_naming_each_problem(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let batch = json!({"jobs": [
        {"type": "noop"},
        {"type": "sleep", "payload": {"ms": "long"}},
        {"type": "noop"},
        {"type": "noop", "queue": "nowhere", "priority": 10},
    ]});

    let response = post_batch(&app, &app.client, &batch).await;

    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("problem+json");
    assert_eq!(fields(&problem), ["jobs[1].payload.ms", "jobs[3].queue", "jobs[3].priority"], "{problem}");
    assert_eq!(app.job_count().await, 0, "nothing written");
    assert_eq!(app.amqp.depth("default").await, 0, "nothing published");

    // A job of the wrong shape is named by its place too.
    let response =
        post_batch(&app, &app.client, &json!({"jobs": [{"type": "noop"}, {"type": "noop", "colour": 1}]})).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("problem+json");
    assert!(fields(&problem).iter().any(|field| field.starts_with("jobs[1]")), "{problem}");
    assert_eq!(app.job_count().await, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_batch_holds_one_to_a_thousand_jobs(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    for count in [0, 1001] {
        let batch = json!({"jobs": vec![json!({"type": "noop"}); count]});
        let response = post_batch(&app, &app.client, &batch).await;
        assert_eq!(response.status(), 422, "{count} jobs");
        let problem: Value = response.json().await.expect("problem+json");
        assert_eq!(fields(&problem), ["jobs"], "{problem}");
    }
    assert_eq!(app.job_count().await, 0);

    let batch = json!({"jobs": vec![json!({"type": "noop"}); 1000]});
    let jobs = jobs_of(post_batch(&app, &app.client, &batch).await).await;
    assert_eq!(jobs.len(), 1000);
    assert_eq!(app.job_count().await, 1000);
    // Sixteen to a message (amqp.jobs_per_message): RabbitMQ's cost is per message.
    assert_eq!(app.amqp.depth("default").await, 63);
    let mut carried = Vec::new();
    while let Some((body, _)) = app.amqp.take("default").await {
        let message: Message = serde_json::from_slice(&body).expect("a job message");
        assert!(message.job_ids().len() <= 16, "{message:?}");
        carried.extend_from_slice(message.job_ids());
    }
    let mut submitted: Vec<_> = jobs.iter().map(|job| job.id).collect();
    carried.sort();
    submitted.sort();
    assert_eq!(carried, submitted, "every job in exactly one message");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_batch_needs_the_write_scope_and_sees_its_own_tenant(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let batch = json!({"jobs": [{"type": "noop"}]});
    let anonymous = reqwest::Client::new();
    assert_eq!(post_batch(&app, &anonymous, &batch).await.status(), 401);
    let reader = client_with(&key(&app.pool, "default", &[Scope::JobsRead]).await);
    assert_eq!(post_batch(&app, &reader, &batch).await.status(), 403);
    assert_eq!(app.job_count().await, 0);

    let writer = client_with(&key(&app.pool, "acme", &[Scope::JobsWrite]).await);
    let jobs = jobs_of(post_batch(&app, &writer, &batch).await).await;
    assert_eq!(jobs[0].tenant, "acme");

    let response = app.client.get(app.url("/v1/jobs/batch")).send().await.expect("sent");
    assert_eq!(response.status(), 405);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_batch_retried_with_its_key_is_replayed(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    let batch = json!({"jobs": [{"type": "noop"}, {"type": "echo", "payload": {"a": 1}}]});
    let keyed = |body: &Value| {
        app.client.post(app.url("/v1/jobs/batch")).header("Idempotency-Key", "batch-1").json(body).send()
    };

    let first = jobs_of(keyed(&batch).await.expect("sent")).await;
    let again = keyed(&batch).await.expect("sent");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = jobs_of(again).await;
    let ids = |jobs: &[Job]| jobs.iter().map(|job| job.id).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(app.job_count().await, 2);

    let different = json!({"jobs": [{"type": "noop"}]});
    assert_eq!(keyed(&different).await.expect("sent").status(), 409);
    // A single submission is a different request from a batch of one.
    let single = app.client.post(app.url("/v1/jobs")).header("Idempotency-Key", "batch-1");
    assert_eq!(single.json(&json!({"type": "noop"})).send().await.expect("sent").status(), 409);
    assert_eq!(app.job_count().await, 2);
    app.stop().await;
}

/// Single submissions that arrive together are inserted in one statement and
/// share messages the way a batch's jobs do: up to `amqp.jobs_per_message`
/// to a message, a message's jobs of one queue, priority and lane, and a
/// request whose trace is sampled in a message of its own (it carries the
/// trace in its headers).
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn single_submissions_made_together_share_messages(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;
    // Hold the inserts back, so that the submissions pile up behind the first.
    let mut lock = app.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE jobs IN SHARE MODE").execute(&mut *lock).await.expect("lock");
    let traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let requests: Vec<_> = (0..41)
        .map(|i| {
            let mut request = app.client.post(app.url("/v1/jobs"));
            request = match i {
                40 => request.header("traceparent", traced).json(&json!({"type": "noop"})),
                i if i % 4 == 0 => request.json(&json!({"type": "noop", "priority": 5})),
                _ => request.json(&json!({"type": "noop"})),
            };
            tokio::spawn(request.send())
        })
        .collect();
    let waiting = || async { waiting_for_jobs_table(&app.pool).await > 0 };
    assert!(wait_until(Duration::from_secs(10), waiting).await, "an insert waits for the lock");
    // The other requests reach the inserter meanwhile (a few ms each).
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.rollback().await.expect("unlock");

    let mut jobs = HashMap::new();
    for request in requests {
        let response = request.await.expect("joined").expect("sent");
        assert_eq!(response.status(), 202);
        let job: Job = response.json().await.expect("a job");
        jobs.insert(job.id, job);
    }

    let messages = app.amqp.depth("default").await;
    let mut carried = Vec::new();
    let mut sampled = Vec::new();
    while let Some((body, properties)) = app.amqp.take("default").await {
        let ids = serde_json::from_slice::<Message>(&body).expect("a job message").job_ids().to_vec();
        assert!(ids.len() <= 16, "at most amqp.jobs_per_message: {ids:?}");
        let priorities: HashSet<_> = ids.iter().map(|id| jobs[id].priority).collect();
        assert_eq!(priorities.len(), 1, "one priority to a message: {ids:?}");
        if properties.headers().as_ref().is_some_and(|headers| headers.inner().contains_key("traceparent")) {
            sampled.push(ids.clone());
        }
        carried.extend(ids);
    }
    carried.sort();
    let mut submitted: Vec<_> = jobs.keys().copied().collect();
    submitted.sort();
    assert_eq!(carried, submitted, "every job in exactly one message");
    assert_eq!(sampled.len(), 1, "the sampled request's message alone carries its trace");
    assert_eq!(sampled[0].len(), 1, "and only its job: {sampled:?}");
    // 41 jobs: without sharing, 41 messages; together, at least four (one
    // blocked first, then 30 of priority 0 in two, 10 of priority 5 in one,
    // the traced one alone).
    assert!(messages < 41, "submissions made together share messages: {messages} messages");
    app.stop().await;
}
