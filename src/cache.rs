//! The per-user response cache: the "cache" step of the flow, after
//! authentication and validation (a hit skips neither) and before the token
//! exchange (a hit needs no KooDrive token).
//!
//! The key always holds the verified principal and KooDrive user id, so one
//! user's jobs can never answer another user's request; no configuration
//! removes them. Only KooDrive's success payload is stored (per-request
//! values such as `X-Traceid` are added fresh on every response). Capacity
//! is bounded in bytes by a moka weigher; freshness is decided on tokio's
//! clock so tests can pause time. Concurrent identical misses share one
//! upstream call, and a failed load is shared by its waiters, not stored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::time::Instant;

use crate::auth::Principal;
use crate::config::CacheConfig;
use crate::error::GatewayError;
use crate::jobs::JobsQuery;
use crate::language::Language;
use crate::upstream::UpstreamReply;

/// Longest a finished reload's answer is shared (normally it is dropped
/// as soon as its load ends; this bounds a missed drop).
const RELOAD_SHARING: Duration = Duration::from_secs(1);
/// Bytes charged per entry on top of body and key, for moka's bookkeeping.
const ENTRY_OVERHEAD: usize = 96;

/// What a cached response is for. The identity fields are not optional.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    subject: String,
    user_id: String,
    query: JobsQuery,
    language: Language,
}

impl CacheKey {
    /// The key of a validated request by a verified caller.
    pub fn new(principal: &Principal, query: &JobsQuery, language: &Language) -> CacheKey {
        CacheKey {
            subject: principal.subject.clone(),
            user_id: principal.user_id.clone(),
            query: query.clone(),
            language: language.clone(),
        }
    }

    fn weight(&self) -> usize {
        self.subject.len() + self.user_id.len() + self.language.as_str().len() + 32
    }
}

/// A stored payload and its deadlines.
struct Entry {
    body: Bytes,
    stored_at: Instant,
    fresh_until: Instant,
    /// Servable on upstream failure until then (== `fresh_until` when
    /// stale-if-error is off).
    stale_until: Instant,
}

/// How a response was produced, for `X-Cache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh entry.
    Hit,
    /// Loaded from KooDrive (possibly sharing another request's load).
    Miss,
    /// The client asked to skip the cache (or the cache is off); loaded from
    /// KooDrive and, if storable, the entry refreshed.
    Bypass,
    /// KooDrive failed; an expired entry within the stale-if-error window
    /// was served.
    Stale,
}

impl CacheStatus {
    /// The `cache_requests_total{result}` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Stale => "stale",
        }
    }

    /// The `X-Cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Bypass => "BYPASS",
            CacheStatus::Stale => "STALE",
        }
    }
}

/// A response body and how it was obtained.
#[derive(Clone, Debug)]
pub struct Served {
    pub body: Bytes,
    pub status: CacheStatus,
    /// Time since the payload was received from KooDrive (for `Age`), on
    /// hits and stale serves.
    pub age: Option<Duration>,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Misses that shared another request's upstream call.
    pub coalesced: u64,
    pub stale_served: u64,
    pub bypasses: u64,
    /// Entries dropped to stay within `max_bytes`.
    pub evictions: u64,
    /// Weighed size of the cache.
    pub bytes: u64,
    pub entries: u64,
}

/// The cache's counters: Prometheus counters, registered by
/// [`ResponseCache::register`] (hits, misses, stale and bypasses are
/// exported per request as `cache_requests_total{result}`).
#[derive(Default)]
struct Counters {
    hits: Counter,
    misses: Counter,
    coalesced: Counter,
    stale_served: Counter,
    bypasses: Counter,
    evictions: Counter,
}

/// Why a shared load produced no entry to store.
#[derive(Debug)]
enum NotStored {
    /// KooDrive failed; every waiter gets this error.
    Failed(GatewayError),
    /// KooDrive answered but forbade storing; every waiter gets the body.
    Uncacheable(Bytes),
}

/// The per-user response cache.
pub struct ResponseCache {
    entries: moka::future::Cache<CacheKey, Arc<Entry>>,
    /// Client-requested reloads (`Cache-Control: no-cache`) in flight, so
    /// that concurrent ones for a key share one upstream call: a bypass
    /// must not become a way to multiply load on KooDrive.
    reloads: moka::future::Cache<CacheKey, UpstreamReply>,
    ttl: Duration,
    ttl_jitter: Duration,
    stale_if_error: Duration,
    honor_client_no_cache: bool,
    counters: Counters,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("ttl", &self.ttl)
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl ResponseCache {
    /// A cache per `config`.
    pub fn new(config: &CacheConfig) -> ResponseCache {
        let counters = Counters::default();
        let evicted = counters.evictions.clone();
        let entries = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|key: &CacheKey, entry: &Arc<Entry>| {
                let weight = key.weight() + entry.body.len() + ENTRY_OVERHEAD;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            // A memory bound only; freshness is decided on tokio's clock.
            .time_to_live(config.ttl + config.ttl_jitter + config.stale_if_error)
            .eviction_listener(move |_key, _value, cause| {
                if cause == RemovalCause::Size {
                    evicted.inc();
                }
            })
            .build();
        ResponseCache {
            entries,
            reloads: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(RELOAD_SHARING)
                .build(),
            ttl: config.ttl,
            ttl_jitter: config.ttl_jitter,
            stale_if_error: config.stale_if_error,
            honor_client_no_cache: config.honor_client_no_cache,
            counters,
        }
    }

    /// Registers the counters the per-request metrics do not cover.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "cache_coalesced",
            "Cache misses that shared another request's upstream call",
            self.counters.coalesced.clone(),
        );
        registry.register(
            "cache_evictions",
            "Cache entries dropped to stay within cache.max_bytes",
            self.counters.evictions.clone(),
        );
    }

    /// Whether a request's `Cache-Control: no-cache` should bypass the cache.
    pub fn honors_client_no_cache(&self) -> bool {
        self.honor_client_no_cache
    }

    /// Serves `key` from the cache, or loads it with `load` (once for all
    /// concurrent identical misses). With `bypass`, always loads and
    /// refreshes the entry.
    pub async fn serve<F, Fut>(
        &self,
        key: CacheKey,
        bypass: bool,
        load: F,
    ) -> Result<Served, GatewayError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<UpstreamReply, GatewayError>>,
    {
        let now = Instant::now();
        let existing = self.entries.get(&key).await;
        if let Some(entry) = existing.as_ref().filter(|e| !bypass && now < e.fresh_until) {
            self.counters.hits.inc();
            return Ok(served(entry, CacheStatus::Hit, now));
        }
        let stale = existing.as_ref().filter(|e| now < e.stale_until).cloned();
        // Kept to put a stale entry back if the load fails (the miss path
        // removes the expired entry so that the load runs).
        let stale_key = stale.as_ref().map(|_| key.clone());

        // The loads are boxed: a hit's future need not be as large as a
        // miss's.
        let outcome = if bypass {
            self.counters.bypasses.inc();
            match Box::pin(self.reload_shared(key.clone(), load)).await {
                Ok(reply) if reply.storable => {
                    self.entries
                        .insert(key, self.entry(reply.body.clone()))
                        .await;
                    Ok(reply.body)
                }
                Ok(reply) => Ok(reply.body),
                Err(error) => Err(error),
            }
        } else {
            Box::pin(self.load_shared(key, existing.as_ref(), load)).await
        };
        let status = if bypass {
            CacheStatus::Bypass
        } else {
            CacheStatus::Miss
        };
        match (outcome, stale) {
            (Ok(body), _) => Ok(Served {
                body,
                status,
                age: None,
            }),
            (Err(error), Some(entry)) if error.is_upstream_failure() => {
                self.counters.stale_served.inc();
                tracing::debug!(cause = %error, "serving a stale entry");
                if let Some(key) = stale_key {
                    Box::pin(self.restore(key, entry.clone())).await;
                }
                Ok(served(&entry, CacheStatus::Stale, Instant::now()))
            }
            (Err(error), _) => Err(error),
        }
    }

    /// One upstream call for all concurrent client-requested reloads of
    /// `key`; the shared answer is forgotten once its load is over.
    async fn reload_shared<F, Fut>(
        &self,
        key: CacheKey,
        load: F,
    ) -> Result<UpstreamReply, GatewayError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<UpstreamReply, GatewayError>>,
    {
        let ran = AtomicBool::new(false);
        let result = self
            .reloads
            .try_get_with(key.clone(), async {
                ran.store(true, Ordering::Relaxed);
                load().await
            })
            .await;
        if ran.load(Ordering::Relaxed) {
            // The next reload asks KooDrive again.
            self.reloads.invalidate(&key).await;
        } else {
            self.counters.coalesced.inc();
        }
        result.map_err(|shared| (*shared).clone())
    }

    /// Puts an expired entry back for later stale serves, unless a newer
    /// one arrived meanwhile.
    async fn restore(&self, key: CacheKey, entry: Arc<Entry>) {
        self.entries
            .entry(key)
            .and_compute_with(|current| async move {
                match current {
                    None => Op::Put(entry),
                    Some(_) => Op::Nop,
                }
            })
            .await;
    }

    /// One upstream call for all concurrent misses of `key`.
    async fn load_shared<F, Fut>(
        &self,
        key: CacheKey,
        expired: Option<&Arc<Entry>>,
        load: F,
    ) -> Result<Bytes, GatewayError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<UpstreamReply, GatewayError>>,
    {
        self.counters.misses.inc();
        // Drop the expired entry so the load below runs, but only if it is
        // still the one this request saw (a fresh one may have arrived).
        if let Some(expired) = expired {
            let expired = expired.clone();
            self.entries
                .entry(key.clone())
                .and_compute_with(|current| async move {
                    match current {
                        Some(c) if Arc::ptr_eq(c.value(), &expired) => Op::Remove,
                        _ => Op::Nop,
                    }
                })
                .await;
        }
        let ran = AtomicBool::new(false);
        let result = self
            .entries
            .try_get_with(key, async {
                ran.store(true, Ordering::Relaxed);
                match load().await {
                    Ok(reply) if reply.storable => Ok(self.entry(reply.body)),
                    Ok(reply) => Err(NotStored::Uncacheable(reply.body)),
                    Err(error) => Err(NotStored::Failed(error)),
                }
            })
            .await;
        if !ran.load(Ordering::Relaxed) {
            self.counters.coalesced.inc();
        }
        match result {
            Ok(entry) => Ok(entry.body.clone()),
            Err(shared) => match shared.as_ref() {
                NotStored::Uncacheable(body) => Ok(body.clone()),
                NotStored::Failed(error) => Err(error.clone()),
            },
        }
    }

    fn entry(&self, body: Bytes) -> Arc<Entry> {
        let now = Instant::now();
        let jitter = if self.ttl_jitter.is_zero() {
            Duration::ZERO
        } else {
            self.ttl_jitter.mul_f64(rand::rng().random_range(0.0..=1.0))
        };
        let fresh_until = now + self.ttl + jitter;
        Arc::new(Entry {
            body,
            stored_at: now,
            fresh_until,
            stale_until: fresh_until + self.stale_if_error,
        })
    }

    /// Current counters (pending moka maintenance is run first, so sizes
    /// are exact).
    pub async fn stats(&self) -> CacheStats {
        self.entries.run_pending_tasks().await;
        let c = &self.counters;
        CacheStats {
            hits: c.hits.get(),
            misses: c.misses.get(),
            coalesced: c.coalesced.get(),
            stale_served: c.stale_served.get(),
            bypasses: c.bypasses.get(),
            evictions: c.evictions.get(),
            bytes: self.entries.weighted_size(),
            entries: self.entries.entry_count(),
        }
    }
}

fn served(entry: &Entry, status: CacheStatus, now: Instant) -> Served {
    Served {
        body: entry.body.clone(),
        status,
        age: Some(now.saturating_duration_since(entry.stored_at)),
    }
}

/// Whether the request's `Cache-Control` carries `no-cache` (RFC 9111 §5.2.1.4).
pub fn requests_no_cache(headers: &http::HeaderMap) -> bool {
    crate::cache_control::has(headers, "no-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ttl_ms: u64, stale_ms: u64) -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_millis(ttl_ms),
            ttl_jitter: Duration::ZERO,
            max_bytes: 1024 * 1024,
            stale_if_error: Duration::from_millis(stale_ms),
            honor_client_no_cache: true,
        }
    }

    fn key(user: &str) -> CacheKey {
        let principal = Principal {
            subject: format!("app-{user}"),
            user_id: user.into(),
        };
        let query = JobsQuery::parse(Some("offset=0&limit=2")).unwrap();
        CacheKey::new(
            &principal,
            &query,
            &Language::from_headers(&http::HeaderMap::new()).unwrap(),
        )
    }

    fn ok(body: &'static str) -> Result<UpstreamReply, GatewayError> {
        Ok(UpstreamReply {
            body: Bytes::from_static(body.as_bytes()),
            storable: true,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_entries_hit_with_age_then_expire() {
        let cache = ResponseCache::new(&config(5_000, 0));
        let first = cache
            .serve(key("a"), false, || async { ok("A1") })
            .await
            .unwrap();
        assert_eq!(first.status, CacheStatus::Miss);
        tokio::time::advance(Duration::from_secs(3)).await;
        let hit = cache
            .serve(key("a"), false, || async { ok("A2") })
            .await
            .unwrap();
        assert_eq!(
            (hit.status, hit.body.as_ref()),
            (CacheStatus::Hit, &b"A1"[..])
        );
        assert_eq!(hit.age, Some(Duration::from_secs(3)));
        tokio::time::advance(Duration::from_secs(3)).await;
        let miss = cache
            .serve(key("a"), false, || async { ok("A3") })
            .await
            .unwrap();
        assert_eq!(
            (miss.status, miss.body.as_ref()),
            (CacheStatus::Miss, &b"A3"[..])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_serves_within_the_window_only() {
        let cache = ResponseCache::new(&config(1_000, 10_000));
        cache
            .serve(key("a"), false, || async { ok("A1") })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let stale = cache
            .serve(key("a"), false, || async {
                Err(GatewayError::UpstreamTimeout)
            })
            .await
            .unwrap();
        assert_eq!(
            (stale.status, stale.body.as_ref()),
            (CacheStatus::Stale, &b"A1"[..])
        );
        assert_eq!(stale.age, Some(Duration::from_secs(5)));
        // Failing again within the window serves the same entry again.
        tokio::time::advance(Duration::from_secs(1)).await;
        let again = cache
            .serve(key("a"), false, || async {
                Err(GatewayError::UpstreamTimeout)
            })
            .await
            .unwrap();
        assert_eq!(
            (again.status, again.age),
            (CacheStatus::Stale, Some(Duration::from_secs(6)))
        );
        // A client error is never covered by a stale entry.
        let rejected = cache
            .serve(key("a"), false, || async {
                Err(GatewayError::UpstreamCredentialsRejected {
                    status: 401,
                    code: "401".into(),
                })
            })
            .await;
        assert!(rejected.is_err());
        tokio::time::advance(Duration::from_secs(6)).await;
        let late = cache
            .serve(key("a"), false, || async {
                Err(GatewayError::UpstreamTimeout)
            })
            .await;
        assert!(matches!(late, Err(GatewayError::UpstreamTimeout)));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_unstorable_answers_are_not_cached() {
        let cache = ResponseCache::new(&config(5_000, 0));
        let failed = cache
            .serve(key("a"), false, || async {
                Err(GatewayError::UpstreamTimeout)
            })
            .await;
        assert!(failed.is_err());
        let uncacheable = cache
            .serve(key("a"), false, || async {
                Ok(UpstreamReply {
                    body: Bytes::from_static(b"private"),
                    storable: false,
                })
            })
            .await
            .unwrap();
        assert_eq!(uncacheable.body.as_ref(), b"private");
        let next = cache
            .serve(key("a"), false, || async { ok("A1") })
            .await
            .unwrap();
        assert_eq!(next.status, CacheStatus::Miss);
        assert_eq!(next.body.as_ref(), b"A1");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_bypasses_share_one_upstream_call_and_later_ones_reload() {
        let cache = Arc::new(ResponseCache::new(&config(5_000, 0)));
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bypass = |cache: Arc<ResponseCache>, calls: Arc<std::sync::atomic::AtomicU64>| async move {
            cache
                .serve(key("a"), true, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    ok("fresh")
                })
                .await
                .unwrap()
        };
        let tasks: Vec<_> = (0..20)
            .map(|_| tokio::spawn(bypass(cache.clone(), calls.clone())))
            .collect();
        for task in tasks {
            let served = task.await.unwrap();
            assert_eq!(
                (served.status, served.body.as_ref()),
                (CacheStatus::Bypass, &b"fresh"[..])
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one upstream call for 20 bypasses"
        );
        assert_eq!(cache.stats().await.coalesced, 19);
        // A bypass after that one finished asks KooDrive again.
        bypass(cache.clone(), calls.clone()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn bypass_refreshes_the_entry() {
        let cache = ResponseCache::new(&config(5_000, 0));
        cache
            .serve(key("a"), false, || async { ok("A1") })
            .await
            .unwrap();
        let bypass = cache
            .serve(key("a"), true, || async { ok("A2") })
            .await
            .unwrap();
        assert_eq!(
            (bypass.status, bypass.body.as_ref()),
            (CacheStatus::Bypass, &b"A2"[..])
        );
        let hit = cache
            .serve(key("a"), false, || async { ok("A3") })
            .await
            .unwrap();
        assert_eq!(
            (hit.status, hit.body.as_ref()),
            (CacheStatus::Hit, &b"A2"[..])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn users_never_share_entries() {
        let cache = ResponseCache::new(&config(5_000, 0));
        cache
            .serve(key("a"), false, || async { ok("A") })
            .await
            .unwrap();
        let b = cache
            .serve(key("b"), false, || async { ok("B") })
            .await
            .unwrap();
        assert_eq!((b.status, b.body.as_ref()), (CacheStatus::Miss, &b"B"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_expiry_within_its_bound() {
        let mut with_jitter = config(1_000, 0);
        with_jitter.ttl_jitter = Duration::from_millis(1_000);
        let cache = ResponseCache::new(&with_jitter);
        for user in ["a", "b", "c", "d"] {
            cache
                .serve(key(user), false, || async { ok("x") })
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        for user in ["a", "b", "c", "d"] {
            let s = cache
                .serve(key(user), false, || async { ok("y") })
                .await
                .unwrap();
            assert_eq!(s.status, CacheStatus::Hit, "expired before the TTL");
        }
        tokio::time::advance(Duration::from_millis(1_002)).await;
        for user in ["a", "b", "c", "d"] {
            let s = cache
                .serve(key(user), false, || async { ok("y") })
                .await
                .unwrap();
            assert_eq!(s.status, CacheStatus::Miss, "lived past TTL + jitter");
        }
    }

    #[test]
    fn no_cache_directive_is_found_among_others() {
        let mut headers = http::HeaderMap::new();
        assert!(!requests_no_cache(&headers));
        headers.insert(
            http::header::CACHE_CONTROL,
            "max-age=0, No-Cache".parse().unwrap(),
        );
        assert!(requests_no_cache(&headers));
    }
}
