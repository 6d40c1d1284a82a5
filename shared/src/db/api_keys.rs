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
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What checking a presented token needs.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub id: Uuid,
    pub tenant: String,
    pub scopes: Scopes,
    pub secret_hash: Vec<u8>,
}

/// A key as its row says it, before its scopes are parsed.
struct Row {
    id: Uuid,
    tenant: String,
    name: Option<String>,
    prefix: String,
    scopes: Vec<String>,
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
) -> Result<ApiKey> {
    let row = sqlx::query_as!(
        Row,
        r#"
        INSERT INTO api_keys (id, tenant, name, prefix, secret_hash, scopes) VALUES ($1, $2, $3, $4, $5, $6)
        RETURNING id, tenant, name, prefix, scopes, created_at, revoked_at
        "#,
        Uuid::now_v7(),
        tenant,
        name,
        prefix,
        secret_hash,
        &scopes.names().into_iter().map(str::to_owned).collect::<Vec<_>>(),
    )
    .fetch_one(db)
    .await?;
    row.try_into()
}

/// Every key, newest first.
pub async fn list(db: impl PgExecutor<'_>) -> Result<Vec<ApiKey>> {
    let rows = sqlx::query_as!(
        Row,
        "SELECT id, tenant, name, prefix, scopes, created_at, revoked_at FROM api_keys ORDER BY id DESC"
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
        RETURNING id, tenant, name, prefix, scopes, created_at, revoked_at
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
        "SELECT id, tenant, scopes, secret_hash FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL",
        prefix,
    )
    .fetch_optional(db)
    .await?;
    row.map(|row| {
        Ok(StoredKey { id: row.id, tenant: row.tenant, scopes: scopes(row.scopes)?, secret_hash: row.secret_hash })
    })
    .transpose()
}
