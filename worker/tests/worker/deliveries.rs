//! The executor with deliveries made in the test, no broker involved: what it
//! does with each kind of message, and how it settles it.

use serde_json::json;
use shared::db::jobs;
use shared::job::JobStatus;
use shared::kinds::Resources;
use shared::outbox::Outbox;
use shared::queue::{Delivery, Message, Settlement};
use shared::testing::{db, new_job};
use sqlx::postgres::PgConnectOptions;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use worker::execute::Executor;

use crate::helpers::Harness;

fn executor(h: &Harness) -> Executor {
    let tasks = TaskTracker::new();
    let outbox = Outbox::new(h.publisher.clone(), h.pool.clone(), &tasks);
    let resources = Resources::new(&h.settings.jobs).expect("valid settings");
    let limits = worker::execute::Limits { lease_seconds: 30, max_running: 0, finishing: 16 };
    Executor::new(Uuid::now_v7(), h.pool.clone(), outbox, h.settings.jobs.clone(), limits, resources, &tasks)
}

fn run_job(id: Uuid) -> Vec<u8> {
    serde_json::to_vec(&Message::RunJob { job_id: id }).expect("serializes")
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn each_delivery_is_run_dropped_or_dead_lettered_and_settled_once(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    let executor = executor(&h);
    let job = jobs::insert(&h.pool, &new_job("echo", json!({"n": 1}))).await.expect("insert").id;

    // A queued job's message: claimed, acknowledged, run to its outcome.
    let (delivery, settled) = Delivery::recorded(run_job(job), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::Ack));
    assert_eq!(jobs::status(&h.pool, job).await.expect("query"), Some(JobStatus::Succeeded));

    // The same message again (a duplicate): the job is not queued any more, so it is dropped.
    let (delivery, settled) = Delivery::recorded(run_job(job), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::Ack));
    assert_eq!(db::attempts(&h.pool, Some(&[job])).await, [(1, 1)].into(), "it ran once");

    // A message for a job that does not exist, and one that is not a message at all: for a human.
    let (delivery, settled) = Delivery::recorded(run_job(Uuid::now_v7()), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::DeadLetter));
    let (delivery, settled) = Delivery::recorded(b"{\"kind\": \"mystery\"}".to_vec(), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::DeadLetter));
    h.close().await;
}

/// A message naming several jobs (a batch's): each job still queued is
/// claimed and run, the others skipped, and the message settled once.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_message_of_several_jobs_runs_each_queued_one_and_is_settled_once(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    let executor = executor(&h);
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(jobs::insert(&h.pool, &new_job("echo", json!({"n": n}))).await.expect("insert").id);
    }
    let run_jobs = |job_ids: Vec<Uuid>| serde_json::to_vec(&Message::RunJobs { job_ids }).expect("serializes");

    // The first job ran already (its message was a duplicate); a job that does not exist rides along.
    let (delivery, settled) = Delivery::recorded(run_job(ids[0]), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::Ack));
    let (delivery, settled) = Delivery::recorded(run_jobs(vec![ids[0], ids[1], Uuid::now_v7(), ids[2]]), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::Ack));
    assert_eq!(db::attempts(&h.pool, Some(&ids)).await, [(1, 3)].into(), "each ran once");
    for id in &ids {
        assert_eq!(jobs::status(&h.pool, *id).await.expect("query"), Some(JobStatus::Succeeded));
    }

    // None of its jobs exists, or it names none: for a human.
    let (delivery, settled) = Delivery::recorded(run_jobs(vec![Uuid::now_v7(), Uuid::now_v7()]), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::DeadLetter));
    let (delivery, settled) = Delivery::recorded(run_jobs(Vec::new()), "default");
    executor.handle(delivery).await;
    assert_eq!(settled.await, Ok(Settlement::DeadLetter));
    h.close().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_cancel_heard_before_its_job_runs_here_still_stops_it(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    let executor = executor(&h);
    let job = jobs::insert(&h.pool, &new_job("sleep", json!({"ms": 60_000}))).await.expect("insert").id;
    // The cancel notification comes in between the job's claim and its
    // registration here (simulated: before the delivery is handled at all).
    executor.cancel(job);
    let (delivery, _settled) = Delivery::recorded(run_job(job), "default");
    let handled = tokio::time::timeout(std::time::Duration::from_secs(10), executor.handle(delivery)).await;
    assert!(handled.is_ok(), "the job ran on, its cancel lost");
    assert_eq!(jobs::status(&h.pool, job).await.expect("query"), Some(JobStatus::Cancelled));
    h.close().await;
}
