//! The verified-token cache: successful verifications remembered by the
//! exact token, so that a repeated token skips the signature check. Part of
//! the "authenticate" step; [`super::Verifier`] looks here first.
//!
//! Why a hit is as safe as a full verification:
//! - **The exact token.** Entries are found by a keyed hash of the token
//!   (SipHash-1-3 under a random key drawn when the cache is built, so
//!   nobody outside can aim tokens at one entry) and hold the token itself,
//!   compared in full (constant time) on every hit, so even a hash
//!   collision cannot let one token use another's entry. The hash only
//!   finds the entry; the full comparison decides, which is why it need not
//!   be SHA-256 (a fifth of the hit path's instructions went to hashing the
//!   token with it).
//!   Because the bytes are identical, everything the full verification
//!   derived from them alone — the JOSE header checks (`alg` allow-list, no
//!   embedded keys, no `crit`, `typ`), `iss`, `aud` and the principal —
//!   holds again: the verifier's configuration never changes, and the cache
//!   lives and dies with its verifier.
//! - **The clock.** The time claims are kept and checked on every use by
//!   the same rules as the full verification ([`super::claims::Times`]); an
//!   entry also leaves memory no later than `exp` + leeway (moka's
//!   per-entry expiry), but that is for memory only.
//! - **The key.** The entry names the key that verified it (`kid`,
//!   algorithm and [`KeyId`]); a hit is only used while the current key set
//!   still picks a key with that identity for them. See
//!   [`super::Verifier::verify_token`].
//! - **Only successes.** A refused token is never stored: a cache of
//!   rejections keyed by attacker-chosen bytes would be a memory attack.
//! - **Bounded.** In bytes (`auth.verified_cache_bytes`, weighed as token
//!   + principal + fixed overhead), least valuable entries evicted first.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::claims::Times;
use super::jwks::KeyId;
use super::Principal;
use crate::metrics::CacheResult;

/// Bytes charged per entry on top of the token and the principal: the
/// entry, its `Arc`, the key and moka's bookkeeping.
const ENTRY_OVERHEAD: usize = 192;

/// A cache key: the token's hash under the cache's own random key.
type TokenHash = u64;

/// One successful verification.
pub(super) struct Verified {
    /// The exact token, compared in full on every hit.
    token: Box<str>,
    pub(super) principal: Principal,
    pub(super) times: Times,
    /// The header's `kid` and `alg` the key was looked up with.
    pub(super) kid: Option<Box<str>>,
    pub(super) alg: Algorithm,
    /// The key that verified the signature.
    pub(super) key: KeyId,
    /// How long moka keeps the entry (no later than `exp` + leeway).
    lifetime: Duration,
}

impl Verified {
    /// A verification of `token` to remember for `lifetime`.
    pub(super) fn new(
        token: &str,
        principal: Principal,
        times: Times,
        kid: Option<&str>,
        alg: Algorithm,
        key: KeyId,
        lifetime: Duration,
    ) -> Verified {
        Verified {
            token: token.into(),
            principal,
            times,
            kid: kid.map(Into::into),
            alg,
            key,
            lifetime,
        }
    }

    fn weight(&self) -> u32 {
        let bytes = self.token.len()
            + self.principal.subject.len()
            + self.principal.user_id.len()
            + self.kid.as_deref().map_or(0, str::len)
            + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// Never shows the token.
impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("principal", &self.principal)
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Each entry leaves when its token stops being acceptable.
struct UntilExpiry;

impl moka::Expiry<TokenHash, Arc<Verified>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenHash,
        value: &Arc<Verified>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

/// Successful verifications by token; off when built with 0 bytes.
pub(super) struct VerifiedCache {
    entries: Option<moka::future::Cache<TokenHash, Arc<Verified>>>,
    /// The key of the token hash, random per cache.
    hasher: RandomState,
    /// `verified_cache_requests_total{result}` (hit, miss).
    lookups: Family<CacheResult, Counter>,
}

impl std::fmt::Debug for VerifiedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedCache")
            .field("entries", &self.entries.as_ref().map(|e| e.entry_count()))
            .finish()
    }
}

impl VerifiedCache {
    /// A cache of at most `max_bytes` (weighed); `0` turns it off.
    pub(super) fn new(max_bytes: u64) -> VerifiedCache {
        let entries = (max_bytes > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_: &TokenHash, entry: &Arc<Verified>| entry.weight())
                .expire_after(UntilExpiry)
                .build()
        });
        let lookups = Family::default();
        for result in ["hit", "miss"] {
            let _ = lookups.get_or_create(&CacheResult { result });
        }
        VerifiedCache {
            entries,
            hasher: RandomState::new(),
            lookups,
        }
    }

    /// Registers the hit and miss counter.
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "verified_cache_requests",
            "Verified-token cache lookups by result (hit: signature check skipped; miss: token verified in full)",
            self.lookups.clone(),
        );
    }

    /// Whether verifications are remembered at all.
    pub(super) fn enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// The remembered verification of exactly `token`.
    pub(super) async fn get(&self, token: &str) -> Option<Arc<Verified>> {
        let entries = self.entries.as_ref()?;
        let entry = entries.get(&self.hash(token)).await?;
        // Only the same bytes: a colliding token gets nothing.
        aws_lc_rs::constant_time::verify_slices_are_equal(entry.token.as_bytes(), token.as_bytes())
            .ok()?;
        Some(entry)
    }

    /// Remembers a successful verification (not one with no lifetime left).
    pub(super) async fn insert(&self, verified: Verified) {
        let Some(entries) = &self.entries else {
            return;
        };
        if verified.lifetime.is_zero() {
            return;
        }
        entries
            .insert(self.hash(&verified.token), Arc::new(verified))
            .await;
    }

    /// Forgets the verification of `token`.
    pub(super) async fn remove(&self, token: &str) {
        if let Some(entries) = &self.entries {
            entries.invalidate(&self.hash(token)).await;
        }
    }

    /// Where `token`'s entry is found.
    fn hash(&self, token: &str) -> TokenHash {
        self.hasher.hash_one(token.as_bytes())
    }

    /// Counts a lookup: `hit` when the signature check was skipped.
    pub(super) fn count(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.lookups.get_or_create(&CacheResult { result }).inc();
    }

    /// (hits, misses) so far.
    #[cfg(test)]
    pub(super) fn lookups(&self) -> (u64, u64) {
        let count = |result| self.lookups.get_or_create(&CacheResult { result }).get();
        (count("hit"), count("miss"))
    }

    /// (entries, weighed bytes) once pending evictions have run.
    #[cfg(test)]
    pub(super) async fn size(&self) -> (u64, u64) {
        match &self.entries {
            Some(entries) => {
                entries.run_pending_tasks().await;
                (entries.entry_count(), entries.weighted_size())
            }
            None => (0, 0),
        }
    }

    /// Stores `verified` under another token's hash, as a collision would.
    #[cfg(test)]
    pub(super) async fn insert_under(&self, token: &str, verified: Verified) {
        if let Some(entries) = &self.entries {
            entries.insert(self.hash(token), Arc::new(verified)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(n: usize) -> Principal {
        Principal {
            subject: format!("svc-{n}"),
            user_id: format!("u-{n}"),
        }
    }

    fn verified(token: &str, n: usize) -> Verified {
        Verified::new(
            token,
            principal(n),
            Times {
                exp: 1_800_000_000,
                nbf: None,
                iat: None,
            },
            Some("ec-1"),
            Algorithm::ES256,
            KeyId::for_tests(1),
            Duration::from_secs(300),
        )
    }

    /// A token-sized string, different for every `n`.
    fn token(n: usize) -> String {
        format!("eyJhbGciOiJFUzI1NiJ9.{n:0>200}.signature")
    }

    #[tokio::test]
    async fn a_remembered_token_is_found_and_another_is_not() {
        let cache = VerifiedCache::new(1024 * 1024);
        cache.insert(verified(&token(1), 1)).await;
        let found = cache.get(&token(1)).await.unwrap();
        assert_eq!(found.principal, principal(1));
        assert!(cache.get(&token(2)).await.is_none());
        cache.remove(&token(1)).await;
        assert!(cache.get(&token(1)).await.is_none());
    }

    #[tokio::test]
    async fn an_entry_under_a_colliding_hash_never_answers_another_token() {
        let cache = VerifiedCache::new(1024 * 1024);
        // As if "forged" and "genuine" had the same hash.
        cache.insert_under("forged", verified("genuine", 1)).await;
        assert!(cache.get("forged").await.is_none());
        assert!(cache.get("genuine").await.is_none());
    }

    #[tokio::test]
    async fn a_verification_with_no_lifetime_left_is_not_remembered() {
        let cache = VerifiedCache::new(1024 * 1024);
        let mut entry = verified(&token(1), 1);
        entry.lifetime = Duration::ZERO;
        cache.insert(entry).await;
        assert!(cache.get(&token(1)).await.is_none());
    }

    #[tokio::test]
    async fn zero_bytes_turns_the_cache_off() {
        let cache = VerifiedCache::new(0);
        assert!(!cache.enabled());
        cache.insert(verified(&token(1), 1)).await;
        assert!(cache.get(&token(1)).await.is_none());
        assert_eq!(cache.size().await, (0, 0));
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_bound_under_100_000_distinct_tokens() {
        const BOUND: u64 = 256 * 1024;
        let cache = VerifiedCache::new(BOUND);
        let lightest = u64::from(verified(&token(0), 0).weight());
        for n in 0..100_000 {
            cache.insert(verified(&token(n), n)).await;
        }
        let (entries, bytes) = cache.size().await;
        assert!(bytes <= BOUND, "{bytes} bytes > {BOUND}");
        assert!(entries <= BOUND / lightest, "{entries} entries");
        assert!(entries > 0);
    }

    #[tokio::test]
    async fn debug_output_never_shows_the_token() {
        let cache = VerifiedCache::new(1024 * 1024);
        let secret = token(7);
        cache.insert(verified(&secret, 7)).await;
        let entry = cache.get(&secret).await.unwrap();
        for shown in [format!("{cache:?}"), format!("{entry:?}")] {
            assert!(!shown.contains(&secret), "{shown}");
            assert!(!shown.contains("signature"), "{shown}");
        }
    }
}
