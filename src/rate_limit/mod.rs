//! Per-principal rate limits: the "rate limit" step of the flow, right
//! after authentication (so a cache hit and a bad query both spend budget).
//!
//! GCRA everywhere: in process through `governor` (keyed by principal, on
//! tokio's clock so tests can pause it), or shared by every replica through
//! one Lua script per decision in Redis ([`shared`]). While Redis cannot
//! be asked, `on_backend_error` decides: the in-process limiter (`allow`)
//! or 503 (`deny`).
//!
//! Headers follow draft-ietf-httpapi-ratelimit-headers-09: `RateLimit-Policy:
//! "per-principal";q=<burst>;w=<seconds to refill>` and `RateLimit:
//! "per-principal";r=<remaining>;t=<seconds until full>`.

mod local;
mod shared;

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{OnBackendError, Quota, RateLimitConfig};
use crate::error::GatewayError;
use local::LocalLimiter;
use shared::SharedLimiter;

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-09 §3).
pub(crate) const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-09 §4).
pub(crate) const RATELIMIT: &str = "ratelimit";
/// The name of the one policy, as the headers carry it.
const POLICY_NAME: &str = "per-principal";

/// How the limiter decided, for the request record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Within budget.
    Admitted,
    /// Over budget: 429.
    Limited,
    /// Redis could not be asked; the in-process limiter admitted.
    FallbackAdmitted,
    /// Redis could not be asked; the in-process limiter refused: 429.
    FallbackLimited,
    /// Redis could not be asked and `on_backend_error = "deny"`: 503.
    Unavailable,
}

impl Outcome {
    /// The label in logs, audit and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::Limited => "limited",
            Outcome::FallbackAdmitted => "fallback_admitted",
            Outcome::FallbackLimited => "fallback_limited",
            Outcome::Unavailable => "backend_unavailable",
        }
    }
}

/// A principal's budget as the headers report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub quota: Quota,
    /// Requests still allowed right now.
    pub remaining: u32,
    /// Until the budget is whole again.
    pub reset: Duration,
}

impl Limits {
    /// Adds `RateLimit-Policy` and `RateLimit`.
    pub(crate) fn stamp(&self, headers: &mut HeaderMap) {
        let refill = self.quota.emission_interval() * self.quota.burst.get();
        let policy = format!(
            "\"{POLICY_NAME}\";q={};w={}",
            self.quota.burst,
            whole_seconds(refill)
        );
        let current = format!(
            "\"{POLICY_NAME}\";r={};t={}",
            self.remaining,
            whole_seconds_at_least_zero(self.reset)
        );
        for (name, value) in [(RATELIMIT_POLICY, policy), (RATELIMIT, current)] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }
}

/// Seconds, rounded up, at least 1 (a window of 0 means nothing).
fn whole_seconds(duration: Duration) -> u64 {
    (duration.as_secs() + u64::from(duration.subsec_nanos() > 0)).max(1)
}

/// Seconds, rounded up (0 when the budget is already whole).
fn whole_seconds_at_least_zero(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// One decision: how it was made, the budget to report (when known), and
/// the refusal, if any.
#[derive(Debug)]
pub(crate) struct Decision {
    pub outcome: Outcome,
    pub limits: Option<Limits>,
    pub refusal: Option<GatewayError>,
}

/// What one limiter (local or Redis) said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Admit(Limits),
    Refuse {
        limits: Limits,
        retry_after: Duration,
    },
}

/// The gateway's rate limiter, built from `[rate_limit]`.
pub(crate) struct RateLimiter {
    config: RateLimitConfig,
    local: LocalLimiter,
    shared: Option<SharedLimiter>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `config`. Redis is connected to on first use.
    pub(crate) fn new(config: &RateLimitConfig) -> Result<Arc<RateLimiter>, redis::RedisError> {
        Ok(Arc::new(RateLimiter {
            local: LocalLimiter::new(config),
            shared: config.shared.as_ref().map(SharedLimiter::new).transpose()?,
            config: config.clone(),
        }))
    }

    /// The budget `principal` spends.
    fn quota_of(&self, principal: &str) -> Quota {
        self.config
            .overrides
            .get(principal)
            .copied()
            .unwrap_or(self.config.default)
    }

    /// Spends one request of `principal`'s budget, if there is one left.
    pub(crate) async fn check(&self, principal: &str) -> Decision {
        let Some(shared) = &self.shared else {
            return decide(self.local.check(principal), false);
        };
        // Boxed: Redis's future is large, and only this configuration pays.
        match Box::pin(shared.check(principal, self.quota_of(principal))).await {
            Ok(verdict) => decide(verdict, false),
            Err(retry_after) => match shared.on_error() {
                OnBackendError::Allow => decide(self.local.check(principal), true),
                OnBackendError::Deny => Decision {
                    outcome: Outcome::Unavailable,
                    limits: None,
                    refusal: Some(GatewayError::RateLimitUnavailable { retry_after }),
                },
            },
        }
    }

    /// Drops in-process state of principals whose budget is whole again,
    /// so memory follows the active principals, not every one ever seen.
    pub(crate) async fn forget_idle(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        every.tick().await;
        loop {
            every.tick().await;
            self.local.forget_idle();
        }
    }
}

fn decide(verdict: Verdict, fallback: bool) -> Decision {
    match verdict {
        Verdict::Admit(limits) => Decision {
            outcome: if fallback {
                Outcome::FallbackAdmitted
            } else {
                Outcome::Admitted
            },
            limits: Some(limits),
            refusal: None,
        },
        Verdict::Refuse {
            limits,
            retry_after,
        } => Decision {
            outcome: if fallback {
                Outcome::FallbackLimited
            } else {
                Outcome::Limited
            },
            limits: Some(limits),
            refusal: Some(GatewayError::RateLimited { retry_after }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn quota(per_second: u32, burst: u32) -> Quota {
        Quota {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn headers_follow_the_draft() {
        let mut headers = HeaderMap::new();
        Limits {
            quota: quota(10, 20),
            remaining: 7,
            reset: Duration::from_millis(1300),
        }
        .stamp(&mut headers);
        assert_eq!(headers[RATELIMIT_POLICY], "\"per-principal\";q=20;w=2");
        assert_eq!(headers[RATELIMIT], "\"per-principal\";r=7;t=2");
        Limits {
            quota: quota(1, 10),
            remaining: 10,
            reset: Duration::ZERO,
        }
        .stamp(&mut headers);
        assert_eq!(headers[RATELIMIT_POLICY], "\"per-principal\";q=10;w=10");
        assert_eq!(headers[RATELIMIT], "\"per-principal\";r=10;t=0");
    }
}
