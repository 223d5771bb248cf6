//! Prometheus metrics (`/metrics` on the admin listener, OpenMetrics text
//! through `prometheus-client`). Each component owns its own metrics and
//! registers them once at start-up; the request-level ones are recorded
//! from the finished request record, at the one exit. Labels carry only
//! bounded values (statuses, codes, outcomes), never a principal, a user id
//! or a token.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::record::{Decision, Finished};

/// The prefix of every metric name.
pub(crate) const PREFIX: &str = "koodrive_gateway";

/// `{status, code}` of a response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResponseLabels {
    pub status: u16,
    pub code: String,
}

/// `{outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Outcome {
    pub outcome: &'static str,
}

/// `{result}` of a cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheResult {
    pub result: &'static str,
}

/// `{status}` of an upstream answer (`"none"` when none arrived).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamStatus {
    pub status: String,
}

/// A `{outcome}` family with its outcomes present from the start (at 0),
/// so that alerts see a zero rather than nothing.
pub(crate) fn outcomes(outcomes: &[&'static str]) -> Family<Outcome, Counter> {
    let family = Family::<Outcome, Counter>::default();
    for outcome in outcomes {
        let _ = family.get_or_create(&Outcome { outcome });
    }
    family
}

/// Latency buckets: 0.5 ms to about 16 s.
pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// What every request contributes, recorded at the exit.
#[derive(Debug)]
pub(crate) struct RequestMetrics {
    requests: Family<ResponseLabels, Counter>,
    duration: Histogram,
    cache: Family<CacheResult, Counter>,
    rate_limited: Counter,
    rate_limit_decisions: Family<Outcome, Counter>,
    upstream_requests: Family<UpstreamStatus, Counter>,
    upstream_duration: Histogram,
}

impl RequestMetrics {
    pub(crate) fn new(registry: &mut Registry) -> RequestMetrics {
        let metrics = RequestMetrics {
            requests: Family::default(),
            duration: latency_histogram(),
            cache: Family::default(),
            rate_limited: Counter::default(),
            rate_limit_decisions: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: latency_histogram(),
        };
        registry.register(
            "requests",
            "Responses by status and error code",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from arrival to the response",
            metrics.duration.clone(),
        );
        registry.register(
            "cache_requests",
            "Response cache lookups by result (hit, miss, stale, bypass)",
            metrics.cache.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429 for their caller's budget",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "rate_limit_decisions",
            "Rate-limit decisions by outcome",
            metrics.rate_limit_decisions.clone(),
        );
        registry.register(
            "upstream_requests",
            "Calls to KooDrive by its status (none: no answer)",
            metrics.upstream_requests.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time of calls to KooDrive",
            metrics.upstream_duration.clone(),
        );
        metrics
    }

    /// Counts a finished request.
    pub(crate) fn record(&self, finished: &Finished<'_>) {
        let r = finished.record;
        self.requests
            .get_or_create(&ResponseLabels {
                status: finished.status.as_u16(),
                code: code_label(finished),
            })
            .inc();
        self.duration.observe(finished.latency.as_secs_f64());
        if let Some(cache) = r.cache {
            self.cache
                .get_or_create(&CacheResult {
                    result: cache.label(),
                })
                .inc();
        }
        if finished.decision == Decision::RateLimited {
            self.rate_limited.inc();
        }
        if let Some(outcome) = r.rate_limit {
            self.rate_limit_decisions
                .get_or_create(&Outcome {
                    outcome: outcome.as_str(),
                })
                .inc();
        }
        if let Some(call) = r.upstream {
            let status = call
                .status
                .map_or_else(|| "none".to_owned(), |s| s.as_u16().to_string());
            self.upstream_requests
                .get_or_create(&UpstreamStatus { status })
                .inc();
            self.upstream_duration.observe(call.latency.as_secs_f64());
        }
    }
}

/// The `code` label: the gateway's own codes as they are; KooDrive's own
/// codes (passed through in bodies) as `koodrive`, so the label's values
/// stay a fixed set whatever KooDrive sends.
fn code_label(finished: &Finished<'_>) -> String {
    use crate::error::GatewayError as E;
    match &finished.error {
        Some(E::UpstreamRejectedRequest { .. } | E::UpstreamFailed { .. }) => "koodrive".into(),
        _ => finished.code().unwrap_or_default().to_owned(),
    }
}

/// The registry as `/metrics` serves it.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}
