//! Retention: the leader deletes ended jobs once past their status's
//! retention, and only those, a bounded share of each pass at a time.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shared::db::jobs;
use shared::job::JobStatus;
use shared::testing::{db, new_job};
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;
use worker::metrics::Metrics;

use crate::helpers::Harness;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_leader_deletes_ended_jobs_past_their_retention_a_batch_per_pass(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::with(connect, |s| {
        s.retention.succeeded_seconds = 3600;
        s.retention.cancelled_seconds = 86_400;
        // A pass's share (a fifth of this) is over after any batch: one batch per pass.
        s.worker.reconcile_interval_ms = 5;
    })
    .await;
    let (hours, days) = (chrono::Duration::hours, chrono::Duration::days);
    // A backlog of 2,500 succeeded jobs that ended two hours ago...
    let backlog: Vec<Uuid> =
        jobs::insert_many(&h.pool, &(0..2500).map(|_| new_job("noop", json!({}))).collect::<Vec<_>>())
            .await
            .expect("insert")
            .into_iter()
            .map(|job| job.id)
            .collect();
    sqlx::query("UPDATE jobs SET status = 'succeeded', finished_at = now() - interval '2 hours'")
        .execute(&h.pool)
        .await
        .expect("end them");
    // ...and one job of each kind around the bounds.
    let cases = [
        (JobStatus::Succeeded, chrono::Duration::minutes(10), true),
        (JobStatus::Failed, days(30), true),
        (JobStatus::Cancelled, hours(2), true),
        (JobStatus::Cancelled, days(2), false),
    ];
    let mut kept = Vec::new();
    for (status, ago, keep) in cases {
        let id = jobs::insert_many(&h.pool, &[new_job("noop", json!({}))]).await.expect("insert")[0].id;
        db::end(&h.pool, id, status, ago).await;
        if keep {
            kept.push(id);
        }
    }
    let queued = jobs::insert_many(&h.pool, &[new_job("noop", json!({}))]).await.expect("insert")[0].id;
    kept.push(queued);

    let metrics = Arc::new(Metrics::new());
    let mut reconciler = h.reconciler().with_metrics(metrics.clone());
    let mut lead = reconciler.elect().await.expect("query").expect("nobody leads yet");
    reconciler.pass(&mut lead).await.expect("pass");
    assert_eq!(db::count(&h.pool, None, Some(&backlog)).await, 1500, "one batch in the first pass");
    reconciler.pass(&mut lead).await.expect("pass");
    assert_eq!(db::count(&h.pool, None, Some(&backlog)).await, 500, "the next batch in the next");
    reconciler.pass(&mut lead).await.expect("pass");
    assert_eq!(db::count(&h.pool, None, Some(&backlog)).await, 0);

    // Swept through, the leader looks again every heartbeat, from where it stopped.
    let later = jobs::insert_many(&h.pool, &[new_job("noop", json!({}))]).await.expect("insert")[0].id;
    db::end(&h.pool, later, JobStatus::Succeeded, chrono::Duration::minutes(90)).await;
    h.wait(Duration::from_secs(5), "the next look", async || {
        reconciler.pass(&mut lead).await.expect("pass");
        db::count(&h.pool, None, Some(&[later])).await == 0
    })
    .await;

    let mut left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs").fetch_all(&h.pool).await.expect("ids");
    left.sort();
    kept.sort();
    assert_eq!(left, kept, "young, failed (kept forever) and unended jobs stay");
    let rendered = metrics.render();
    assert!(rendered.contains(r#"conveyor_reconciler_actions_total{action="expired"} 2502"#), "{rendered}");
    h.close().await;
}
