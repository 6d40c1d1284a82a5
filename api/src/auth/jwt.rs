//! JWTs (when configured): HS256 with a shared secret or RS256 with a public
//! key. `sub` is the tenant, `scope` the space-separated scopes; `exp` is required.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use shared::config::{AuthSettings, ConfigError};

use super::{Caller, Scopes};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: String,
}

/// One accepted algorithm with its key and validation rules.
pub struct Verifier {
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
}

/// What a token must say. A configured issuer or audience is required, not
/// only checked when present: a token minted for another issuer or service
/// that simply leaves the claim out must not pass. `nbf` is honoured.
fn validation(algorithm: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(algorithm);
    let mut required = vec!["exp", "sub"];
    validation.leeway = 30;
    validation.validate_nbf = true;
    if !settings.jwt_issuer.is_empty() {
        validation.set_issuer(&[&settings.jwt_issuer]);
        required.push("iss");
    }
    if settings.jwt_audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&[&settings.jwt_audience]);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

impl Verifier {
    /// `None` when no JWT key is configured.
    pub fn new(settings: &AuthSettings) -> Result<Option<Self>, ConfigError> {
        let mut keys = Vec::new();
        if !settings.jwt_hs256_secret.is_empty() {
            let key = DecodingKey::from_secret(settings.jwt_hs256_secret.as_bytes());
            keys.push((Algorithm::HS256, key, validation(Algorithm::HS256, settings)));
        }
        if !settings.jwt_rs256_public_key_file.is_empty() {
            let path = &settings.jwt_rs256_public_key_file;
            let pem = std::fs::read(path)
                .map_err(|e| ConfigError::new(format!("auth.jwt_rs256_public_key_file: cannot read {path}: {e}")))?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                ConfigError::new(format!("auth.jwt_rs256_public_key_file: {path} is not an RSA public key in PEM: {e}"))
            })?;
            keys.push((Algorithm::RS256, key, validation(Algorithm::RS256, settings)));
        }
        Ok((!keys.is_empty()).then_some(Self { keys }))
    }

    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let invalid = |e: jsonwebtoken::errors::Error| {
            let reason = match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the JWT has expired".to_owned(),
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => "the JWT is not valid yet (nbf)".to_owned(),
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim) => {
                    format!("the JWT lacks the {claim} claim, which this server requires")
                }
                jsonwebtoken::errors::ErrorKind::InvalidSignature => "the JWT's signature is invalid".to_owned(),
                _ => format!("invalid JWT: {e}"),
            };
            ApiError::Unauthorized(reason)
        };
        let header = decode_header(token).map_err(invalid)?;
        // Only the configured algorithms, each with its own key: a token cannot
        // pick HS256 and have the RSA public key used as its HMAC secret.
        let Some((_, key, validation)) = self.keys.iter().find(|(alg, _, _)| *alg == header.alg) else {
            let accepted: Vec<String> = self.keys.iter().map(|(alg, _, _)| format!("{alg:?}")).collect();
            return Err(ApiError::Unauthorized(format!(
                "JWTs signed with {:?} are not accepted; this server accepts {}",
                header.alg,
                accepted.join(", ")
            )));
        };
        let claims = decode::<Claims>(token, key, validation).map_err(invalid)?.claims;
        // The tenant names a key space of its own (jobs, keys, logs): the same
        // rule as for API keys' tenants.
        if !shared::config::is_name(&claims.sub) {
            return Err(ApiError::Unauthorized("the JWT's sub (the tenant) must be 1-64 of [a-zA-Z0-9_-]".into()));
        }
        Ok(Caller { tenant: claims.sub, scopes: Scopes::lenient(claims.scope.split_whitespace()), own_rate: None })
    }
}
