//! The upstream request: built from an allow-list (never by copying the
//! client's request), stamped with `X-Date` at send time, sent over a pooled
//! rustls client with a timeout, and its answer normalized into the body to
//! return or a [`GatewayError`].
//!
//! Because both directions are built from allow-lists, hop-by-hop headers
//! (RFC 9110 §7.6.1: `Connection` and the fields it names, `Keep-Alive`,
//! `TE`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`) never cross the gateway.
//!
//! KooDrive is protected from the gateway's own callers: at most
//! `upstream.max_concurrency` requests are in flight, a request that cannot
//! get a slot within `upstream.queue_timeout_ms` is shed (503), and a 429 or
//! 503 with `Retry-After` pauses forwarding for that long.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use time::macros::format_description;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cache_control;
use crate::config::UpstreamConfig;
use crate::error::{BadResponse, GatewayError, InternalError};
use crate::http_client::{self, FetchError, HttpsClient};
use crate::jobs::{JobsQuery, JOBS_PATH};
use crate::language::{Language, LANGUAGE};
use crate::token::AccessToken;
use crate::trace_id::{TraceId, TRACEPARENT, X_TRACEID};

/// `X-User-Id`: the KooDrive user the request acts for.
pub(crate) const X_USER_ID: &str = "x-user-id";
/// `X-Date`: when the request was sent, `yyyyMMdd'T'HHmmss'Z'` UTC.
pub(crate) const X_DATE: &str = "x-date";
// The header names, checked once at compile time rather than per request
// (statics, not consts: a `HeaderName` holds `Bytes`, an interior
// mutability clippy refuses in a const).
static X_USER_ID_HEADER: HeaderName = HeaderName::from_static(X_USER_ID);
static X_TRACEID_HEADER: HeaderName = HeaderName::from_static(X_TRACEID);
static TRACEPARENT_HEADER: HeaderName = HeaderName::from_static(TRACEPARENT);
static LANGUAGE_HEADER: HeaderName = HeaderName::from_static(LANGUAGE);
static X_DATE_HEADER: HeaderName = HeaderName::from_static(X_DATE);
/// Longest upstream error message passed on to the client.
const MAX_MSG_CHARS: usize = 512;
/// Longest pause a `Retry-After` from KooDrive can impose: beyond it, the
/// gateway tries again anyway (a typo upstream must not stop it for a day).
const MAX_PAUSE: Duration = Duration::from_secs(300);
/// `Retry-After` sent with `upstream_overloaded`: slots free up quickly.
const OVERLOADED_RETRY: Duration = Duration::from_secs(1);

/// Everything the upstream request is built from.
#[derive(Debug)]
pub(crate) struct Forward<'a> {
    pub query: &'a JobsQuery,
    pub user_id: &'a str,
    pub token: &'a AccessToken,
    pub trace_id: &'a TraceId,
    pub language: &'a Language,
    /// Spans are exported: `traceparent` names the exported `upstream`
    /// span, so KooDrive's own spans attach to it.
    pub traced: bool,
}

/// The KooDrive upstream: base URL, pooled client, limits.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    client: HttpsClient,
    jobs_url: String,
    timeout: Duration,
    max_body: usize,
    /// One permit per request in flight to KooDrive.
    slots: Arc<Semaphore>,
    queue_timeout: Duration,
    /// No request is sent before this (KooDrive's `Retry-After`), and the
    /// status that asked for it.
    paused: Arc<Mutex<Option<(Instant, StatusCode)>>>,
    /// `upstream_in_flight`.
    in_flight: Gauge,
    /// `upstream_clock_skew_seconds`: KooDrive's `Date` minus this clock.
    clock_skew: Gauge<f64, AtomicU64>,
}

impl Upstream {
    /// A client for `base` (scheme, authority and optional path prefix).
    pub(crate) fn new(base: &Uri, client: HttpsClient, config: &UpstreamConfig) -> Upstream {
        let prefix = base.path().trim_end_matches('/');
        let jobs_url = format!(
            "{}://{}{prefix}{JOBS_PATH}",
            base.scheme_str().unwrap_or("https"),
            base.authority().map(|a| a.as_str()).unwrap_or_default(),
        );
        Upstream {
            client,
            jobs_url,
            timeout: config.timeout,
            max_body: config.max_response_bytes,
            slots: Arc::new(Semaphore::new(config.max_concurrency)),
            queue_timeout: config.queue_timeout,
            paused: Arc::default(),
            in_flight: Gauge::default(),
            clock_skew: Gauge::default(),
        }
    }

    /// Registers the in-flight and clock-skew gauges.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "upstream_in_flight",
            "Requests to KooDrive in flight",
            self.in_flight.clone(),
        );
        registry.register(
            "upstream_clock_skew_seconds",
            "KooDrive's Date header minus the gateway's clock at the answer's midpoint (X-Date depends on it; 1 s resolution)",
            self.clock_skew.clone(),
        );
    }

    /// The pause KooDrive asked for, while it lasts.
    fn pause(&self) -> Option<GatewayError> {
        let paused = *self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let (until, status) = paused?;
        let now = Instant::now();
        (now < until).then(|| GatewayError::UpstreamPaused {
            status: status.as_u16(),
            retry_after: until - now,
        })
    }

    /// Starts (or extends) a pause of `delay` asked for with `status`.
    fn pause_for(&self, status: StatusCode, delay: Duration) -> GatewayError {
        let delay = delay.min(MAX_PAUSE);
        let until = Instant::now() + delay;
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|(current, _)| current < until) {
            *paused = Some((until, status));
        }
        tracing::warn!(
            status = status.as_u16(),
            pause_ms = delay.as_millis() as u64,
            "KooDrive asked to pause; forwarding stops until then"
        );
        GatewayError::UpstreamPaused {
            status: status.as_u16(),
            retry_after: delay,
        }
    }

    /// Sends one jobs request and returns KooDrive's success body verbatim,
    /// with KooDrive's status whatever it was — unless KooDrive asked for a
    /// pause, or no slot frees up within the queue timeout. `X-Date` is
    /// stamped after the wait, so every call (a retry too) gets a fresh one.
    pub(crate) async fn fetch_jobs(&self, forward: &Forward<'_>) -> Attempt {
        if let Some(paused) = self.pause() {
            return Attempt::not_sent(paused);
        }
        let _slot = match tokio::time::timeout(self.queue_timeout, self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            // Timed out, or (never: the semaphore is not closed) closed.
            Ok(Err(_)) | Err(_) => {
                return Attempt::not_sent(GatewayError::UpstreamOverloaded {
                    retry_after: OVERLOADED_RETRY,
                })
            }
        };
        // A pause may have begun while this request waited.
        if let Some(paused) = self.pause() {
            return Attempt::not_sent(paused);
        }
        let request = match self.build_request(forward) {
            Ok(request) => request,
            Err(error) => return Attempt::not_sent(error),
        };
        let sent = Instant::now();
        // Counted down however the call ends (a dropped request included).
        let in_flight = InFlight::enter(&self.in_flight);
        let fetched = http_client::fetch(&self.client, request, self.timeout, self.max_body).await;
        drop(in_flight);
        let latency = Some(sent.elapsed());
        let fetched = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                let error = match e {
                    FetchError::Timeout => GatewayError::UpstreamTimeout,
                    FetchError::Connect(cause) => GatewayError::UpstreamUnreachable(cause.into()),
                    FetchError::Lost(cause) => GatewayError::UpstreamConnectionLost(cause.into()),
                    FetchError::TooLarge(_) => {
                        GatewayError::UpstreamBadResponse(BadResponse::TooLarge)
                    }
                };
                return Attempt {
                    status: None,
                    latency,
                    result: Err(error),
                };
            }
        };
        if let (Some(skew), Some(latency)) = (clock_skew(&fetched.headers), latency) {
            // The Date was stamped about halfway through the exchange.
            self.clock_skew.set(skew + latency.as_secs_f64() / 2.0);
        }
        // RFC 6585 §4 / RFC 9110 §15.6.4: KooDrive says when to come back.
        let status = fetched.status;
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            if let Some(delay) = retry_after(&fetched.headers) {
                return Attempt {
                    status: Some(status),
                    latency,
                    result: Err(self.pause_for(status, delay)),
                };
            }
        }
        let storable = storable(&fetched.headers);
        Attempt {
            status: Some(status),
            latency,
            result: normalize(status, fetched.body).map(|body| UpstreamReply { body, storable }),
        }
    }

    pub(crate) fn build_request(
        &self,
        forward: &Forward<'_>,
    ) -> Result<Request<Full<Bytes>>, GatewayError> {
        let uri = format!("{}?{}", self.jobs_url, forward.query.canonical());
        let header = |value: &str| {
            HeaderValue::from_str(value)
                .map_err(|_| GatewayError::Internal(InternalError::UnrepresentableHeader))
        };
        let mut authorization = header(&format!("Bearer {}", forward.token.expose()))?;
        authorization.set_sensitive(true);
        let mut request = Request::get(uri)
            .body(Full::default())
            .map_err(|_| GatewayError::Internal(InternalError::UnrepresentableUri))?;
        let headers = request.headers_mut();
        // Room for all nine at once: no regrowth while they are added.
        headers.reserve(9);
        headers.insert(AUTHORIZATION, authorization);
        headers.insert(X_USER_ID_HEADER.clone(), header(forward.user_id)?);
        headers.insert(X_TRACEID_HEADER.clone(), forward.trace_id.header_value());
        // W3C Trace Context: the request's trace, a span of this call.
        let traceparent = forward
            .traced
            .then(crate::telemetry::current_traceparent)
            .flatten()
            .unwrap_or_else(|| forward.trace_id.child_traceparent());
        headers.insert(TRACEPARENT_HEADER.clone(), traceparent);
        headers.insert(LANGUAGE_HEADER.clone(), header(forward.language.as_str())?);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("koodrive-gateway/", env!("CARGO_PKG_VERSION"))),
        );
        // Last, so nothing between stamping and sending can age it.
        headers.insert(
            X_DATE_HEADER.clone(),
            header(&x_date(OffsetDateTime::now_utc()))?,
        );
        Ok(request)
    }
}

/// One call in `upstream_in_flight` while it lives.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One try to call KooDrive: whether it was sent (and then how long it
/// took and KooDrive's status, when an answer arrived), and what the answer
/// means.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub status: Option<StatusCode>,
    /// `None` when nothing was sent (paused, shed, unrepresentable).
    pub latency: Option<Duration>,
    pub result: Result<UpstreamReply, GatewayError>,
}

impl Attempt {
    fn not_sent(error: GatewayError) -> Attempt {
        Attempt {
            status: None,
            latency: None,
            result: Err(error),
        }
    }
}

/// KooDrive's `Date` (RFC 9110 §6.6.1) minus now, in seconds.
fn clock_skew(headers: &http::HeaderMap) -> Option<f64> {
    let value = headers.get(http::header::DATE)?.to_str().ok()?;
    let date =
        OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc2822).ok()?;
    Some((date - OffsetDateTime::now_utc()).as_seconds_f64())
}

/// `Retry-After` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let delay = at - OffsetDateTime::now_utc();
    Some(Duration::try_from(delay).unwrap_or(Duration::ZERO))
}

/// KooDrive's success body and whether it may be cached.
#[derive(Clone, Debug)]
pub struct UpstreamReply {
    pub body: Bytes,
    /// False when KooDrive marked the response `no-store` or `private`.
    pub storable: bool,
}

/// RFC 9111 §5.2.2: a response marked `no-store` must not be stored, and
/// one marked `private` (even as `private="field"`) is kept out of shared
/// caches; the gateway's cache is shared infrastructure, so both opt out.
fn storable(headers: &http::HeaderMap) -> bool {
    !(cache_control::has(headers, "no-store") || cache_control::has(headers, "private"))
}

/// Formats `X-Date`: `yyyyMMdd'T'HHmmss'Z'` in UTC, e.g. `20251103T070140Z`.
/// Digit by digit: `time`'s formatter costs several times as much, on
/// every upstream request.
pub(crate) fn x_date(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let Ok(year) = u32::try_from(at.year()) else {
        return x_date_formatted(at);
    };
    if year > 9999 {
        return x_date_formatted(at);
    }
    let mut out = String::with_capacity(16);
    let mut digits = |value: u32, width: u32| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
        }
    };
    digits(year, 4);
    digits(u32::from(u8::from(at.month())), 2);
    digits(u32::from(at.day()), 2);
    let (hour, minute, second) = at.to_hms();
    out.push('T');
    let mut digits = |value: u8| {
        out.push(char::from(b'0' + value / 10));
        out.push(char::from(b'0' + value % 10));
    };
    digits(hour);
    digits(minute);
    digits(second);
    out.push('Z');
    out
}

/// [`x_date`] by `time`'s formatter: years outside 0–9999 (never sent in
/// practice), and the reference its tests compare with.
fn x_date_formatted(at: OffsetDateTime) -> String {
    let format = format_description!("[year][month][day]T[hour][minute][second]Z");
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

/// KooDrive's `code`: a number in its example, a string in its schema.
#[derive(Deserialize)]
#[serde(untagged)]
enum Code {
    Number(i64),
    Text(String),
}

impl Code {
    fn into_string(self) -> String {
        match self {
            Code::Number(n) => n.to_string(),
            Code::Text(s) => s,
        }
    }
}

/// KooDrive's error body: `{code, msg}`.
#[derive(Deserialize)]
struct KooDriveError {
    code: Code,
    #[serde(default)]
    msg: String,
}

/// KooDrive's success body: `{code: 0, msg, data: [JobInfo…]}`. The body is
/// passed on verbatim; `data` is only checked to be an array of JSON
/// values, without building them.
#[derive(Deserialize)]
struct KooDriveSuccess {
    code: Code,
    #[serde(default)]
    msg: String,
    #[serde(rename = "data")]
    _data: Vec<serde::de::IgnoredAny>,
}

/// Maps KooDrive's answer to the body to return or the error to raise.
fn normalize(status: StatusCode, body: Bytes) -> Result<Bytes, GatewayError> {
    let code = status.as_u16();
    let bad = GatewayError::UpstreamBadResponse;
    let error_body = || serde_json::from_slice::<KooDriveError>(&body).ok();
    match status.as_u16() {
        200 => {
            let parsed: KooDriveSuccess = serde_json::from_slice(&body)
                .map_err(|_| bad(BadResponse::NotSuccessShape(code)))?;
            let code = clean_code(parsed.code.into_string());
            if code == "0" {
                Ok(body)
            } else {
                Err(GatewayError::UpstreamFailed {
                    code,
                    msg: clean_msg(&parsed.msg),
                })
            }
        }
        400 => Err(error_body()
            .map(|e| GatewayError::UpstreamRejectedRequest {
                code: clean_code(e.code.into_string()),
                msg: clean_msg(&e.msg),
            })
            .unwrap_or(bad(BadResponse::UnparseableErrorBody(code)))),
        401 | 403 => Err(GatewayError::UpstreamCredentialsRejected {
            status: status.as_u16(),
            code: error_body()
                .map(|e| clean_msg(&e.code.into_string()))
                .unwrap_or_else(|| "none".into()),
        }),
        500..=599 => Err(error_body()
            .map(|e| GatewayError::UpstreamFailed {
                code: clean_code(e.code.into_string()),
                msg: clean_msg(&e.msg),
            })
            .unwrap_or(bad(BadResponse::UnparseableErrorBody(code)))),
        _ => Err(bad(BadResponse::UnexpectedStatus(code))),
    }
}

/// For `crate::fuzzing`: whatever KooDrive sends becomes its body passed
/// on (a 200 in the success shape) or a normalized error body that is
/// JSON with exactly `code`, `msg` and `traceId`, and no control
/// characters.
pub(crate) fn fuzz_normalize(status: StatusCode, body: Bytes) {
    let Err(error) = normalize(status, body) else {
        assert_eq!(status, StatusCode::OK);
        return;
    };
    let rendered = error.render();
    assert!(rendered.status.as_u16() >= 400);
    assert!(!rendered.code.is_empty() && rendered.code.len() <= 64);
    assert!(rendered.code.bytes().all(|b| b.is_ascii_graphic()));
    assert!(!rendered.msg.chars().any(char::is_control));
}

/// KooDrive's code passed to the client: printable, at most 64 characters.
fn clean_code(code: String) -> String {
    if code.len() <= 64 && code.chars().all(|c| c.is_ascii_graphic()) {
        return code;
    }
    code.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// Upstream text passed to the client: printable, bounded.
fn clean_msg(msg: &str) -> String {
    msg.chars()
        .filter(|c| !c.is_control())
        .take(MAX_MSG_CHARS)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::UpstreamTarget;

    /// Limits for tests that never reach them.
    pub(crate) fn config() -> UpstreamConfig {
        UpstreamConfig {
            target: UpstreamTarget::Embedded,
            ca_file: None,
            timeout: Duration::from_secs(1),
            max_response_bytes: 1024,
            max_concurrency: 4,
            queue_timeout: Duration::from_millis(100),
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let headers = |value: &'static str| {
            let mut map = http::HeaderMap::new();
            map.insert(http::header::RETRY_AFTER, HeaderValue::from_static(value));
            map
        };
        assert_eq!(retry_after(&headers("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(" 0 ")), Some(Duration::ZERO));
        // A date in the past means "now".
        assert_eq!(
            retry_after(&headers("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers("soon")), None);
        assert_eq!(retry_after(&http::HeaderMap::new()), None);
    }

    fn run(status: u16, body: &str) -> Result<Bytes, GatewayError> {
        normalize(
            StatusCode::from_u16(status).unwrap(),
            Bytes::from(body.to_owned()),
        )
    }

    #[test]
    fn base_url_path_prefixes_are_kept() {
        let client = http_client::build(crate::server::tls::client_config(None).unwrap());
        for (base, expected) in [
            (
                "https://kd.example.com",
                "https://kd.example.com/koodrive/ose/v1/jobs",
            ),
            (
                "https://kd.example.com/",
                "https://kd.example.com/koodrive/ose/v1/jobs",
            ),
            (
                "https://kd.example.com:8443/api/",
                "https://kd.example.com:8443/api/koodrive/ose/v1/jobs",
            ),
            (
                "http://127.0.0.1:9443",
                "http://127.0.0.1:9443/koodrive/ose/v1/jobs",
            ),
        ] {
            let upstream = Upstream::new(&base.parse().unwrap(), client.clone(), &config());
            assert_eq!(upstream.jobs_url, expected, "{base}");
        }
    }

    #[test]
    fn no_store_and_private_responses_are_not_storable() {
        let headers = |value: &'static str| {
            let mut map = http::HeaderMap::new();
            map.insert(http::header::CACHE_CONTROL, HeaderValue::from_static(value));
            map
        };
        assert!(storable(&http::HeaderMap::new()));
        assert!(storable(&headers("max-age=60")));
        assert!(!storable(&headers("no-store")));
        assert!(!storable(&headers("max-age=5, Private")));
        assert!(!storable(&headers("private=\"x-user\"")));
    }

    #[test]
    fn x_date_has_the_documented_format() {
        let at = time::macros::datetime!(2025-11-03 07:01:40 UTC);
        assert_eq!(x_date(at), "20251103T070140Z");
        let offset = time::macros::datetime!(2025-11-03 15:01:40 +08:00);
        assert_eq!(x_date(offset), "20251103T070140Z");
    }

    #[test]
    fn x_date_writes_what_the_formatter_writes() {
        // Every few hours over four centuries, leap days and year ends too.
        let mut at = time::macros::datetime!(1999-12-31 23:59:59 UTC);
        let end = time::macros::datetime!(2401-03-01 00:00:00 UTC);
        while at < end {
            assert_eq!(x_date(at), x_date_formatted(at));
            at += time::Duration::seconds(3 * 3600 + 61);
        }
        let early = time::macros::datetime!(-0001-12-31 23:59:59 UTC);
        assert_eq!(x_date(early), x_date_formatted(early));
    }

    #[test]
    fn success_body_passes_through_verbatim() {
        let body = r#"{"code":0,"msg":"OK","data":[]}"#;
        assert_eq!(run(200, body).unwrap(), Bytes::from(body));
        assert!(run(200, r#"{"code":"0","msg":"OK","data":[{"taskId":"1"}]}"#).is_ok());
    }

    #[test]
    fn garbage_html_and_empty_bodies_are_bad_responses() {
        for (status, body) in [
            (200, "<html>oops</html>"),
            (200, ""),
            (200, r#"{"code":0}"#),
            (500, "<html><body>Internal Server Error</body></html>"),
            (400, "nonsense"),
            (404, r#"{"code":404,"msg":"nope"}"#),
        ] {
            assert!(
                matches!(run(status, body), Err(GatewayError::UpstreamBadResponse(_))),
                "{status} {body}"
            );
        }
    }

    #[test]
    fn upstream_codes_are_kept_as_strings() {
        match run(400, r#"{"code":40001,"msg":"bad limit"}"#) {
            Err(GatewayError::UpstreamRejectedRequest { code, msg }) => {
                assert_eq!((code.as_str(), msg.as_str()), ("40001", "bad limit"))
            }
            other => panic!("{other:?}"),
        }
        match run(500, r#"{"code":"KD500","msg":"down"}"#) {
            Err(GatewayError::UpstreamFailed { code, .. }) => assert_eq!(code, "KD500"),
            other => panic!("{other:?}"),
        }
        match run(200, r#"{"code":3,"msg":"busy","data":[]}"#) {
            Err(GatewayError::UpstreamFailed { code, .. }) => assert_eq!(code, "3"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upstream_401_is_a_gateway_credential_problem_not_the_callers() {
        let err = run(401, r#"{"code":"401","msg":"token invalid"}"#).unwrap_err();
        assert_eq!(err.render().status, StatusCode::BAD_GATEWAY);
        assert_eq!(err.render().code, "upstream_credentials_rejected");
        let err = run(403, "").unwrap_err();
        assert_eq!(err.render().code, "upstream_credentials_rejected");
    }

    #[test]
    fn upstream_codes_are_bounded_and_printable() {
        let long = format!(r#"{{"code":"{}\n\u0001","msg":"m"}}"#, "K".repeat(500));
        match run(500, &long) {
            Err(GatewayError::UpstreamFailed { code, .. }) => {
                assert_eq!(code.len(), 64);
                assert!(code.chars().all(|c| c.is_ascii_graphic()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upstream_messages_are_bounded_and_printable() {
        let long = format!(r#"{{"code":1,"msg":"{}\u0007"}}"#, "x".repeat(2000));
        match run(500, &long) {
            Err(GatewayError::UpstreamFailed { msg, .. }) => {
                assert_eq!(msg.len(), MAX_MSG_CHARS);
                assert!(!msg.contains('\u{7}'));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod properties {
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    const MARKER: &str = "SECRET-kd-token-5f3a";

    /// KooDrive-like bodies and noise, each carrying the marker somewhere
    /// other than `code` and `msg`.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let json_value = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "[ -~]{0,20}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just("null".to_owned()),
            Just("[]".to_owned()),
        ];
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|mut bytes| {
                bytes.extend_from_slice(MARKER.as_bytes());
                bytes
            }),
            (json_value.clone(), json_value).prop_map(|(code, msg)| {
                format!(r#"{{"code":{code},"msg":{msg},"data":[],"token":"{MARKER}"}}"#)
                    .into_bytes()
            }),
            "[ -~]{0,40}".prop_map(|text| {
                format!("<html><body>{text} {MARKER}</body></html>").into_bytes()
            }),
        ]
    }

    proptest! {
        #[test]
        fn any_upstream_answer_becomes_a_normalized_body_without_leaking(
            status in 100..=599u16,
            body in body(),
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let Err(error) = normalize(status, Bytes::from(body)) else {
                return Ok(());
            };
            let trace_id = TraceId::generate();
            let response = error.response(&trace_id);
            prop_assert!(response.status().as_u16() >= 400);
            let bytes = response
                .into_body()
                .collect()
                .now_or_never()
                .unwrap()
                .unwrap()
                .to_bytes();
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            let json: Value = serde_json::from_str(&text).unwrap();
            let object = json.as_object().unwrap();
            let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
            keys.sort_unstable();
            prop_assert_eq!(keys, ["code", "msg", "traceId"]);
            let code = object["code"].as_str().unwrap();
            let msg = object["msg"].as_str().unwrap();
            prop_assert!(!code.is_empty() && code.len() <= 64);
            prop_assert!(code.bytes().all(|b| b.is_ascii_graphic()));
            prop_assert!(!msg.chars().any(char::is_control));
            prop_assert_eq!(object["traceId"].as_str().unwrap(), trace_id.as_str());
            prop_assert!(!text.contains(MARKER), "{}", text);
            prop_assert!(!text.contains("<html"), "{}", text);
        }
    }
}
