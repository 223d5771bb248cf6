//! The admin listener (`server.admin_listen`, plain HTTP, meant for
//! loopback or a private port): `/healthz` (the process serves) and
//! `/readyz` (a verification key set is loaded and the gateway is not
//! draining). Kept off the public listener so probes need no JWT.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::watch;

use crate::audit::Auditor;
use crate::auth::KeyStore;
use crate::metrics;
use prometheus_client::registry::Registry;

/// The gateway's components that readiness looks at.
#[derive(Clone, Debug)]
pub(crate) struct Readiness {
    pub keys: Arc<KeyStore>,
    /// Failing closed, the gateway is not ready while its sink cannot write.
    pub audit: Option<Arc<Auditor>>,
    /// What `/metrics` serves.
    pub metrics: Arc<Registry>,
}

/// What the admin listener answers from.
#[derive(Clone, Debug)]
pub(crate) struct Health {
    readiness: Readiness,
    /// Becomes `true` when shutdown starts.
    draining: watch::Receiver<bool>,
}

impl Health {
    pub(crate) fn new(readiness: Readiness, draining: watch::Receiver<bool>) -> Health {
        Health {
            readiness,
            draining,
        }
    }

    /// Why the gateway is not ready, if it is not.
    pub(crate) fn not_ready(&self) -> Option<&'static str> {
        if *self.draining.borrow() {
            Some("draining")
        } else if self.readiness.keys.current().is_none() {
            Some("no verification key set loaded")
        } else if self
            .readiness
            .audit
            .as_ref()
            .is_some_and(|audit| audit.refuses_requests())
        {
            Some("audit sink cannot write")
        } else {
            None
        }
    }

    /// Answers one admin request.
    pub(crate) async fn handle<B>(
        &self,
        request: Request<B>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if request.method() != Method::GET {
            return Ok(json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"status":"method_not_allowed"}"#.into(),
            ));
        }
        Ok(match request.uri().path() {
            "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(metrics::encode(
                    &self.readiness.metrics,
                ))));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/readyz" => match self.not_ready() {
                None => json(StatusCode::OK, r#"{"status":"ready"}"#.into()),
                Some(reason) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(r#"{{"status":"not_ready","reason":"{reason}"}}"#),
                ),
            },
            _ => json(StatusCode::NOT_FOUND, r#"{"status":"not_found"}"#.into()),
        })
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
