//! The shared limiter: one budget per principal for every replica, kept in
//! Redis and decided by one atomic Lua script per request (GCRA: one key per
//! principal holding its theoretical arrival time, with a TTL), on Redis's
//! own clock (`TIME`) so replicas' clocks never matter.
//!
//! A circuit breaker keeps a dead Redis from costing every request its
//! timeout: after a failure, calls are skipped for a while (250 ms,
//! doubling to 2 s), then one probe is let through; its success closes the
//! breaker, so Redis coming back is used again without a restart.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::{Limits, Verdict};
use crate::config::{OnBackendError, Quota, SharedLimit};

/// GCRA on Redis's clock. KEYS[1]: the principal's key. ARGV: the emission
/// interval and the burst, in microseconds and requests. Returns
/// `{admitted, retry_after_us, remaining, reset_us}`.
const GCRA: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local tolerance = interval * burst
local next_tat = tat + interval
local allowed_at = next_tat - tolerance
if allowed_at > now then
  return {0, allowed_at - now, 0, tat - now}
end
local ttl_ms = math.ceil((next_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', ttl_ms)
return {1, 0, math.floor((now + tolerance - next_tat) / interval), next_tat - now}
"#;

/// Prefix of the keys in Redis.
const KEY_PREFIX: &str = "koodrive-gateway:rate:";
/// First and longest time the breaker stays open.
const BREAKER_FIRST: Duration = Duration::from_millis(250);
const BREAKER_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub(super) struct Breaker {
    /// Consecutive failures.
    failures: u32,
    /// No calls before this, except one probe after it.
    open_until: Option<Instant>,
    /// A probe is running.
    probing: bool,
}

/// Clears the breaker's probe flag however the probe ends.
struct ProbeGuard<'a>(&'a Mutex<Breaker>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).probing = false;
    }
}

/// The Redis-backed limiter.
pub(super) struct SharedLimiter {
    client: redis::Client,
    script: redis::Script,
    timeout: Duration,
    on_error: OnBackendError,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    breaker: Mutex<Breaker>,
}

impl SharedLimiter {
    pub(super) fn new(config: &SharedLimit) -> Result<SharedLimiter, redis::RedisError> {
        Ok(SharedLimiter {
            client: redis::Client::open(config.url.as_str())?,
            script: redis::Script::new(GCRA),
            timeout: config.timeout,
            on_error: config.on_error,
            connection: tokio::sync::Mutex::new(None),
            breaker: Mutex::new(Breaker::default()),
        })
    }

    pub(super) fn on_error(&self) -> OnBackendError {
        self.on_error
    }

    /// Asks Redis, within the timeout. `Err` carries how long until Redis
    /// is asked again (for `Retry-After`).
    pub(super) async fn check(&self, principal: &str, quota: Quota) -> Result<Verdict, Duration> {
        let probe = self.admit_call()?;
        // A probe whose request is dropped mid-way (client gone) must not
        // leave the breaker waiting for it for ever.
        let _probing = probe.then(|| ProbeGuard(&self.breaker));
        let result = tokio::time::timeout(self.timeout, self.run(principal, quota)).await;
        match result {
            Ok(Ok(verdict)) => {
                self.succeeded();
                Ok(verdict)
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, probe, "rate-limit backend failed");
                Err(self.failed().await)
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    probe,
                    "rate-limit backend timed out"
                );
                Err(self.failed().await)
            }
        }
    }

    async fn run(&self, principal: &str, quota: Quota) -> redis::RedisResult<Verdict> {
        let mut connection = self.connection().await?;
        let interval = quota.emission_interval();
        let reply: Vec<i64> = self
            .script
            .key(format!("{KEY_PREFIX}{principal}"))
            .arg(interval.as_micros() as u64)
            .arg(quota.burst.get())
            .invoke_async(&mut connection)
            .await?;
        let micros =
            |i: usize| Duration::from_micros(reply.get(i).copied().unwrap_or(0).max(0) as u64);
        let remaining = reply
            .get(2)
            .copied()
            .unwrap_or(0)
            .clamp(0, i64::from(quota.burst.get())) as u32;
        let limits = Limits {
            quota,
            remaining,
            reset: micros(3),
        };
        Ok(match reply.first() {
            Some(1) => Verdict::Admit(limits),
            _ => Verdict::Refuse {
                limits,
                retry_after: micros(1),
            },
        })
    }

    /// The shared connection, connecting if there is none.
    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.client.get_multiplexed_async_connection().await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Whether Redis may be called now: `Ok(true)` for the one probe of a
    /// breaker that has been open long enough, `Err` (time until the next
    /// probe) while it is open.
    fn admit_call(&self) -> Result<bool, Duration> {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let Some(until) = breaker.open_until else {
            return Ok(false);
        };
        let now = Instant::now();
        if now < until {
            return Err(until - now);
        }
        if breaker.probing {
            return Err(BREAKER_FIRST);
        }
        breaker.probing = true;
        Ok(true)
    }

    fn succeeded(&self) {
        *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) = Breaker::default();
    }

    /// Opens the breaker (longer after each consecutive failure) and drops
    /// the connection, so the next attempt connects afresh.
    async fn failed(&self) -> Duration {
        *self.connection.lock().await = None;
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        breaker.failures = breaker.failures.saturating_add(1);
        let open_for = BREAKER_FIRST
            .saturating_mul(1 << breaker.failures.min(8).saturating_sub(1))
            .min(BREAKER_MAX);
        breaker.open_until = Some(Instant::now() + open_for);
        breaker.probing = false;
        open_for
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnBackendError;
    use std::num::NonZeroU32;

    #[tokio::test]
    async fn a_cancelled_probe_does_not_wedge_the_breaker() {
        // Nothing listens on this port: every call fails fast.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let limiter = SharedLimiter::new(&SharedLimit {
            url: format!("redis://127.0.0.1:{port}"),
            timeout: Duration::from_millis(200),
            on_error: OnBackendError::Deny,
        })
        .unwrap();
        let quota = Quota {
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
        };
        assert!(limiter.check("p", quota).await.is_err());
        // Open: wait until a probe is due, then start one and drop it.
        tokio::time::sleep(BREAKER_FIRST).await;
        let probe = limiter.check("p", quota);
        drop(probe);
        {
            let mut cancelled = Box::pin(limiter.check("p", quota));
            let _ = futures_util::poll!(cancelled.as_mut());
        }
        assert!(
            !limiter.breaker.lock().unwrap().probing,
            "probe flag left set"
        );
    }
}
