//! The `leaders` table: a leadership (the reconciler's) held by one worker
//! process at a time, with an expiry its holder renews as it works.
//!
//! A holder that stalls (frozen, paused, starved) stops renewing, so the
//! leadership lapses after its time-to-live and a standby takes it over, even
//! though the stalled process's connections stay open. Every change of hands
//! mints a new `term`; every statement a leader makes presents its [`Term`]
//! and applies only while that term is current and unexpired, so a holder
//! that wakes up after losing the leadership changes nothing. Times are the
//! database's: the only clock all processes share.

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

use super::Result;

/// The reconciler's leadership.
pub const RECONCILER: &str = "reconciler";

/// A leadership as one holder won it: who, and which term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    pub holder: Uuid,
    pub term: i64,
}

/// What [`claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the leadership until `remaining` from now: renewed when
    /// it held it already (same term), or won (a new term).
    Held { term: Term, remaining: Duration },
    /// Another process holds it for `remaining` at least.
    Elsewhere { holder: Uuid, remaining: Duration },
}

/// Renews `name` for `holder` when it holds it, or takes it when nobody holds
/// it or its holder let it lapse; either way for `ttl` from now. A leadership
/// that lapsed is taken with a new term, even by its last holder: whatever that
/// holder started before it stalled must not count as the new term's.
pub async fn claim(db: impl PgExecutor<'_>, name: &str, holder: Uuid, ttl: Duration) -> Result<Claim> {
    let row = sqlx::query!(
        r#"
        WITH won AS (
            INSERT INTO leaders AS l (name, holder, term, elected_at, expires_at)
            VALUES ($1, $2, 1, now(), now() + make_interval(secs => $3))
            ON CONFLICT (name) DO UPDATE SET
                holder = EXCLUDED.holder,
                term = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now() THEN l.term ELSE l.term + 1 END,
                elected_at = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now()
                                  THEN l.elected_at ELSE now() END,
                expires_at = EXCLUDED.expires_at
            WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
            RETURNING holder, term, expires_at)
        SELECT holder AS "holder!", term AS "term!",
               (extract(epoch FROM expires_at - now()) * 1000)::int8 AS "remaining_ms!"
        FROM won
        UNION ALL
        SELECT holder, term, (extract(epoch FROM expires_at - now()) * 1000)::int8
        FROM leaders WHERE name = $1 AND NOT EXISTS (SELECT FROM won)
        "#,
        name,
        holder,
        ttl.as_secs_f64(),
    )
    .fetch_one(db)
    .await?;
    let remaining = Duration::from_millis(u64::try_from(row.remaining_ms).unwrap_or(0));
    Ok(if row.holder == holder {
        Claim::Held { term: Term { holder, term: row.term }, remaining }
    } else {
        Claim::Elsewhere { holder: row.holder, remaining }
    })
}

/// Gives the leadership up at once (a clean shutdown), so a standby need not
/// wait for it to lapse. The row stays, with its term, so terms never repeat.
pub async fn release(db: impl PgExecutor<'_>, name: &str, term: Term) -> Result<()> {
    sqlx::query!(
        "UPDATE leaders SET expires_at = now() WHERE name = $1 AND holder = $2 AND term = $3",
        name,
        term.holder,
        term.term,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The current holder of `name` and its term, and whether the term is live,
/// if anyone ever held it.
pub async fn current(db: impl PgExecutor<'_>, name: &str) -> Result<Option<(Term, bool)>> {
    let row = sqlx::query!(r#"SELECT holder, term, expires_at > now() AS "live!" FROM leaders WHERE name = $1"#, name,)
        .fetch_optional(db)
        .await?;
    Ok(row.map(|row| (Term { holder: row.holder, term: row.term }, row.live)))
}
