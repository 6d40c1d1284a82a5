//! The `api_keys` table. A key is stored as the SHA-256 of its token with a
//! short public prefix to find it by; the token itself is never stored (the
//! API's `auth::keys` mints tokens and checks them).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Error, Result};
use crate::scope::Scopes;

/// A stored key, without its secret.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant: String,
    pub name: Option<String>,
    pub prefix: String,
    pub scopes: Scopes,
    /// Its own rate limit; `None`: the tenant's.
    pub rate_limit: Option<KeyRate>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key's own rate limit: `per_second` sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeyRate {
    pub per_second: u32,
    pub burst: u32,
}

impl KeyRate {
    /// The columns, both set or both NULL (a CHECK keeps them so).
    fn from_columns(per_second: Option<i32>, burst: Option<i32>) -> Option<Self> {
        Some(Self { per_second: u32::try_from(per_second?).ok()?, burst: u32::try_from(burst?).ok()? })
    }

    fn columns(rate: Option<Self>) -> (Option<i32>, Option<i32>) {
        let column = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        (rate.map(|r| column(r.per_second)), rate.map(|r| column(r.burst)))
    }
}

/// What checking a presented token needs.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub id: Uuid,
    pub tenant: String,
    pub scopes: Scopes,
    pub rate_limit: Option<KeyRate>,
    pub secret_hash: Vec<u8>,
}

/// A key as its row says it, before its scopes are parsed.
struct Row {
    id: Uuid,
    tenant: String,
    name: Option<String>,
    prefix: String,
    scopes: Vec<String>,
    rate_per_second: Option<i32>,
    rate_burst: Option<i32>,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<Row> for ApiKey {
    type Error = Error;

    fn try_from(row: Row) -> Result<Self> {
        Ok(Self {
            id: row.id,
            tenant: row.tenant,
            name: row.name,
            prefix: row.prefix,
            scopes: scopes(row.scopes)?,
            rate_limit: KeyRate::from_columns(row.rate_per_second, row.rate_burst),
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        })
    }
}

/// A CHECK constraint keeps unknown names out; one that got in anyway is a bug.
fn scopes(names: Vec<String>) -> Result<Scopes> {
    Scopes::try_from(names).map_err(|e| Error::Other(std::sync::Arc::new(e)))
}

/// Stores a new key for `tenant`.
pub async fn insert(
    db: impl PgExecutor<'_>,
    tenant: &str,
    name: Option<&str>,
    prefix: &str,
    secret_hash: &[u8],
    scopes: Scopes,
    rate_limit: Option<KeyRate>,
) -> Result<ApiKey> {
    let (rate_per_second, rate_burst) = KeyRate::columns(rate_limit);
    let row = sqlx::query_as!(
        Row,
        r#"
        INSERT INTO api_keys (id, tenant, name, prefix, secret_hash, scopes, rate_per_second, rate_burst)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        RETURNING id, tenant, name, prefix, scopes, rate_per_second, rate_burst, created_at, revoked_at
        "#,
        Uuid::now_v7(),
        tenant,
        name,
        prefix,
        secret_hash,
        &scopes.names().into_iter().map(str::to_owned).collect::<Vec<_>>(),
        rate_per_second,
        rate_burst,
    )
    .fetch_one(db)
    .await?;
    row.try_into()
}

/// Every key, newest first.
pub async fn list(db: impl PgExecutor<'_>) -> Result<Vec<ApiKey>> {
    let rows = sqlx::query_as!(
        Row,
        r#"
        SELECT id, tenant, name, prefix, scopes, rate_per_second, rate_burst, created_at, revoked_at
        FROM api_keys ORDER BY id DESC
        "#
    )
    .fetch_all(db)
    .await?;
    rows.into_iter().map(ApiKey::try_from).collect()
}

/// Revokes a key; `None` when there is no such key. Revoking twice is harmless.
pub async fn revoke(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ApiKey>> {
    let row = sqlx::query_as!(
        Row,
        r#"
        UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1
        RETURNING id, tenant, name, prefix, scopes, rate_per_second, rate_burst, created_at, revoked_at
        "#,
        id,
    )
    .fetch_optional(db)
    .await?;
    row.map(ApiKey::try_from).transpose()
}

/// The live (unrevoked) key with this prefix.
pub async fn find_live(db: impl PgExecutor<'_>, prefix: &str) -> Result<Option<StoredKey>> {
    let row = sqlx::query!(
        r#"
        SELECT id, tenant, scopes, rate_per_second, rate_burst, secret_hash
        FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL
        "#,
        prefix,
    )
    .fetch_optional(db)
    .await?;
    row.map(|row| {
        Ok(StoredKey {
            id: row.id,
            tenant: row.tenant,
            scopes: scopes(row.scopes)?,
            rate_limit: KeyRate::from_columns(row.rate_per_second, row.rate_burst),
            secret_hash: row.secret_hash,
        })
    })
    .transpose()
}
