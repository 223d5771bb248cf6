//! Inbound authentication: the internal JWT from `Authorization: Bearer …`
//! verified against the configured key set → a [`Principal`]. The
//! "authenticate" step of the flow.
//!
//! Hardening follows RFC 8725: the algorithm allow-list comes from config,
//! never from the token (§3.1); keys are matched by family so a public key
//! can never act as an HMAC secret (§2.1); embedded key references (`jwk`,
//! `jku`, `x5u`, `x5c`) are refused; `iss`, `aud`, `exp` are required.

mod claims;
pub mod jwks;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};

use crate::config::AuthConfig;
use crate::error::{CredentialProblem, GatewayError};
use claims::Claims;
pub use jwks::{JwksError, KeySet, KeyStore};

/// Longest accepted principal or user id.
const MAX_IDENTITY_LEN: usize = 256;

/// Who is calling, as proven by a verified internal JWT.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The caller (from `auth.principal_claim`); keys rate limits and caches.
    pub subject: String,
    /// The KooDrive user id (from `auth.user_id_claim`), sent as `X-User-Id`.
    pub user_id: String,
}

/// The caller's verified JWT. It may be presented to the token endpoint as
/// an RFC 8693 `subject_token`; its `Debug` never shows it.
#[derive(Clone)]
pub struct SubjectToken(Arc<str>);

impl SubjectToken {
    /// Wraps a verified compact JWS.
    pub fn new(token: &str) -> SubjectToken {
        SubjectToken(token.into())
    }

    /// The compact JWS, for the token exchange request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SubjectToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectToken(<redacted>)")
    }
}

/// A successfully authenticated request.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub principal: Principal,
    pub subject_token: SubjectToken,
}

/// Verifies internal JWTs.
#[derive(Debug)]
pub struct Verifier {
    keys: Arc<KeyStore>,
    /// One ready `Validation` per accepted algorithm, built at start-up;
    /// an algorithm not in here is refused.
    validations: Vec<(Algorithm, Validation)>,
    leeway: Duration,
    principal_claim: String,
    user_id_claim: String,
    max_token_bytes: usize,
    typ: Option<String>,
}

impl Verifier {
    /// Builds a verifier over the process's key store.
    pub fn new(config: &AuthConfig, keys: Arc<KeyStore>) -> Verifier {
        Verifier {
            keys,
            validations: config
                .algorithms
                .iter()
                .map(|alg| (*alg, validation(config, *alg)))
                .collect(),
            leeway: config.leeway,
            principal_claim: config.principal_claim.clone(),
            user_id_claim: config.user_id_claim.clone(),
            max_token_bytes: config.max_token_bytes,
            typ: config.typ.clone(),
        }
    }

    /// Authenticates a request from its headers.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<Authenticated, GatewayError> {
        let token = bearer_token(headers, self.max_token_bytes)?;
        let principal = self.verify_token(token).await?;
        Ok(Authenticated {
            principal,
            subject_token: SubjectToken(token.into()),
        })
    }

    /// Verifies one compact JWS and derives the principal.
    pub async fn verify_token(&self, token: &str) -> Result<Principal, GatewayError> {
        use CredentialProblem as P;
        let invalid = GatewayError::InvalidCredentials;
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| invalid(P::MalformedHeaderSegment))?;
        let validation = self
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, validation)| validation)
            .ok_or(invalid(P::AlgorithmNotAccepted))?;
        if header.jwk.is_some()
            || header.jku.is_some()
            || header.x5u.is_some()
            || header.x5c.is_some()
        {
            return Err(invalid(P::EmbeddedKeyReference));
        }
        // RFC 7515 §4.1.11: unknown critical extensions must be refused.
        if header.crit.is_some() {
            return Err(invalid(P::CriticalExtension));
        }
        if let Some(expected) = &self.typ {
            if !header
                .typ
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(expected))
            {
                return Err(invalid(P::WrongType));
            }
        }
        let mut keys = match self.keys.current() {
            Some(keys) => keys,
            None => self
                .keys
                .refetch()
                .await
                .ok_or_else(|| GatewayError::KeysUnavailable {
                    retry_after: self.keys.retry_after(),
                })?,
        };
        // A `kid` the key set does not know may be a freshly rotated key.
        if header.kid.is_some() && keys.find(header.kid.as_deref(), header.alg).is_none() {
            keys = self.keys.refetch().await.unwrap_or(keys);
        }
        let key = keys
            .find(header.kid.as_deref(), header.alg)
            .ok_or(invalid(P::NoMatchingKey))?;

        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => GatewayError::ExpiredCredentials,
                ErrorKind::ImmatureSignature => invalid(P::NotYetValid),
                ErrorKind::InvalidIssuer => invalid(P::WrongIssuer),
                ErrorKind::InvalidAudience => invalid(P::WrongAudience),
                ErrorKind::InvalidSignature => invalid(P::BadSignature),
                ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                    "exp" => invalid(P::MissingClaim("exp")),
                    "iss" => invalid(P::MissingClaim("iss")),
                    _ => invalid(P::MissingClaim("aud")),
                },
                _ => invalid(P::Malformed),
            })?;
        let claims = data.claims;
        if claims.issued_in_future(self.leeway) {
            return Err(invalid(P::IssuedInFuture));
        }
        Ok(Principal {
            subject: identity(&claims, &self.principal_claim)?,
            user_id: identity(&claims, &self.user_id_claim)?,
        })
    }
}

/// The claim checks for tokens signed with `alg`: this algorithm only,
/// `iss`, `aud` and `exp` required, `nbf` checked, with the leeway.
fn validation(config: &AuthConfig, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = config.leeway.as_secs();
    validation
}

/// The token of `Authorization: Bearer <token>` (RFC 6750 §2.1; the scheme
/// is case-insensitive, RFC 9110 §11.1). The header's size is capped before
/// anything is decoded.
fn bearer_token(headers: &HeaderMap, max_bytes: usize) -> Result<&str, GatewayError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(GatewayError::MissingCredentials)?;
    // Two credentials in one request are ambiguous: refuse rather than pick.
    if values.next().is_some() {
        return Err(GatewayError::InvalidCredentials(
            CredentialProblem::MultipleHeaders,
        ));
    }
    if value.len() > max_bytes {
        return Err(GatewayError::InvalidCredentials(
            CredentialProblem::TooLarge,
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| GatewayError::InvalidCredentials(CredentialProblem::MalformedHeader))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(GatewayError::InvalidCredentials(
            CredentialProblem::NotBearer,
        )),
    }
}

/// A claim that names an identity: a non-empty string of visible ASCII
/// (it becomes a header value and a cache key), at most 256 characters.
fn identity(claims: &Claims, name: &str) -> Result<String, GatewayError> {
    let value = claims.string(name).ok_or_else(|| {
        GatewayError::InvalidCredentials(CredentialProblem::MissingIdentity(name.to_owned()))
    })?;
    let usable = !value.is_empty()
        && value.len() <= MAX_IDENTITY_LEN
        && value.bytes().all(|b| b.is_ascii_graphic());
    if !usable {
        return Err(GatewayError::InvalidCredentials(
            CredentialProblem::UnusableIdentity(name.to_owned()),
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const MAX: usize = 8 * 1024;

    fn headers(value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        map
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(&headers("bearer abc"), MAX).unwrap(), "abc");
        assert_eq!(bearer_token(&headers("BEARER abc"), MAX).unwrap(), "abc");
    }

    #[test]
    fn missing_header_is_missing_credentials() {
        assert!(matches!(
            bearer_token(&HeaderMap::new(), MAX),
            Err(GatewayError::MissingCredentials)
        ));
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_invalid() {
        for value in ["Basic abc", "Bearer", "Bearer ", "Token abc"] {
            assert!(
                matches!(
                    bearer_token(&headers(value), MAX),
                    Err(GatewayError::InvalidCredentials(_))
                ),
                "{value}"
            );
        }
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let mut map = headers("Bearer a");
        map.append(AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert!(matches!(
            bearer_token(&map, MAX),
            Err(GatewayError::InvalidCredentials(_))
        ));
    }

    #[test]
    fn oversized_header_is_refused_before_decoding() {
        let value = format!("Bearer {}", "a".repeat(MAX));
        match bearer_token(&headers(&value), MAX) {
            Err(GatewayError::InvalidCredentials(problem)) => {
                assert_eq!(problem, CredentialProblem::TooLarge)
            }
            other => panic!("{other:?}"),
        }
    }
}
