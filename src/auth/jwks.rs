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
}

/// The keys tokens may be verified with.
pub struct KeySet {
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
    pub async fn from_file(path: &Path) -> Result<KeySet, JwksError> {
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
    pub fn from_json(bytes: &[u8]) -> Result<KeySet, JwksError> {
        let set: JwkSet = serde_json::from_slice(bytes)?;
        let keys: Vec<Key> = set
            .keys
            .iter()
            .filter(|jwk| jwk.is_supported())
            .filter(|jwk| !matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature))
            .filter(|jwk| !matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)))
            .filter_map(|jwk| {
                DecodingKey::from_jwk(jwk).ok().map(|key| Key {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm,
                    key,
                })
            })
            .collect();
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        Ok(KeySet { keys })
    }

    /// The key for a token signed with `alg` and carrying `kid`. Without a
    /// `kid`, only an unambiguous key (exactly one of the right family) is
    /// used. A key never verifies an algorithm outside its family or other
    /// than the `alg` the JWKS pins it to.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        let usable = |k: &&Key| {
            k.key.family() == alg.family() && k.alg.is_none_or(|a| a == KeyAlgorithm::from(alg))
        };
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(usable)
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key),
            None => {
                let mut candidates = self.keys.iter().filter(usable);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(&only.key),
                    _ => None,
                }
            }
        }
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
pub struct KeyStore {
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
    /// Loads the key set once. A file that cannot be used fails start-up; a
    /// URL that cannot be fetched does not: requests get 503 until a
    /// refresh succeeds.
    pub async fn load(
        config: &AuthConfig,
        client: HttpsClient,
    ) -> Result<Arc<KeyStore>, JwksError> {
        KeyStore::start(config, client, None).await
    }

    /// As [`KeyStore::load`], with the key set already read from the file
    /// source when `preloaded` is given.
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
    pub fn current(&self) -> Option<Arc<KeySet>> {
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
    pub async fn refetch(&self) -> Option<Arc<KeySet>> {
        let mut last = self.last_refetch.lock().await;
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.min_refetch) {
            return self.current();
        }
        *last = Some(now);
        match self.fetch().await {
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
        let period = match fetched.max_age {
            Some(max_age) => self.refresh.min(max_age * 3 / 4).max(MIN_REFRESH),
            None => self.refresh,
        };
        fetched.at + period
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

    /// Whether the key set can change without a restart, so that
    /// [`Self::keep_fresh`] is worth running (a URL; a file changes only
    /// when reloaded).
    pub(crate) fn refreshes(&self) -> bool {
        matches!(self.source, JwksSource::Url(_))
    }

    /// Refreshes forever: when [`Self::next_refresh`] is due while
    /// refreshes succeed, on a doubling retry schedule (from 1 s up to the
    /// refresh period) while none has succeeded or the last one failed.
    pub async fn keep_fresh(self: Arc<Self>) {
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
            match self.fetch().await {
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
