//! API keys: minting, storage and lookup. A token is `cvk_<prefix>_<secret>`:
//! the prefix is public (shown in `api keys list`, used to find the row), the
//! whole token is stored only as its SHA-256.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgExecutor;
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::Scopes;

const TOKEN_PREFIX: &str = "cvk_";

/// A stored key, without its secret.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant: String,
    pub name: Option<String>,
    pub prefix: String,
    #[sqlx(try_from = "Vec<String>")]
    pub scopes: Scopes,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What a lookup needs to check a presented token.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredKey {
    pub id: Uuid,
    pub tenant: String,
    #[sqlx(try_from = "Vec<String>")]
    pub scopes: Scopes,
    pub secret_hash: Vec<u8>,
}

/// The SHA-256 of a token, as stored.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The public prefix of a well-formed token.
pub fn prefix_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (prefix, secret) = rest.split_once('_')?;
    let is_hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (is_hex(prefix, 12) && is_hex(secret, 64)).then_some(prefix)
}

/// Whether `token` is the one whose hash is `stored`, in time independent of
/// where they differ.
pub fn matches(token: &str, stored: &[u8]) -> bool {
    hash(token).ct_eq(stored).into()
}

/// Mints a key for `tenant` and stores its hash. Returns the stored key and
/// the token, which exists nowhere else from now on.
pub async fn create(
    db: impl PgExecutor<'_>,
    tenant: &str,
    name: Option<&str>,
    scopes: Scopes,
) -> sqlx::Result<(ApiKey, String)> {
    let prefix = shared::hex(&rand::random::<[u8; 6]>());
    let token = format!("{TOKEN_PREFIX}{prefix}_{}", shared::hex(&rand::random::<[u8; 32]>()));
    let key = sqlx::query_as(
        "INSERT INTO api_keys (id, tenant, name, prefix, secret_hash, scopes) VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING id, tenant, name, prefix, scopes, created_at, revoked_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(name)
    .bind(&prefix)
    .bind(hash(&token).as_slice())
    .bind(scopes.names())
    .fetch_one(db)
    .await?;
    Ok((key, token))
}

/// Every key, newest first.
pub async fn list(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<ApiKey>> {
    sqlx::query_as("SELECT id, tenant, name, prefix, scopes, created_at, revoked_at FROM api_keys ORDER BY id DESC")
        .fetch_all(db)
        .await
}

/// Revokes a key; `None` when there is no such key. Revoking twice is harmless.
pub async fn revoke(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<ApiKey>> {
    sqlx::query_as(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 \
         RETURNING id, tenant, name, prefix, scopes, created_at, revoked_at",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The live (unrevoked) key with this prefix.
pub async fn find_live(db: impl PgExecutor<'_>, prefix: &str) -> sqlx::Result<Option<StoredKey>> {
    sqlx::query_as("SELECT id, tenant, scopes, secret_hash FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL")
        .bind(prefix)
        .fetch_optional(db)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_exact_shape() {
        let token = format!("cvk_{}_{}", "a".repeat(12), "0".repeat(64));
        assert_eq!(prefix_of(&token), Some("aaaaaaaaaaaa"));
        assert_eq!(prefix_of(&token[..token.len() - 1]), None);
        assert_eq!(prefix_of(&token.replace("cvk_", "xyz_")), None);
        assert_eq!(prefix_of("cvk_zzzzzzzzzzzz_"), None);
        assert!(matches(&token, &hash(&token)));
        assert!(!matches(&token, &hash("cvk_other")));
        assert!(!matches(&token, &[0; 3]), "a short stored hash never matches");
    }
}
