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

use crate::jobs::QueryError;
use crate::trace_id::TraceId;

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
    /// No `Authorization: Bearer …` header.
    #[error("missing bearer token")]
    MissingCredentials,
    /// The internal JWT is past its `exp` (plus leeway).
    #[error("token expired")]
    ExpiredCredentials,
    /// The internal JWT failed verification; the reason is safe to show.
    #[error("invalid token: {0}")]
    InvalidCredentials(String),
    /// The caller is authenticated but no KooDrive credentials exist for
    /// their user id.
    #[error("no KooDrive credentials for this user")]
    UserNotProvisioned,
    /// KooDrive rejected the request as malformed (400); its code and
    /// message are kept.
    #[error("upstream rejected the request: {code}: {msg}")]
    UpstreamRejectedRequest { code: String, msg: String },

    // ---- upstream side and the gateway's dependencies (502/503/504) ----
    /// No verification key set could be loaded (the JWKS URL has been
    /// unreachable since start-up). Not the caller's fault: 503, not 401.
    #[error("verification keys unavailable")]
    KeysUnavailable,
    /// No valid KooDrive token could be obtained for the caller's user; try
    /// again after the delay.
    #[error("KooDrive token unavailable")]
    TokenUnavailable { retry_after: std::time::Duration },
    /// No answer within `upstream.timeout_ms`.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The connection could not be established.
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[source] SharedError),
    /// The connection broke before a complete response arrived.
    #[error("upstream connection lost")]
    UpstreamConnectionLost(#[source] SharedError),
    /// KooDrive answered with something that is not its documented shape
    /// (HTML, empty, garbage, oversized, unexpected status).
    #[error("upstream sent an unusable response: {0}")]
    UpstreamBadResponse(String),
    /// KooDrive refused the gateway's own KooDrive token (401/403). This is
    /// not the caller's fault, so it is never shown as a 401.
    #[error("upstream refused the gateway's credentials (status {status}, code {code})")]
    UpstreamCredentialsRejected { status: u16, code: String },
    /// KooDrive reported its own failure (5xx) in its documented shape; its
    /// code and message are kept.
    #[error("upstream failed: {code}: {msg}")]
    UpstreamFailed { code: String, msg: String },

    // ---- the gateway itself (500) ----
    /// A bug or an unexpected local failure.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A boxed error, as hyper and tower hand them over.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A shared cause carried by transport errors.
pub type SharedError = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// What the client is told: status, code, message, and extra headers.
#[derive(Debug, PartialEq, Eq)]
pub struct Rendered {
    pub status: StatusCode,
    pub code: String,
    pub msg: String,
}

impl GatewayError {
    /// The one mapping from error to (status, code, msg). Exhaustive, no
    /// catch-all arm: a new variant must be given its row here.
    pub fn render(&self) -> Rendered {
        use GatewayError as E;
        let (status, code, msg): (StatusCode, &str, String) = match self {
            E::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such resource".into(),
            ),
            E::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "only GET is allowed on this resource".into(),
            ),
            E::BodyNotAllowed => (
                StatusCode::BAD_REQUEST,
                "body_not_allowed",
                "GET /koodrive/ose/v1/jobs takes no request body".into(),
            ),
            E::InvalidQuery(q) => (StatusCode::BAD_REQUEST, q.code(), q.to_string()),
            E::InvalidHeader { name, reason } => (
                StatusCode::BAD_REQUEST,
                "invalid_header",
                format!("header `{name}`: {reason}"),
            ),
            E::MissingCredentials => (
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "an `Authorization: Bearer <token>` header is required".into(),
            ),
            E::ExpiredCredentials => (
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "the bearer token has expired".into(),
            ),
            E::InvalidCredentials(reason) => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                format!("the bearer token is invalid: {reason}"),
            ),
            E::UserNotProvisioned => (
                StatusCode::FORBIDDEN,
                "user_not_provisioned",
                "no KooDrive credentials are configured for this user".into(),
            ),
            E::UpstreamRejectedRequest { code, msg } => {
                (StatusCode::BAD_REQUEST, code.as_str(), msg.clone())
            }
            E::KeysUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "jwks_unavailable",
                "the gateway cannot verify tokens right now; try again shortly".into(),
            ),
            E::TokenUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_token_unavailable",
                "the gateway cannot obtain KooDrive credentials right now; try again shortly"
                    .into(),
            ),
            E::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "KooDrive did not answer in time".into(),
            ),
            E::UpstreamUnreachable(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "KooDrive could not be reached".into(),
            ),
            E::UpstreamConnectionLost(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_connection_lost",
                "the connection to KooDrive broke before it answered".into(),
            ),
            E::UpstreamBadResponse(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_bad_response",
                "KooDrive sent a response the gateway could not use".into(),
            ),
            E::UpstreamCredentialsRejected { code, .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_credentials_rejected",
                format!("KooDrive refused the gateway's credentials (KooDrive code {code})"),
            ),
            E::UpstreamFailed { code, msg } => {
                (StatusCode::BAD_GATEWAY, code.as_str(), msg.clone())
            }
            E::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the gateway failed to process the request".into(),
            ),
        };
        Rendered {
            status,
            code: code.to_owned(),
            msg,
        }
    }

    /// Builds the normalized response for this error.
    pub fn into_response(self, trace_id: &TraceId) -> Response<Full<Bytes>> {
        let rendered = self.render();
        let mut response = error_response(rendered.status, &rendered.code, &rendered.msg, trace_id);
        let headers = response.headers_mut();
        match self {
            // RFC 9110 §15.5.6: a 405 lists the allowed methods.
            GatewayError::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("GET"));
            }
            // RFC 6750 §3: no error code when no credentials were sent.
            GatewayError::MissingCredentials => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            GatewayError::ExpiredCredentials | GatewayError::InvalidCredentials(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            // RFC 9110 §10.2.3: when to try again.
            GatewayError::KeysUnavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("5"));
            }
            GatewayError::TokenUnavailable { retry_after } => {
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                    headers.insert(RETRY_AFTER, value);
                }
            }
            _ => {}
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
        )
    }

    /// Which side failed, for logs and metrics.
    pub fn side(&self) -> &'static str {
        match self.render().status.as_u16() {
            400..=499 => "client",
            500 => "gateway",
            _ => "upstream",
        }
    }
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
pub fn error_response(
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

    fn io_error() -> SharedError {
        std::sync::Arc::new(std::io::Error::other("boom"))
    }

    #[test]
    fn every_error_maps_to_its_status_and_code() {
        let rows: Vec<(GatewayError, u16, &str)> = vec![
            (GatewayError::NotFound, 404, "not_found"),
            (GatewayError::MethodNotAllowed, 405, "method_not_allowed"),
            (GatewayError::BodyNotAllowed, 400, "body_not_allowed"),
            (
                GatewayError::InvalidQuery(QueryError::Missing("offset")),
                400,
                "missing_parameter",
            ),
            (
                GatewayError::InvalidHeader {
                    name: "language",
                    reason: "bad",
                },
                400,
                "invalid_header",
            ),
            (GatewayError::MissingCredentials, 401, "missing_token"),
            (GatewayError::ExpiredCredentials, 401, "token_expired"),
            (
                GatewayError::InvalidCredentials("x".into()),
                401,
                "invalid_token",
            ),
            (
                GatewayError::UserNotProvisioned,
                403,
                "user_not_provisioned",
            ),
            (
                GatewayError::UpstreamRejectedRequest {
                    code: "40001".into(),
                    msg: "bad".into(),
                },
                400,
                "40001",
            ),
            (GatewayError::KeysUnavailable, 503, "jwks_unavailable"),
            (
                GatewayError::TokenUnavailable {
                    retry_after: std::time::Duration::from_millis(1500),
                },
                503,
                "upstream_token_unavailable",
            ),
            (GatewayError::UpstreamTimeout, 504, "upstream_timeout"),
            (
                GatewayError::UpstreamUnreachable(io_error()),
                502,
                "upstream_unreachable",
            ),
            (
                GatewayError::UpstreamConnectionLost(io_error()),
                502,
                "upstream_connection_lost",
            ),
            (
                GatewayError::UpstreamBadResponse("html".into()),
                502,
                "upstream_bad_response",
            ),
            (
                GatewayError::UpstreamCredentialsRejected {
                    status: 401,
                    code: "401".into(),
                },
                502,
                "upstream_credentials_rejected",
            ),
            (
                GatewayError::UpstreamFailed {
                    code: "50000".into(),
                    msg: "down".into(),
                },
                502,
                "50000",
            ),
            (GatewayError::Internal("bug".into()), 500, "internal_error"),
        ];
        for (error, status, code) in rows {
            let rendered = error.render();
            assert_eq!(rendered.status.as_u16(), status, "{error:?}");
            assert_eq!(rendered.code, code, "{error:?}");
            assert!(!rendered.msg.is_empty(), "{error:?}");
        }
    }

    #[test]
    fn internal_details_stay_out_of_the_message() {
        let rendered =
            GatewayError::UpstreamBadResponse("<html>stack trace</html>".into()).render();
        assert!(!rendered.msg.contains("stack"));
        let rendered = GatewayError::Internal("secret path /etc/x".into()).render();
        assert!(!rendered.msg.contains("/etc/x"));
    }

    #[test]
    fn method_not_allowed_carries_allow_header() {
        let response = GatewayError::MethodNotAllowed.into_response(&TraceId::generate());
        assert_eq!(response.headers()[ALLOW], "GET");
    }

    #[test]
    fn unavailable_token_says_when_to_retry() {
        let response = GatewayError::TokenUnavailable {
            retry_after: std::time::Duration::from_millis(1500),
        }
        .into_response(&TraceId::generate());
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert!(!response.headers().contains_key(WWW_AUTHENTICATE));
    }

    #[test]
    fn auth_errors_carry_www_authenticate() {
        let response = GatewayError::ExpiredCredentials.into_response(&TraceId::generate());
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        let response = GatewayError::MissingCredentials.into_response(&TraceId::generate());
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
    }
}
