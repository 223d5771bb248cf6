//! Inbound authentication: the internal JWT from `Authorization: Bearer …`
//! verified against the configured key set → a [`Principal`]. The
//! "authenticate" step of the flow.
//!
//! Hardening follows RFC 8725: the algorithm allow-list comes from config,
//! never from the token (§3.1); keys are matched by family so a public key
//! can never act as an HMAC secret (§2.1); embedded key references (`jwk`,
//! `jku`, `x5u`, `x5c`) are refused; `iss`, `aud`, `exp` are required.
//! A token verified once is remembered ([`verified`]) so that repeating it
//! costs no signature check.

mod claims;
pub(crate) mod jwks;
mod verified;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use prometheus_client::registry::Registry;

use crate::config::AuthConfig;
use crate::error::{CredentialProblem, GatewayError};
use claims::{Claims, Times};
use jwks::KeyId;
pub(crate) use jwks::{JwksError, KeySet, KeyStore};
use verified::{Verified, VerifiedCache};

/// Longest accepted principal or user id.
const MAX_IDENTITY_LEN: usize = 256;
/// Longest a verification is remembered, whatever the token's `exp`: past
/// it the signature is checked again.
const MAX_REMEMBERED: Duration = Duration::from_secs(3600);

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
pub(crate) struct Verifier {
    keys: Arc<KeyStore>,
    /// One ready `Validation` per accepted algorithm, built at start-up;
    /// an algorithm not in here is refused.
    validations: Vec<(Algorithm, Validation)>,
    leeway: Duration,
    principal_claim: String,
    user_id_claim: String,
    max_token_bytes: usize,
    typ: Option<String>,
    /// Tokens verified before (`auth.verified_cache_bytes`).
    cache: VerifiedCache,
    /// The time `exp`, `nbf` and `iat` are checked against.
    clock: Clock,
}

/// Wall-clock time in whole seconds since the Unix epoch, the unit of the
/// JWT time claims.
#[derive(Clone, Copy, Debug)]
enum Clock {
    /// The system clock, which jsonwebtoken reads too.
    System,
    /// Tests: `epoch` seconds when tokio's (paused) clock read `at`; it
    /// moves only as tokio's clock does.
    #[cfg(test)]
    Tokio {
        epoch: u64,
        at: tokio::time::Instant,
    },
}

impl Clock {
    fn now(self) -> u64 {
        match self {
            Clock::System => jsonwebtoken::get_current_timestamp(),
            #[cfg(test)]
            Clock::Tokio { epoch, at } => epoch + at.elapsed().as_secs(),
        }
    }
}

/// What a full verification established besides the principal.
struct Proof {
    times: Times,
    kid: Option<String>,
    alg: Algorithm,
    key: KeyId,
}

impl Verifier {
    /// Builds a verifier over the process's key store.
    pub(crate) fn new(config: &AuthConfig, keys: Arc<KeyStore>) -> Verifier {
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
            cache: VerifiedCache::new(config.verified_cache_bytes),
            clock: Clock::System,
        }
    }

    /// Registers the verified-token cache's counter.
    pub(crate) fn register(&self, registry: &mut Registry) {
        self.cache.register(registry);
    }

    /// Authenticates a request from its headers.
    pub(crate) async fn verify(&self, headers: &HeaderMap) -> Result<Authenticated, GatewayError> {
        let token = bearer_token(headers, self.max_token_bytes)?;
        let principal = self.verify_token(token).await?;
        Ok(Authenticated {
            principal,
            subject_token: SubjectToken(token.into()),
        })
    }

    /// Verifies one compact JWS and derives the principal: from the
    /// verified-token cache when this exact token passed before with a key
    /// the key set still holds, else in full (and then remembered).
    pub(crate) async fn verify_token(&self, token: &str) -> Result<Principal, GatewayError> {
        if let Some(cached) = self.cached(token).await {
            // Signature, header, `iss`, `aud` and identity held for these
            // very bytes under this configuration; only the clock moved.
            cached.times.check(self.clock.now(), self.leeway)?;
            return Ok(cached.principal.clone());
        }
        // Boxed: the full verification (and a key refetch) is the rare
        // path, and its future would otherwise enlarge every request's.
        let (principal, proof) = Box::pin(self.verify_in_full(token)).await?;
        if self.cache.enabled() {
            let lifetime = proof
                .times
                .lifetime(self.clock.now(), self.leeway, MAX_REMEMBERED);
            let verified = Verified::new(
                token,
                principal.clone(),
                proof.times,
                proof.kid.as_deref(),
                proof.alg,
                proof.key,
                lifetime,
            );
            self.cache.insert(verified).await;
        }
        Ok(principal)
    }

    /// The remembered verification of `token`, if it may stand in for a
    /// full one. Key rotation: only while the current key set still picks,
    /// for the token's `kid` and `alg`, the very key that verified it (same
    /// [`KeyId`]); otherwise the entry is dropped and the token verified in
    /// full, which gives exactly the answer an uncached token gets. This is
    /// checked on every hit rather than by emptying the cache when the key
    /// set is replaced: a periodic refresh bringing the same keys keeps the
    /// cache warm, and a verification that raced a refresh and stored an
    /// entry for a key that was just removed is caught as well.
    async fn cached(&self, token: &str) -> Option<Arc<Verified>> {
        if !self.cache.enabled() {
            return None;
        }
        let usable = match self.cache.get(token).await {
            Some(entry) => {
                let key_kept = self.keys.current().is_some_and(|keys| {
                    keys.key_id(entry.kid.as_deref(), entry.alg) == Some(entry.key)
                });
                if !key_kept {
                    self.cache.remove(token).await;
                }
                key_kept.then_some(entry)
            }
            None => None,
        };
        self.cache.count(usable.is_some());
        usable
    }

    /// The full verification: header checks, key lookup, signature and
    /// claims.
    async fn verify_in_full(&self, token: &str) -> Result<(Principal, Proof), GatewayError> {
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
        let (key, key_id) = keys
            .find_with_id(header.kid.as_deref(), header.alg)
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
        // jsonwebtoken checked `exp` and `nbf`; these are the rules a cached
        // verification is checked by on every use, so both paths agree.
        let times = claims.times().map_err(invalid)?;
        times.check(self.clock.now(), self.leeway)?;
        let principal = Principal {
            subject: identity(&claims, &self.principal_claim)?,
            user_id: identity(&claims, &self.user_id_claim)?,
        };
        let proof = Proof {
            times,
            kid: header.kid,
            alg: header.alg,
            key: key_id,
        };
        Ok((principal, proof))
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
    // Too large is a size limit (431), not a verdict on the credentials.
    if value.len() > max_bytes {
        return Err(GatewayError::AuthorizationTooLarge { limit: max_bytes });
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

/// For `crate::fuzzing`: the checks a token meets before any key is
/// looked at. A value within the size limit is either refused or yields a
/// non-empty trimmed token whose JOSE header decodes or is refused.
pub(crate) fn fuzz_pre_checks(value: &[u8]) {
    let Ok(value) = http::HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    match bearer_token(&headers, 8192) {
        Ok(token) => {
            assert!(!token.is_empty() && token.trim() == token);
            let _ = jsonwebtoken::decode_header(token);
        }
        Err(GatewayError::AuthorizationTooLarge { .. } | GatewayError::InvalidCredentials(_)) => {}
        Err(other) => panic!("unexpected pre-check error {other:?}"),
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
    use crate::config::JwksSource;
    use http::HeaderValue;
    use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};

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
            Err(GatewayError::AuthorizationTooLarge { limit }) => assert_eq!(limit, MAX),
            other => panic!("{other:?}"),
        }
    }

    // ---- Verifier::verify_token ----

    const ISS: &str = "https://idp.example.test";
    const AUD: &str = "koodrive-gateway";
    const EC_KID: &str = "ec-1";
    const ED_KID: &str = "ed-1";
    /// The configured user id claim; deliberately not `sub`.
    const USER_CLAIM: &str = "koodrive_user";

    fn client() -> crate::http_client::HttpsClient {
        crate::server::tls::install_default_providers();
        crate::http_client::build(crate::server::tls::client_config(None).unwrap())
    }

    fn auth_config(jwks: JwksSource) -> AuthConfig {
        AuthConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            jwks,
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(3600),
            algorithms: vec![Algorithm::ES256, Algorithm::EdDSA],
            leeway: Duration::from_secs(60),
            principal_claim: "sub".into(),
            user_id_claim: USER_CLAIM.into(),
            max_token_bytes: MAX,
            typ: None,
            verified_cache_bytes: 1024 * 1024,
        }
    }

    /// The public JWK of an ES256 signing key, as the key `EC_KID`.
    fn ec_jwk(key: &EncodingKey) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(EC_KID.into());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk
    }

    fn es256_pem() -> String {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem()
    }

    /// An ES256 and an EdDSA signing key, the public halves in a JWKS file.
    struct Keys {
        dir: tempfile::TempDir,
        ec_pem: String,
        ec: EncodingKey,
        ed: EncodingKey,
        ec_jwk: Jwk,
        ed_jwk: Jwk,
    }

    impl Keys {
        fn new() -> Keys {
            crate::server::tls::install_default_providers();
            let ec_pem = es256_pem();
            let ec = EncodingKey::from_ec_pem(ec_pem.as_bytes()).unwrap();
            let ed_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let ed = EncodingKey::from_ed_pem(ed_pair.serialize_pem().as_bytes()).unwrap();
            let ec_jwk = ec_jwk(&ec);
            // rcgen writes Ed25519 keys as PKCS#8 v2, which
            // `Jwk::from_encoding_key` does not take: the JWK by hand.
            let ed_jwk: Jwk = serde_json::from_value(json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": b64(ed_pair.public_key_raw()),
                "alg": "EdDSA",
                "use": "sig",
                "kid": ED_KID,
            }))
            .unwrap();
            let keys = Keys {
                dir: tempfile::tempdir().unwrap(),
                ec_pem,
                ec,
                ed,
                ec_jwk,
                ed_jwk,
            };
            keys.write_jwks(vec![keys.ec_jwk.clone(), keys.ed_jwk.clone()]);
            keys
        }

        /// Rewrites the JWKS file (a refetch then loads it).
        fn write_jwks(&self, keys: Vec<Jwk>) {
            let set = JwkSet { keys };
            std::fs::write(
                self.dir.path().join("jwks.json"),
                serde_json::to_vec(&set).unwrap(),
            )
            .unwrap();
        }

        fn config(&self) -> AuthConfig {
            auth_config(JwksSource::File(self.dir.path().join("jwks.json")))
        }

        async fn verifier(&self) -> Verifier {
            self.verifier_with(|_| {}).await
        }

        async fn verifier_with(&self, edit: impl FnOnce(&mut AuthConfig)) -> Verifier {
            let mut config = self.config();
            edit(&mut config);
            Verifier::new(
                &config,
                KeyStore::start(&config, client(), None).await.unwrap(),
            )
        }

        /// Signs with the key of `header.alg`'s family.
        fn sign(&self, header: &Header, claims: &Value) -> String {
            let key = match header.alg {
                Algorithm::EdDSA => &self.ed,
                _ => &self.ec,
            };
            jsonwebtoken::encode(header, claims, key).unwrap()
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "svc-reports",
            USER_CLAIM: "u-42",
            "iat": now(),
            "exp": now() + 300,
        })
    }

    fn claims_with(name: &str, value: Value) -> Value {
        let mut claims = claims();
        claims[name] = value;
        claims
    }

    fn claims_without(name: &str) -> Value {
        let mut claims = claims();
        claims.as_object_mut().unwrap().remove(name).unwrap();
        claims
    }

    fn header(alg: Algorithm, kid: &str) -> Header {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        header
    }

    fn es256() -> Header {
        header(Algorithm::ES256, EC_KID)
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Refused for exactly `problem`.
    #[track_caller]
    fn assert_refused(result: Result<Principal, GatewayError>, problem: CredentialProblem) {
        match result {
            Err(GatewayError::InvalidCredentials(found)) => assert_eq!(found, problem),
            other => panic!("expected {problem:?}, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_invalid(result: Result<Principal, GatewayError>) {
        assert!(
            matches!(result, Err(GatewayError::InvalidCredentials(_))),
            "expected InvalidCredentials, got {result:?}"
        );
    }

    #[tokio::test]
    async fn a_valid_token_yields_the_subject_and_user_id_of_the_configured_claims() {
        let keys = Keys::new();
        let principal = keys
            .verifier()
            .await
            .verify_token(&keys.sign(&es256(), &claims()))
            .await
            .unwrap();
        assert_eq!(
            principal,
            Principal {
                subject: "svc-reports".into(),
                user_id: "u-42".into(),
            }
        );
    }

    #[tokio::test]
    async fn the_principal_comes_from_whichever_claims_are_configured() {
        let keys = Keys::new();
        let verifier = keys
            .verifier_with(|c| {
                c.principal_claim = "client_id".into();
                c.user_id_claim = "sub".into();
            })
            .await;
        let token = keys.sign(&es256(), &claims_with("client_id", json!("svc-b")));
        let principal = verifier.verify_token(&token).await.unwrap();
        assert_eq!(principal.subject, "svc-b");
        assert_eq!(principal.user_id, "svc-reports");
    }

    #[tokio::test]
    async fn an_eddsa_token_verifies_when_eddsa_is_allowed() {
        let keys = Keys::new();
        let token = keys.sign(&header(Algorithm::EdDSA, ED_KID), &claims());
        let principal = keys.verifier().await.verify_token(&token).await.unwrap();
        assert_eq!(principal.user_id, "u-42");
    }

    #[tokio::test]
    async fn a_token_signed_by_another_key_is_invalid() {
        let keys = Keys::new();
        let other = EncodingKey::from_ec_pem(es256_pem().as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&es256(), &claims(), &other).unwrap();
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn a_token_with_a_tampered_payload_is_invalid() {
        let keys = Keys::new();
        let token = keys.sign(&es256(), &claims());
        let (header, rest) = token.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        let forged = b64(&serde_json::to_vec(&claims_with(USER_CLAIM, json!("u-1"))).unwrap());
        let tampered = format!("{header}.{forged}.{signature}");
        assert_invalid(keys.verifier().await.verify_token(&tampered).await);
    }

    #[tokio::test]
    async fn a_token_from_another_issuer_is_invalid() {
        let keys = Keys::new();
        let token = keys.sign(&es256(), &claims_with("iss", json!("https://evil.test")));
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn a_token_for_another_audience_is_invalid() {
        let keys = Keys::new();
        let token = keys.sign(&es256(), &claims_with("aud", json!("another-service")));
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn a_token_without_iss_or_aud_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        for claim in ["iss", "aud"] {
            let token = keys.sign(&es256(), &claims_without(claim));
            assert_invalid(verifier.verify_token(&token).await);
        }
    }

    #[tokio::test]
    async fn an_expired_token_is_expired_credentials() {
        let keys = Keys::new();
        let token = keys.sign(&es256(), &claims_with("exp", json!(now() - 3600)));
        let result = keys.verifier().await.verify_token(&token).await;
        assert!(
            matches!(result, Err(GatewayError::ExpiredCredentials)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_token_expired_within_the_leeway_is_still_accepted() {
        let keys = Keys::new();
        let token = keys.sign(&es256(), &claims_with("exp", json!(now() - 10)));
        assert!(keys.verifier().await.verify_token(&token).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_not_valid_before_a_future_time_is_invalid() {
        let keys = Keys::new();
        let token = keys.sign(&es256(), &claims_with("nbf", json!(now() + 3600)));
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn a_token_issued_in_the_future_beyond_the_leeway_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims_with("iat", json!(now() + 3600)));
        assert_invalid(verifier.verify_token(&token).await);
        // Within the leeway, clock skew is tolerated.
        let token = keys.sign(&es256(), &claims_with("iat", json!(now() + 10)));
        assert!(verifier.verify_token(&token).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_without_exp_is_invalid() {
        let keys = Keys::new();
        let token = keys.sign(&es256(), &claims_without("exp"));
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn an_algorithm_outside_the_allow_list_is_invalid() {
        let keys = Keys::new();
        let verifier = keys
            .verifier_with(|c| c.algorithms = vec![Algorithm::ES256])
            .await;
        // Signed correctly, with a key the JWKS holds for EdDSA.
        let token = keys.sign(&header(Algorithm::EdDSA, ED_KID), &claims());
        assert_invalid(verifier.verify_token(&token).await);
    }

    #[tokio::test]
    async fn an_unsigned_alg_none_token_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let payload = b64(&serde_json::to_vec(&claims()).unwrap());
        for header in [
            json!({"alg": "none", "typ": "JWT", "kid": EC_KID}),
            json!({"alg": "None", "typ": "JWT"}),
        ] {
            let token = format!("{}.{payload}.", b64(&serde_json::to_vec(&header).unwrap()));
            assert_invalid(verifier.verify_token(&token).await);
        }
    }

    #[tokio::test]
    async fn an_hs256_token_is_invalid() {
        let keys = Keys::new();
        let token = jsonwebtoken::encode(
            &header(Algorithm::HS256, EC_KID),
            &claims(),
            &EncodingKey::from_secret(b"a shared secret").unwrap(),
        )
        .unwrap();
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn an_hs256_token_keyed_with_the_public_key_is_invalid_even_if_hs256_were_allowed() {
        // The classic key-confusion attack: the verifier's public key used
        // as an HMAC secret. Config validation refuses HS256; this checks
        // the key lookup refuses it too.
        let keys = Keys::new();
        let verifier = keys
            .verifier_with(|c| c.algorithms.push(Algorithm::HS256))
            .await;
        let jwks = std::fs::read(keys.dir.path().join("jwks.json")).unwrap();
        let public_pem = rcgen::KeyPair::from_pem(&keys.ec_pem)
            .unwrap()
            .public_key_pem();
        for secret in [jwks.as_slice(), public_pem.as_bytes()] {
            let token = jsonwebtoken::encode(
                &header(Algorithm::HS256, EC_KID),
                &claims(),
                &EncodingKey::from_secret(secret).unwrap(),
            )
            .unwrap();
            assert_invalid(verifier.verify_token(&token).await);
        }
    }

    #[tokio::test]
    async fn an_embedded_jwk_header_is_invalid() {
        let keys = Keys::new();
        let mut header = es256();
        // The token's own (valid) key, embedded: still refused.
        header.jwk = Some(Jwk::from_encoding_key(&keys.ec, Algorithm::ES256).unwrap());
        let token = keys.sign(&header, &claims());
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn an_embedded_jku_header_is_invalid() {
        let keys = Keys::new();
        let mut header = es256();
        header.jku = Some("https://evil.test/jwks.json".into());
        let token = keys.sign(&header, &claims());
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn an_embedded_x5u_header_is_invalid() {
        let keys = Keys::new();
        let mut header = es256();
        header.x5u = Some("https://evil.test/cert.pem".into());
        let token = keys.sign(&header, &claims());
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn a_crit_header_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let mut header = es256();
        header.crit = Some(vec!["exp".into()]);
        assert_invalid(verifier.verify_token(&keys.sign(&header, &claims())).await);
        // jsonwebtoken itself accepts `"crit": ["b64"]` with `"b64": true`;
        // the gateway refuses every critical extension.
        header.crit = Some(vec!["b64".into()]);
        header.extras.insert("b64", true);
        assert_invalid(verifier.verify_token(&keys.sign(&header, &claims())).await);
    }

    #[tokio::test]
    async fn a_wrong_or_missing_typ_is_invalid_when_typ_is_required() {
        let keys = Keys::new();
        let verifier = keys.verifier_with(|c| c.typ = Some("at+jwt".into())).await;
        for typ in [Some("JWT"), Some("at+jwt+x"), None] {
            let mut header = es256();
            header.typ = typ.map(Into::into);
            let token = keys.sign(&header, &claims());
            let result = verifier.verify_token(&token).await;
            assert!(
                matches!(result, Err(GatewayError::InvalidCredentials(_))),
                "typ {typ:?}: {result:?}"
            );
        }
        // The required typ, in any case, is accepted.
        for typ in ["at+jwt", "AT+JWT"] {
            let mut header = es256();
            header.typ = Some(typ.into());
            let token = keys.sign(&header, &claims());
            assert!(verifier.verify_token(&token).await.is_ok(), "{typ}");
        }
    }

    #[tokio::test]
    async fn an_unknown_kid_is_invalid() {
        let keys = Keys::new();
        let token = keys.sign(&header(Algorithm::ES256, "unknown-kid"), &claims());
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn a_token_without_the_principal_claim_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        for claim in ["sub", USER_CLAIM] {
            let token = keys.sign(&es256(), &claims_without(claim));
            let result = verifier.verify_token(&token).await;
            assert!(
                matches!(result, Err(GatewayError::InvalidCredentials(_))),
                "without {claim}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_identity_claim_that_is_not_a_string_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        for value in [json!(42), json!(["u-42"]), json!(null)] {
            let token = keys.sign(&es256(), &claims_with(USER_CLAIM, value.clone()));
            let result = verifier.verify_token(&token).await;
            assert!(
                matches!(result, Err(GatewayError::InvalidCredentials(_))),
                "{value}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_identity_claim_with_spaces_or_controls_or_empty_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        for claim in ["sub", USER_CLAIM] {
            for value in ["svc reports", " u-42", "u-42\n", "u\u{7f}", "ü-42", ""] {
                let token = keys.sign(&es256(), &claims_with(claim, json!(value)));
                let result = verifier.verify_token(&token).await;
                assert!(
                    matches!(result, Err(GatewayError::InvalidCredentials(_))),
                    "{claim} = {value:?}: {result:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_identity_claim_longer_than_256_characters_is_invalid() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        for claim in ["sub", USER_CLAIM] {
            let longest = "a".repeat(MAX_IDENTITY_LEN);
            let token = keys.sign(&es256(), &claims_with(claim, json!(longest)));
            assert!(verifier.verify_token(&token).await.is_ok(), "{claim}");
            let too_long = "a".repeat(MAX_IDENTITY_LEN + 1);
            let token = keys.sign(&es256(), &claims_with(claim, json!(too_long)));
            let result = verifier.verify_token(&token).await;
            assert!(
                matches!(result, Err(GatewayError::InvalidCredentials(_))),
                "{claim}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_token_repeating_a_claim_is_invalid() {
        let keys = Keys::new();
        let header = b64(&serde_json::to_vec(&es256()).unwrap());
        let body = claims().to_string();
        let payload =
            b64(format!("{},\"sub\":\"svc-admin\"}}", &body[..body.len() - 1]).as_bytes());
        let message = format!("{header}.{payload}");
        // Sign the exact bytes, duplicate and all.
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &keys.ec, Algorithm::ES256).unwrap();
        let token = format!("{message}.{signature}");
        assert_invalid(keys.verifier().await.verify_token(&token).await);
    }

    #[tokio::test]
    async fn while_no_keys_load_retry_after_follows_the_background_retry() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url: http::Uri = format!("http://127.0.0.1:{port}/jwks.json")
            .parse()
            .unwrap();
        let config = auth_config(JwksSource::Url(url));
        let store = KeyStore::start(&config, client(), None).await.unwrap();
        // Nothing scheduled yet: the on-demand throttle is the only bound.
        assert_eq!(store.retry_after(), config.jwks_min_refetch);
        // The refresh loop retries a failed start after 1 s (doubling).
        let refresh = tokio::spawn(store.clone().keep_fresh());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let retry_after = store.retry_after();
        refresh.abort();
        assert!(
            retry_after > Duration::from_millis(800) && retry_after <= Duration::from_secs(1),
            "{retry_after:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_jwks_url_is_keys_unavailable() {
        let keys = Keys::new();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url: http::Uri = format!("http://127.0.0.1:{port}/jwks.json")
            .parse()
            .unwrap();
        let config = auth_config(JwksSource::Url(url));
        let store = KeyStore::start(&config, client(), None).await.unwrap();
        assert!(store.current().is_none());
        let verifier = Verifier::new(&config, store);
        let result = verifier.verify_token(&keys.sign(&es256(), &claims())).await;
        // Retry-After follows the schedule: the refetch this request caused
        // allows the next one only after `jwks_min_refetch` (an hour here).
        match result {
            Err(GatewayError::KeysUnavailable { retry_after }) => assert!(
                retry_after > Duration::from_secs(3590) && retry_after <= Duration::from_secs(3600),
                "{retry_after:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    // ---- the verified-token cache ----

    /// Reads `exp`, `nbf` and `iat` against tokio's (paused) clock, which
    /// reads `epoch` now.
    fn set_clock(verifier: &mut Verifier, epoch: u64) {
        verifier.clock = Clock::Tokio {
            epoch,
            at: tokio::time::Instant::now(),
        };
    }

    async fn uncached_verifier(keys: &Keys) -> Verifier {
        keys.verifier_with(|c| c.verified_cache_bytes = 0).await
    }

    #[tokio::test]
    async fn a_repeated_token_is_not_verified_again() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims());
        for _ in 0..3 {
            let principal = verifier.verify_token(&token).await.unwrap();
            assert_eq!(principal.user_id, "u-42");
        }
        // One full verification (the miss), two answered without one.
        assert_eq!(verifier.cache.lookups(), (2, 1));
        // Another token is another miss.
        let other = keys.sign(&header(Algorithm::EdDSA, ED_KID), &claims());
        verifier.verify_token(&other).await.unwrap();
        assert_eq!(verifier.cache.lookups(), (2, 2));
    }

    #[tokio::test]
    async fn a_refused_token_is_not_remembered() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims_with("aud", json!("another-service")));
        for _ in 0..2 {
            assert_invalid(verifier.verify_token(&token).await);
        }
        assert_eq!(verifier.cache.lookups(), (0, 2));
        assert_eq!(verifier.cache.size().await, (0, 0));
    }

    #[tokio::test]
    async fn with_the_cache_off_nothing_is_remembered_or_counted() {
        let keys = Keys::new();
        let verifier = uncached_verifier(&keys).await;
        let token = keys.sign(&es256(), &claims());
        for _ in 0..2 {
            assert!(verifier.verify_token(&token).await.is_ok());
        }
        assert_eq!(verifier.cache.lookups(), (0, 0));
        assert_eq!(verifier.cache.size().await, (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_token_is_refused_as_expired_once_exp_and_the_leeway_pass() {
        let keys = Keys::new();
        let mut verifier = keys.verifier().await;
        let start = now();
        set_clock(&mut verifier, start);
        let token = keys.sign(&es256(), &claims_with("exp", json!(start + 100)));
        assert!(verifier.verify_token(&token).await.is_ok());
        // Up to exp + leeway (60 s) the cached verification serves…
        tokio::time::advance(Duration::from_secs(160)).await;
        assert!(verifier.verify_token(&token).await.is_ok());
        assert_eq!(verifier.cache.lookups(), (1, 1));
        // …one second later the cached entry is refused, as expired.
        tokio::time::advance(Duration::from_secs(1)).await;
        let result = verifier.verify_token(&token).await;
        assert!(
            matches!(result, Err(GatewayError::ExpiredCredentials)),
            "{result:?}"
        );
        assert_eq!(verifier.cache.lookups(), (2, 1), "refused from the cache");
        // The same answer as a verifier that never saw the token.
        let mut uncached = uncached_verifier(&keys).await;
        set_clock(&mut uncached, start + 161);
        let result = uncached.verify_token(&token).await;
        assert!(
            matches!(result, Err(GatewayError::ExpiredCredentials)),
            "{result:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_token_stays_refused_while_its_nbf_is_ahead() {
        // The full verification refuses an `nbf` beyond the leeway, so no
        // such entry is ever stored; one exists only when the wall clock
        // steps back after the token was cached (NTP). It is refused then.
        let keys = Keys::new();
        let mut verifier = keys.verifier().await;
        let start = now();
        set_clock(&mut verifier, start);
        let ahead = keys.sign(&es256(), &claims_with("nbf", json!(start + 3600)));
        for _ in 0..2 {
            assert_invalid(verifier.verify_token(&ahead).await);
        }
        assert_eq!(verifier.cache.lookups(), (0, 2), "never cached");

        let mut valid_now = claims_with("nbf", json!(start));
        valid_now.as_object_mut().unwrap().remove("iat");
        let token = keys.sign(&es256(), &valid_now);
        assert!(verifier.verify_token(&token).await.is_ok());
        // The clock steps back an hour.
        set_clock(&mut verifier, start - 3600);
        assert_refused(
            verifier.verify_token(&token).await,
            CredentialProblem::NotYetValid,
        );
        assert_eq!(verifier.cache.lookups(), (1, 3), "refused from the cache");
        // As a verifier that never saw it would at that time.
        let mut uncached = uncached_verifier(&keys).await;
        set_clock(&mut uncached, start - 3600);
        assert_refused(
            uncached.verify_token(&token).await,
            CredentialProblem::NotYetValid,
        );
        // Back to the present, the entry serves again.
        set_clock(&mut verifier, start);
        assert!(verifier.verify_token(&token).await.is_ok());
        assert_eq!(verifier.cache.lookups(), (2, 3));
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_a_refetch_removes_its_key() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims());
        for _ in 0..2 {
            assert!(verifier.verify_token(&token).await.is_ok());
        }
        assert_eq!(verifier.cache.lookups(), (1, 1));
        // Rotation: the ES256 key leaves the JWKS.
        keys.write_jwks(vec![keys.ed_jwk.clone()]);
        assert!(verifier.keys.refetch().await.is_some());
        assert_refused(
            verifier.verify_token(&token).await,
            CredentialProblem::NoMatchingKey,
        );
        // Not served from the cache: the entry was dropped, the token
        // verified in full and refused.
        assert_eq!(verifier.cache.lookups(), (1, 2));
        assert_eq!(verifier.cache.size().await.0, 0);
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_its_kid_names_new_key_material() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims());
        assert!(verifier.verify_token(&token).await.is_ok());
        // Rotation keeping the kid: `ec-1` is now another key.
        let new_key = EncodingKey::from_ec_pem(es256_pem().as_bytes()).unwrap();
        keys.write_jwks(vec![ec_jwk(&new_key), keys.ed_jwk.clone()]);
        assert!(verifier.keys.refetch().await.is_some());
        assert_refused(
            verifier.verify_token(&token).await,
            CredentialProblem::BadSignature,
        );
        assert_eq!(verifier.cache.lookups(), (0, 2));
        // A token signed by the new key verifies.
        let fresh = jsonwebtoken::encode(&es256(), &claims(), &new_key).unwrap();
        assert!(verifier.verify_token(&fresh).await.is_ok());
    }

    #[tokio::test]
    async fn a_refetch_that_keeps_the_key_keeps_the_cached_token() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims());
        assert!(verifier.verify_token(&token).await.is_ok());
        // A new key set with the same keys (and one more).
        let extra = EncodingKey::from_ec_pem(es256_pem().as_bytes()).unwrap();
        let mut extra = ec_jwk(&extra);
        extra.common.key_id = Some("ec-2".into());
        keys.write_jwks(vec![extra, keys.ec_jwk.clone(), keys.ed_jwk.clone()]);
        assert!(verifier.keys.refetch().await.is_some());
        assert!(verifier.verify_token(&token).await.is_ok());
        assert_eq!(verifier.cache.lookups(), (1, 1));
    }

    #[tokio::test]
    async fn a_flipped_signature_byte_is_refused_while_the_genuine_token_is_cached() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims());
        assert!(verifier.verify_token(&token).await.is_ok());
        let (message, signature) = token.rsplit_once('.').unwrap();
        let mut flipped = signature.as_bytes().to_vec();
        flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
        let forged = format!("{message}.{}", String::from_utf8(flipped).unwrap());
        for _ in 0..2 {
            assert_invalid(verifier.verify_token(&forged).await);
        }
        // Same header and claims, but other bytes: verified in full, twice.
        assert_eq!(verifier.cache.lookups(), (0, 3));
        assert!(verifier.verify_token(&token).await.is_ok());
        assert_eq!(verifier.cache.lookups(), (1, 3));
    }

    #[tokio::test]
    async fn the_verifier_debug_output_never_shows_a_cached_token() {
        let keys = Keys::new();
        let verifier = keys.verifier().await;
        let token = keys.sign(&es256(), &claims());
        assert!(verifier.verify_token(&token).await.is_ok());
        let shown = format!("{verifier:?}");
        let (_, signature) = token.rsplit_once('.').unwrap();
        assert!(!shown.contains(signature), "{shown}");
    }

    // ---- properties ----

    mod properties {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        use super::*;

        proptest! {
            #[test]
            fn any_authorization_value_yields_a_bounded_bearer_token_or_a_refusal(
                value in prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..120),
                    "(?i)(bearer|basic)[ \t]{0,3}[ -~]{0,60}".prop_map(String::into_bytes),
                ],
                max in 8..64usize,
            ) {
                let Ok(value) = HeaderValue::from_bytes(&value) else {
                    return Ok(());
                };
                let mut map = HeaderMap::new();
                map.insert(AUTHORIZATION, value.clone());
                match bearer_token(&map, max) {
                    Ok(token) => {
                        prop_assert!(value.len() <= max);
                        prop_assert!(!token.is_empty());
                        prop_assert_eq!(token.trim(), token);
                        prop_assert!(value.to_str().unwrap().ends_with(token));
                    }
                    Err(GatewayError::AuthorizationTooLarge { limit }) => {
                        prop_assert_eq!(limit, max);
                        prop_assert!(value.len() > max);
                    }
                    Err(GatewayError::InvalidCredentials(_)) => {}
                    Err(other) => prop_assert!(false, "{other:?}"),
                }
            }
        }

        /// Compact-JWS look-alikes: random segments, and headers naming the
        /// accepted algorithms and known kids over random payloads and
        /// signatures.
        fn forged_token() -> impl Strategy<Value = String> {
            let segment = proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| b64(&b));
            let header = (
                prop_oneof![
                    Just("ES256"),
                    Just("EdDSA"),
                    Just("HS256"),
                    Just("none"),
                    Just("RS256")
                ],
                prop_oneof![Just(EC_KID), Just(ED_KID), Just("other")],
            )
                .prop_map(|(alg, kid)| {
                    b64(format!(r#"{{"alg":"{alg}","kid":"{kid}","typ":"JWT"}}"#).as_bytes())
                });
            let payload = Just(b64(claims().to_string().as_bytes()));
            prop_oneof![
                "[ -~]{0,80}",
                (segment.clone(), segment.clone(), segment.clone())
                    .prop_map(|(h, p, s)| format!("{h}.{p}.{s}")),
                (header, prop_oneof![payload, segment.clone()], segment)
                    .prop_map(|(h, p, s)| format!("{h}.{p}.{s}")),
            ]
        }

        #[test]
        fn no_unsigned_or_forged_token_is_ever_accepted() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let keys = Keys::new();
            let verifier = runtime.block_on(keys.verifier());
            let mut runner = TestRunner::new(Config {
                cases: 256,
                ..Config::default()
            });
            runner
                .run(&forged_token(), |token| {
                    let result = runtime.block_on(verifier.verify_token(&token));
                    prop_assert!(
                        matches!(result, Err(GatewayError::InvalidCredentials(_))),
                        "{token}: {result:?}"
                    );
                    Ok(())
                })
                .unwrap();
        }
    }
}
