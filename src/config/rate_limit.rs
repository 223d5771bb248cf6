//! `[rate_limit]`: per-principal request budgets, in-process or shared by
//! every replica through Redis.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::error::{invalid, ConfigError};
use super::{bounds, defaults};

/// `[rate_limit]` as written, defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    /// Sustained requests per second, per principal.
    pub requests_per_second: u64,
    /// Requests a principal may send at once (the bucket size).
    pub burst: u64,
    /// One budget for all replicas: `redis://[user:password@]host:port[/db]`.
    /// The password is never printed.
    #[serde(default, serialize_with = "redacted_url")]
    pub redis_url: Option<String>,
    #[serde(default = "defaults::redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    #[serde(default)]
    pub on_backend_error: OnBackendError,
    /// Principals with a budget of their own.
    #[serde(default)]
    pub overrides: BTreeMap<String, FileQuota>,
}

/// One principal's own budget.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuota {
    pub requests_per_second: u64,
    pub burst: u64,
}

/// What a shared limiter does while Redis cannot be asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBackendError {
    /// Admit by the in-process limiter (the full budget, on each replica).
    #[default]
    Allow,
    /// Refuse with 503 `rate_limit_unavailable`.
    Deny,
}

/// A budget: GCRA with `per_second` sustained and `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Quota {
    /// The time one request's share of the budget takes to come back.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_secs(1) / self.per_second.get()
    }
}

/// Validated `[rate_limit]`.
#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    pub default: Quota,
    pub overrides: HashMap<String, Quota>,
    /// `None`: in-process only.
    pub shared: Option<SharedLimit>,
}

/// The Redis backend. Its `Debug` never shows the URL's password.
#[derive(Clone)]
pub struct SharedLimit {
    pub url: String,
    /// Per decision, connecting included.
    pub timeout: Duration,
    pub on_error: OnBackendError,
}

impl std::fmt::Debug for SharedLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimit")
            .field("url", &redact(&self.url))
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl FileRateLimit {
    pub(crate) fn validate(&self) -> Result<RateLimitConfig, ConfigError> {
        let default = quota(
            "rate_limit.requests_per_second",
            self.requests_per_second,
            "rate_limit.burst",
            self.burst,
        )?;
        let mut overrides = HashMap::with_capacity(self.overrides.len());
        for (principal, file) in &self.overrides {
            if principal.is_empty() || !principal.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "rate_limit.overrides",
                    format!("`{principal}` is not a principal (visible ASCII, no spaces)"),
                ));
            }
            let quota = quota(
                "rate_limit.requests_per_second",
                file.requests_per_second,
                "rate_limit.burst",
                file.burst,
            )
            .map_err(|e| match e {
                ConfigError::Invalid { key, reason, .. } => invalid(
                    "rate_limit.overrides",
                    format!(
                        "`{principal}`: {}: {reason}",
                        key.trim_start_matches("rate_limit.")
                    ),
                ),
                other => other,
            })?;
            overrides.insert(principal.clone(), quota);
        }
        let timeout = bounds::millis("rate_limit.redis_timeout_ms", self.redis_timeout_ms)?;
        let shared = self
            .redis_url
            .as_deref()
            .map(|url| {
                check_redis_url(url)?;
                Ok(SharedLimit {
                    url: url.to_owned(),
                    timeout,
                    on_error: self.on_backend_error,
                })
            })
            .transpose()?;
        Ok(RateLimitConfig {
            default,
            overrides,
            shared,
        })
    }
}

fn quota(
    rate_key: &'static str,
    rate: u64,
    burst_key: &'static str,
    burst: u64,
) -> Result<Quota, ConfigError> {
    let nonzero = |key: &'static str, value: u64| {
        bounds::check(key, value).and_then(|v| {
            u32::try_from(v)
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or_else(|| invalid(key, "must be at least 1"))
        })
    };
    Ok(Quota {
        per_second: nonzero(rate_key, rate)?,
        burst: nonzero(burst_key, burst)?,
    })
}

/// `redis://host[:port][/db]`, optionally with credentials. TLS
/// (`rediss://`) is not offered yet; Redis holds principals' budgets, no
/// secrets, but keep it on a private network or loopback.
fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    let key = "rate_limit.redis_url";
    let uri: http::Uri = url
        .parse()
        .map_err(|_| invalid(key, "not a valid redis:// URL"))?;
    match uri.scheme_str() {
        Some("redis") => {}
        Some("rediss") => {
            return Err(invalid(
                key,
                "rediss:// (TLS) is not supported yet; use redis:// on a private network",
            ))
        }
        _ => return Err(invalid(key, "scheme must be redis://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(key, "needs a host"));
    }
    Ok(())
}

/// Prints a Redis URL without its password.
fn redacted_url<S: Serializer>(url: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_str(&redact(url)),
        None => serializer.serialize_none(),
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::static_with;
    use super::*;

    #[test]
    fn a_section_gives_a_default_budget_and_overrides() {
        let config = static_with(
            "rate_limit",
            "requests_per_second = 10\nburst = 20\n[rate_limit.overrides]\n\"batch-app\" = { requests_per_second = 200, burst = 400 }",
        )
        .unwrap();
        let limits = config.rate_limit.unwrap();
        assert_eq!(limits.default.per_second.get(), 10);
        assert_eq!(limits.default.burst.get(), 20);
        assert_eq!(
            limits.default.emission_interval(),
            Duration::from_millis(100)
        );
        assert_eq!(limits.overrides["batch-app"].burst.get(), 400);
        assert!(limits.shared.is_none());
    }

    #[test]
    fn no_section_means_no_limit() {
        assert!(static_with("cache", "").unwrap().rate_limit.is_none());
    }

    #[test]
    fn redis_settings_are_checked() {
        let shared = static_with(
            "rate_limit",
            "requests_per_second = 1\nburst = 1\nredis_url = \"redis://127.0.0.1:6379\"\non_backend_error = \"deny\"",
        )
        .unwrap()
        .rate_limit
        .unwrap()
        .shared
        .unwrap();
        assert_eq!(shared.on_error, OnBackendError::Deny);
        assert_eq!(shared.timeout, Duration::from_millis(50));
        for (url, expected) in [
            ("rediss://h:1", "not supported yet"),
            ("http://h:1", "redis://"),
            ("nonsense url", "redis://"),
        ] {
            let err = static_with(
                "rate_limit",
                &format!("requests_per_second = 1\nburst = 1\nredis_url = \"{url}\""),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("rate_limit.redis_url") && err.contains(expected),
                "{err}"
            );
        }
        let err = static_with(
            "rate_limit",
            "requests_per_second = 1\nburst = 1\non_backend_error = \"maybe\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("on_backend_error"), "{err}");
    }

    #[test]
    fn a_bad_override_names_its_principal() {
        let err = static_with(
            "rate_limit",
            "requests_per_second = 1\nburst = 1\n[rate_limit.overrides]\n\"big\" = { requests_per_second = 0, burst = 4 }",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rate_limit.overrides") && err.contains("`big`"),
            "{err}"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("redis://u:s3cret@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        let shared = SharedLimit {
            url: "redis://:s3cret@h:6379".into(),
            timeout: Duration::from_millis(50),
            on_error: OnBackendError::Allow,
        };
        assert!(!format!("{shared:?}").contains("s3cret"));
    }
}
