//! API key tokens: minting and checking. A token is `cvk_<prefix>_<secret>`:
//! the prefix is public (shown in `api keys list`, used to find the row), the
//! whole token is stored only as its SHA-256 ([`shared::db::api_keys`]).

use sha2::{Digest, Sha256};
use shared::db::api_keys::{self, ApiKey, KeyRate};
use sqlx::PgExecutor;
use subtle::ConstantTimeEq as _;

use super::Scopes;

const TOKEN_PREFIX: &str = "cvk_";

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
    rate_limit: Option<KeyRate>,
) -> shared::db::Result<(ApiKey, String)> {
    let prefix = shared::hex(&rand::random::<[u8; 6]>());
    let token = format!("{TOKEN_PREFIX}{prefix}_{}", shared::hex(&rand::random::<[u8; 32]>()));
    let key = api_keys::insert(db, tenant, name, &prefix, &hash(&token), scopes, rate_limit).await?;
    Ok((key, token))
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
