//! The accepted range of every duration and size key, in one table that
//! validation consults: no value that passes `check-config` can overflow a
//! timer or a cache at `serve` (moka refuses lifetimes over 1000 years,
//! `Instant + Duration` panics on overflow).

use std::time::Duration;

use super::error::{invalid, ConfigError};

/// The inclusive range of one numeric key.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub key: &'static str,
    pub min: u64,
    pub max: u64,
}

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
const MIB: u64 = 1024 * 1024;

/// Every numeric key; README's configuration table documents the same
/// ranges. A lower bound above 0 where 0 would mean nothing (a zero
/// timeout) or break the gateway (a cache smaller than one entry).
pub const NUMERIC_KEYS: &[Bound] = &[
    // 0 = close at once; over an hour, a deploy would wait for ever.
    bound("server.drain_timeout_ms", 0, HOUR_MS),
    bound("server.max_header_bytes", 1024, 1024 * 1024),
    bound("server.max_connections", 1, 1_000_000),
    // Below a second, slow but honest clients would be cut off.
    bound("server.handshake_timeout_ms", 1_000, MINUTE_MS),
    bound("server.header_read_timeout_ms", 1_000, MINUTE_MS),
    // Below 8, ordinary clients (Host, Authorization, Accept, …) are refused.
    bound("server.max_headers", 8, 1_000),
    // The http crate refuses targets of 64 KiB and more.
    bound("server.max_request_target_bytes", 256, 32 * 1024),
    bound("server.idle_timeout_ms", 1_000, HOUR_MS),
    bound("server.send_timeout_ms", 1_000, 10 * MINUTE_MS),
    bound("server.h2_max_concurrent_streams", 1, 10_000),
    bound("server.h2_keepalive_interval_ms", 1_000, HOUR_MS),
    bound("server.h2_keepalive_timeout_ms", 1_000, MINUTE_MS),
    bound("server.h2_max_resets_per_second", 1, 100_000),
    bound("upstream.timeout_ms", 1, 10 * MINUTE_MS),
    bound("upstream.max_response_bytes", 1024, 1024 * MIB),
    bound("upstream.max_concurrency", 1, 100_000),
    // 0 = shed at once when every slot is taken.
    bound("upstream.queue_timeout_ms", 0, MINUTE_MS),
    bound("auth.leeway_s", 0, 3_600),
    bound("auth.jwks_refresh_s", 1, 86_400),
    // 0 = no throttle (single flight still applies).
    bound("auth.jwks_min_refetch_s", 0, 3_600),
    bound("auth.max_token_bytes", 256, 64 * 1024),
    // 0 = verified-token cache off.
    bound("auth.verified_cache_bytes", 0, 1024 * MIB),
    bound("token.timeout_ms", 1, 2 * MINUTE_MS),
    bound("token.expiry_margin_s", 0, 3_600),
    bound("token.max_cached_tokens", 1, 10_000_000),
    // 0 = cache off.
    bound("cache.ttl_ms", 0, DAY_MS),
    // 1 = every successful request's line.
    bound("log.success_sample", 1, 1_000_000),
    bound("cache.ttl_jitter_ms", 0, HOUR_MS),
    bound("cache.max_bytes", 1024, 16 * 1024 * MIB),
    bound("cache.stale_if_error_ms", 0, DAY_MS),
    bound("rate_limit.requests_per_second", 1, 1_000_000),
    bound("rate_limit.burst", 1, 1_000_000),
    bound("rate_limit.redis_timeout_ms", 1, 10_000),
    // 0 = never rotate.
    bound("audit.max_file_bytes", 0, 1024 * 1024 * MIB),
    bound("audit.max_files", 1, 1_000),
    bound("audit.queue_records", 1, 1_000_000),
];

const fn bound(key: &'static str, min: u64, max: u64) -> Bound {
    Bound { key, min, max }
}

/// `value` if it lies within the bound of `key`.
pub(crate) fn check(key: &'static str, value: u64) -> Result<u64, ConfigError> {
    let Some(bound) = NUMERIC_KEYS.iter().find(|b| b.key == key) else {
        return Err(invalid(key, "has no bound in NUMERIC_KEYS (a bug)"));
    };
    if (bound.min..=bound.max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            key,
            format!(
                "{value} is out of range: must be between {} and {}",
                bound.min, bound.max
            ),
        ))
    }
}

/// A bounded millisecond key as a duration.
pub(crate) fn millis(key: &'static str, value: u64) -> Result<Duration, ConfigError> {
    check(key, value).map(Duration::from_millis)
}

/// A bounded second key as a duration.
pub(crate) fn secs(key: &'static str, value: u64) -> Result<Duration, ConfigError> {
    check(key, value).map(Duration::from_secs)
}

/// A bounded count key that fits a `u32`.
pub(crate) fn count(key: &'static str, value: u64) -> Result<u32, ConfigError> {
    let value = check(key, value)?;
    u32::try_from(value).map_err(|_| invalid(key, "too large"))
}

/// A bounded byte or count key as a `usize`.
pub(crate) fn size(key: &'static str, value: u64) -> Result<usize, ConfigError> {
    let value = check(key, value)?;
    usize::try_from(value).map_err(|_| invalid(key, "too large for this platform"))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{exchange_with, numeric_keys_of};
    use super::*;

    /// Sets `key` (`section.name`) to `value` in the exchange fixture.
    fn with_value(key: &str, value: u64) -> Result<super::super::Config, ConfigError> {
        let (section, name) = key.split_once('.').unwrap();
        exchange_with(section, &format!("{name} = {value}"))
    }

    #[test]
    fn every_numeric_key_accepts_its_range_and_refuses_the_rest_naming_the_key() {
        for bound in NUMERIC_KEYS {
            for value in [0, bound.min, bound.max, bound.max + 1, i64::MAX as u64] {
                let result = with_value(bound.key, value);
                if (bound.min..=bound.max).contains(&value) {
                    assert!(
                        result.is_ok(),
                        "{} = {value}: {:?}",
                        bound.key,
                        result.err()
                    );
                } else {
                    let err = result.unwrap_err().to_string();
                    assert!(err.contains(&format!("`{}`", bound.key)), "{err}");
                }
            }
        }
    }

    #[test]
    fn the_table_lists_every_numeric_key_of_the_file_and_nothing_else() {
        let mut in_file = numeric_keys_of();
        in_file.sort();
        let mut in_table: Vec<String> = NUMERIC_KEYS.iter().map(|b| b.key.to_owned()).collect();
        in_table.sort();
        assert_eq!(in_file, in_table);
    }

    #[test]
    fn defaults_lie_within_their_bounds() {
        // A default out of range would make every file that omits the key fail.
        assert!(super::super::testing::exchange_with("cache", "").is_ok());
    }

    #[test]
    fn values_that_used_to_crash_serve_are_refused() {
        for (key, value) in [
            ("cache.ttl_ms", 40_000_000_000_000),
            ("cache.ttl_jitter_ms", i64::MAX as u64),
            ("auth.jwks_refresh_s", i64::MAX as u64),
        ] {
            let err = with_value(key, value).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
    }

    #[test]
    fn the_longest_cache_lifetime_stays_far_below_moka_s_limit() {
        let longest: u64 = [
            "cache.ttl_ms",
            "cache.ttl_jitter_ms",
            "cache.stale_if_error_ms",
        ]
        .iter()
        .map(|key| NUMERIC_KEYS.iter().find(|b| b.key == *key).unwrap().max)
        .sum();
        assert!(Duration::from_millis(longest) < Duration::from_secs(365 * 24 * 3600));
    }
}
