//! Who is calling: `Authorization: Bearer <token>` on every `/v1` route,
//! where the token is an API key (`cvk_…`) or, when configured, a JWT.
//! Handlers take an [`Authorized<S>`], which answers 401 without a valid
//! token, 429 over the caller's rate limit and 403 without scope `S`, before
//! the handler runs.
//!
//! Verified API keys are cached for `auth.key_cache_ttl_ms`; that is the
//! longest a revoked key keeps working on a replica.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix_web::{FromRequest, HttpMessage as _, HttpRequest, dev::Payload, http::header, web};
use shared::config::AuthSettings;
use shared::db::api_keys::{self, StoredKey};
pub use shared::scope::{Scope, Scopes};
use sqlx::PgPool;

use crate::error::ApiError;
use crate::observe::Tenant;
use crate::rate_limit::{Bucket, Limits, Rate};

pub mod jwt;
pub mod keys;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub scopes: Scopes,
    /// The key's own rate limit, when it was created with one.
    pub own_rate: Option<(uuid::Uuid, Rate)>,
}

impl Caller {
    /// The rate-limit bucket the caller draws from, and its rate when it is
    /// not the tenant's.
    pub fn bucket(&self) -> (Bucket, Option<Rate>) {
        match self.own_rate {
            Some((key, rate)) => (Bucket::Key(key), Some(rate)),
            None => (Bucket::Tenant(self.tenant.clone()), None),
        }
    }

    /// Charges the caller's rate-limit bucket for a request that costs
    /// `cost` and of which `paid` was taken already, and sets the
    /// `RateLimit-*` headers the answer will carry.
    pub async fn charge(&self, req: &HttpRequest, cost: u32, paid: u32) -> Result<(), ApiError> {
        let Some(limits) = req.app_data::<web::Data<Arc<Limits>>>() else { return Ok(()) };
        let (bucket, own) = self.bucket();
        match limits.charge(&bucket, own, cost, paid).await {
            None => Ok(()),
            Some(Ok(decision)) => {
                req.extensions_mut().insert(decision);
                Ok(())
            }
            Some(Err(refusal)) => Err(ApiError::RateLimited(Box::new(refusal))),
        }
    }

    /// 403 unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<&Self, ApiError> {
        if self.scopes.grant(scope) {
            Ok(self)
        } else {
            let or_admin = if scope == Scope::Operator { "" } else { " (or admin)" };
            Err(ApiError::Forbidden(format!(
                "this token lacks the {scope} scope; use a key created with `api keys create --scopes {scope}`{or_admin}",
                scope = scope.as_str()
            )))
        }
    }
}

/// A scope a route needs, as a type: `Authorized<JobsRead>`.
pub trait RequiredScope {
    const SCOPE: Scope;
}

/// Needs `jobs:read`.
pub struct JobsRead;
/// Needs `jobs:write`.
pub struct JobsWrite;
/// Needs `admin` (a tenant's admin).
pub struct Admin;
/// Needs `operator` (platform-wide views).
pub struct Operator;

impl RequiredScope for JobsRead {
    const SCOPE: Scope = Scope::JobsRead;
}
impl RequiredScope for JobsWrite {
    const SCOPE: Scope = Scope::JobsWrite;
}
impl RequiredScope for Admin {
    const SCOPE: Scope = Scope::Admin;
}
impl RequiredScope for Operator {
    const SCOPE: Scope = Scope::Operator;
}

/// A caller holding scope `S`; dereferences to the [`Caller`].
pub struct Authorized<S> {
    caller: Caller,
    scope: PhantomData<S>,
}

impl<S> Deref for Authorized<S> {
    type Target = Caller;

    fn deref(&self) -> &Caller {
        &self.caller
    }
}

impl<S: RequiredScope> FromRequest for Authorized<S> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let auth = req.app_data::<web::Data<Authenticator>>().cloned();
        let req = req.clone();
        let header = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().map(str::to_owned));
        Box::pin(async move {
            // A wiring fault of the server, not the client's: a 500, not a 401.
            let auth = auth.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("the route has no authenticator")))?;
            let token = match header {
                None => return Err(ApiError::Unauthorized("send Authorization: Bearer <token>".into())),
                Some(Err(_)) => return Err(ApiError::Unauthorized("the Authorization header is not text".into())),
                Some(Ok(value)) => bearer(&value)?.to_owned(),
            };
            let caller = auth.authenticate(&token).await?;
            req.extensions_mut().insert(Tenant(caller.tenant.clone()));
            caller.charge(&req, 1, 0).await?;
            caller.require(S::SCOPE)?;
            Ok(Self { caller, scope: PhantomData })
        })
    }
}

fn bearer(value: &str) -> Result<&str, ApiError> {
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())),
    }
}

/// Verifies tokens: API keys against Postgres (cached), JWTs by signature.
pub struct Authenticator {
    pool: PgPool,
    jwt: Option<jwt::Verifier>,
    ttl: Duration,
    cache: RwLock<HashMap<String, (StoredKey, Instant)>>,
    /// Well-formed prefixes no live key has, for as long as a key is cached:
    /// a client hammering with a made-up or revoked key costs one query per
    /// `ttl`, not one per request. Apart from the keys, so that a flood of
    /// misses never evicts them.
    misses: RwLock<HashMap<String, Instant>>,
}

/// More cached keys than this and the cache starts over: keys are few, so this
/// only bounds memory against a flood of distinct valid tokens.
const CACHE_LIMIT: usize = 10_000;

impl Authenticator {
    /// Fails (naming the setting) when a configured JWT key cannot be used.
    pub fn new(settings: &AuthSettings, pool: PgPool) -> Result<Self, shared::config::ConfigError> {
        Ok(Self {
            pool,
            jwt: jwt::Verifier::new(settings)?,
            ttl: Duration::from_millis(settings.key_cache_ttl_ms),
            cache: RwLock::new(HashMap::new()),
            misses: RwLock::new(HashMap::new()),
        })
    }

    pub async fn authenticate(&self, token: &str) -> Result<Caller, ApiError> {
        if let Some(prefix) = keys::prefix_of(token) {
            let key = self.lookup(prefix).await?;
            return match key {
                Some(key) if keys::matches(token, &key.secret_hash) => {
                    let own_rate =
                        key.rate_limit.and_then(|limit| Some((key.id, Rate::new(limit.per_second, limit.burst)?)));
                    Ok(Caller { tenant: key.tenant, scopes: key.scopes, own_rate })
                }
                _ => Err(ApiError::Unauthorized(
                    "unknown or revoked API key; create one with `api keys create` (an operator can list them \
                     with `api keys list`)"
                        .into(),
                )),
            };
        }
        match &self.jwt {
            Some(verifier) if token.matches('.').count() == 2 => verifier.verify(token),
            Some(_) => Err(ApiError::Unauthorized(
                "the token is neither an API key (cvk_<12 hex>_<64 hex>) nor a JWT (three dot-separated parts)".into(),
            )),
            None => Err(ApiError::Unauthorized(
                "the token is not an API key: expected cvk_<12 hex>_<64 hex>, as printed by `api keys create`".into(),
            )),
        }
    }

    async fn lookup(&self, prefix: &str) -> Result<Option<StoredKey>, ApiError> {
        if let Ok(cache) = self.cache.read()
            && let Some((key, at)) = cache.get(prefix)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(key.clone()));
        }
        if let Ok(misses) = self.misses.read()
            && misses.get(prefix).is_some_and(|at| at.elapsed() < self.ttl)
        {
            return Ok(None);
        }
        let key = api_keys::find_live(&self.pool, prefix).await?;
        match &key {
            Some(key) => {
                if let Ok(mut cache) = self.cache.write() {
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(prefix.to_owned(), (key.clone(), Instant::now()));
                }
            }
            None => {
                if let Ok(mut cache) = self.cache.write() {
                    cache.remove(prefix);
                }
                if let Ok(mut misses) = self.misses.write() {
                    if misses.len() >= CACHE_LIMIT {
                        misses.clear();
                    }
                    misses.insert(prefix.to_owned(), Instant::now());
                }
            }
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bearer_tokens_are_taken() {
        assert_eq!(bearer("Bearer abc").ok(), Some("abc"));
        assert_eq!(bearer("bearer  abc ").ok(), Some("abc"));
        assert!(bearer("Basic abc").is_err());
        assert!(bearer("Bearer ").is_err());
        assert!(bearer("abc").is_err());
    }
}
