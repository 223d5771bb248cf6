//! The per-request record: what happened to one request, filled in by the
//! pipeline's steps as they run, and the one exit every request leaves
//! through — answered, refused or panicked — which writes the access-log
//! line (and is where the audit record and metrics are written).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use crate::audit;
use crate::cache::CacheStatus;
use crate::error::{GatewayError, Rendered, Side};
use crate::rate_limit::{self, Limits};
use crate::trace_id::TraceId;

/// Longest query text kept in a record (client-supplied, so bounded).
pub(crate) const MAX_QUERY_CHARS: usize = 1024;
/// Longest path kept in a record.
const MAX_PATH_CHARS: usize = 1024;

/// Client-supplied text made safe for a log line or an audit record:
/// control characters, line and paragraph separators (U+2028/2029), quotes
/// and backslashes escaped Rust-style (`\n`, `\u{2028}`), at most `max`
/// characters of the result. Nobody can split or forge a line with it.
pub(crate) fn escaped(text: &str, max: usize) -> String {
    // Most paths and queries have nothing to escape: copied as they are
    // (printable ASCII other than quotes and backslash is its own escape).
    let plain = |b: &u8| matches!(b, b' '..=b'~') && !matches!(b, b'"' | b'\'' | b'\\');
    if text.len() <= max && text.as_bytes().iter().all(plain) {
        return text.to_owned();
    }
    text.escape_debug().take(max).collect()
}

/// Which access-log lines are written: every request's, except that of
/// successful (2xx) requests only one in `every` (`log.success_sample`).
/// Errors, refusals and abandoned requests are always logged; the audit
/// trail and the metrics count every request whatever this says.
#[derive(Debug)]
pub(crate) struct LogSampler {
    every: u64,
    successes: AtomicU64,
}

impl LogSampler {
    /// One success line in `every` (0 or 1: all of them).
    pub(crate) fn new(every: u64) -> LogSampler {
        LogSampler {
            every: every.max(1),
            successes: AtomicU64::new(0),
        }
    }

    /// Whether the line of a request answered with `status` is written:
    /// always for an error, and for a stale answer (KooDrive just failed,
    /// and the line is where that shows); one success in `every` else.
    pub(crate) fn keeps(&self, status: StatusCode, decision: Decision) -> bool {
        if self.every == 1 || !status.is_success() || decision == Decision::Stale {
            return true;
        }
        self.successes
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.every)
    }
}

/// What the gateway did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Refused before KooDrive was asked (route, credentials, schema, token).
    Rejected,
    /// Refused for the caller's rate limit (429).
    RateLimited,
    /// KooDrive was asked — by this request or by the one whose answer it
    /// shared — whatever KooDrive then answered (the cache may say BYPASS).
    Forwarded,
    /// Answered from a fresh cache entry.
    CacheHit,
    /// KooDrive failed; answered from an expired entry (stale-if-error).
    Stale,
    /// The client went away (connection closed, stream reset, drain
    /// deadline) before the answer was ready; logged with status 499.
    Abandoned,
}

impl Decision {
    /// The label in logs and the audit record.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Decision::Rejected => "rejected",
            Decision::RateLimited => "rate_limited",
            Decision::Forwarded => "forwarded",
            Decision::CacheHit => "cache_hit",
            Decision::Stale => "stale",
            Decision::Abandoned => "abandoned",
        }
    }
}

/// The request's query as recorded: canonical once the schema accepted it,
/// else the raw text (truncated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum QueryText {
    Canonical(String),
    Raw(String),
}

impl QueryText {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            QueryText::Canonical(text) | QueryText::Raw(text) => text,
        }
    }
}

/// One call to KooDrive made for this request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UpstreamCall {
    /// KooDrive's status; `None` when no response arrived (timeout,
    /// connection failure).
    pub status: Option<StatusCode>,
    /// Time from sending the request to reading the whole answer, over
    /// every attempt (a retry after a refused token included).
    pub latency: Duration,
}

/// What is known about a request while it is being handled.
#[derive(Debug)]
pub(crate) struct RequestRecord {
    pub trace_id: TraceId,
    /// Wall-clock arrival, for the audit record's `ts`.
    pub arrived: time::OffsetDateTime,
    started: Instant,
    pub client: Option<SocketAddr>,
    /// Who the connection's client certificate names (mTLS).
    pub client_identity: Option<Arc<str>>,
    pub method: Method,
    pub path: String,
    pub query: Option<QueryText>,
    /// The verified caller, once authenticated.
    pub principal: Option<String>,
    pub user_id: Option<String>,
    pub cache: Option<CacheStatus>,
    pub upstream: Option<UpstreamCall>,
    /// How the rate limiter decided, when one is configured.
    pub rate_limit: Option<rate_limit::Outcome>,
    /// The caller's budget after this request, for the response headers.
    pub limits: Option<Limits>,
    /// The record's reserved place in the audit queue, when auditing.
    pub audit: Option<audit::Ticket>,
    /// Set once the record was written; a record dropped before that
    /// belongs to an abandoned request and writes itself.
    closed: bool,
    /// The subscriber current when the request arrived, for a record
    /// written from `Drop` (where it may no longer be current).
    dispatch: tracing::Dispatch,
}

impl RequestRecord {
    /// Opens the record of a request as it arrives.
    pub(crate) fn open(
        trace_id: TraceId,
        client: Option<SocketAddr>,
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> RequestRecord {
        RequestRecord {
            trace_id,
            arrived: time::OffsetDateTime::now_utc(),
            started: Instant::now(),
            client,
            client_identity: None,
            method: method.clone(),
            path: escaped(path, MAX_PATH_CHARS),
            query: query.map(|q| QueryText::Raw(escaped(q, MAX_QUERY_CHARS))),
            principal: None,
            user_id: None,
            cache: None,
            upstream: None,
            rate_limit: None,
            limits: None,
            audit: None,
            closed: false,
            dispatch: tracing::dispatcher::get_default(tracing::Dispatch::clone),
        }
    }

    /// Adds one KooDrive call's outcome; a second call (a retry) adds its
    /// time and replaces the status.
    pub(crate) fn upstream_called(&mut self, status: Option<StatusCode>, latency: Duration) {
        let before = self.upstream.map_or(Duration::ZERO, |call| call.latency);
        self.upstream = Some(UpstreamCall {
            status,
            latency: before + latency,
        });
    }

    /// Closes the record with the response's status and, for an error, the
    /// error.
    pub(crate) fn finish(
        &mut self,
        status: StatusCode,
        error: Option<GatewayError>,
    ) -> Finished<'_> {
        self.closed = true;
        let decision = match (&error, self.cache) {
            (None, Some(CacheStatus::Hit)) => Decision::CacheHit,
            (None, Some(CacheStatus::Stale)) => Decision::Stale,
            (None, _) => Decision::Forwarded,
            (Some(GatewayError::RateLimited { .. }), _) => Decision::RateLimited,
            // This request asked KooDrive, whatever came of it.
            (Some(_), _) if self.upstream.is_some() => Decision::Forwarded,
            // It shared the failed load of a request that asked KooDrive.
            (Some(error), _) if error.side() == Side::Upstream && !error.never_sent() => {
                Decision::Forwarded
            }
            (Some(_), _) => Decision::Rejected,
        };
        Finished {
            latency: self.started.elapsed(),
            record: self,
            status,
            decision,
            rendered: error.as_ref().map(GatewayError::render),
            error,
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let dispatch = self.dispatch.clone();
        let ticket = self.audit.take();
        tracing::dispatcher::with_default(&dispatch, || {
            let mut finished = self.finish(CLIENT_CLOSED_REQUEST, None);
            finished.decision = Decision::Abandoned;
            finished.log();
            if let Some(ticket) = ticket {
                ticket.deliver_now(audit::audit_line(&finished));
            }
        });
    }
}

/// The status an abandoned request is recorded with (as nginx does; it is
/// never sent, there is no one to send it to).
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// A request's complete record, as the exit writes it.
#[derive(Debug)]
pub(crate) struct Finished<'a> {
    pub record: &'a RequestRecord,
    pub status: StatusCode,
    pub decision: Decision,
    pub error: Option<GatewayError>,
    /// The error's code and side, rendered once for the log, the audit
    /// record and the metrics.
    rendered: Option<Rendered>,
    /// From arrival to the response being ready.
    pub latency: Duration,
}

/// Milliseconds with microsecond precision, for logs and the audit trail.
pub(crate) fn millis(duration: Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}

impl Finished<'_> {
    /// Replaces the outcome with a refusal decided after the fact (the
    /// audit record could not be kept): the response became `status`.
    pub(crate) fn refused(&mut self, error: GatewayError, status: StatusCode) {
        self.status = status;
        self.decision = Decision::Rejected;
        self.rendered = Some(error.render());
        self.error = Some(error);
    }

    /// The error code sent to the client, if any.
    pub(crate) fn code(&self) -> Option<&str> {
        match (&self.rendered, self.decision) {
            (Some(rendered), _) => Some(&rendered.code),
            (None, Decision::Abandoned) => Some("client_closed_request"),
            (None, _) => None,
        }
    }

    /// Writes the access-log line: one per logged request (see
    /// [`LogSampler`]), at info level, flat
    /// fields (client-supplied text was escaped when the record opened).
    /// For a 5xx the error's causes are included.
    pub(crate) fn log(&self) {
        let r = self.record;
        let cause = self
            .error
            .as_ref()
            .filter(|_| self.status.is_server_error())
            .map(GatewayError::chain);
        tracing::info!(
            trace_id = %r.trace_id.as_str(),
            client = r.client.map(tracing::field::display),
            method = %r.method,
            path = %r.path,
            query = r.query.as_ref().map(QueryText::as_str),
            principal = r.principal.as_deref(),
            user_id = r.user_id.as_deref(),
            decision = self.decision.as_str(),
            rate_limit = r.rate_limit.map(rate_limit::Outcome::as_str),
            cache = r.cache.map(CacheStatus::as_str),
            upstream_status = r.upstream.and_then(|u| u.status).map(|s| s.as_u16()),
            upstream_ms = r.upstream.map(|u| millis(u.latency)),
            status = self.status.as_u16(),
            code = self.code(),
            side = self.rendered.as_ref().map(|x| x.side.as_str()),
            latency_ms = millis(self.latency),
            cause,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::InternalError;

    fn record() -> RequestRecord {
        RequestRecord::open(
            TraceId::generate(),
            Some(SocketAddr::from(([127, 0, 0, 1], 5000))),
            &Method::GET,
            "/koodrive/ose/v1/jobs",
            Some("limit=1&offset=0"),
        )
    }

    #[test]
    fn the_decision_follows_the_cache_status_and_the_side_that_failed() {
        let mut hit = record();
        hit.cache = Some(CacheStatus::Hit);
        assert_eq!(
            hit.finish(StatusCode::OK, None).decision,
            Decision::CacheHit
        );
        let mut stale = record();
        stale.cache = Some(CacheStatus::Stale);
        assert_eq!(stale.finish(StatusCode::OK, None).decision, Decision::Stale);
        let mut bypass = record();
        bypass.cache = Some(CacheStatus::Bypass);
        assert_eq!(
            bypass.finish(StatusCode::OK, None).decision,
            Decision::Forwarded
        );
        let mut r = record();
        let timeout = r.finish(
            StatusCode::GATEWAY_TIMEOUT,
            Some(GatewayError::UpstreamTimeout),
        );
        assert_eq!(timeout.decision, Decision::Forwarded);
        let mut r = record();
        let refused = r.finish(
            StatusCode::UNAUTHORIZED,
            Some(GatewayError::MissingCredentials),
        );
        assert_eq!(refused.decision, Decision::Rejected);
        let mut r = record();
        let panic = r.finish(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(GatewayError::Internal(InternalError::Panic("x".into()))),
        );
        assert_eq!(panic.decision, Decision::Rejected);
        // Shed before sending: not forwarded.
        let mut r = record();
        let shed = r.finish(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(GatewayError::UpstreamOverloaded {
                retry_after: Duration::from_secs(1),
            }),
        );
        assert_eq!(shed.decision, Decision::Rejected);
        // A retry whose token exchange then failed had asked KooDrive.
        let mut r = record();
        r.upstream_called(Some(StatusCode::UNAUTHORIZED), Duration::from_millis(2));
        let retried = r.finish(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(GatewayError::TokenUnavailable {
                retry_after: Duration::from_secs(1),
                cause: crate::error::TokenFailure::BackingOff,
            }),
        );
        assert_eq!(retried.decision, Decision::Forwarded);
    }

    #[test]
    fn a_record_dropped_unwritten_writes_itself_as_abandoned() {
        let (dispatch, buffer) = crate::test_log::CapturedLog::start();
        let r = tracing::dispatcher::with_default(&dispatch, record);
        let id = r.trace_id.as_str().to_owned();
        // Dropped where another subscriber is current: it still writes to
        // the one of its request.
        drop(r);
        let mut written = tracing::dispatcher::with_default(&dispatch, record);
        written.finish(StatusCode::OK, None);
        drop(written);
        let log = buffer.text();
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains(&format!("trace_id={id} ")), "{log}");
        assert!(log.contains("status=499"), "{log}");
        assert!(log.contains("decision=\"abandoned\""), "{log}");
        assert!(log.contains("code=\"client_closed_request\""), "{log}");
    }

    #[test]
    fn a_retry_adds_its_time_and_replaces_the_status() {
        let mut r = record();
        r.upstream_called(Some(StatusCode::UNAUTHORIZED), Duration::from_millis(3));
        r.upstream_called(Some(StatusCode::OK), Duration::from_millis(4));
        assert_eq!(
            r.upstream,
            Some(UpstreamCall {
                status: Some(StatusCode::OK),
                latency: Duration::from_millis(7),
            })
        );
    }

    #[test]
    fn client_text_cannot_split_a_line() {
        let r = RequestRecord::open(
            TraceId::generate(),
            None,
            &Method::GET,
            "/a\u{2028}b",
            Some("x=1\r\nforged=2\u{2029}\"q\"\u{7}"),
        );
        assert_eq!(r.path, "/a\\u{2028}b");
        let query = r.query.clone().unwrap();
        assert_eq!(query.as_str(), "x=1\\r\\nforged=2\\u{2029}\\\"q\\\"\\u{7}");
        assert!(!query.as_str().chars().any(|c| c.is_control()));
    }

    #[test]
    fn text_with_nothing_to_escape_is_kept_as_it_is() {
        let every_printable: String = (b' '..=b'~').map(char::from).collect();
        for text in [
            "offset=0&limit=10",
            "/koodrive/ose/v1/jobs",
            &every_printable,
        ] {
            let slow: String = text.escape_debug().take(MAX_QUERY_CHARS).collect();
            assert_eq!(escaped(text, MAX_QUERY_CHARS), slow, "{text}");
        }
        assert_eq!(escaped("abcdef", 3), "abc");
    }

    #[test]
    fn raw_queries_are_truncated() {
        let long = "x".repeat(5000);
        let r = RequestRecord::open(TraceId::generate(), None, &Method::GET, "/", Some(&long));
        assert_eq!(
            r.query.as_ref().map(|q| q.as_str().len()),
            Some(MAX_QUERY_CHARS)
        );
    }

    #[test]
    fn the_sampler_keeps_one_success_line_in_n_and_every_other_line() {
        let ok = Decision::Forwarded;
        let sampler = LogSampler::new(3);
        let kept: Vec<bool> = (0..7).map(|_| sampler.keeps(StatusCode::OK, ok)).collect();
        assert_eq!(kept, [true, false, false, true, false, false, true]);
        for status in [400, 401, 429, 499, 502, 503] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                (0..5).all(|_| sampler.keeps(status, Decision::Rejected)),
                "{status}"
            );
        }
        // A stale answer is a 200 that hides KooDrive's failure.
        assert!((0..5).all(|_| sampler.keeps(StatusCode::OK, Decision::Stale)));
        for every in [0, 1] {
            let all = LogSampler::new(every);
            assert!((0..5).all(|_| all.keeps(StatusCode::OK, ok)));
        }
    }

    #[test]
    fn latency_keeps_sub_millisecond_precision() {
        assert_eq!(millis(Duration::from_micros(734)), 0.734);
    }
}
