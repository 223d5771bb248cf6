//! `[auth]`: how inbound JWTs are verified.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};
use super::{bounds, defaults, parse_url};

/// `[auth]` as written, defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    pub issuer: String,
    pub audience: String,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    #[serde(default = "defaults::principal_claim")]
    pub principal_claim: String,
    #[serde(default = "defaults::user_id_claim")]
    pub user_id_claim: String,
    #[serde(default = "defaults::algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "defaults::leeway_s")]
    pub leeway_s: u64,
    /// Background refresh period of a `jwks_url` key set.
    #[serde(default = "defaults::jwks_refresh_s")]
    pub jwks_refresh_s: u64,
    /// Least time between two refetches caused by unknown `kid`s.
    #[serde(default = "defaults::jwks_min_refetch_s")]
    pub jwks_min_refetch_s: u64,
    /// Largest `Authorization` header decoded.
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: u64,
    /// Required JOSE `typ` header (case-insensitive), if set.
    pub typ: Option<String>,
    /// Capacity of the verified-token cache in bytes; 0 = off.
    #[serde(default = "defaults::verified_cache_bytes")]
    pub verified_cache_bytes: u64,
}

/// Inbound JWT verification.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub jwks_refresh: Duration,
    pub jwks_min_refetch: Duration,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub principal_claim: String,
    pub user_id_claim: String,
    pub max_token_bytes: usize,
    pub typ: Option<String>,
    /// Capacity of the verified-token cache (weighed bytes); 0 = off.
    pub verified_cache_bytes: u64,
}

/// Where the verification keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(http::Uri),
}

impl FileAuth {
    pub(crate) fn validate(&self) -> Result<AuthConfig, ConfigError> {
        let jwks = match (&self.jwks_file, &self.jwks_url) {
            (Some(file), None) => JwksSource::File(file.clone()),
            (None, Some(url)) => JwksSource::Url(parse_url("auth.jwks_url", url)?),
            (None, None) => {
                return Err(invalid(
                    "auth.jwks_file",
                    "one of auth.jwks_file or auth.jwks_url is required",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "auth.jwks_url",
                    "set either auth.jwks_file or auth.jwks_url, not both",
                ))
            }
        };
        for (key, value) in [
            ("auth.issuer", &self.issuer),
            ("auth.audience", &self.audience),
            ("auth.principal_claim", &self.principal_claim),
            ("auth.user_id_claim", &self.user_id_claim),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        let algorithms = self
            .algorithms
            .iter()
            .map(|name| parse_algorithm(name))
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(invalid(
                "auth.algorithms",
                "must list at least one algorithm",
            ));
        }
        Ok(AuthConfig {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            jwks,
            jwks_refresh: bounds::secs("auth.jwks_refresh_s", self.jwks_refresh_s)?,
            jwks_min_refetch: bounds::secs("auth.jwks_min_refetch_s", self.jwks_min_refetch_s)?,
            algorithms,
            leeway: bounds::secs("auth.leeway_s", self.leeway_s)?,
            principal_claim: self.principal_claim.clone(),
            user_id_claim: self.user_id_claim.clone(),
            max_token_bytes: bounds::size("auth.max_token_bytes", self.max_token_bytes)?,
            typ: self.typ.clone(),
            verified_cache_bytes: bounds::check(
                "auth.verified_cache_bytes",
                self.verified_cache_bytes,
            )?,
        })
    }
}

/// Only asymmetric algorithms: a JWKS holds public keys, and accepting HMAC
/// would let a public key double as a shared secret (RFC 8725 §2.1).
fn parse_algorithm(name: &str) -> Result<Algorithm, ConfigError> {
    use Algorithm::*;
    match name.parse::<Algorithm>() {
        Ok(alg @ (RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA)) => Ok(alg),
        _ => Err(invalid(
            "auth.algorithms",
            format!("`{name}` is not an accepted algorithm (RS256/384/512, PS256/384/512, ES256/384, EdDSA)"),
        )),
    }
}
