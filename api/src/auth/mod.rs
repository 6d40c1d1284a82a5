//! Who is calling: `Authorization: Bearer <token>` on every `/v1` route,
//! where the token is an API key (`cvk_…`) or, when configured, a JWT.
//! Handlers take a [`Caller`] and ask it for the scope they need.
//!
//! Verified API keys are cached for `auth.key_cache_ttl_ms`; that is the
//! longest a revoked key keeps working on a replica.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
use serde::{Serialize, Serializer};
use shared::config::AuthSettings;
use sqlx::PgPool;

use crate::error::ApiError;
use crate::startup::AppState;

pub mod jwt;
pub mod keys;

/// A permission. `admin` includes the other two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    JobsRead,
    JobsWrite,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::JobsRead, Scope::JobsWrite, Scope::Admin];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::JobsRead => "jobs:read",
            Self::JobsWrite => "jobs:write",
            Self::Admin => "admin",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Self::JobsRead => 1,
            Self::JobsWrite => 2,
            Self::Admin => 4,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == name)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn of(scopes: &[Scope]) -> Self {
        Self(scopes.iter().fold(0, |bits, scope| bits | scope.bit()))
    }

    /// Whether these scopes grant `scope`; `admin` grants everything.
    pub fn grant(self, scope: Scope) -> bool {
        self.0 & (scope.bit() | Scope::Admin.bit()) != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL.into_iter().filter(|s| self.0 & s.bit() != 0).map(Scope::as_str).collect()
    }

    /// Parses names, ignoring unknown ones (a JWT may carry scopes of other services).
    pub fn lenient<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self::of(&names.into_iter().filter_map(Scope::parse).collect::<Vec<_>>())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(serializer)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown scope {0:?} (known: jobs:read, jobs:write, admin)")]
pub struct UnknownScope(String);

impl TryFrom<Vec<String>> for Scopes {
    type Error = UnknownScope;

    fn try_from(names: Vec<String>) -> Result<Self, Self::Error> {
        let scopes: Result<Vec<_>, _> =
            names.iter().map(|n| Scope::parse(n).ok_or_else(|| UnknownScope(n.clone()))).collect();
        Ok(Self::of(&scopes?))
    }
}

impl std::str::FromStr for Scopes {
    type Err = UnknownScope;

    /// Comma-separated names, as `api keys create --scopes` takes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect::<Vec<_>>().try_into()
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub scopes: Scopes,
}

impl Caller {
    /// 403 unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<&Self, ApiError> {
        if self.scopes.grant(scope) {
            Ok(self)
        } else {
            Err(ApiError::Forbidden(format!(
                "this token lacks the {scope} scope; use a key created with `api keys create --scopes {scope}` \
                 (or admin)",
                scope = scope.as_str()
            )))
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let header = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().map(str::to_owned));
        Box::pin(async move {
            // A wiring fault of the server, not the client's: a 500, not a 401.
            let state = state.ok_or_else(|| ApiError::Internal("the route has no application state".into()))?;
            let token = match header {
                None => return Err(ApiError::Unauthorized("send Authorization: Bearer <token>".into())),
                Some(Err(_)) => return Err(ApiError::Unauthorized("the Authorization header is not text".into())),
                Some(Ok(value)) => bearer(&value)?.to_owned(),
            };
            state.auth.authenticate(&state.pool, &token).await
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
    jwt: Option<jwt::Verifier>,
    ttl: Duration,
    cache: RwLock<HashMap<String, (keys::StoredKey, Instant)>>,
}

/// More cached keys than this and the cache starts over: keys are few, so this
/// only bounds memory against a flood of distinct valid tokens.
const CACHE_LIMIT: usize = 10_000;

impl Authenticator {
    /// Fails (naming the setting) when a configured JWT key cannot be used.
    pub fn new(settings: &AuthSettings) -> Result<Self, shared::config::ConfigError> {
        Ok(Self {
            jwt: jwt::Verifier::new(settings)?,
            ttl: Duration::from_millis(settings.key_cache_ttl_ms),
            cache: RwLock::new(HashMap::new()),
        })
    }

    pub async fn authenticate(&self, pool: &PgPool, token: &str) -> Result<Caller, ApiError> {
        if let Some(prefix) = keys::prefix_of(token) {
            let key = self.lookup(pool, prefix).await?;
            return match key {
                Some(key) if keys::matches(token, &key.secret_hash) => {
                    Ok(Caller { tenant: key.tenant, scopes: key.scopes })
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

    async fn lookup(&self, pool: &PgPool, prefix: &str) -> Result<Option<keys::StoredKey>, ApiError> {
        if let Ok(cache) = self.cache.read()
            && let Some((key, at)) = cache.get(prefix)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(key.clone()));
        }
        let key = keys::find_live(pool, prefix).await?;
        if let Ok(mut cache) = self.cache.write() {
            match &key {
                Some(key) => {
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(prefix.to_owned(), (key.clone(), Instant::now()));
                }
                None => {
                    cache.remove(prefix);
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
    fn admin_grants_every_scope_and_others_only_themselves() {
        let admin = Scopes::of(&[Scope::Admin]);
        assert!(Scope::ALL.into_iter().all(|s| admin.grant(s)));
        let read = Scopes::of(&[Scope::JobsRead]);
        assert!(read.grant(Scope::JobsRead) && !read.grant(Scope::JobsWrite) && !read.grant(Scope::Admin));
    }

    #[test]
    fn scopes_parse_from_a_comma_list_and_refuse_unknown_names() {
        let scopes: Scopes = "jobs:read, jobs:write".parse().expect("valid");
        assert_eq!(scopes.names(), ["jobs:read", "jobs:write"]);
        assert!("jobs:read,jobs:delete".parse::<Scopes>().is_err());
        assert_eq!(Scopes::lenient(["jobs:read", "openid"]).names(), ["jobs:read"]);
    }

    #[test]
    fn only_bearer_tokens_are_taken() {
        assert_eq!(bearer("Bearer abc").ok(), Some("abc"));
        assert_eq!(bearer("bearer  abc ").ok(), Some("abc"));
        assert!(bearer("Basic abc").is_err());
        assert!(bearer("Bearer ").is_err());
        assert!(bearer("abc").is_err());
    }
}
