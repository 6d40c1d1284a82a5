//! Idempotency keys: one transaction per keyed submission, and expiry.

use serde_json::json;
use shared::db::idempotency::{self, Keyed};
use shared::testing::{db, new_job};
use sqlx::PgPool;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_key_is_replayed_refused_or_taken_over_once_expired(pool: PgPool) {
    let job = new_job("noop", json!({}));
    let Keyed::Created(created) =
        idempotency::submit(&pool, "default", "k", &[1; 32], 0, &[job]).await.expect("submit")
    else {
        panic!("a free key creates");
    };
    // Expired at once (ttl 0): a different request takes the key over.
    let retry = new_job("noop", json!({}));
    let Keyed::Created(again) =
        idempotency::submit(&pool, "default", "k", &[2; 32], 3600, &[retry]).await.expect("submit")
    else {
        panic!("an expired key is free");
    };
    assert_ne!(again[0].id, created[0].id);
    // Now held for an hour: the same request replays, another conflicts.
    let third = new_job("noop", json!({}));
    let replay =
        idempotency::submit(&pool, "default", "k", &[2; 32], 3600, std::slice::from_ref(&third)).await.expect("submit");
    assert!(matches!(replay, Keyed::Replayed(ref ids) if ids == &[again[0].id]), "{replay:?}");
    let conflict = idempotency::submit(&pool, "default", "k", &[3; 32], 3600, &[third]).await.expect("submit");
    assert!(matches!(conflict, Keyed::Conflict), "{conflict:?}");
    assert_eq!(db::count(&pool, None, None).await, 2);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn pruning_deletes_expired_keys_only(pool: PgPool) {
    for (key, ttl) in [("gone-1", 0), ("gone-2", 0), ("kept", 3600)] {
        idempotency::submit(&pool, "default", key, &[0; 32], ttl, &[new_job("noop", json!({}))]).await.expect("submit");
    }
    assert_eq!(idempotency::prune_expired(&pool, 1).await.expect("prune"), 1);
    assert_eq!(idempotency::prune_expired(&pool, 1000).await.expect("prune"), 1);
    assert_eq!(idempotency::prune_expired(&pool, 1000).await.expect("prune"), 0);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT key FROM idempotency_keys").fetch_all(&pool).await.expect("keys");
    assert_eq!(left, ["kept"]);
    // Pruning a key leaves its job alone.
    assert_eq!(db::count(&pool, None, None).await, 3);
}
