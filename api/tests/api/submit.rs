//! Submitting and fetching jobs.

use std::time::Duration;

use serde_json::json;
use shared::job::JobStatus;
use shared::queue::Message;
use shared::testing::db;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{spawn_app, wait_until};

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_submitted_job_is_committed_and_published_before_202(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;

    let response = app.submit(&json!({"type": "echo", "payload": {"x": 1}})).await;

    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().expect("ascii").to_owned();
    let job: shared::job::Job = response.json().await.expect("job body");
    assert_eq!(location, format!("/v1/jobs/{}", job.id));
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!((job.kind.as_str(), job.queue.as_str(), job.tenant.as_str()), ("echo", "default", "default"));
    assert_eq!(job.payload.value(), json!({"x": 1}));
    assert_eq!((job.priority, job.attempt, job.max_attempts, job.timeout_seconds), (0, 0, 5, 300));
    // Durable at 202: the row is committed and the message is already in
    // RabbitMQ (confirmed; no worker is running to take it).
    assert_eq!(db::count(&app.pool, None, Some(&[job.id])).await, 1);
    assert_eq!(app.amqp.depth("default").await, 1);
    // The confirm is then recorded (in a batch), taking the job out of the outbox.
    let recorded =
        wait_until(Duration::from_secs(5), || async { db::outbox_len(&app.pool, Some(job.id)).await == 0 }).await;
    assert!(recorded, "the confirmed publish was never recorded");
    assert_eq!(app.get_job(job.id).await, job);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_message_is_persistent_names_the_job_and_carries_its_priority(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "noop", "priority": 7})).await;
    let (body, properties) = app.amqp.take("default").await.expect("a message");
    let message: Message = serde_json::from_slice(&body).expect("a Conveyor message");
    assert_eq!(message, Message::RunJob { job_id: job.id });
    // Persistent: it survives a broker restart (with the durable queue).
    assert_eq!(properties.delivery_mode(), &Some(2));
    assert_eq!(properties.priority(), &Some(7));
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_request_id_is_echoed_and_stored_on_the_job(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;

    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .header("X-Request-Id", "req-abc-123")
        .json(&json!({"type": "noop"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    let job: shared::job::Job = response.json().await.expect("job body");
    assert_eq!(job.request_id.as_deref(), Some("req-abc-123"));

    // Without one, the API makes one up, on errors too.
    let response = app.client.get(app.url("/v1/jobs/not-a-uuid")).send().await.expect("sent");
    assert_eq!(response.status(), 400);
    assert!(!response.headers()["x-request-id"].is_empty());
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_for_later_is_scheduled_and_not_published(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let app = spawn_app(connect).await;

    let delayed = app.submit_ok(&json!({"type": "noop", "delay_seconds": 3600})).await;
    let at = app.submit_ok(&json!({"type": "noop", "run_at": "2999-01-01T00:00:00Z"})).await;
    let past = app.submit_ok(&json!({"type": "noop", "run_at": "2000-01-01T00:00:00Z"})).await;

    assert_eq!(delayed.status, JobStatus::Scheduled);
    let wait = delayed.run_at - delayed.created_at;
    assert!((3599..=3601).contains(&wait.num_seconds()), "run_at is now + delay: {wait}");
    assert_eq!(at.status, JobStatus::Scheduled);
    assert_eq!(at.run_at.to_rfc3339(), "2999-01-01T00:00:00+00:00");
    assert_eq!(past.status, JobStatus::Queued, "a run_at in the past means now");
    assert_eq!(app.amqp.depth("default").await, 1, "only the due job was published");
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn submission_options_are_stored_and_the_job_goes_to_its_queue(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app(connect).await;

    let job = app
        .submit_ok(&json!({
            "type": "sleep", "payload": {"ms": 1}, "queue": "critical",
            "priority": 7, "max_attempts": 2, "timeout_seconds": 9
        }))
        .await;

    assert_eq!((job.queue.as_str(), job.priority, job.max_attempts, job.timeout_seconds), ("critical", 7, 2, 9));
    assert_eq!(app.amqp.depth("critical").await, 1);
    assert_eq!(app.amqp.depth("default").await, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn higher_priority_jobs_run_first_within_a_queue(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    let mut submitted = Vec::new();
    for priority in [0, 3, 9, 1, 9, 5] {
        let job = app.submit_ok(&json!({"type": "noop", "priority": priority})).await;
        submitted.push(job.id);
    }

    // One slot: the worker takes one message at a time, so start order is the queue's order.
    app.spawn_worker(&["default"], 1);
    assert!(wait_until(Duration::from_secs(30), || async { app.count_in(JobStatus::Succeeded).await == 6 }).await);

    assert_eq!(db::priorities_by_start(&app.pool).await, [9, 9, 5, 3, 1, 0]);
    app.stop().await;
}

/// `#[sqlx::test]` hands a pool's options and the connect options; the app
/// builds its own pool from the latter.
pub type PgPoolOptionsUnused = sqlx::postgres::PgPoolOptions;
