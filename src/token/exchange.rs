//! The exchanged-token cache: one KooDrive token per (principal, user id),
//! held until `expires_in` minus a margin (monotonic clock, from receipt),
//! refreshed in the background ahead of expiry while the cached one is still
//! served, never injected past its expiry. At most one exchange per key is
//! in flight (moka's per-key compute lock); after a failure the key backs off
//! exponentially with jitter, and callers get a fast 503 meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::ops::compute::{CompResult, Op};
use rand::Rng;
use tokio::time::Instant;
use tracing::Instrument;

use super::endpoint::{Issued, Subject, TokenEndpoint};
use super::AccessToken;
use crate::auth::{Authenticated, Principal};
use crate::error::{GatewayError, InternalError, TokenFailure};
use crate::metrics::{outcomes, Outcome};
use crate::subscriber::InCurrentSubscriber;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// First back-off delay after a failed exchange.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Longest back-off delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Tokens are cached per caller and KooDrive user.
type Key = (String, String);

fn key_of(principal: &Principal) -> Key {
    (principal.subject.clone(), principal.user_id.clone())
}

/// A cached token and its deadlines.
struct Cached {
    token: AccessToken,
    /// Never used at or after this instant.
    expires_at: Instant,
    /// From this instant on, a request triggers a background refresh.
    refresh_at: Instant,
    /// Set while a background refresh for this entry runs.
    refreshing: AtomicBool,
}

impl Cached {
    fn new(issued: Issued, received: Instant, margin: Duration) -> Cached {
        // A lifetime shorter than twice the margin would leave (almost)
        // nothing; use half of it instead.
        let usable = if issued.expires_in > margin * 2 {
            issued.expires_in - margin
        } else {
            issued.expires_in / 2
        };
        Cached {
            token: issued.token,
            expires_at: received + usable,
            refresh_at: received + usable * 3 / 4,
            refreshing: AtomicBool::new(false),
        }
    }
}

/// Consecutive failures of one key and when it may try again.
#[derive(Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Instant,
}

struct Inner<E> {
    endpoint: E,
    /// `token_exchanges_total{outcome}`: every call to the endpoint.
    exchanges: Family<Outcome, Counter>,
    /// `token_refreshes_total{outcome}`: background refreshes ahead of expiry.
    refreshes: Family<Outcome, Counter>,
    entries: moka::future::Cache<Key, Arc<Cached>>,
    backoff: moka::sync::Cache<Key, Backoff>,
    margin: Duration,
}

/// Exchanged tokens, cached per (principal, user id).
pub struct TokenCache<E> {
    inner: Arc<Inner<E>>,
}

impl<E: TokenEndpoint> TokenCache<E> {
    /// A cache over `endpoint`, holding at most `capacity` tokens.
    pub fn new(endpoint: E, margin: Duration, capacity: u64) -> TokenCache<E> {
        TokenCache {
            inner: Arc::new(Inner {
                endpoint,
                exchanges: outcomes(&["ok", "error"]),
                refreshes: outcomes(&["ok", "error"]),
                entries: moka::future::Cache::new(capacity),
                backoff: moka::sync::Cache::new(capacity),
                margin,
            }),
        }
    }

    /// A valid token for the caller: the cached one while it lasts (and a
    /// background refresh once it nears expiry), else a new exchange.
    pub async fn token_for(&self, caller: &Authenticated) -> Result<AccessToken, GatewayError> {
        let key = key_of(&caller.principal);
        if let Some(entry) = self.inner.entries.get(&key).await {
            let now = Instant::now();
            if now < entry.expires_at {
                if now >= entry.refresh_at && !entry.refreshing.swap(true, Ordering::SeqCst) {
                    self.spawn_refresh(key, subject_of(caller), entry.clone());
                }
                return Ok(entry.token.clone());
            }
        }
        self.inner
            .obtain(key, &subject_of(caller), Need::Valid)
            .await
    }

    /// Registers the exchange and refresh counters.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "token_exchanges",
            "Calls to the token endpoint by outcome (ok, error)",
            self.inner.exchanges.clone(),
        );
        registry.register(
            "token_refreshes",
            "Background token refreshes ahead of expiry by outcome (ok, error)",
            self.inner.refreshes.clone(),
        );
    }

    /// Drops `refused` if it is still the cached token for this caller.
    pub async fn invalidate(&self, principal: &Principal, refused: &AccessToken) {
        let refused = refused.clone();
        self.inner
            .entries
            .entry(key_of(principal))
            .and_compute_with(|existing| async move {
                match existing {
                    Some(entry) if entry.value().token == refused => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    fn spawn_refresh(&self, key: Key, subject: Subject, entry: Arc<Cached>) {
        let inner = self.inner.clone();
        let refresh = async move {
            let outcome = match inner.obtain(key, &subject, Need::Fresh).await {
                Ok(_) => "ok",
                Err(error) => {
                    tracing::debug!(%error, "background token refresh failed; serving the cached token");
                    "error"
                }
            };
            inner.refreshes.get_or_create(&Outcome { outcome }).inc();
            // On success the new entry has its own flag; on failure a later
            // request may try again once the back-off allows.
            entry.refreshing.store(false, Ordering::SeqCst);
        };
        // In the span (trace id) and subscriber of the request that saw the
        // token near expiry.
        tokio::spawn(refresh.in_current_span().in_current_subscriber());
    }
}

/// What the caller of [`Inner::obtain`] needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any token not yet expired.
    Valid,
    /// A token not yet due for refresh.
    Fresh,
}

impl<E: TokenEndpoint> Inner<E> {
    /// Exchanges for `key` unless a good enough token appeared while this
    /// call waited for the key's lock. Calls for one key run one at a time.
    async fn obtain(
        &self,
        key: Key,
        subject: &Subject,
        need: Need,
    ) -> Result<AccessToken, GatewayError> {
        let entry_key = key.clone();
        let result = self
            .entries
            .entry(entry_key)
            .and_try_compute_with(move |existing| async move {
                let now = Instant::now();
                if let Some(entry) = &existing {
                    let entry = entry.value();
                    let good_enough = match need {
                        Need::Valid => now < entry.expires_at,
                        Need::Fresh => now < entry.refresh_at,
                    };
                    if good_enough {
                        return Ok(Op::Nop);
                    }
                }
                if let Some(backoff) = self.backoff.get(&key).filter(|b| now < b.until) {
                    return Err(GatewayError::TokenUnavailable {
                        retry_after: backoff.until - now,
                        cause: TokenFailure::BackingOff,
                    });
                }
                let issued = self.endpoint.issue(subject).await;
                let outcome = if issued.is_ok() { "ok" } else { "error" };
                self.exchanges.get_or_create(&Outcome { outcome }).inc();
                match issued {
                    Ok(issued) => {
                        self.backoff.invalidate(&key);
                        Ok(Op::Put(Arc::new(Cached::new(issued, Instant::now(), self.margin))))
                    }
                    Err(error) => {
                        let retry_after = self.record_failure(&key);
                        tracing::warn!(user_id = %key.1, %error, retry_after_ms = retry_after.as_millis() as u64, "token exchange failed");
                        Err(GatewayError::TokenUnavailable {
                            retry_after,
                            cause: TokenFailure::Exchange(Arc::new(error)),
                        })
                    }
                }
            })
            .await?;
        match result {
            CompResult::Inserted(entry)
            | CompResult::ReplacedWith(entry)
            | CompResult::Unchanged(entry) => Ok(entry.into_value().token.clone()),
            CompResult::Removed(_) | CompResult::StillNone(_) => {
                Err(GatewayError::Internal(InternalError::TokenCacheEmpty))
            }
        }
    }

    /// Doubles the key's delay (with jitter) and returns it.
    fn record_failure(&self, key: &Key) -> Duration {
        let failures = self.backoff.get(key).map_or(0, |b| b.failures) + 1;
        let exponential = BACKOFF_FIRST
            .saturating_mul(1u32 << failures.min(16).saturating_sub(1))
            .min(BACKOFF_MAX);
        // "Equal jitter": between half and all of the exponential delay.
        let delay = exponential.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.backoff.insert(
            key.clone(),
            Backoff {
                failures,
                until: Instant::now() + delay,
            },
        );
        delay
    }
}

fn subject_of(caller: &Authenticated) -> Subject {
    Subject {
        user_id: caller.principal.user_id.clone(),
        subject_token: caller.subject_token.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::SubjectToken;
    use crate::token::endpoint::EndpointError;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    pub(crate) fn caller(subject: &str, user: &str) -> Authenticated {
        Authenticated {
            principal: Principal {
                subject: subject.into(),
                user_id: user.into(),
            },
            subject_token: SubjectToken::new("header.payload.signature"),
        }
    }

    /// A scripted token endpoint: counts calls, can be slowed down or made
    /// to fail, and issues `tok-<user>-<n>` with a fixed lifetime.
    #[derive(Default)]
    struct Scripted {
        calls: AtomicU64,
        down: AtomicBool,
        delay: Mutex<Duration>,
        lifetime: Mutex<Duration>,
    }

    impl TokenEndpoint for Arc<Scripted> {
        async fn issue(&self, subject: &Subject) -> Result<Issued, EndpointError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(EndpointError::Status(503));
            }
            Ok(Issued {
                token: AccessToken::new(format!("tok-{}-{n}", subject.user_id)),
                expires_in: *self.lifetime.lock().unwrap(),
            })
        }
    }

    fn setup(lifetime: Duration) -> (Arc<Scripted>, TokenCache<Arc<Scripted>>) {
        let endpoint = Arc::new(Scripted::default());
        *endpoint.lifetime.lock().unwrap() = lifetime;
        let cache = TokenCache::new(endpoint.clone(), Duration::from_secs(60), 1000);
        (endpoint, cache)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_requests_cause_one_exchange() {
        let (endpoint, cache) = setup(Duration::from_secs(3600));
        *endpoint.delay.lock().unwrap() = Duration::from_millis(100);
        let cache = Arc::new(cache);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.token_for(&caller("app", "u1")).await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().expose(), "tok-u1-1");
        }
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn distinct_users_get_distinct_tokens() {
        let (endpoint, cache) = setup(Duration::from_secs(3600));
        for user in ["a", "b", "c"] {
            let token = cache.token_for(&caller("app", user)).await.unwrap();
            assert!(token.expose().starts_with(&format!("tok-{user}-")));
        }
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_near_expiry_is_refreshed_in_the_background() {
        // 600 s lifetime, 60 s margin: usable 540 s, refresh after 405 s.
        let (endpoint, cache) = setup(Duration::from_secs(600));
        let first = cache.token_for(&caller("app", "u1")).await.unwrap();
        tokio::time::advance(Duration::from_secs(410)).await;
        // Still served while the refresh runs.
        assert_eq!(cache.token_for(&caller("app", "u1")).await.unwrap(), first);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
        let second = cache.token_for(&caller("app", "u1")).await.unwrap();
        assert_ne!(second, first);
        // Many requests in the refresh window start only one refresh.
        tokio::time::advance(Duration::from_secs(410)).await;
        for _ in 0..20 {
            cache.token_for(&caller("app", "u1")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn endpoint_down_serves_the_cached_token_until_expiry_then_503() {
        let (endpoint, cache) = setup(Duration::from_secs(600));
        let first = cache.token_for(&caller("app", "u1")).await.unwrap();
        endpoint.down.store(true, Ordering::SeqCst);
        // Through the refresh window: background refreshes fail, the cached
        // token keeps being served.
        for _ in 0..13 {
            tokio::time::advance(Duration::from_secs(40)).await;
            assert_eq!(cache.token_for(&caller("app", "u1")).await.unwrap(), first);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // 520 s elapsed; at 540 s the token expires and is never injected.
        tokio::time::advance(Duration::from_secs(21)).await;
        match cache.token_for(&caller("app", "u1")).await {
            Err(GatewayError::TokenUnavailable { retry_after, .. }) => {
                assert!(retry_after <= BACKOFF_MAX && retry_after > Duration::ZERO)
            }
            other => panic!("expected 503, got {other:?}"),
        }
        // During the back-off, callers fail fast without calling the endpoint.
        let calls = endpoint.calls.load(Ordering::SeqCst);
        assert!(matches!(
            cache.token_for(&caller("app", "u1")).await,
            Err(GatewayError::TokenUnavailable { .. })
        ));
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), calls);
        // The endpoint recovers: after the back-off a new token is issued.
        endpoint.down.store(false, Ordering::SeqCst);
        tokio::time::advance(BACKOFF_MAX).await;
        let fresh = cache.token_for(&caller("app", "u1")).await.unwrap();
        assert_ne!(fresh, first);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_exponentially_and_is_capped() {
        let (endpoint, cache) = setup(Duration::from_secs(600));
        endpoint.down.store(true, Ordering::SeqCst);
        let mut delays = Vec::new();
        for _ in 0..10 {
            match cache.token_for(&caller("app", "u1")).await {
                Err(GatewayError::TokenUnavailable { retry_after, .. }) => {
                    delays.push(retry_after);
                    tokio::time::advance(retry_after).await;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 10);
        assert!(delays[0] <= BACKOFF_FIRST && delays[0] >= BACKOFF_FIRST / 2);
        assert!(delays[4] >= BACKOFF_FIRST * 8, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_forces_one_new_exchange_and_keeps_newer_tokens() {
        let (endpoint, cache) = setup(Duration::from_secs(3600));
        let alice = caller("app", "u1");
        let first = cache.token_for(&alice).await.unwrap();
        cache.invalidate(&alice.principal, &first).await;
        let second = cache.token_for(&alice).await.unwrap();
        assert_ne!(second, first);
        // A stale invalidation (of `first` again) must not drop `second`.
        cache.invalidate(&alice.principal, &first).await;
        assert_eq!(cache.token_for(&alice).await.unwrap(), second);
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn short_lifetimes_keep_half_instead_of_going_negative() {
        let now = Instant::now();
        let issued = Issued {
            token: AccessToken::new("t"),
            expires_in: Duration::from_secs(90),
        };
        let cached = Cached::new(issued, now, Duration::from_secs(60));
        assert_eq!(cached.expires_at - now, Duration::from_secs(45));
        assert!(cached.refresh_at < cached.expires_at);
    }
}
