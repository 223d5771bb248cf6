//! The one outbound HTTP client (pooled hyper-util client over rustls) and
//! the bounded exchange every outbound call uses: a timeout over the whole
//! exchange and a cap on the response body. Used for KooDrive, the token
//! endpoint and the JWKS URL.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error::BoxError;

/// A pooled HTTPS (or loopback HTTP) client.
pub(crate) type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the client; connections are reused across requests.
pub(crate) fn build(tls: rustls::ClientConfig) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build(connector)
}

/// A complete response.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why an outbound exchange produced no response.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("timed out")]
    Timeout,
    #[error("could not connect: {0}")]
    Connect(#[source] BoxError),
    #[error("connection lost: {0}")]
    Lost(#[source] BoxError),
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
}

/// Sends `request` and reads the whole answer, within `timeout` and at
/// most `max_body` bytes of body.
pub(crate) async fn fetch(
    client: &HttpsClient,
    request: Request<Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
) -> Result<Fetched, FetchError> {
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                FetchError::Connect(Box::new(e))
            } else {
                FetchError::Lost(Box::new(e))
            }
        })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge(max_body)
                } else {
                    FetchError::Lost(e)
                }
            })?
            .to_bytes();
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| FetchError::Timeout)?
}
