//! koodrive-gateway: an authenticating reverse proxy for KooDrive's
//! "List batch tasks" API. [`Gateway::build`] turns a validated
//! [`config::Config`] into a bound, ready server; [`Gateway::run`] serves it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cache;
pub mod cache_control;
pub mod config;
pub mod devcerts;
pub mod emulator;
pub mod error;
pub mod http_client;
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
use tokio::sync::{oneshot, watch};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::auth::{JwksError, KeySet, KeyStore, Verifier};
use crate::cache::ResponseCache;
use crate::config::{Config, JwksSource, Secret, TokenConfig, TokenEndpoint, UpstreamTarget};
use crate::devcerts::DevCertError;
use crate::emulator::Emulator;
use crate::pipeline::Pipeline;
use crate::server::admin::Health;
use crate::server::tls::{self, TlsError};
use crate::token::endpoint::HttpTokenEndpoint;
use crate::token::exchange::TokenCache;
use crate::token::{TokenFileError, TokenSource};
use crate::upstream::Upstream;

/// Why the gateway could not start. Every file is read before the port is
/// bound, so a bad file never leaves a half-started process.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("development certificates: {0}")]
    DevCerts(#[from] DevCertError),
    #[error("auth JWKS: {0}")]
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
    #[error("{0}")]
    Inconsistent(&'static str),
}

/// A spawned task that ends when its owner drops it.
struct BackgroundTask(tokio::task::JoinHandle<()>);

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A built gateway: files loaded, listener bound, not yet serving.
pub struct Gateway {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    pipeline: Arc<Pipeline>,
    grace: Duration,
    /// The in-process emulator when `upstream.base_url = "embedded"`.
    emulator: Option<Emulator>,
    /// Key refresh; stops with the gateway.
    tasks: Vec<BackgroundTask>,
    /// The admin listener and what readiness looks at.
    admin: Option<(TcpListener, Arc<KeyStore>)>,
}

impl Gateway {
    /// Reads every file the config names — TLS certificate and key, extra
    /// CA, JWKS file, static token file — as a start would, without binding
    /// ports or fetching URLs. Development material is created if asked.
    pub fn check_files(config: &Config) -> Result<(), StartError> {
        if let Some(dir) = &config.server.dev_certs_dir {
            devcerts::ensure(dir)?;
        }
        if let Some(files) = &config.server.tls {
            tls::server_config(files)?;
        }
        tls::client_config(config.upstream.ca_file.as_deref())?;
        if let JwksSource::File(path) = &config.auth.jwks {
            KeySet::from_file(path)?;
        }
        if let TokenConfig::Static { tokens_file } = &config.token {
            TokenSource::from_static_file(tokens_file)?;
        }
        Ok(())
    }

    /// Builds the gateway from config: creates dev material if asked, loads
    /// keys, tokens and certificates, starts the embedded emulator if
    /// configured, and binds the listener last.
    pub async fn build(config: &Config) -> Result<Gateway, StartError> {
        if let Some(dir) = &config.server.dev_certs_dir {
            devcerts::ensure(dir)?;
        }
        let server_tls = config
            .server
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()?;
        // One pooled client for KooDrive, its token endpoint and the JWKS URL.
        let client = http_client::build(tls::client_config(config.upstream.ca_file.as_deref())?);
        let (base, emulator) = match &config.upstream.target {
            UpstreamTarget::Url(uri) => (uri.clone(), None),
            UpstreamTarget::Embedded => {
                let emulator = Emulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), None)
                    .await
                    .map_err(StartError::Emulator)?;
                (emulator_url(&emulator.base_url())?, Some(emulator))
            }
        };
        let keys = KeyStore::load(&config.auth, client.clone()).await?;
        let tokens = token_source(config, &client, emulator.as_ref())?;
        let upstream = Upstream::new(
            &base,
            client,
            config.upstream.timeout,
            config.upstream.max_response_bytes,
        );

        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some((
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
                keys.clone(),
            )),
            None => None,
        };
        let tasks = vec![BackgroundTask(tokio::spawn(keys.clone().keep_fresh()))];
        Ok(Gateway {
            listener,
            tls: server_tls,
            pipeline: Arc::new(Pipeline {
                verifier: Verifier::new(&config.auth, keys),
                tokens,
                upstream,
                cache: config
                    .cache
                    .as_ref()
                    .map(|c| Arc::new(ResponseCache::new(c))),
            }),
            grace: config.server.shutdown_grace,
            emulator,
            tasks,
            admin,
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
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
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
        // Keep the embedded emulator and the key refresh alive for as long
        // as the gateway serves.
        let _emulator = self.emulator;
        let _tasks = self.tasks;
        // On the shutdown signal readiness turns false and the public
        // listener drains; the admin listener keeps answering (`/readyz`
        // 503) until the drain is over, so probes see the gateway leave.
        let (draining_tx, mut draining) = watch::channel(false);
        let (admin_stop, admin_stopped) = oneshot::channel::<()>();
        let admin = self.admin.map(|(listener, keys)| {
            let health = Health {
                keys,
                draining: draining.clone(),
            };
            let service = hyper::service::service_fn(move |request| {
                let health = health.clone();
                async move { health.handle(request).await }
            });
            let stopped = async {
                let _ = admin_stopped.await;
            };
            tokio::spawn(server::serve(listener, None, service, stopped, self.grace))
        });
        tokio::spawn(async move {
            shutdown.await;
            let _ = draining_tx.send(true);
        });
        let drain = async move {
            let _ = draining.wait_for(|draining| *draining).await;
        };
        server::serve(self.listener, self.tls, service, drain, self.grace).await;
        let _ = admin_stop.send(());
        if let Some(admin) = admin {
            let _ = admin.await;
        }
    }

    /// The response cache, when enabled (for its counters).
    pub fn cache(&self) -> Option<Arc<ResponseCache>> {
        self.pipeline.cache.clone()
    }

    /// The admin listener's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }
}

/// The token source from config. With the embedded emulator, static tokens
/// are granted to it, or it is told the exchange client's credentials (a
/// random per-process secret when the configured variable is unset).
fn token_source(
    config: &Config,
    client: &http_client::HttpsClient,
    emulator: Option<&Emulator>,
) -> Result<TokenSource, StartError> {
    match &config.token {
        TokenConfig::Static { tokens_file } => {
            let source = TokenSource::from_static_file(tokens_file)?;
            if let Some(emulator) = emulator {
                for (user, token) in source.static_grants() {
                    emulator.grant(token.expose(), &user);
                }
            }
            Ok(source)
        }
        TokenConfig::Exchange(exchange) => {
            let (url, client_secret) = match (&exchange.endpoint, emulator) {
                (TokenEndpoint::Url(url), _) => (
                    url.clone(),
                    exchange
                        .client_secret
                        .clone()
                        .ok_or(StartError::Inconsistent(
                            "token.client_secret_env: no secret",
                        ))?,
                ),
                (TokenEndpoint::Embedded, Some(emulator)) => {
                    // 128 random bits, known only to this process and its emulator.
                    let secret = exchange
                        .client_secret
                        .clone()
                        .unwrap_or_else(|| Secret::new(format!("{:032x}", rand::random::<u128>())));
                    emulator.set_client(&exchange.client_id, secret.expose());
                    emulator.set_user_claim(&config.auth.user_id_claim);
                    (emulator_url(&emulator.token_url())?, secret)
                }
                (TokenEndpoint::Embedded, None) => return Err(no_emulator()),
            };
            Ok(TokenSource::Exchange(TokenCache::new(
                HttpTokenEndpoint {
                    client: client.clone(),
                    url,
                    client_id: exchange.client_id.clone(),
                    client_secret,
                    grant: exchange.grant,
                    user_id_param: exchange.user_id_param.clone(),
                    timeout: exchange.timeout,
                },
                exchange.expiry_margin,
                exchange.max_cached_tokens,
            )))
        }
    }
}

fn emulator_url(url: &str) -> Result<http::Uri, StartError> {
    url.parse()
        .map_err(|_| StartError::Emulator(std::io::Error::other("bad emulator URL")))
}

fn no_emulator() -> StartError {
    StartError::Emulator(std::io::Error::other(
        "the embedded emulator is not running",
    ))
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
