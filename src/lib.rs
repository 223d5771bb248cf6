//! koodrive-gateway: an authenticating reverse proxy for KooDrive's
//! "List batch tasks" API. [`Gateway::build`] turns a validated
//! [`config::Config`] into a bound, ready server; [`Gateway::run`] serves it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod devcerts;
pub mod emulator;
pub mod error;
pub mod jobs;
pub mod language;
pub mod pipeline;
pub mod server;
pub mod token;
pub mod trace_id;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::StatusCode;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::auth::{JwksError, Verifier};
use crate::config::{Config, TokenConfig, UpstreamTarget};
use crate::devcerts::DevCertError;
use crate::emulator::Emulator;
use crate::pipeline::Pipeline;
use crate::server::tls::{self, TlsError};
use crate::token::{TokenFileError, TokenSource};
use crate::upstream::Upstream;

/// Why the gateway could not start. Every file is read before the port is
/// bound, so a bad file never leaves a half-started process.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("development certificates: {0}")]
    DevCerts(#[from] DevCertError),
    #[error("auth.jwks_file: {0}")]
    Jwks(#[from] JwksError),
    #[error("token.static_tokens_file: {0}")]
    Tokens(#[from] TokenFileError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the embedded emulator: {0}")]
    Emulator(#[source] std::io::Error),
}

/// A built gateway: files loaded, listener bound, not yet serving.
pub struct Gateway {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    pipeline: Arc<Pipeline>,
    grace: Duration,
    /// The in-process emulator when `upstream.base_url = "embedded"`.
    emulator: Option<Emulator>,
}

impl Gateway {
    /// Builds the gateway from config: creates dev material if asked, loads
    /// keys, tokens and certificates, starts the embedded emulator if
    /// configured, and binds the listener last.
    pub async fn build(config: &Config) -> Result<Gateway, StartError> {
        if let Some(dir) = &config.server.dev_certs_dir {
            devcerts::ensure(dir)?;
        }
        let verifier = Verifier::from_config(&config.auth)?;
        let tokens = match &config.token {
            TokenConfig::Static { tokens_file } => TokenSource::from_static_file(tokens_file)?,
        };
        let server_tls = config
            .server
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()?;
        let client_tls = tls::client_config(config.upstream.ca_file.as_deref())?;

        let (base, emulator) = match &config.upstream.target {
            UpstreamTarget::Url(uri) => (uri.clone(), None),
            UpstreamTarget::Embedded => {
                let emulator = Emulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), None)
                    .await
                    .map_err(StartError::Emulator)?;
                for (user, token) in tokens.static_grants() {
                    emulator.grant(token.expose(), &user);
                }
                let base = emulator
                    .base_url()
                    .parse()
                    .map_err(|_| StartError::Emulator(std::io::Error::other("bad emulator URL")))?;
                (base, Some(emulator))
            }
        };
        let upstream = Upstream::new(
            &base,
            client_tls,
            config.upstream.timeout,
            config.upstream.max_response_bytes,
        );

        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.server.listen,
                source,
            })?;
        Ok(Gateway {
            listener,
            tls: server_tls,
            pipeline: Arc::new(Pipeline {
                verifier,
                tokens,
                upstream,
            }),
            grace: config.server.shutdown_grace,
            emulator,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether the gateway terminates TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The embedded emulator, when the config asked for one.
    pub fn emulator(&self) -> Option<&Emulator> {
        self.emulator.as_ref()
    }

    /// Serves until `shutdown` resolves, then drains for the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let pipeline = self.pipeline;
        // Order matters: Authorization is marked sensitive before anything
        // could log headers; panics become a normalized 500, not a reset.
        let service = ServiceBuilder::new()
            .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
            .layer(CatchPanicLayer::custom(panic_response))
            .service_fn(move |request| {
                let pipeline = pipeline.clone();
                async move { Ok::<_, Infallible>(pipeline.handle(request).await) }
            });
        let service = hyper_util::service::TowerToHyperService::new(service);
        // Keep the embedded emulator alive for as long as the gateway serves.
        let _emulator = self.emulator;
        server::serve(self.listener, self.tls, service, shutdown, self.grace).await;
    }
}

fn panic_response(
    _panic: Box<dyn std::any::Any + Send + 'static>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    tracing::error!("request handler panicked");
    error::error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the gateway failed to process the request",
        &trace_id::TraceId::generate(),
    )
}
