//! The in-process limiter: `governor`'s GCRA, one keyed limiter for the
//! default budget and one per override, on tokio's clock.

use std::collections::HashMap;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};

use super::{Limits, Verdict};
use crate::config::{Quota, RateLimitConfig};

/// governor's clock on tokio's time, so paused tests control it.
#[derive(Clone, Debug)]
struct TokioClock {
    origin: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

type Keyed = governor::RateLimiter<
    String,
    DashMapStateStore<String>,
    TokioClock,
    StateInformationMiddleware,
>;
type Direct =
    governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;

/// Budgets kept in this process.
pub(super) struct LocalLimiter {
    clock: TokioClock,
    default_quota: Quota,
    default: Keyed,
    overrides: HashMap<String, (Quota, Direct)>,
}

fn governor_quota(quota: Quota) -> governor::Quota {
    governor::Quota::per_second(quota.per_second).allow_burst(quota.burst)
}

impl LocalLimiter {
    pub(super) fn new(config: &RateLimitConfig) -> LocalLimiter {
        let clock = TokioClock {
            origin: tokio::time::Instant::now(),
        };
        let overrides = config
            .overrides
            .iter()
            .map(|(principal, quota)| {
                let limiter = Direct::new(
                    governor_quota(*quota),
                    InMemoryState::default(),
                    clock.clone(),
                );
                (principal.clone(), (*quota, limiter))
            })
            .collect();
        LocalLimiter {
            default: Keyed::new(
                governor_quota(config.default),
                DashMapStateStore::default(),
                clock.clone(),
            ),
            default_quota: config.default,
            clock,
            overrides,
        }
    }

    /// Spends one request of `principal`'s budget.
    pub(super) fn check(&self, principal: &str) -> Verdict {
        let (quota, result) = match self.overrides.get(principal) {
            Some((quota, limiter)) => (*quota, limiter.check()),
            None => (
                self.default_quota,
                self.default.check_key(&principal.to_owned()),
            ),
        };
        match result {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                Verdict::Admit(Limits {
                    quota,
                    remaining,
                    // Each spent request comes back after one interval.
                    reset: quota.emission_interval() * (quota.burst.get() - remaining),
                })
            }
            Err(not_until) => Verdict::Refuse {
                limits: Limits {
                    quota,
                    remaining: 0,
                    reset: quota.emission_interval() * quota.burst.get(),
                },
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    /// Forgets principals whose budget is whole (their state equals a
    /// fresh one), and gives the memory back.
    pub(super) fn forget_idle(&self) {
        self.default.retain_recent();
        self.default.shrink_to_fit();
    }

    #[cfg(test)]
    pub(super) fn tracked(&self) -> usize {
        self.default.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn config(per_second: u32, burst: u32) -> RateLimitConfig {
        let quota = Quota {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        };
        RateLimitConfig {
            default: quota,
            overrides: HashMap::from([(
                "vip".to_owned(),
                Quota {
                    per_second: NonZeroU32::new(1).unwrap(),
                    burst: NonZeroU32::new(3).unwrap(),
                },
            )]),
            shared: None,
        }
    }

    fn admitted(limiter: &LocalLimiter, principal: &str, n: usize) -> usize {
        (0..n)
            .filter(|_| matches!(limiter.check(principal), Verdict::Admit(_)))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_admitted_then_the_rate_refills_it() {
        let limiter = LocalLimiter::new(&config(10, 20));
        assert_eq!(admitted(&limiter, "app", 50), 20);
        match limiter.check("app") {
            Verdict::Refuse {
                retry_after,
                limits,
            } => {
                assert_eq!(retry_after, Duration::from_millis(100));
                assert_eq!(limits.remaining, 0);
            }
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(admitted(&limiter, "app", 50), 5);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(admitted(&limiter, "app", 50), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_and_reset_count_down() {
        let limiter = LocalLimiter::new(&config(10, 20));
        match limiter.check("app") {
            Verdict::Admit(limits) => {
                assert_eq!(limits.remaining, 19);
                assert_eq!(limits.reset, Duration::from_millis(100));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn principals_and_overrides_have_their_own_budgets() {
        let limiter = LocalLimiter::new(&config(10, 20));
        assert_eq!(admitted(&limiter, "a", 30), 20);
        assert_eq!(admitted(&limiter, "b", 30), 20);
        assert_eq!(admitted(&limiter, "vip", 30), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_principals_are_forgotten() {
        let limiter = LocalLimiter::new(&config(10, 20));
        for i in 0..1000 {
            limiter.check(&format!("p{i}"));
        }
        assert_eq!(limiter.tracked(), 1000);
        tokio::time::advance(Duration::from_secs(3)).await;
        limiter.forget_idle();
        assert_eq!(limiter.tracked(), 0);
    }
}
