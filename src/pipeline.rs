//! The request flow of DESIGN.md, in order, one line per step. Every exit
//! goes through [`Pipeline::handle`], which normalizes errors (and panics),
//! stamps `X-Traceid` on the response and closes the request's record.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{
    HeaderValue, AGE, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING,
};
use http::{HeaderName, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Body;
use tracing::Instrument;

use crate::audit::{self, Auditor, Delivery};
use crate::auth::{Authenticated, Verifier};
use crate::cache::{requests_no_cache, CacheKey, CacheStatus, ResponseCache, Served};
use crate::config::ServerLimits;
use crate::error::{GatewayError, InternalError};
use crate::jobs::{JobsQuery, JOBS_PATH};
use crate::language::Language;
use crate::metrics::RequestMetrics;
use crate::rate_limit::RateLimiter;
use crate::record::{LogSampler, QueryText, RequestRecord};
use crate::server::{ClientAddr, ClientIdentity};
use crate::token::TokenSource;
use crate::trace_id::{TraceId, X_TRACEID};
use crate::upstream::{Forward, Upstream, UpstreamReply};

// Response header names, checked at compile time rather than per request.
static X_TRACEID_HEADER: HeaderName = HeaderName::from_static(X_TRACEID);
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The gateway's request handling, built once from config.
#[derive(Debug)]
pub(crate) struct Pipeline {
    /// Whether spans are exported (`[telemetry]`): only then do requests
    /// join their W3C trace.
    traced: bool,
    /// The request-head limits of `[server]` the gateway answers itself.
    head: HeadLimits,
    /// Which access-log lines are written (`log.success_sample`).
    access_log: LogSampler,
    metrics: RequestMetrics,
    audit: Option<Arc<Auditor>>,
    verifier: Verifier,
    limiter: Option<Arc<RateLimiter>>,
    tokens: TokenSource,
    upstream: Upstream,
    cache: Option<Arc<ResponseCache>>,
}

impl Pipeline {
    /// The pipeline over its components.
    pub(crate) fn new(
        metrics: RequestMetrics,
        audit: Option<Arc<Auditor>>,
        verifier: Verifier,
        limiter: Option<Arc<RateLimiter>>,
        tokens: TokenSource,
        upstream: Upstream,
        cache: Option<Arc<ResponseCache>>,
    ) -> Pipeline {
        Pipeline {
            traced: false,
            head: HeadLimits::NONE,
            access_log: LogSampler::new(1),
            metrics,
            audit,
            verifier,
            limiter,
            tokens,
            upstream,
            cache,
        }
    }

    /// Refuses request heads beyond `limits` (414, 431).
    pub(crate) fn head_limits(mut self, limits: &ServerLimits) -> Pipeline {
        self.head = HeadLimits {
            bytes: limits.max_header_bytes,
            fields: limits.max_headers,
            target_bytes: limits.max_request_target_bytes,
        };
        self
    }

    /// Writes the access-log line of one successful request in `every`
    /// (every other line always).
    pub(crate) fn sample_success_lines(mut self, every: u64) -> Pipeline {
        self.access_log = LogSampler::new(every);
        self
    }

    /// Exports each request's spans into its W3C trace.
    pub(crate) fn traced(mut self, traced: bool) -> Pipeline {
        self.traced = traced;
        self
    }

    /// The response cache, when enabled.
    pub(crate) fn cache(&self) -> Option<Arc<ResponseCache>> {
        self.cache.clone()
    }

    /// Handles one request; never fails: errors, and panics, become
    /// normalized responses carrying the request's trace id, and every
    /// request is finished exactly once: recorded in the metrics and the
    /// audit trail, and its line written unless sampled out.
    pub(crate) async fn handle<B: Body>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        let trace_id = TraceId::from_headers(request.headers());
        let mut record = RequestRecord::open(
            trace_id.clone(),
            request.extensions().get::<ClientAddr>().map(|c| c.0),
            request.method(),
            request.uri().path(),
            request.uri().query(),
        );
        record.client_identity = request
            .extensions()
            .get::<ClientIdentity>()
            .map(|identity| Arc::clone(&identity.0));
        // Logs written while the request is handled (token exchange, JWKS
        // refetch) carry its trace id.
        let span = tracing::info_span!("request", trace_id = %trace_id.as_str());
        if self.traced {
            crate::telemetry::join_trace(&span, &trace_id);
        }
        // The audit record's place first: failing closed, a request whose
        // record could not be kept is refused before anything happens.
        let admitted = match &self.audit {
            Some(auditor) => auditor.admit().map(|ticket| record.audit = Some(ticket)),
            None => Some(()),
        };
        let outcome = match admitted {
            Some(()) => AssertUnwindSafe(self.process(&request, &mut record).instrument(span))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    Err(GatewayError::Internal(InternalError::Panic(panic_message(
                        panic.as_ref(),
                    ))))
                }),
            None => Err(GatewayError::AuditUnavailable {
                retry_after: audit::RETRY_AFTER,
            }),
        };
        let (mut response, error) = match outcome {
            Ok(response) => (response, None),
            Err(error) => (error.response(&trace_id), Some(error)),
        };
        // HTTP/1.1 cannot tell where an unread body or an oversized head
        // ends: the connection goes with the answer, whatever the answer.
        let close = request.version() <= http::Version::HTTP_11
            && (has_body(&request) || error.as_ref().is_some_and(GatewayError::closes_connection));
        let ticket = record.audit.take();
        let mut finished = record.finish(response.status(), error);
        if let Some(ticket) = ticket {
            if ticket.deliver(audit::audit_line(&finished)).await == Delivery::Refused {
                // Nothing is served unaudited.
                let refusal = GatewayError::AuditUnavailable {
                    retry_after: audit::RETRY_AFTER,
                };
                response = refusal.response(&trace_id);
                finished.refused(refusal, response.status());
            }
        }
        let headers = response.headers_mut();
        headers.insert(X_TRACEID_HEADER.clone(), trace_id.header_value());
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        // Whatever the answer, a caller whose budget was looked at learns it.
        if let Some(limits) = &finished.record.limits {
            limits.stamp(headers);
        }
        if self.access_log.keeps(finished.status, finished.decision) {
            finished.log();
        }
        self.metrics.record(&finished);
        response
    }

    async fn process<B: Body>(
        &self,
        request: &Request<B>,
        record: &mut RequestRecord,
    ) -> Result<Response<Full<Bytes>>, GatewayError> {
        // The head's size first: nothing else is worth reading in one that
        // is too large (hyper's own limits sit above these).
        self.head.check(request)?;
        // Route: unknown paths and methods need no credentials to refuse.
        route(request)?;
        // Authenticate before looking at the query, so the schema is not an
        // oracle for unauthenticated callers.
        let caller = self.verifier.verify(request.headers()).await?;
        record.principal = Some(caller.principal.subject.clone());
        record.user_id = Some(caller.principal.user_id.clone());
        // Rate limit right after authentication, before validation and the
        // cache: a bad query and a cache hit both spend budget.
        if let Some(limiter) = &self.limiter {
            let decision = limiter.check(&caller.principal.subject).await;
            record.rate_limit = Some(decision.outcome);
            record.limits = decision.limits;
            if let Some(refusal) = decision.refusal {
                return Err(refusal);
            }
        }
        let query = JobsQuery::parse(request.uri().query())?;
        record.query = Some(QueryText::Canonical(query.canonical()));
        let language = Language::from_headers(request.headers())?;
        // The cache after authentication and validation, so a hit skips
        // neither; before the token, so a hit costs no exchange.
        let trace_id = record.trace_id.clone();
        // Without a cache every request bypasses it; with one, the client
        // may ask to.
        let bypass = self.cache.as_ref().is_none_or(|cache| {
            cache.honors_client_no_cache() && requests_no_cache(request.headers())
        });
        let served = match &self.cache {
            Some(cache) => {
                let key = CacheKey::new(&caller.principal, &query, &language);
                let (caller, query, language, trace_id) = (&caller, &query, &language, &trace_id);
                let noted = &mut *record;
                // The upstream call's future is large (token source, pool,
                // timeouts) and needed only on a miss: boxed, it is not
                // part of (and copied with) every request's future.
                cache
                    .serve(key, bypass, move || {
                        Box::pin(self.forward(caller, query, language, trace_id, noted))
                    })
                    .await
            }
            None => Box::pin(self.forward(&caller, &query, &language, &trace_id, record))
                .await
                .map(|reply| Served {
                    body: reply.body,
                    status: CacheStatus::Bypass,
                    age: None,
                }),
        };
        // A failed load still tells how the cache was consulted.
        record.cache = Some(match &served {
            Ok(served) => served.status,
            Err(_) if bypass => CacheStatus::Bypass,
            Err(_) => CacheStatus::Miss,
        });
        Ok(json_response(served?))
    }

    /// Obtains the caller's KooDrive token and sends the request. When
    /// KooDrive refuses a token that can be renewed (it may have been
    /// revoked), the token is dropped and the request retried once with a
    /// fresh one; `X-Date` is stamped again for the retry.
    async fn forward(
        &self,
        caller: &Authenticated,
        query: &JobsQuery,
        language: &Language,
        trace_id: &TraceId,
        record: &mut RequestRecord,
    ) -> Result<UpstreamReply, GatewayError> {
        // Token after validation: a bad request never costs a token exchange.
        let token = self
            .tokens
            .token_for(caller)
            .instrument(tracing::info_span!("token"))
            .await?;
        let send = |token| Forward {
            query,
            user_id: &caller.principal.user_id,
            token,
            trace_id,
            language,
            traced: self.traced,
        };
        match self.send(&send(&token), record).await {
            Err(GatewayError::UpstreamCredentialsRejected { .. }) if self.tokens.can_renew() => {
                self.tokens.invalidate(caller, &token).await;
                let token = self.tokens.token_for(caller).await?;
                self.send(&send(&token), record).await
            }
            result => result,
        }
    }

    /// One call to KooDrive, noted in the record.
    async fn send(
        &self,
        forward: &Forward<'_>,
        record: &mut RequestRecord,
    ) -> Result<UpstreamReply, GatewayError> {
        let attempt = self
            .upstream
            .fetch_jobs(forward)
            .instrument(tracing::info_span!("upstream"))
            .await;
        if let Some(latency) = attempt.latency {
            record.upstream_called(attempt.status, latency);
        }
        attempt.result
    }
}

/// `server.max_request_target_bytes`, `max_headers`, `max_header_bytes`.
#[derive(Clone, Copy, Debug)]
struct HeadLimits {
    bytes: usize,
    fields: usize,
    target_bytes: usize,
}

impl HeadLimits {
    const NONE: HeadLimits = HeadLimits {
        bytes: usize::MAX,
        fields: usize::MAX,
        target_bytes: usize::MAX,
    };

    /// 414 for a long target, then 431 for too many or too large headers.
    fn check<B>(&self, request: &Request<B>) -> Result<(), GatewayError> {
        let target = request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len());
        if target > self.target_bytes {
            return Err(GatewayError::UriTooLong {
                limit: self.target_bytes,
            });
        }
        if request.headers().len() > self.fields {
            return Err(GatewayError::TooManyHeaders { limit: self.fields });
        }
        if head_size(request.method(), target, request.headers()) > self.bytes {
            return Err(GatewayError::HeadersTooLarge { limit: self.bytes });
        }
        Ok(())
    }
}

/// The size of a request head as HTTP/1.1 would carry it: request line
/// (`METHOD target HTTP/1.1\r\n`) and every `name: value\r\n` line.
fn head_size(method: &Method, target: usize, headers: &http::HeaderMap) -> usize {
    let line = method.as_str().len() + target + 11;
    line + headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
}

/// The text of a panic's payload (`panic!` with a literal or a format).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".into())
}

/// 404 for other paths, 405 for other methods, 400 for a body on the GET.
fn route<B: Body>(request: &Request<B>) -> Result<(), GatewayError> {
    #[cfg(test)]
    if request.uri().path() == tests::PANIC_PATH {
        panic!("test fault: {}", tests::PANIC_PATH);
    }
    check_host(request)?;
    if request.uri().path() != JOBS_PATH {
        return Err(GatewayError::NotFound);
    }
    if request.method() != Method::GET {
        return Err(GatewayError::MethodNotAllowed);
    }
    if has_body(request) {
        return Err(GatewayError::BodyNotAllowed);
    }
    Ok(())
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`, whatever
/// the form of its target (an absolute-form target does not stand in for
/// it); a target in absolute form, and HTTP/2's `:authority` (RFC 9113
/// §8.3.1), must agree with a `Host` that is sent.
fn check_host<B>(request: &Request<B>) -> Result<(), GatewayError> {
    let invalid = |reason| GatewayError::InvalidHeader {
        name: "host",
        reason,
    };
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(invalid("sent more than once"));
    }
    match (host, request.uri().authority()) {
        (None, _) if request.version() == http::Version::HTTP_11 => {
            Err(invalid("required in HTTP/1.1"))
        }
        (Some(host), Some(authority))
            if !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
        {
            Err(invalid("does not match the request target's authority"))
        }
        _ => Ok(()),
    }
}

fn has_body<B: Body>(request: &Request<B>) -> bool {
    let headers = request.headers();
    let declared = headers
        .get(CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || headers.contains_key(TRANSFER_ENCODING);
    let body = request.body();
    declared || (!body.is_end_stream() && body.size_hint().exact() != Some(0))
}

fn json_response(served: Served) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(served.body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Per-user data: shared caches between client and gateway must not keep it.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    headers.insert(
        X_CACHE.clone(),
        HeaderValue::from_static(served.status.as_str()),
    );
    // RFC 9111 §5.1: whole seconds since the payload left the origin.
    if let Some(age) = served.age {
        headers.insert(AGE, HeaderValue::from(age.as_secs()));
    }
    response
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::{KeySet, KeyStore};
    use crate::config::{AuthConfig, JwksSource};
    use http_body_util::{BodyExt, Empty};
    use std::time::Duration;
    use tracing::instrument::WithSubscriber;

    /// A test-only route whose handler panics (see `route`).
    pub(crate) const PANIC_PATH: &str = "/__test/panic";

    /// RFC 7515 appendix A.3's P-256 public key.
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    /// A pipeline whose upstream is never reached by these tests.
    async fn pipeline() -> Pipeline {
        pipeline_auditing(None).await
    }

    /// The same, writing its audit trail with `auditor`.
    async fn pipeline_auditing(auditor: Option<Arc<Auditor>>) -> Pipeline {
        crate::server::tls::install_default_providers();
        let client = crate::http_client::build(crate::server::tls::client_config(None).unwrap());
        let auth = AuthConfig {
            issuer: "iss".into(),
            audience: "aud".into(),
            jwks: JwksSource::File("unused.json".into()),
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(30),
            algorithms: vec![jsonwebtoken::Algorithm::ES256],
            leeway: Duration::from_secs(60),
            principal_claim: "sub".into(),
            user_id_claim: "uid".into(),
            max_token_bytes: 8192,
            typ: None,
            verified_cache_bytes: 1024 * 1024,
        };
        let keys = KeySet::from_json(JWKS.as_bytes()).unwrap();
        let store = KeyStore::start(&auth, client.clone(), Some(keys))
            .await
            .unwrap();
        let upstream = Upstream::new(
            &"http://127.0.0.1:1".parse().unwrap(),
            client,
            &crate::upstream::tests::config(),
        );
        Pipeline::new(
            RequestMetrics::new(&mut Default::default()),
            auditor,
            Verifier::new(&auth, store),
            None,
            TokenSource::Static(Default::default()),
            upstream,
            None,
        )
    }

    #[tokio::test]
    async fn a_panic_gets_its_audit_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = crate::config::AuditConfig {
            sink: crate::config::AuditSink::File(path.clone()),
            on_error: crate::config::OnAuditError::Reject,
            max_file_bytes: None,
            max_files: 1,
            queue_records: 16,
            durability: crate::config::Durability::Written,
        };
        let auditor = Arc::new(Auditor::start(&config).unwrap());
        let pipeline = pipeline_auditing(Some(auditor)).await;
        let mut request = request(Method::GET, PANIC_PATH);
        request
            .headers_mut()
            .insert(X_TRACEID, HeaderValue::from_static("panic-audited"));
        let (dispatch, _log) = crate::test_log::CapturedLog::start();
        let response = pipeline.handle(request).with_subscriber(dispatch).await;
        assert_eq!(response.status(), 500);
        // `written` durability: the record is in the file once the
        // response is out.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let record: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(record["trace_id"], "panic-audited");
        assert_eq!(record["status"], 500);
        assert_eq!(record["code"], "internal_error");
        assert_eq!(record["decision"], "rejected");
    }

    #[tokio::test]
    async fn a_panic_is_answered_with_the_requests_trace_id_and_logged_once() {
        let pipeline = pipeline().await;
        for inbound in [Some("panic-trace-7"), None] {
            let (dispatch, log) = crate::test_log::CapturedLog::start();
            let mut request = request(Method::GET, PANIC_PATH);
            request
                .extensions_mut()
                .insert(ClientAddr(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    4321,
                ))));
            if let Some(id) = inbound {
                request
                    .headers_mut()
                    .insert(X_TRACEID, HeaderValue::from_static(id));
            }
            let response = pipeline.handle(request).with_subscriber(dispatch).await;
            assert_eq!(response.status(), 500);
            let header = response.headers()[X_TRACEID].to_str().unwrap().to_owned();
            if let Some(id) = inbound {
                assert_eq!(header, id);
            }
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["code"], "internal_error");
            assert_eq!(body["traceId"], header.as_str());
            assert!(!body["msg"].as_str().unwrap().contains("test fault"));

            let log = log.text();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&format!(" request trace_id={header} ")))
                .collect();
            assert_eq!(lines.len(), 1, "{log}");
            for field in [
                "status=500",
                "code=\"internal_error\"",
                "side=\"gateway\"",
                "client=127.0.0.1:4321",
                "decision=\"rejected\"",
                "request handler panicked: test fault",
            ] {
                assert!(lines[0].contains(field), "{field} missing: {}", lines[0]);
            }
        }
    }

    fn request(method: Method, uri: &str) -> Request<Empty<Bytes>> {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, "localhost")
            .body(Empty::new())
            .unwrap()
    }

    #[test]
    fn a_missing_repeated_or_mismatched_host_is_a_400() {
        let mut missing = request(Method::GET, JOBS_PATH);
        missing.headers_mut().remove(http::header::HOST);
        let mut repeated = request(Method::GET, JOBS_PATH);
        repeated
            .headers_mut()
            .append(http::header::HOST, HeaderValue::from_static("other"));
        let absolute = Request::get("https://evil.example/koodrive/ose/v1/jobs")
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        // The absolute form's authority is no substitute for Host.
        let absolute_without_host = Request::get("https://evil.example/koodrive/ose/v1/jobs")
            .body(Empty::<Bytes>::new())
            .unwrap();
        for request in [missing, repeated, absolute, absolute_without_host] {
            assert!(
                matches!(
                    route(&request),
                    Err(GatewayError::InvalidHeader { name: "host", .. })
                ),
                "{request:?}"
            );
        }
        // HTTP/2 names the authority in `:authority`; Host may be absent.
        let h2 = Request::get("https://localhost:8443/koodrive/ose/v1/jobs")
            .version(http::Version::HTTP_2)
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert!(route(&h2).is_ok());
        let same = Request::get("https://localhost:8443/koodrive/ose/v1/jobs")
            .header(http::header::HOST, "LOCALHOST:8443")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert!(route(&same).is_ok());
    }

    #[test]
    fn other_paths_are_not_found() {
        for path in [
            "/",
            "/koodrive/ose/v1/jobs/",
            "/koodrive/ose/v1/job",
            "/KOODRIVE/ose/v1/jobs",
        ] {
            assert!(
                matches!(
                    route(&request(Method::GET, path)),
                    Err(GatewayError::NotFound)
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn other_methods_are_not_allowed() {
        for method in [
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::PATCH,
        ] {
            assert!(matches!(
                route(&request(method.clone(), JOBS_PATH)),
                Err(GatewayError::MethodNotAllowed)
            ));
        }
    }

    #[test]
    fn a_body_on_the_get_is_rejected() {
        let with_body = Request::get(JOBS_PATH)
            .header(http::header::HOST, "localhost")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert!(matches!(
            route(&with_body),
            Err(GatewayError::BodyNotAllowed)
        ));
        let mut declared = request(Method::GET, JOBS_PATH);
        declared
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert!(matches!(
            route(&declared),
            Err(GatewayError::BodyNotAllowed)
        ));
        assert!(route(&request(Method::GET, JOBS_PATH)).is_ok());
    }
}
