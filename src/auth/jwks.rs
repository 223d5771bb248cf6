//! The verification keys: a standard JWKS document (RFC 7517) turned into
//! one `DecodingKey` per usable key, looked up by `kid` ([`KeySet`]), and
//! the process's one [`KeyStore`] that loads it from a file or URL and keeps
//! it fresh: refreshed in the background, the last good set kept when a
//! refresh fails, refetched on an unknown `kid` at most once at a time and
//! once per `auth.jwks_min_refetch_s`.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::ACCEPT;
use http::Request;
use http_body_util::Full;
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

use crate::cache_control;
use crate::config::{AuthConfig, JwksSource};
use crate::http_client::{self, FetchError, HttpsClient};
use crate::metrics::{outcomes, Outcome};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Largest JWKS document accepted from a URL.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Per-fetch timeout for a JWKS URL.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed background refresh; doubles up to the
/// refresh period.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Shortest refresh period, however small the IdP's `max-age`.
const MIN_REFRESH: Duration = Duration::from_secs(10);

/// A JWKS that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a JWKS document: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the JWKS holds no usable signing key")]
    Empty,
    #[error("fetching the JWKS: {0}")]
    Fetch(#[from] FetchError),
    #[error("the JWKS URL answered with status {0}")]
    Status(u16),
}

/// One verification key.
struct Key {
    kid: Option<String>,
    /// The `alg` the key is restricted to, if the JWKS says.
    alg: Option<KeyAlgorithm>,
    key: DecodingKey,
    id: KeyId,
}

/// What a key is, independently of which load of the key set holds it: a
/// SHA-256 of its public parameters (`kty`, `crv`, `x`, `y`, `n`, `e` as the
/// JWKS spells them). The verified-token cache remembers it to tell, on a
/// later use, whether the key that verified a token is still in the set —
/// the same `kid` with new material is another key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyId([u8; 32]);

impl KeyId {
    fn of(jwk: &jsonwebtoken::jwk::Jwk) -> Option<KeyId> {
        // Serializing plain strings and enums cannot fail; a key that did
        // would be skipped like one `DecodingKey` cannot use.
        let parameters = serde_json::to_vec(&jwk.algorithm).ok()?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &parameters);
        let mut id = [0; 32];
        id.copy_from_slice(digest.as_ref());
        Some(KeyId(id))
    }

    /// A made-up identity, for tests of what stores one.
    #[cfg(test)]
    pub(crate) fn for_tests(n: u8) -> KeyId {
        KeyId([n; 32])
    }
}

/// The keys tokens may be verified with.
pub(crate) struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

impl KeySet {
    /// Reads and parses a JWKS file (without blocking the runtime).
    pub(crate) async fn from_file(path: &Path) -> Result<KeySet, JwksError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| JwksError::Read {
                path: path.display().to_string(),
                source,
            })?;
        KeySet::from_json(&bytes)
    }

    /// Parses a JWKS document. Keys that are not for signatures, not
    /// supported, or symmetric (`oct`) are skipped: a public key set must
    /// never hold a shared secret.
    pub(crate) fn from_json(bytes: &[u8]) -> Result<KeySet, JwksError> {
        let set: JwkSet = serde_json::from_slice(bytes)?;
        let keys: Vec<Key> = set
            .keys
            .iter()
            // `alg` is optional (RFC 7517 §4.4): a key without it serves any
            // algorithm of its family; one with an unsupported `alg` is
            // skipped.
            .filter(|jwk| jwk.common.key_algorithm.is_none() || jwk.is_supported())
            .filter(|jwk| !matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature))
            .filter(|jwk| !matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)))
            .filter_map(|jwk| {
                Some(Key {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm,
                    key: DecodingKey::from_jwk(jwk).ok()?,
                    id: KeyId::of(jwk)?,
                })
            })
            .collect();
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        Ok(KeySet { keys })
    }

    /// Each key's `kid`, `alg` and identity: equal for two loads of the
    /// same keys.
    fn fingerprint(&self) -> Vec<(Option<&str>, Option<KeyAlgorithm>, KeyId)> {
        self.keys
            .iter()
            .map(|k| (k.kid.as_deref(), k.alg, k.id))
            .collect()
    }

    /// The key for a token signed with `alg` and carrying `kid`. Without a
    /// `kid`, only an unambiguous key (exactly one of the right family) is
    /// used. A key never verifies an algorithm outside its family or other
    /// than the `alg` the JWKS pins it to.
    pub(crate) fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        self.find_key(kid, alg).map(|k| &k.key)
    }

    /// The key [`Self::find`] picks, with its identity.
    pub(crate) fn find_with_id(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Option<(&DecodingKey, KeyId)> {
        self.find_key(kid, alg).map(|k| (&k.key, k.id))
    }

    /// The identity of the key [`Self::find`] picks.
    pub(crate) fn key_id(&self, kid: Option<&str>, alg: Algorithm) -> Option<KeyId> {
        self.find_key(kid, alg).map(|k| k.id)
    }

    fn find_key(&self, kid: Option<&str>, alg: Algorithm) -> Option<&Key> {
        let usable = |k: &&Key| {
            k.key.family() == alg.family() && k.alg.is_none_or(|a| a == KeyAlgorithm::from(alg))
        };
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(usable)
                .find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut candidates = self.keys.iter().filter(usable);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        }
    }
}

/// The time between background refreshes: `refresh`, shortened to three
/// quarters of the JWKS URL's `max-age` but not below 10 s. `max-age` comes
/// from the network, so any value must be safe (divide before multiplying).
fn refresh_period(refresh: Duration, max_age: Option<Duration>) -> Duration {
    match max_age {
        Some(max_age) => refresh.min(max_age / 4 * 3).max(MIN_REFRESH),
        None => refresh,
    }
}

/// When the key set was last loaded and how long its source said it stays
/// valid.
#[derive(Clone, Copy, Debug)]
struct Fetched {
    at: Instant,
    max_age: Option<Duration>,
}

/// The process's key set and how it is kept fresh.
pub(crate) struct KeyStore {
    source: JwksSource,
    client: HttpsClient,
    current: RwLock<Option<Arc<KeySet>>>,
    /// When the last on-demand refetch started; the lock makes refetches
    /// single-flight.
    last_refetch: tokio::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
    refresh: Duration,
    /// When the key set was last fetched, and the `max-age` sent with it.
    fetched: std::sync::Mutex<Fetched>,
    /// When the background refresh tries next.
    next_attempt: std::sync::Mutex<Option<Instant>>,
    /// `jwks_refreshes_total{outcome}`: every load after the first.
    refreshes: Family<Outcome, Counter>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("source", &self.source)
            .field("current", &self.current())
            .finish()
    }
}

impl KeyStore {
    /// Loads the key set once — or takes `preloaded`, the file source's set
    /// as the loader read it. A file that cannot be used fails start-up; a
    /// URL that cannot be fetched does not: requests get 503 until a
    /// refresh succeeds.
    pub(crate) async fn start(
        config: &AuthConfig,
        client: HttpsClient,
        preloaded: Option<KeySet>,
    ) -> Result<Arc<KeyStore>, JwksError> {
        let store = Arc::new(KeyStore {
            source: config.jwks.clone(),
            client,
            current: RwLock::new(None),
            last_refetch: tokio::sync::Mutex::new(None),
            min_refetch: config.jwks_min_refetch,
            refresh: config.jwks_refresh,
            fetched: std::sync::Mutex::new(Fetched {
                at: Instant::now(),
                max_age: None,
            }),
            next_attempt: std::sync::Mutex::new(None),
            refreshes: outcomes(&["ok", "error"]),
        });
        let first = match preloaded {
            Some(set) => Ok(set),
            None => store.fetch().await,
        };
        match first {
            Ok(set) => store.replace(set),
            Err(error) => match &store.source {
                JwksSource::File(_) => return Err(error),
                JwksSource::Url(url) => {
                    tracing::error!(%url, %error, "JWKS unavailable at start-up; requests get 503 until it loads")
                }
            },
        }
        Ok(store)
    }

    /// The current key set, if one was ever loaded.
    pub(crate) fn current(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn replace(&self, set: KeySet) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(set));
    }

    /// Refetches on demand (unknown `kid`, or no key set yet): one fetch at
    /// a time, and none if the last one started within `min_refetch`, so
    /// random `kid`s cannot flood the identity provider. Returns the key
    /// set to use afterwards.
    pub(crate) async fn refetch(&self) -> Option<Arc<KeySet>> {
        let mut last = self.last_refetch.lock().await;
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.min_refetch) {
            return self.current();
        }
        *last = Some(now);
        let fetched = self.fetch().await;
        self.count(fetched.is_ok());
        match fetched {
            Ok(set) => self.replace(set),
            Err(error) => {
                tracing::warn!(%error, "JWKS refetch failed; keeping the last good key set")
            }
        }
        self.current()
    }

    /// When the next background refresh is due: `auth.jwks_refresh_s`
    /// after the last fetch, or sooner — at three quarters of the key set's
    /// cache lifetime when the JWKS URL sends `Cache-Control: max-age` —
    /// but never less than 10 s after it.
    fn next_refresh(&self) -> Instant {
        let fetched = *self.fetched.lock().unwrap_or_else(|p| p.into_inner());
        fetched.at + refresh_period(self.refresh, fetched.max_age)
    }

    /// How long until the key set may next be loaded: the background
    /// refresh's next attempt or the next allowed on-demand refetch,
    /// whichever comes first (for `Retry-After` while none is loaded).
    pub(crate) fn retry_after(&self) -> Duration {
        let now = Instant::now();
        let background = *self.next_attempt.lock().unwrap_or_else(|p| p.into_inner());
        let on_demand = match self.last_refetch.try_lock() {
            Ok(last) => last.map(|at| at + self.min_refetch),
            // A refetch is running right now.
            Err(_) => Some(now),
        };
        [background, on_demand]
            .into_iter()
            .flatten()
            .min()
            .map_or(self.min_refetch, |at| at.saturating_duration_since(now))
    }

    /// Registers the refresh counter.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "jwks_refreshes",
            "JWKS reloads after start-up (background and unknown kid) by outcome (ok, error)",
            self.refreshes.clone(),
        );
    }

    /// Counts a reload's outcome.
    fn count(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.refreshes.get_or_create(&Outcome { outcome }).inc();
    }

    /// Reads `auth.jwks_file` again (SIGHUP, a change on disk): a document
    /// that parses and holds a usable key replaces the current set — and
    /// the verified-token cache then refuses tokens whose key left it;
    /// anything else leaves the current set serving. Returns whether the
    /// keys changed; `Ok(false)` as well for a URL source, which refreshes
    /// on its own schedule.
    pub(crate) async fn reload_file(&self) -> Result<bool, JwksError> {
        let JwksSource::File(path) = &self.source else {
            return Ok(false);
        };
        let set = KeySet::from_file(path).await?;
        let changed = self
            .current()
            .is_none_or(|current| current.fingerprint() != set.fingerprint());
        if changed {
            self.replace(set);
        }
        Ok(changed)
    }

    /// Whether the key set can change without a restart, so that
    /// [`Self::keep_fresh`] is worth running (a URL; a file changes only
    /// when reloaded).
    pub(crate) fn refreshes(&self) -> bool {
        matches!(self.source, JwksSource::Url(_))
    }

    /// Refreshes forever: when [`Self::next_refresh`] is due while
    /// refreshes succeed, on a doubling retry schedule (from 1 s up to the
    /// refresh period) while none has succeeded or the last one failed.
    pub(crate) async fn keep_fresh(self: Arc<Self>) {
        let mut retry = self.current().is_none().then_some(RETRY_FIRST);
        loop {
            let due = match retry {
                Some(delay) => Instant::now() + delay,
                None => self.next_refresh(),
            };
            *self.next_attempt.lock().unwrap_or_else(|p| p.into_inner()) = Some(due);
            tokio::time::sleep_until(due).await;
            // An on-demand refetch may have renewed the set meanwhile.
            if retry.is_none() && self.next_refresh() > Instant::now() {
                continue;
            }
            let fetched = self.fetch().await;
            self.count(fetched.is_ok());
            match fetched {
                Ok(set) => {
                    self.replace(set);
                    retry = None;
                }
                Err(error) => {
                    tracing::warn!(%error, "JWKS refresh failed; keeping the last good key set");
                    retry = Some(retry.map_or(RETRY_FIRST, |d| (d * 2).min(self.refresh)));
                }
            }
        }
    }

    /// Loads the key set once and records when (and its `max-age`).
    async fn fetch(&self) -> Result<KeySet, JwksError> {
        let (set, max_age) = self.load_once().await?;
        *self.fetched.lock().unwrap_or_else(|p| p.into_inner()) = Fetched {
            at: Instant::now(),
            max_age,
        };
        Ok(set)
    }

    async fn load_once(&self) -> Result<(KeySet, Option<Duration>), JwksError> {
        match &self.source {
            JwksSource::File(path) => Ok((KeySet::from_file(path).await?, None)),
            JwksSource::Url(url) => {
                let request = Request::get(url.clone())
                    .header(ACCEPT, "application/json, application/jwk-set+json")
                    .body(Full::<Bytes>::default())
                    .map_err(|_| JwksError::Status(0))?;
                let fetched =
                    http_client::fetch(&self.client, request, FETCH_TIMEOUT, MAX_JWKS_BYTES)
                        .await?;
                if fetched.status != http::StatusCode::OK {
                    return Err(JwksError::Status(fetched.status.as_u16()));
                }
                let set = KeySet::from_json(&fetched.body)?;
                let max_age = cache_control::max_age(&fetched.headers).map(Duration::from_secs);
                Ok((set, max_age))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    // Public keys from the RFCs' examples: RSA (RFC 7517 A.1), two P-256
    // keys (RFC 7517 A.1, RFC 7515 A.3) and Ed25519 (RFC 8037 A.2).
    const RSA_N: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
    const EC_1: (&str, &str) = (
        "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
        "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM",
    );
    const EC_2: (&str, &str) = (
        "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
    );
    const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    const ALL: [Algorithm; 12] = [
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::EdDSA,
    ];

    fn rsa(kid: &str, alg: &str) -> Value {
        json!({"kty": "RSA", "kid": kid, "alg": alg, "use": "sig", "n": RSA_N, "e": "AQAB"})
    }

    fn ec(kid: &str, alg: &str, (x, y): (&str, &str)) -> Value {
        json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": alg, "use": "sig", "x": x, "y": y})
    }

    fn ed(kid: &str, alg: &str) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": alg, "use": "sig", "x": ED_X})
    }

    fn oct(kid: &str) -> Value {
        json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": "c2hhcmVkLXNlY3JldC1zaGFyZWQtc2VjcmV0"})
    }

    fn parse(keys: Vec<Value>) -> Result<KeySet, JwksError> {
        KeySet::from_json(&serde_json::to_vec(&json!({ "keys": keys })).unwrap())
    }

    fn key_set(keys: Vec<Value>) -> KeySet {
        parse(keys).unwrap()
    }

    /// The position in the JWKS (of the usable keys) of the key `find`
    /// picks.
    fn found(set: &KeySet, kid: Option<&str>, alg: Algorithm) -> Option<usize> {
        let key = set.find(kid, alg)?;
        Some(
            set.keys
                .iter()
                .position(|k| std::ptr::eq(&k.key, key))
                .expect("find returned a key outside the set"),
        )
    }

    #[test]
    fn the_key_with_the_tokens_kid_is_found() {
        let set = key_set(vec![
            ec("a", "ES256", EC_1),
            ec("b", "ES256", EC_2),
            rsa("c", "RS256"),
        ]);
        assert_eq!(found(&set, Some("a"), Algorithm::ES256), Some(0));
        assert_eq!(found(&set, Some("b"), Algorithm::ES256), Some(1));
        assert_eq!(found(&set, Some("c"), Algorithm::RS256), Some(2));
    }

    #[test]
    fn an_unknown_kid_finds_no_key_even_when_one_key_would_fit() {
        let set = key_set(vec![ec("a", "ES256", EC_1)]);
        assert_eq!(found(&set, Some("a"), Algorithm::ES256), Some(0));
        assert_eq!(found(&set, Some("unknown"), Algorithm::ES256), None);
        assert_eq!(found(&set, Some(""), Algorithm::ES256), None);
    }

    #[test]
    fn an_ec_key_never_verifies_rs256() {
        // Even mislabelled with "alg": "RS256", an EC key stays an EC key.
        let set = key_set(vec![
            ec("ec", "ES256", EC_1),
            ec("mislabelled", "RS256", EC_2),
        ]);
        for kid in ["ec", "mislabelled"] {
            for alg in [Algorithm::RS256, Algorithm::PS256, Algorithm::HS256] {
                assert_eq!(found(&set, Some(kid), alg), None, "{kid} {alg:?}");
            }
        }
        assert_eq!(found(&set, None, Algorithm::RS256), None);
        assert_eq!(found(&set, Some("ec"), Algorithm::ES256), Some(0));
    }

    #[test]
    fn an_rsa_key_never_verifies_es256() {
        let set = key_set(vec![rsa("rsa", "RS256"), rsa("mislabelled", "ES256")]);
        for kid in ["rsa", "mislabelled"] {
            for alg in [Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA] {
                assert_eq!(found(&set, Some(kid), alg), None, "{kid} {alg:?}");
            }
        }
        assert_eq!(found(&set, None, Algorithm::ES256), None);
        assert_eq!(found(&set, Some("rsa"), Algorithm::RS256), Some(0));
    }

    #[test]
    fn an_ed25519_key_verifies_eddsa_only() {
        let set = key_set(vec![ed("ed", "EdDSA"), ed("mislabelled", "ES256")]);
        for alg in ALL {
            let expected = (alg == Algorithm::EdDSA).then_some(0);
            assert_eq!(found(&set, Some("ed"), alg), expected, "{alg:?}");
            assert_eq!(found(&set, Some("mislabelled"), alg), None, "{alg:?}");
        }
    }

    #[test]
    fn a_key_pinned_to_rs256_is_not_used_for_rs384_or_ps256() {
        let set = key_set(vec![rsa("rsa", "RS256")]);
        assert_eq!(found(&set, Some("rsa"), Algorithm::RS256), Some(0));
        assert_eq!(found(&set, None, Algorithm::RS256), Some(0));
        for alg in [
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            assert_eq!(found(&set, Some("rsa"), alg), None, "{alg:?}");
            assert_eq!(found(&set, None, alg), None, "{alg:?}");
        }
    }

    #[test]
    fn a_key_pinned_to_es256_is_not_used_for_es384() {
        let set = key_set(vec![ec("ec", "ES256", EC_1)]);
        assert_eq!(found(&set, Some("ec"), Algorithm::ES384), None);
        assert_eq!(found(&set, None, Algorithm::ES384), None);
    }

    #[test]
    fn keys_for_encryption_are_skipped() {
        let mut enc = ec("enc", "ES256", EC_2);
        enc["use"] = json!("enc");
        let mut unspecified = ec("unspecified", "ES256", EC_1);
        unspecified.as_object_mut().unwrap().remove("use");
        let set = key_set(vec![enc.clone(), unspecified, ec("sig", "ES256", EC_1)]);
        assert_eq!(set.keys.len(), 2);
        assert_eq!(found(&set, Some("enc"), Algorithm::ES256), None);
        assert_eq!(found(&set, Some("unspecified"), Algorithm::ES256), Some(0));
        assert_eq!(found(&set, Some("sig"), Algorithm::ES256), Some(1));
        assert!(matches!(parse(vec![enc]), Err(JwksError::Empty)));
    }

    #[test]
    fn any_max_age_gives_a_refresh_period_between_10_s_and_the_configured_one() {
        let refresh = Duration::from_secs(300);
        assert_eq!(refresh_period(refresh, None), refresh);
        assert_eq!(
            refresh_period(refresh, Some(Duration::from_secs(120))),
            Duration::from_secs(90)
        );
        assert_eq!(refresh_period(refresh, Some(Duration::ZERO)), MIN_REFRESH);
        assert_eq!(
            refresh_period(refresh, Some(Duration::from_secs(u64::MAX))),
            refresh
        );
    }

    #[test]
    fn a_key_without_alg_serves_every_algorithm_of_its_family() {
        let mut open = ec("open", "ES256", EC_1);
        open.as_object_mut().unwrap().remove("alg");
        let set = key_set(vec![open]);
        assert_eq!(found(&set, Some("open"), Algorithm::ES256), Some(0));
        assert_eq!(found(&set, None, Algorithm::ES256), Some(0));
        // Still never outside its family.
        assert_eq!(found(&set, Some("open"), Algorithm::RS256), None);
        assert_eq!(found(&set, Some("open"), Algorithm::EdDSA), None);
    }

    #[test]
    fn symmetric_oct_keys_are_skipped() {
        let set = key_set(vec![oct("hmac"), ec("ec", "ES256", EC_1)]);
        assert_eq!(set.keys.len(), 1);
        assert_eq!(found(&set, Some("hmac"), Algorithm::HS256), None);
        assert_eq!(found(&set, None, Algorithm::HS256), None);
        assert_eq!(found(&set, Some("ec"), Algorithm::ES256), Some(0));
    }

    #[test]
    fn a_jwks_of_only_symmetric_keys_is_empty() {
        assert!(matches!(
            parse(vec![oct("hmac-1"), oct("hmac-2")]),
            Err(JwksError::Empty)
        ));
    }

    #[test]
    fn a_key_keeps_its_identity_across_loads_and_new_material_under_its_kid_is_another() {
        let first = key_set(vec![ec("a", "ES256", EC_1), rsa("r", "RS256")]);
        let reloaded = key_set(vec![rsa("r", "RS256"), ec("a", "ES256", EC_1)]);
        let id = first.key_id(Some("a"), Algorithm::ES256);
        assert!(id.is_some());
        assert_eq!(id, reloaded.key_id(Some("a"), Algorithm::ES256));
        assert_eq!(id, reloaded.key_id(None, Algorithm::ES256));
        let rotated = key_set(vec![ec("a", "ES256", EC_2)]);
        assert_ne!(id, rotated.key_id(Some("a"), Algorithm::ES256));
        assert_ne!(id, first.key_id(Some("r"), Algorithm::RS256));
        assert_eq!(first.key_id(Some("a"), Algorithm::RS256), None);
    }

    #[test]
    fn without_a_kid_the_only_key_of_the_family_is_used() {
        let set = key_set(vec![
            rsa("rsa", "RS256"),
            ec("ec", "ES256", EC_1),
            ed("ed", "EdDSA"),
        ]);
        assert_eq!(found(&set, None, Algorithm::RS256), Some(0));
        assert_eq!(found(&set, None, Algorithm::ES256), Some(1));
        assert_eq!(found(&set, None, Algorithm::EdDSA), Some(2));
    }

    #[test]
    fn without_a_kid_two_keys_of_the_family_are_ambiguous() {
        let set = key_set(vec![
            ec("ec-1", "ES256", EC_1),
            ec("ec-2", "ES256", EC_2),
            rsa("rsa", "RS256"),
        ]);
        assert_eq!(found(&set, None, Algorithm::ES256), None);
        assert_eq!(found(&set, None, Algorithm::RS256), Some(2));
        assert_eq!(found(&set, Some("ec-2"), Algorithm::ES256), Some(1));
    }
}
