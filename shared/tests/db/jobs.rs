//! Moves of a job: each a guarded statement, fenced by the lease of the run
//! that makes it; a refused value fails its own job only; requeue by ids is
//! all or nothing.

use std::time::Duration;

use serde_json::json;
use shared::db::{self, jobs};
use shared::job::{Cancel, FailureKind, JobFailure, JobStatus, Outcome, RawJson, RequeueRefused};
use shared::testing::{db as inspect, lead, new_job};
use uuid::Uuid;

fn raw(value: serde_json::Value) -> RawJson {
    RawJson::of(&value).expect("json")
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_postgres_refuses_fails_alone_not_its_whole_batch(pool: sqlx::PgPool) {
    // Validation keeps such values out of the API; this is the safety net under it.
    let good = new_job("echo", json!({"n": 1}));
    let refused = new_job("echo", json!({"s": "x\u{0}y"}));
    let also_good = new_job("echo", json!({"n": 2}));
    let each = jobs::insert_each_if_refused(&pool, &[good.clone(), refused, also_good.clone()]).await.expect("batch");
    let ok: Vec<bool> = each.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, false, true]);
    assert!(matches!(each[1], Err(db::Error::Refused(_))), "{:?}", each[1]);
    assert_eq!(inspect::count(&pool, None, None).await, 2);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_whose_cancel_was_requested_is_never_retried(pool: sqlx::PgPool) {
    let pool = &pool;
    let worker = Uuid::now_v7();
    let running = || async {
        let job = jobs::insert(pool, &new_job("noop", json!({}))).await.expect("insert");
        let claimed = jobs::claim(pool, job.id, worker, 30).await.expect("claim").expect("queued");
        assert!(matches!(jobs::cancel(pool, "default", job.id).await.expect("cancel"), Cancel::Requested(_)));
        claimed
    };
    let status_of = |id| async move { jobs::status(pool, id).await.expect("status").expect("exists") };

    // Its handler failed retryably instead of stopping.
    let failed = running().await;
    let error = JobFailure { message: "boom".to_owned(), kind: FailureKind::Retryable, attempt: failed.attempt };
    let outcome = Outcome::Retrying { error, retry_at: chrono::Utc::now() };
    assert!(jobs::finish(pool, failed.lease(), &outcome).await.expect("finish"));
    assert_eq!(status_of(failed.id).await, JobStatus::Cancelled);

    // Its worker was lost.
    let lost = running().await;
    inspect::expire_lease(pool, lost.id).await;
    let leader = lead(pool).await;
    assert_eq!(jobs::rescue_expired(pool, leader, 10).await.expect("rescue"), 1);
    assert_eq!(status_of(lost.id).await, JobStatus::Cancelled);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_zombie_workers_late_writes_are_rejected(pool: sqlx::PgPool) {
    let pool = &pool;
    let job = jobs::insert(pool, &new_job("echo", json!({"v": 1}))).await.expect("insert");
    let (zombie_worker, live_worker) = (Uuid::now_v7(), Uuid::now_v7());

    // Worker Z claims the job, then goes silent: its lease expires and the job is rescued.
    let z = jobs::claim(pool, job.id, zombie_worker, 30).await.expect("claim").expect("claimed");
    inspect::expire_lease(pool, job.id).await;
    let leader = lead(pool).await;
    assert_eq!(jobs::rescue_expired(pool, leader, 10).await.expect("rescue"), 1);
    assert_eq!(jobs::queue_due(pool, leader, 10).await.expect("due").len(), 1);
    // Worker L claims it again and finishes it.
    let l = jobs::claim(pool, job.id, live_worker, 30).await.expect("claim").expect("claimed");
    assert_eq!((z.attempt, l.attempt), (1, 2), "the lost attempt counts");
    let (zombie, live) = (z.lease(), l.lease());

    // Z wakes up: nothing it writes lands, before or after L's outcome.
    assert!(!jobs::set_progress(pool, zombie, 50).await.expect("query"));
    assert!(!jobs::finish(pool, zombie, &Outcome::Succeeded(raw(json!("zombie")))).await.expect("query"));
    assert!(jobs::renew(pool, &[zombie], 30).await.expect("query").is_empty(), "Z learns its lease is gone");
    assert!(jobs::finish(pool, live, &Outcome::Succeeded(raw(json!("live")))).await.expect("query"));
    assert!(!jobs::finish(pool, zombie, &Outcome::Succeeded(raw(json!("zombie")))).await.expect("query"));
    assert!(jobs::release(pool, zombie).await.expect("query").is_none());

    let done = jobs::get(pool, "default", job.id).await.expect("query").expect("exists");
    assert_eq!(
        (done.status, done.attempt, done.result.map(|r| r.value())),
        (JobStatus::Succeeded, 2, Some(json!("live")))
    );
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_requeue_by_ids_moves_all_or_none(pool: sqlx::PgPool) {
    let pool = &pool;
    let failed = |status| async move {
        let job = jobs::insert(pool, &new_job("noop", json!({}))).await.expect("insert");
        let claimed = jobs::claim(pool, job.id, Uuid::now_v7(), 30).await.expect("claim").expect("queued");
        let error = JobFailure { message: "boom".to_owned(), kind: FailureKind::Permanent, attempt: 1 };
        let outcome =
            if status == JobStatus::Failed { Outcome::Failed(error) } else { Outcome::Succeeded(raw(json!({}))) };
        assert!(jobs::finish(pool, claimed.lease(), &outcome).await.expect("finish"));
        job.id
    };
    let (a, b, done) =
        (failed(JobStatus::Failed).await, failed(JobStatus::Failed).await, failed(JobStatus::Succeeded).await);
    let before = inspect::snapshot(pool).await;

    let missing = Uuid::now_v7();
    assert_eq!(
        jobs::requeue_exactly(pool, &[a, missing], false).await.expect("query"),
        Err(RequeueRefused::Missing(missing))
    );
    assert_eq!(
        jobs::requeue_exactly(pool, &[a, done, b], false).await.expect("query"),
        Err(RequeueRefused::NotEnded(done, JobStatus::Succeeded))
    );
    assert_eq!(jobs::requeue_exactly(pool, &[a, b], true).await.expect("query"), Ok(Vec::new()), "a dry run");
    assert_eq!(inspect::snapshot(pool).await, before, "refusals and dry runs change nothing");

    let moved = jobs::requeue_exactly(pool, &[a, b], false).await.expect("query").expect("both failed");
    assert_eq!(moved.len(), 2);
    assert_eq!(inspect::count(pool, Some(JobStatus::Queued), Some(&[a, b])).await, 2);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_cancel_of_a_running_job_wakes_its_worker(pool: sqlx::PgPool) {
    let job = jobs::insert(&pool, &new_job("noop", json!({}))).await.expect("insert");
    jobs::claim(&pool, job.id, Uuid::now_v7(), 30).await.expect("claim").expect("queued");
    let mut listener = db::notify::listen(&pool, db::CANCEL_CHANNEL).await.expect("listen");
    assert!(matches!(jobs::cancel(&pool, "default", job.id).await.expect("cancel"), Cancel::Requested(_)));
    let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("in time").expect("recv");
    assert_eq!(heard, Some(job.id.to_string()));
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_job_handed_back_at_shutdown_after_a_cancel_request_ends_cancelled(pool: sqlx::PgPool) {
    let pool = &pool;
    let job = jobs::insert(pool, &new_job("noop", json!({}))).await.expect("insert").id;
    let claimed = jobs::claim(pool, job, Uuid::now_v7(), 30).await.expect("claim").expect("queued");
    inspect::clear_outbox(pool).await;
    assert!(matches!(jobs::cancel(pool, "default", job).await.expect("cancel"), Cancel::Requested(_)));
    // Its worker stops before it has told the handler.
    assert_eq!(jobs::release(pool, claimed.lease()).await.expect("release"), Some(jobs::Released::Cancelled));
    let done = jobs::get(pool, "default", job).await.expect("query").expect("exists");
    assert_eq!((done.status, done.error.map(|e| e.kind)), (JobStatus::Cancelled, Some(FailureKind::Cancelled)));
    assert_eq!(inspect::outbox_len(pool, Some(job)).await, 0, "not published again");

    // Without a cancel request, a hand-back queues it again, the attempt not counted.
    let other = jobs::insert(pool, &new_job("noop", json!({}))).await.expect("insert").id;
    let claimed = jobs::claim(pool, other, Uuid::now_v7(), 30).await.expect("claim").expect("queued");
    assert!(matches!(jobs::release(pool, claimed.lease()).await.expect("release"), Some(jobs::Released::Queued(_))));
    let back = jobs::get(pool, "default", other).await.expect("query").expect("exists");
    assert_eq!((back.status, back.attempt), (JobStatus::Queued, 0));
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_outcome_postgres_cannot_store_is_refused_not_unavailable(pool: sqlx::PgPool) {
    // What the worker relies on to fail such a job for good instead of retrying the write.
    let job = jobs::insert(&pool, &new_job("noop", json!({}))).await.expect("insert").id;
    let claimed = jobs::claim(&pool, job, Uuid::now_v7(), 30).await.expect("claim").expect("queued");
    let unstorable = RawJson::from_text(r#"{"text": "a\u0000b"}"#.to_owned()).expect("json");
    let written = jobs::finish(&pool, claimed.lease(), &Outcome::Succeeded(unstorable)).await;
    assert!(matches!(written, Err(db::Error::Refused(_))), "{written:?}");
    let error = JobFailure { message: "could not be stored".into(), kind: FailureKind::Permanent, attempt: 1 };
    assert!(jobs::finish(&pool, claimed.lease(), &Outcome::Failed(error)).await.expect("finish"));
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn prune_deletes_one_status_ended_before_the_bound_oldest_first_from_its_cursor(pool: sqlx::PgPool) {
    let days = chrono::Duration::days;
    let ids = jobs::insert_many(&pool, &(0..7).map(|_| new_job("noop", json!({}))).collect::<Vec<_>>())
        .await
        .expect("insert")
        .into_iter()
        .map(|job| job.id)
        .collect::<Vec<_>>();
    let ended = [
        (JobStatus::Succeeded, days(4)),
        (JobStatus::Succeeded, days(3)),
        (JobStatus::Succeeded, days(2)),
        (JobStatus::Failed, days(4)),
        (JobStatus::Succeeded, chrono::Duration::zero()),
    ];
    for (id, (status, ago)) in ids.iter().zip(ended) {
        inspect::end(&pool, *id, status, ago).await;
    }
    let left = |pool: sqlx::PgPool| async move {
        let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs").fetch_all(&pool).await.expect("ids");
        left.into_iter().collect::<std::collections::BTreeSet<_>>()
    };
    let these = |i: &[usize]| i.iter().map(|&i| ids[i]).collect::<std::collections::BTreeSet<_>>();
    let before = chrono::Utc::now() - chrono::Duration::hours(1);
    let statuses = [JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled];
    assert_eq!(jobs::prune_count(&pool, &statuses, before).await.expect("count"), 4);
    assert_eq!(jobs::prune_count(&pool, &[JobStatus::Failed], before).await.expect("count"), 1);

    // Batches of two: the oldest two, then the third from where the first stopped.
    let first = jobs::prune_batch(&pool, JobStatus::Succeeded, before, None, 2).await.expect("prune");
    assert_eq!(first.deleted, 2);
    assert_eq!(left(pool.clone()).await, these(&[2, 3, 4, 5, 6]));
    let second = jobs::prune_batch(&pool, JobStatus::Succeeded, before, first.last, 2).await.expect("prune");
    assert_eq!((second.deleted, first.last < second.last), (1, true));
    assert_eq!(left(pool.clone()).await, these(&[3, 4, 5, 6]), "the failed, young and queued jobs stay");
    let none = jobs::prune_batch(&pool, JobStatus::Succeeded, before, second.last, 2).await.expect("prune");
    assert_eq!(none, jobs::Pruned { deleted: 0, last: None });

    // A batch starts at its cursor: a job that ended before it waits for a walk from the start.
    inspect::end(&pool, ids[5], JobStatus::Cancelled, days(5)).await;
    inspect::end(&pool, ids[6], JobStatus::Cancelled, days(1)).await;
    let cursor = Some(chrono::Utc::now() - days(3));
    let walked = jobs::prune_batch(&pool, JobStatus::Cancelled, before, cursor, 10).await.expect("prune");
    assert_eq!(walked.deleted, 1);
    assert_eq!(left(pool.clone()).await, these(&[3, 4, 5]));

    // A job someone holds locked is left for a later batch.
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE").bind(ids[5]).execute(&mut *holder).await.expect("lock");
    let skipped = jobs::prune_batch(&pool, JobStatus::Cancelled, before, None, 10).await.expect("prune");
    assert_eq!(skipped.deleted, 0);
    holder.rollback().await.expect("rollback");
    let taken = jobs::prune_batch(&pool, JobStatus::Cancelled, before, None, 10).await.expect("prune");
    assert_eq!(taken.deleted, 1);
    assert_eq!(left(pool.clone()).await, these(&[3, 4]));
}
