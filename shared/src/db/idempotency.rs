//! The `idempotency_keys` table: a submission with an `Idempotency-Key` is
//! written with its key in one transaction. A second submission with the
//! same key (a client retrying after a timeout) finds the first and gets its
//! jobs back, or is refused if it is a different request.

use uuid::Uuid;

use super::{Result, jobs};
use crate::job::{Job, NewJob};

/// What a keyed submission came to.
#[derive(Debug)]
pub enum Keyed {
    /// The key was free (or had expired): the jobs were created with it.
    Created(Vec<Job>),
    /// The key was used before, by the same request: the jobs it created.
    Replayed(Vec<Uuid>),
    /// The key was used before, by a different request.
    Conflict,
}

/// Inserts `jobs` under `tenant`'s `key`, unless the key is taken; `hash`
/// identifies the request, `ttl_seconds` how long the key is kept. Concurrent
/// calls with one key wait for the first to commit: exactly one creates jobs.
pub async fn submit(
    db: &sqlx::PgPool,
    tenant: &str,
    key: &str,
    hash: &[u8; 32],
    ttl_seconds: i64,
    jobs: &[NewJob],
) -> Result<Keyed> {
    let mut tx = db.begin().await?;
    let ids: Vec<Uuid> = jobs.iter().map(|job| job.id).collect();
    let taken = sqlx::query_scalar!(
        r#"
        INSERT INTO idempotency_keys AS k (tenant, key, request_hash, job_ids, expires_at)
        VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
        ON CONFLICT (tenant, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, job_ids = EXCLUDED.job_ids, created_at = now(),
                expires_at = EXCLUDED.expires_at
            WHERE k.expires_at <= now()
        RETURNING true AS "taken!"
        "#,
        tenant,
        key,
        &hash[..],
        &ids,
        ttl_seconds as f64,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if taken.is_none() {
        let earlier = sqlx::query!(
            "SELECT request_hash, job_ids FROM idempotency_keys WHERE tenant = $1 AND key = $2",
            tenant,
            key,
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(if earlier.request_hash == hash[..] { Keyed::Replayed(earlier.job_ids) } else { Keyed::Conflict });
    }
    let created = jobs::insert_many(&mut *tx, jobs).await?;
    tx.commit().await?;
    Ok(Keyed::Created(created))
}

/// Deletes up to `limit` keys that expired, oldest first; returns how many.
pub async fn prune_expired(db: &sqlx::PgPool, limit: i64) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        DELETE FROM idempotency_keys WHERE (tenant, key) IN (
            SELECT tenant, key FROM idempotency_keys WHERE expires_at < now() ORDER BY expires_at LIMIT $1)
        "#,
        limit,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
