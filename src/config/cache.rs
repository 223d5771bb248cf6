//! `[cache]`: the per-user response cache.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::{bounds, defaults};

/// `[cache]` as written, defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    /// Freshness lifetime; 0 turns the cache off.
    #[serde(default = "defaults::cache_ttl_ms")]
    pub ttl_ms: u64,
    /// Up to this much is added to each entry's lifetime, at random, so
    /// entries filled together do not expire together.
    #[serde(default = "defaults::cache_ttl_jitter_ms")]
    pub ttl_jitter_ms: u64,
    /// Capacity in bytes (bodies plus keys).
    #[serde(default = "defaults::cache_max_bytes")]
    pub max_bytes: u64,
    /// How long past expiry an entry may still be served when KooDrive
    /// fails; 0 = never.
    #[serde(default = "defaults::cache_stale_if_error_ms")]
    pub stale_if_error_ms: u64,
    /// Whether `Cache-Control: no-cache` on a request bypasses the cache.
    #[serde(default = "defaults::honor_client_no_cache")]
    pub honor_client_no_cache: bool,
}

impl Default for FileCache {
    fn default() -> Self {
        FileCache {
            ttl_ms: defaults::cache_ttl_ms(),
            ttl_jitter_ms: defaults::cache_ttl_jitter_ms(),
            max_bytes: defaults::cache_max_bytes(),
            stale_if_error_ms: defaults::cache_stale_if_error_ms(),
            honor_client_no_cache: defaults::honor_client_no_cache(),
        }
    }
}

/// The per-user response cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub ttl_jitter: Duration,
    pub max_bytes: u64,
    pub stale_if_error: Duration,
    pub honor_client_no_cache: bool,
}

impl FileCache {
    /// `None` when `ttl_ms = 0`. Every key is checked even then, so a
    /// value that would crash the cache is refused before it is turned on.
    pub(crate) fn validate(&self) -> Result<Option<CacheConfig>, ConfigError> {
        let config = CacheConfig {
            ttl: bounds::millis("cache.ttl_ms", self.ttl_ms)?,
            ttl_jitter: bounds::millis("cache.ttl_jitter_ms", self.ttl_jitter_ms)?,
            max_bytes: bounds::check("cache.max_bytes", self.max_bytes)?,
            stale_if_error: bounds::millis("cache.stale_if_error_ms", self.stale_if_error_ms)?,
            honor_client_no_cache: self.honor_client_no_cache,
        };
        Ok((!config.ttl.is_zero()).then_some(config))
    }
}
