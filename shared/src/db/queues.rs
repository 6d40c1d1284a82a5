//! Counts across queues, for operators (`GET /v1/queues`).

use std::collections::BTreeMap;

use sqlx::PgExecutor;

use super::Result;

/// Jobs by queue, then by status. One pass over the table for every queue:
/// fine for an operator's look, not for a dashboard polling a huge table
/// (that would want maintained counters).
pub async fn job_counts(db: impl PgExecutor<'_>) -> Result<BTreeMap<String, BTreeMap<String, i64>>> {
    let rows = sqlx::query!(r#"SELECT queue, status, count(*) AS "count!" FROM jobs GROUP BY queue, status"#)
        .fetch_all(db)
        .await?;
    let mut counts: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for row in rows {
        counts.entry(row.queue).or_default().insert(row.status, row.count);
    }
    Ok(counts)
}
