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

fn validation(algorithm: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = 30;
    if !settings.jwt_issuer.is_empty() {
        validation.set_issuer(&[&settings.jwt_issuer]);
    }
    if settings.jwt_audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&[&settings.jwt_audience]);
    }
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
        if claims.sub.is_empty() {
            return Err(ApiError::Unauthorized("the JWT has an empty sub (tenant)".into()));
        }
        Ok(Caller { tenant: claims.sub, scopes: Scopes::lenient(claims.scope.split_whitespace()) })
    }
}
