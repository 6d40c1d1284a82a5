//! The outbox: a confirm takes out only its own stint's row; the sweep reads
//! a bounded batch, oldest first, and drops rows of jobs no longer queued.

use serde_json::json;
use shared::db::{jobs, outbox};
use shared::job::{Cancel, Enqueued};
use shared::testing::{db, lead, new_job};

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_late_confirm_of_an_earlier_stint_leaves_the_job_in_the_outbox(pool: sqlx::PgPool) {
    let job = jobs::insert(&pool, &new_job("noop", json!({}))).await.expect("insert");
    let first = Enqueued::of(&job, 0, None, None);
    // Queued again before the first stint's confirm is recorded.
    assert!(matches!(jobs::cancel(&pool, "default", job.id).await.expect("cancel"), Cancel::Cancelled(_)));
    let second = jobs::requeue_one(&pool, "default", job.id).await.expect("requeue").expect("cancelled");

    outbox::confirmed(&pool, &[first.outbox_row()]).await.expect("record");
    assert_eq!(db::outbox_len(&pool, Some(job.id)).await, 1, "the requeued stint's message is not confirmed yet");
    outbox::confirmed(&pool, &[second.outbox_row()]).await.expect("record");
    assert_eq!(db::outbox_len(&pool, Some(job.id)).await, 0);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn each_outbox_sweep_reads_a_bounded_batch_oldest_first(pool: sqlx::PgPool) {
    // Oldest first: two cancelled jobs, then one still queued, all unconfirmed.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(jobs::insert(&pool, &new_job("noop", json!({}))).await.expect("insert").id);
    }
    for id in &ids[..2] {
        assert!(matches!(jobs::cancel(&pool, "default", *id).await.expect("cancel"), Cancel::Cancelled(_)));
    }

    let leader = lead(&pool).await;
    let first = outbox::sweep(&pool, leader, 0, 2).await.expect("sweep");
    assert!(first.is_empty(), "the two oldest rows are of cancelled jobs: {first:?}");
    assert_eq!(db::outbox_len(&pool, None).await, 1, "and only those two were dropped");
    let second = outbox::sweep(&pool, leader, 0, 2).await.expect("sweep");
    assert_eq!(second.iter().map(|job| job.id).collect::<Vec<_>>(), [ids[2]], "the queued one comes next");
    assert_eq!(db::outbox_len(&pool, None).await, 1, "kept until its publish is confirmed");
}
