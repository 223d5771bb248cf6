//! Errors of the request flow and their one mapping to the normalized body
//! `{"code", "msg", "traceId"}` (DESIGN.md, "Error body").
//!
//! Errors are grouped by the side that failed, pingora-style: the client
//! (4xx), the upstream or its credentials (502/503/504), the gateway itself
//! (500). The client sees only `code` and `msg`; causes stay in `#[source]`
//! for the log.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use std::time::Duration;

use crate::jobs::QueryError;
use crate::trace_id::TraceId;

/// Which side of the gateway failed: the caller, the gateway itself, or one
/// of the services it depends on. Logs and metrics carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The request was wrong or not allowed (4xx).
    Client,
    /// The gateway failed on its own (500).
    Gateway,
    /// The identity provider's key set could not be loaded.
    IdentityProvider,
    /// The token endpoint gave no KooDrive token.
    TokenEndpoint,
    /// Redis, where the shared rate-limit budgets live, could not be asked.
    RateLimitBackend,
    /// The audit trail's sink (its queue or the file) cannot take records.
    AuditSink,
    /// KooDrive, or the way to it.
    Upstream,
}

impl Side {
    /// The label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Gateway => "gateway",
            Side::IdentityProvider => "identity_provider",
            Side::TokenEndpoint => "token_endpoint",
            Side::RateLimitBackend => "rate_limit_backend",
            Side::AuditSink => "audit_sink",
            Side::Upstream => "upstream",
        }
    }
}

/// Every way a request can fail, by side. `Clone`, so one failed upstream
/// load can be handed to every request that waited for it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GatewayError {
    // ---- client side (4xx) ----
    /// The path is not one the gateway serves.
    #[error("no route for this path")]
    NotFound,
    /// The path exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A body was sent on the body-less `GET /jobs`.
    #[error("request body not allowed")]
    BodyNotAllowed,
    /// The query string broke the jobs schema.
    #[error(transparent)]
    InvalidQuery(#[from] QueryError),
    /// A request header the gateway reads had an invalid value.
    #[error("invalid header {name}: {reason}")]
    InvalidHeader {
        name: &'static str,
        reason: &'static str,
    },
    /// The request line and headers exceed `server.max_header_bytes`.
    #[error("request head larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    /// The `Authorization` header exceeds `auth.max_token_bytes`; refused
    /// before anything is decoded.
    #[error("authorization header larger than {limit} bytes")]
    AuthorizationTooLarge { limit: usize },
    /// More header fields than `server.max_headers`.
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    /// The request target (path and query) exceeds
    /// `server.max_request_target_bytes`.
    #[error("request target longer than {limit} bytes")]
    UriTooLong { limit: usize },
    /// No `Authorization: Bearer …` header.
    #[error("missing bearer token")]
    MissingCredentials,
    /// The internal JWT is past its `exp` (plus leeway).
    #[error("token expired")]
    ExpiredCredentials,
    /// The internal JWT failed verification; the problem is safe to show.
    #[error("invalid token: {0}")]
    InvalidCredentials(CredentialProblem),
    /// The caller is authenticated but no KooDrive credentials exist for
    /// their user id.
    #[error("no KooDrive credentials for this user")]
    UserNotProvisioned,
    /// The caller spent its budget (`[rate_limit]`).
    #[error("rate limited")]
    RateLimited { retry_after: Duration },

    // ---- the audit sink ----
    /// Failing closed, the request's audit record could not be kept (the
    /// queue is full or the sink cannot write): nothing is served unaudited.
    #[error("audit record cannot be kept")]
    AuditUnavailable { retry_after: Duration },

    // ---- the rate-limit backend ----
    /// Redis could not be asked and `on_backend_error = "deny"`.
    #[error("rate-limit backend unavailable")]
    RateLimitUnavailable { retry_after: Duration },

    // ---- the identity provider ----
    /// No verification key set could be loaded (the JWKS URL has been
    /// unreachable since start-up). Not the caller's fault: 503, not 401.
    #[error("verification keys unavailable")]
    KeysUnavailable {
        /// Until the next scheduled attempt to load them.
        retry_after: Duration,
    },

    // ---- the token endpoint ----
    /// No valid KooDrive token could be obtained for the caller's user; try
    /// again after the delay.
    #[error("KooDrive token unavailable: {cause}")]
    TokenUnavailable {
        retry_after: Duration,
        cause: TokenFailure,
    },

    // ---- KooDrive (502/504, or its own 400) ----
    /// KooDrive rejected the request as malformed (400); its code and
    /// message are kept. The gateway validated the request, so this is
    /// KooDrive disagreeing with it, not the caller's mistake.
    #[error("upstream rejected the request: {code}: {msg}")]
    UpstreamRejectedRequest { code: String, msg: String },
    /// No answer within `upstream.timeout_ms`.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The connection could not be established.
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[source] SharedError),
    /// The connection broke before a complete response arrived.
    #[error("upstream connection lost")]
    UpstreamConnectionLost(#[source] SharedError),
    /// KooDrive answered with something that is not its documented shape.
    #[error("upstream sent an unusable response: {0}")]
    UpstreamBadResponse(BadResponse),
    /// KooDrive refused the gateway's own KooDrive token (401/403). This is
    /// not the caller's fault, so it is never shown as a 401.
    #[error("upstream refused the gateway's credentials (status {status}, code {code})")]
    UpstreamCredentialsRejected { status: u16, code: String },
    /// KooDrive reported its own failure (5xx) in its documented shape; its
    /// code and message are kept.
    #[error("upstream failed: {code}: {msg}")]
    UpstreamFailed { code: String, msg: String },
    /// Every upstream slot (`upstream.max_concurrency`) stayed taken for
    /// `upstream.queue_timeout_ms`: the request is shed, not queued further.
    #[error("upstream overloaded: no slot within the queue timeout")]
    UpstreamOverloaded { retry_after: Duration },
    /// KooDrive asked for a pause (429 or 503 with `Retry-After`); no
    /// request is sent until it ends.
    #[error("upstream asked to pause (status {status})")]
    UpstreamPaused { status: u16, retry_after: Duration },

    // ---- the gateway itself (500) ----
    /// A bug or an unexpected local failure.
    #[error("internal error: {0}")]
    Internal(InternalError),
}

/// Why an internal JWT was refused. Every message is safe to show the
/// caller: it names a rule, never a key or a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialProblem {
    #[error("more than one authorization header")]
    MultipleHeaders,
    #[error("malformed authorization header")]
    MalformedHeader,
    #[error("expected `Authorization: Bearer <token>`")]
    NotBearer,
    #[error("malformed token or unsupported algorithm")]
    MalformedHeaderSegment,
    #[error("algorithm not accepted")]
    AlgorithmNotAccepted,
    #[error("embedded key references (jwk, jku, x5u, x5c) are not accepted")]
    EmbeddedKeyReference,
    #[error("critical header extensions are not supported")]
    CriticalExtension,
    #[error("wrong token type (typ)")]
    WrongType,
    #[error("no matching verification key")]
    NoMatchingKey,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("signature does not verify")]
    BadSignature,
    #[error("missing claim `{0}`")]
    MissingClaim(&'static str),
    #[error("malformed token")]
    Malformed,
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
    /// A configured identity claim (its name) is absent or not a string.
    #[error("missing string claim `{0}`")]
    MissingIdentity(String),
    /// A configured identity claim (its name) cannot serve as an identity.
    #[error("claim `{0}` must be 1-256 visible ASCII characters")]
    UnusableIdentity(String),
}

/// Why no KooDrive token could be had.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TokenFailure {
    /// An exchange for this caller failed recently; the gateway waits
    /// before asking the endpoint again.
    #[error("backing off after a failed exchange")]
    BackingOff,
    /// The exchange just failed.
    #[error(transparent)]
    Exchange(SharedError),
}

/// How a KooDrive answer broke its documented shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("status {0}: body is not KooDrive's success shape")]
    NotSuccessShape(u16),
    #[error("status {0}: unparseable error body")]
    UnparseableErrorBody(u16),
    #[error("status {0}: unexpected status")]
    UnexpectedStatus(u16),
    #[error("response body too large")]
    TooLarge,
}

/// A failure of the gateway itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InternalError {
    /// The request handler panicked; the panic's message.
    #[error("request handler panicked: {0}")]
    Panic(String),
    #[error("a value cannot be sent as an upstream header")]
    UnrepresentableHeader,
    #[error("the upstream URI cannot be built")]
    UnrepresentableUri,
    #[error("the token cache returned no entry")]
    TokenCacheEmpty,
}

/// A boxed error, as hyper and tower hand them over.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A shared cause carried by transport errors.
pub(crate) type SharedError = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// What the client is told (status, code, message) and which side failed.
#[derive(Debug, PartialEq, Eq)]
pub struct Rendered {
    pub side: Side,
    pub status: StatusCode,
    pub code: String,
    pub msg: String,
}

impl GatewayError {
    /// The one mapping from error to (side, status, code, msg). Exhaustive,
    /// no catch-all arm: a new variant must be given its row here.
    pub fn render(&self) -> Rendered {
        use GatewayError as E;
        use Side::*;
        let (side, status, code, msg): (Side, StatusCode, &str, String) = match self {
            E::NotFound => (
                Client,
                StatusCode::NOT_FOUND,
                "not_found",
                "no such resource".into(),
            ),
            E::MethodNotAllowed => (
                Client,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "only GET is allowed on this resource".into(),
            ),
            E::BodyNotAllowed => (
                Client,
                StatusCode::BAD_REQUEST,
                "body_not_allowed",
                "GET /koodrive/ose/v1/jobs takes no request body".into(),
            ),
            E::InvalidQuery(q) => (Client, StatusCode::BAD_REQUEST, q.code(), q.to_string()),
            E::InvalidHeader { name, reason } => (
                Client,
                StatusCode::BAD_REQUEST,
                "invalid_header",
                format!("header `{name}`: {reason}"),
            ),
            E::HeadersTooLarge { limit } => (
                Client,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("the request line and headers exceed {limit} bytes"),
            ),
            E::AuthorizationTooLarge { limit } => (
                Client,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("the Authorization header exceeds {limit} bytes"),
            ),
            E::TooManyHeaders { limit } => (
                Client,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("the request has more than {limit} header fields"),
            ),
            E::UriTooLong { limit } => (
                Client,
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!("the request target (path and query) exceeds {limit} bytes"),
            ),
            E::MissingCredentials => (
                Client,
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "an `Authorization: Bearer <token>` header is required".into(),
            ),
            E::ExpiredCredentials => (
                Client,
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "the bearer token has expired".into(),
            ),
            E::InvalidCredentials(problem) => (
                Client,
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                format!("the bearer token is invalid: {problem}"),
            ),
            E::UserNotProvisioned => (
                Client,
                StatusCode::FORBIDDEN,
                "user_not_provisioned",
                "no KooDrive credentials are configured for this user".into(),
            ),
            E::RateLimited { .. } => (
                Client,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this caller; retry after the delay in Retry-After".into(),
            ),
            E::AuditUnavailable { .. } => (
                AuditSink,
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the gateway cannot record this request right now; try again shortly".into(),
            ),
            E::RateLimitUnavailable { .. } => (
                RateLimitBackend,
                StatusCode::SERVICE_UNAVAILABLE,
                "rate_limit_unavailable",
                "the gateway cannot check the rate limit right now; try again shortly".into(),
            ),
            E::KeysUnavailable { .. } => (
                IdentityProvider,
                StatusCode::SERVICE_UNAVAILABLE,
                "jwks_unavailable",
                "the gateway cannot verify tokens right now; try again shortly".into(),
            ),
            E::TokenUnavailable { .. } => (
                TokenEndpoint,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_token_unavailable",
                "the gateway cannot obtain KooDrive credentials right now; try again shortly"
                    .into(),
            ),
            E::UpstreamRejectedRequest { code, msg } => (
                Upstream,
                StatusCode::BAD_REQUEST,
                code.as_str(),
                msg.clone(),
            ),
            E::UpstreamTimeout => (
                Upstream,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "KooDrive did not answer in time".into(),
            ),
            E::UpstreamUnreachable(_) => (
                Upstream,
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "KooDrive could not be reached".into(),
            ),
            E::UpstreamConnectionLost(_) => (
                Upstream,
                StatusCode::BAD_GATEWAY,
                "upstream_connection_lost",
                "the connection to KooDrive broke before it answered".into(),
            ),
            E::UpstreamBadResponse(_) => (
                Upstream,
                StatusCode::BAD_GATEWAY,
                "upstream_bad_response",
                "KooDrive sent a response the gateway could not use".into(),
            ),
            E::UpstreamCredentialsRejected { code, .. } => (
                Upstream,
                StatusCode::BAD_GATEWAY,
                "upstream_credentials_rejected",
                format!("KooDrive refused the gateway's credentials (KooDrive code {code})"),
            ),
            E::UpstreamFailed { code, msg } => (
                Upstream,
                StatusCode::BAD_GATEWAY,
                code.as_str(),
                msg.clone(),
            ),
            E::UpstreamOverloaded { .. } => (
                Upstream,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_overloaded",
                "too many requests to KooDrive are in flight; try again shortly".into(),
            ),
            E::UpstreamPaused { .. } => (
                Upstream,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_paused",
                "KooDrive asked the gateway to slow down; try again after Retry-After".into(),
            ),
            E::Internal(_) => (
                Gateway,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the gateway failed to process the request".into(),
            ),
        };
        Rendered {
            side,
            status,
            code: code.to_owned(),
            msg,
        }
    }

    /// Which side failed, for logs and metrics.
    /// Whether an HTTP/1.1 connection must close after this answer: the
    /// request's body was not read, or its head broke a size limit.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            GatewayError::BodyNotAllowed
                | GatewayError::HeadersTooLarge { .. }
                | GatewayError::TooManyHeaders { .. }
                | GatewayError::UriTooLong { .. }
        )
    }

    pub fn side(&self) -> Side {
        self.render().side
    }

    /// Builds the normalized response for this error, with the headers its
    /// status calls for. Exhaustive: a new variant must decide its headers.
    pub fn response(&self, trace_id: &TraceId) -> Response<Full<Bytes>> {
        use GatewayError as E;
        let rendered = self.render();
        let mut response = error_response(rendered.status, &rendered.code, &rendered.msg, trace_id);
        let headers = response.headers_mut();
        match self {
            // RFC 9110 §15.5.6: a 405 lists the allowed methods.
            E::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("GET"));
            }
            // RFC 6750 §3: no error code when no credentials were sent.
            E::MissingCredentials => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            E::ExpiredCredentials | E::InvalidCredentials(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            // RFC 9110 §10.2.3: when to try again.
            E::KeysUnavailable { retry_after }
            | E::TokenUnavailable { retry_after, .. }
            | E::RateLimited { retry_after }
            | E::RateLimitUnavailable { retry_after }
            | E::AuditUnavailable { retry_after }
            | E::UpstreamOverloaded { retry_after }
            | E::UpstreamPaused { retry_after, .. } => {
                headers.insert(RETRY_AFTER, retry_after_value(*retry_after));
            }
            E::NotFound
            | E::HeadersTooLarge { .. }
            | E::AuthorizationTooLarge { .. }
            | E::TooManyHeaders { .. }
            | E::UriTooLong { .. }
            | E::BodyNotAllowed
            | E::InvalidQuery(_)
            | E::InvalidHeader { .. }
            | E::UserNotProvisioned
            | E::UpstreamRejectedRequest { .. }
            | E::UpstreamTimeout
            | E::UpstreamUnreachable(_)
            | E::UpstreamConnectionLost(_)
            | E::UpstreamBadResponse(_)
            | E::UpstreamCredentialsRejected { .. }
            | E::UpstreamFailed { .. }
            | E::Internal(_) => {}
        }
        response
    }

    /// Whether KooDrive (or the path to it) failed, as opposed to the
    /// client or the gateway: the failures stale-if-error may cover.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamTimeout
                | GatewayError::UpstreamUnreachable(_)
                | GatewayError::UpstreamConnectionLost(_)
                | GatewayError::UpstreamBadResponse(_)
                | GatewayError::UpstreamFailed { .. }
                | GatewayError::UpstreamPaused { .. }
                | GatewayError::UpstreamOverloaded { .. }
        )
    }

    /// Whether the error means the request was never sent to KooDrive
    /// (shed, or held back by a pause), although it is KooDrive's side.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamOverloaded { .. } | GatewayError::UpstreamPaused { .. }
        )
    }

    /// The error and its causes, `: `-separated, for the log.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// `Retry-After` in whole seconds, at least 1 (RFC 9110 §10.2.3).
pub(crate) fn retry_after_value(delay: Duration) -> HeaderValue {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    msg: &'a str,
    #[serde(rename = "traceId")]
    trace_id: &'a str,
}

/// Builds a normalized error response. Used by [`GatewayError`] and by the
/// few places (panic handler) that fail outside the pipeline.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    msg: &str,
    trace_id: &TraceId,
) -> Response<Full<Bytes>> {
    let body = ErrorBody {
        code,
        msg,
        trace_id: trace_id.as_str(),
    };
    // Serializing three strings cannot fail; fall back to a fixed body anyway.
    let bytes = serde_json::to_vec(&body)
        .unwrap_or_else(|_| br#"{"code":"internal_error","msg":"","traceId":""}"#.to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::QueryError;
    use std::collections::{BTreeMap, BTreeSet};
    use yaml_rust2::{Yaml, YamlLoader};

    fn io_error() -> SharedError {
        std::sync::Arc::new(std::io::Error::other("boom"))
    }

    /// Every variant, once: adding a variant without a row here fails to
    /// compile in `variant_count`.
    fn every_variant() -> Vec<(GatewayError, Side, u16, &'static str)> {
        use GatewayError as E;
        use Side::*;
        vec![
            (E::NotFound, Client, 404, "not_found"),
            (E::MethodNotAllowed, Client, 405, "method_not_allowed"),
            (E::BodyNotAllowed, Client, 400, "body_not_allowed"),
            (
                E::InvalidQuery(QueryError::Missing("offset")),
                Client,
                400,
                "missing_parameter",
            ),
            (
                E::InvalidHeader {
                    name: "language",
                    reason: "bad",
                },
                Client,
                400,
                "invalid_header",
            ),
            (
                E::HeadersTooLarge { limit: 16384 },
                Client,
                431,
                "headers_too_large",
            ),
            (
                E::AuthorizationTooLarge { limit: 8192 },
                Client,
                431,
                "headers_too_large",
            ),
            (
                E::TooManyHeaders { limit: 64 },
                Client,
                431,
                "headers_too_large",
            ),
            (E::UriTooLong { limit: 8192 }, Client, 414, "uri_too_long"),
            (E::MissingCredentials, Client, 401, "missing_token"),
            (E::ExpiredCredentials, Client, 401, "token_expired"),
            (
                E::InvalidCredentials(CredentialProblem::BadSignature),
                Client,
                401,
                "invalid_token",
            ),
            (E::UserNotProvisioned, Client, 403, "user_not_provisioned"),
            (
                E::RateLimited {
                    retry_after: Duration::from_millis(100),
                },
                Client,
                429,
                "rate_limited",
            ),
            (
                E::AuditUnavailable {
                    retry_after: Duration::from_secs(1),
                },
                AuditSink,
                503,
                "audit_unavailable",
            ),
            (
                E::RateLimitUnavailable {
                    retry_after: Duration::from_millis(250),
                },
                RateLimitBackend,
                503,
                "rate_limit_unavailable",
            ),
            (
                E::UpstreamOverloaded {
                    retry_after: Duration::from_secs(1),
                },
                Upstream,
                503,
                "upstream_overloaded",
            ),
            (
                E::UpstreamPaused {
                    status: 429,
                    retry_after: Duration::from_secs(2),
                },
                Upstream,
                503,
                "upstream_paused",
            ),
            (
                E::KeysUnavailable {
                    retry_after: Duration::from_secs(3),
                },
                IdentityProvider,
                503,
                "jwks_unavailable",
            ),
            (
                E::TokenUnavailable {
                    retry_after: Duration::from_millis(1500),
                    cause: TokenFailure::BackingOff,
                },
                TokenEndpoint,
                503,
                "upstream_token_unavailable",
            ),
            (
                E::UpstreamRejectedRequest {
                    code: "40001".into(),
                    msg: "bad".into(),
                },
                Upstream,
                400,
                "40001",
            ),
            (E::UpstreamTimeout, Upstream, 504, "upstream_timeout"),
            (
                E::UpstreamUnreachable(io_error()),
                Upstream,
                502,
                "upstream_unreachable",
            ),
            (
                E::UpstreamConnectionLost(io_error()),
                Upstream,
                502,
                "upstream_connection_lost",
            ),
            (
                E::UpstreamBadResponse(BadResponse::NotSuccessShape(200)),
                Upstream,
                502,
                "upstream_bad_response",
            ),
            (
                E::UpstreamCredentialsRejected {
                    status: 401,
                    code: "401".into(),
                },
                Upstream,
                502,
                "upstream_credentials_rejected",
            ),
            (
                E::UpstreamFailed {
                    code: "50000".into(),
                    msg: "down".into(),
                },
                Upstream,
                502,
                "50000",
            ),
            (
                E::Internal(InternalError::TokenCacheEmpty),
                Gateway,
                500,
                "internal_error",
            ),
        ]
    }

    /// Counts variants by an exhaustive match, so a new variant cannot be
    /// left out of the table above unnoticed.
    fn variant_index(error: &GatewayError) -> usize {
        use GatewayError as E;
        match error {
            E::NotFound => 0,
            E::MethodNotAllowed => 1,
            E::BodyNotAllowed => 2,
            E::InvalidQuery(_) => 3,
            E::InvalidHeader { .. } => 4,
            E::MissingCredentials => 5,
            E::ExpiredCredentials => 6,
            E::InvalidCredentials(_) => 7,
            E::UserNotProvisioned => 8,
            E::KeysUnavailable { .. } => 9,
            E::TokenUnavailable { .. } => 10,
            E::UpstreamRejectedRequest { .. } => 11,
            E::UpstreamTimeout => 12,
            E::UpstreamUnreachable(_) => 13,
            E::UpstreamConnectionLost(_) => 14,
            E::UpstreamBadResponse(_) => 15,
            E::UpstreamCredentialsRejected { .. } => 16,
            E::UpstreamFailed { .. } => 17,
            E::Internal(_) => 18,
            E::RateLimited { .. } => 19,
            E::RateLimitUnavailable { .. } => 20,
            E::UpstreamOverloaded { .. } => 21,
            E::UpstreamPaused { .. } => 22,
            E::AuditUnavailable { .. } => 23,
            E::HeadersTooLarge { .. } => 24,
            E::AuthorizationTooLarge { .. } => 25,
            E::TooManyHeaders { .. } => 26,
            E::UriTooLong { .. } => 27,
        }
    }

    #[test]
    fn every_error_maps_to_its_side_status_and_code() {
        let rows = every_variant();
        let mut seen: Vec<usize> = rows.iter().map(|(e, ..)| variant_index(e)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..=27).collect::<Vec<_>>(), "one row per variant");
        for (error, side, status, code) in rows {
            let rendered = error.render();
            assert_eq!(rendered.side, side, "{error:?}");
            assert_eq!(rendered.status.as_u16(), status, "{error:?}");
            assert_eq!(rendered.code, code, "{error:?}");
            assert!(!rendered.msg.is_empty(), "{error:?}");
            let response = error.response(&TraceId::generate());
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            // Every 503 and 429 says when to come back.
            if status == 503 || status == 429 {
                assert!(response.headers().contains_key(RETRY_AFTER), "{error:?}");
            }
        }
    }

    #[test]
    fn the_identity_provider_and_a_koodrive_400_are_not_the_clients_side() {
        let keys = GatewayError::KeysUnavailable {
            retry_after: Duration::from_secs(1),
        };
        assert_eq!(keys.side(), Side::IdentityProvider);
        let rejected = GatewayError::UpstreamRejectedRequest {
            code: "1".into(),
            msg: "m".into(),
        };
        assert_eq!(rejected.side(), Side::Upstream);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_value(Duration::from_secs(30)), "30");
    }

    #[test]
    fn chain_names_the_cause_for_the_log() {
        let error = GatewayError::UpstreamUnreachable(io_error());
        assert_eq!(error.chain(), "upstream unreachable: boom");
    }

    #[test]
    fn internal_details_stay_out_of_the_message() {
        let rendered =
            GatewayError::UpstreamBadResponse(BadResponse::UnparseableErrorBody(500)).render();
        assert!(!rendered.msg.contains("500"));
        let rendered =
            GatewayError::Internal(InternalError::Panic("secret path /etc/x".into())).render();
        assert!(!rendered.msg.contains("/etc/x"));
    }

    #[test]
    fn method_not_allowed_carries_allow_header() {
        let response = GatewayError::MethodNotAllowed.response(&TraceId::generate());
        assert_eq!(response.headers()[ALLOW], "GET");
    }

    #[test]
    fn unavailable_token_says_when_to_retry() {
        let response = GatewayError::TokenUnavailable {
            retry_after: Duration::from_millis(1500),
            cause: TokenFailure::BackingOff,
        }
        .response(&TraceId::generate());
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert!(!response.headers().contains_key(WWW_AUTHENTICATE));
    }

    #[test]
    fn auth_errors_carry_www_authenticate() {
        let response = GatewayError::ExpiredCredentials.response(&TraceId::generate());
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        let response = GatewayError::MissingCredentials.response(&TraceId::generate());
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
    }

    /// Every `QueryError`, once: a new variant fails to compile in
    /// `query_error_index` until it has a row here.
    fn every_query_error() -> Vec<QueryError> {
        vec![
            QueryError::Missing("offset"),
            QueryError::Unknown("page".into()),
            QueryError::Repeated("limit"),
            QueryError::Invalid {
                name: "limit",
                rule: "must be a decimal integer from 1 to 100",
            },
        ]
    }

    fn query_error_index(error: &QueryError) -> usize {
        match error {
            QueryError::Missing(_) => 0,
            QueryError::Unknown(_) => 1,
            QueryError::Repeated(_) => 2,
            QueryError::Invalid { .. } => 3,
        }
    }

    /// Errors whose `code` is KooDrive's own, passed through.
    fn keeps_koodrive_code(error: &GatewayError) -> bool {
        matches!(
            error,
            GatewayError::UpstreamRejectedRequest { .. } | GatewayError::UpstreamFailed { .. }
        )
    }

    /// What `openapi.yaml` documents for one status of the jobs operation.
    #[derive(Debug, Default)]
    struct Documented {
        /// The gateway's codes: the `const` and `enum` values under `code`.
        codes: BTreeSet<String>,
        /// Whether `code` may also be KooDrive's own (`KooDriveCode`).
        koodrive_codes: bool,
        /// Response headers (lower case) and whether each is required.
        headers: BTreeMap<String, bool>,
    }

    /// The jobs operation's responses in `openapi.yaml`, by status.
    fn api_description() -> BTreeMap<u16, Documented> {
        let docs = YamlLoader::load_from_str(include_str!("../openapi.yaml"))
            .expect("openapi.yaml is YAML");
        let root = &docs[0];
        let responses = root["paths"]["/koodrive/ose/v1/jobs"]["get"]["responses"]
            .as_hash()
            .expect("the jobs operation has responses");
        responses
            .iter()
            .map(|(status, response)| {
                let status: u16 = status
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("status {status:?} is not a quoted number"));
                let response = resolve(root, response);
                let mut documented = Documented::default();
                for (name, header) in response["headers"].as_hash().into_iter().flatten() {
                    let name = name.as_str().expect("header name").to_ascii_lowercase();
                    let required = resolve(root, header)["required"].as_bool() == Some(true);
                    documented.headers.insert(name, required);
                }
                // Error codes only: a 200's `code` is KooDrive's success code.
                if status >= 400 {
                    collect_codes(
                        root,
                        &response["content"]["application/json"]["schema"],
                        &mut documented,
                    );
                }
                (status, documented)
            })
            .collect()
    }

    /// Follows local `$ref`s (`#/components/...`) to their target.
    fn resolve<'a>(root: &'a Yaml, node: &'a Yaml) -> &'a Yaml {
        let Some(reference) = node["$ref"].as_str() else {
            return node;
        };
        let path = reference
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("{reference} is not a local reference"));
        let target = path.split('/').fold(root, |node, key| &node[key]);
        assert!(!target.is_badvalue(), "{reference} names nothing");
        resolve(root, target)
    }

    /// The codes of a response schema: its `code` property, through
    /// `$ref`, `allOf`, `anyOf` and `oneOf`.
    fn collect_codes(root: &Yaml, schema: &Yaml, documented: &mut Documented) {
        let schema = resolve(root, schema);
        collect_code_values(root, &schema["properties"]["code"], documented);
        for combinator in ["allOf", "anyOf", "oneOf"] {
            for branch in schema[combinator].as_vec().into_iter().flatten() {
                collect_codes(root, branch, documented);
            }
        }
    }

    fn collect_code_values(root: &Yaml, code: &Yaml, documented: &mut Documented) {
        if code["$ref"]
            .as_str()
            .is_some_and(|r| r == "#/components/schemas/KooDriveCode")
        {
            documented.koodrive_codes = true;
            return;
        }
        let code = resolve(root, code);
        documented
            .codes
            .extend(code["const"].as_str().map(str::to_owned));
        for value in code["enum"].as_vec().into_iter().flatten() {
            documented
                .codes
                .insert(value.as_str().expect("codes are strings").to_owned());
        }
        for combinator in ["allOf", "anyOf", "oneOf"] {
            for branch in code[combinator].as_vec().into_iter().flatten() {
                collect_code_values(root, branch, documented);
            }
        }
    }

    #[test]
    fn the_api_description_lists_every_status_and_code_and_nothing_else() {
        let mut query_errors: Vec<usize> =
            every_query_error().iter().map(query_error_index).collect();
        query_errors.sort_unstable();
        assert_eq!(
            query_errors,
            (0..=3).collect::<Vec<_>>(),
            "one row per variant"
        );
        let rows: Vec<(GatewayError, u16, String)> = every_variant()
            .into_iter()
            .map(|(error, _, status, code)| (error, status, code.to_owned()))
            .chain(every_query_error().into_iter().map(|query| {
                let code = query.code().to_owned();
                (GatewayError::InvalidQuery(query), 400, code)
            }))
            .collect();
        let documented = api_description();

        let mut sent: BTreeMap<u16, (BTreeSet<String>, bool)> = BTreeMap::new();
        for (error, status, code) in &rows {
            let doc = documented
                .get(status)
                .unwrap_or_else(|| panic!("{error:?}: status {status} is not in openapi.yaml"));
            let entry = sent.entry(*status).or_default();
            if keeps_koodrive_code(error) {
                assert!(
                    doc.koodrive_codes,
                    "{error:?}: status {status} does not admit KooDrive's codes"
                );
                entry.1 = true;
            } else {
                assert!(
                    doc.codes.contains(code),
                    "{error:?}: code `{code}` is not under {status}"
                );
                entry.0.insert(code.clone());
            }
            // The headers the mapping sets are documented, as required.
            let response = error.response(&TraceId::generate());
            for name in [RETRY_AFTER, ALLOW, WWW_AUTHENTICATE] {
                if response.headers().contains_key(&name) {
                    assert_eq!(
                        doc.headers.get(name.as_str()),
                        Some(&true),
                        "{error:?}: `{name}` is not a required header of {status}"
                    );
                }
            }
        }

        // And nothing else: every status and code documented is sent.
        assert!(documented.contains_key(&200), "200 is not in openapi.yaml");
        for (status, doc) in &documented {
            assert_eq!(
                doc.headers.get("x-traceid"),
                Some(&true),
                "{status} does not require X-Traceid"
            );
            if *status == 200 {
                continue;
            }
            let (codes, koodrive) = sent.get(status).unwrap_or_else(|| {
                panic!("openapi.yaml lists {status}, which the gateway never sends")
            });
            assert_eq!(
                &doc.codes, codes,
                "codes documented under {status} vs codes sent"
            );
            assert_eq!(
                doc.koodrive_codes, *koodrive,
                "KooDrive's codes under {status}"
            );
        }
    }
}
