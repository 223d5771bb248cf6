//! The token endpoint client: one RFC 8693 token exchange (or RFC 6749
//! client-credentials) request per call, with client authentication, a
//! timeout, a bounded response, and strict checks on what comes back.

use std::future::Future;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use serde::Deserialize;

use super::AccessToken;
use crate::auth::SubjectToken;
use crate::config::{Grant, Secret};
use crate::http_client::{self, FetchError, HttpsClient};

/// RFC 8693 §2.1 grant type.
pub(crate) const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3 token type of a JWT subject token.
pub(crate) const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 §3 token type of the requested access token.
pub(crate) const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Largest token response accepted.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest access token accepted.
const MAX_TOKEN_LEN: usize = 4096;
/// An `expires_in` above this is treated as garbage, not trusted for a year.
const MAX_EXPIRES_IN: i64 = 366 * 24 * 3600;

/// Who a token is requested for.
#[derive(Clone, Debug)]
pub struct Subject {
    pub user_id: String,
    pub subject_token: SubjectToken,
}

/// A token the endpoint issued, and its lifetime from receipt.
#[derive(Clone, Debug)]
pub struct Issued {
    pub token: AccessToken,
    pub expires_in: Duration,
}

/// Why no token was issued. Messages never carry a token or secret.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("token endpoint: {0}")]
    Fetch(#[from] FetchError),
    #[error("token endpoint answered with status {0}")]
    Status(u16),
    #[error("token endpoint sent an unusable response: {0}")]
    Garbage(&'static str),
}

/// Something that issues KooDrive tokens (the HTTP endpoint in production).
pub trait TokenEndpoint: Send + Sync + 'static {
    /// Requests one token for `subject`.
    fn issue(
        &self,
        subject: &Subject,
    ) -> impl Future<Output = Result<Issued, EndpointError>> + Send;
}

/// The token endpoint over HTTP.
pub struct HttpTokenEndpoint {
    pub client: HttpsClient,
    pub url: Uri,
    pub client_id: String,
    pub client_secret: Secret,
    pub grant: Grant,
    pub user_id_param: String,
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

impl HttpTokenEndpoint {
    fn request(&self, subject: &Subject) -> Result<Request<Full<Bytes>>, EndpointError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        match self.grant {
            Grant::TokenExchange => form
                .append_pair("grant_type", TOKEN_EXCHANGE_GRANT)
                .append_pair("subject_token", subject.subject_token.expose())
                .append_pair("subject_token_type", JWT_TOKEN_TYPE)
                .append_pair("requested_token_type", ACCESS_TOKEN_TYPE),
            Grant::ClientCredentials => form
                .append_pair("grant_type", "client_credentials")
                .append_pair(&self.user_id_param, &subject.user_id),
        };
        // RFC 6749 §2.3.1: id and secret are form-encoded, then Basic.
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let credentials = STANDARD.encode(format!(
            "{}:{}",
            encode(&self.client_id),
            encode(self.client_secret.expose())
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {credentials}"))
            .map_err(|_| EndpointError::Garbage("client credentials are not a valid header"))?;
        authorization.set_sensitive(true);
        Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, authorization)
            .body(Full::new(Bytes::from(form.finish())))
            .map_err(|_| EndpointError::Garbage("unrepresentable request"))
    }
}

impl TokenEndpoint for HttpTokenEndpoint {
    async fn issue(&self, subject: &Subject) -> Result<Issued, EndpointError> {
        let request = self.request(subject)?;
        let fetched =
            http_client::fetch(&self.client, request, self.timeout, MAX_RESPONSE_BYTES).await?;
        if fetched.status != StatusCode::OK {
            return Err(EndpointError::Status(fetched.status.as_u16()));
        }
        parse_response(&fetched.body)
    }
}

/// Checks a token response strictly: an `access_token` usable as a header
/// value, a `Bearer` (or RFC 8693 `N_A`) type, and a sane `expires_in`.
pub(crate) fn parse_response(body: &[u8]) -> Result<Issued, EndpointError> {
    let response: TokenResponse = serde_json::from_slice(body)
        .map_err(|_| EndpointError::Garbage("not a JSON token response"))?;
    let token = response
        .access_token
        .filter(|t| {
            !t.is_empty() && t.len() <= MAX_TOKEN_LEN && t.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or(EndpointError::Garbage("missing or malformed access_token"))?;
    if let Some(kind) = &response.token_type {
        if !kind.eq_ignore_ascii_case("bearer") && kind != "N_A" {
            return Err(EndpointError::Garbage("token_type is not Bearer"));
        }
    }
    let expires_in = response
        .expires_in
        .and_then(|v| v.as_i64())
        .filter(|s| (1..=MAX_EXPIRES_IN).contains(s))
        .ok_or(EndpointError::Garbage("missing or implausible expires_in"))?;
    Ok(Issued {
        token: AccessToken::new(token),
        expires_in: Duration::from_secs(expires_in as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_response_is_accepted() {
        let issued =
            parse_response(br#"{"access_token":"abc","token_type":"Bearer","expires_in":3600}"#)
                .unwrap();
        assert_eq!(issued.token.expose(), "abc");
        assert_eq!(issued.expires_in, Duration::from_secs(3600));
        assert!(
            parse_response(br#"{"access_token":"abc","token_type":"N_A","expires_in":1}"#).is_ok()
        );
    }

    #[test]
    fn garbage_responses_are_failures() {
        for body in [
            "",
            "<html>",
            r#"{"token_type":"Bearer","expires_in":3600}"#,
            r#"{"access_token":"","expires_in":3600}"#,
            r#"{"access_token":"has space","expires_in":3600}"#,
            r#"{"access_token":"abc"}"#,
            r#"{"access_token":"abc","expires_in":0}"#,
            r#"{"access_token":"abc","expires_in":-5}"#,
            r#"{"access_token":"abc","expires_in":99999999999}"#,
            r#"{"access_token":"abc","expires_in":"3600"}"#,
            r#"{"access_token":"abc","expires_in":3600,"token_type":"mac"}"#,
        ] {
            assert!(parse_response(body.as_bytes()).is_err(), "{body}");
        }
    }
}
