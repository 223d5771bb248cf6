//! koodrive-gateway: an authenticating reverse proxy for KooDrive's
//! "List batch tasks" API. [`Gateway::build`] turns a validated
//! [`config::Config`] into a bound, ready server; [`Gateway::run`] serves it.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

// The public surface is what `main.rs` and the integration tests use: the
// config, building and running a gateway, the emulator, TLS set-up, dev
// material and the cache's counters. Everything else is the crate's own.
pub(crate) mod audit;
pub(crate) mod auth;
#[doc(hidden)]
pub mod bench_api;
pub mod cache;
pub(crate) mod cache_control;
pub mod config;
pub mod devcerts;
pub mod emulator;
pub(crate) mod error;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod http_client;
pub(crate) mod jobs;
pub(crate) mod language;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub(crate) mod rate_limit;
pub(crate) mod record;
pub mod reload;
pub mod server;
pub(crate) mod subscriber;
pub mod telemetry;
#[cfg(test)]
mod test_log;
pub mod token;
pub(crate) mod trace_id;
pub(crate) mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::audit::Auditor;
use crate::auth::{JwksError, KeySet, KeyStore, Verifier};
use crate::cache::ResponseCache;
use crate::config::{Config, JwksSource, Secrets, TokenConfig, TokenEndpoint, UpstreamTarget};
use crate::devcerts::DevCertError;
use crate::emulator::Emulator;
use crate::metrics::RequestMetrics;
use crate::pipeline::Pipeline;
use crate::rate_limit::RateLimiter;
pub use crate::reload::{FileWatch, Reloader};
use crate::server::admin::Readiness;
use crate::server::tls::{self, ServerTls, TlsError};
use crate::server::Listeners;
use crate::subscriber::InCurrentSubscriber;
use crate::token::{TokenFileError, TokenSetupError, TokenSource};
use crate::upstream::Upstream;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why the gateway could not start. Every file is read before the port is
/// bound, so a bad file never leaves a half-started process. Each message
/// names the config key and its file or address.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("`server.dev_certs_dir`: {0}")]
    DevCerts(#[from] DevCertError),
    #[error("`auth.jwks_file` {path}: {reason}")]
    JwksFile { path: PathBuf, reason: String },
    #[error("`auth.jwks_file`: {0}")]
    Jwks(#[from] JwksError),
    #[error("`token.static_tokens_file`: {0}")]
    Tokens(#[from] TokenFileError),
    #[error("{0}")]
    TokenSetup(#[from] TokenSetupError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("`{key}` {addr}: cannot bind: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the embedded emulator: {0}")]
    Emulator(#[source] std::io::Error),
    #[error("`rate_limit.redis_url`: {0}")]
    RateLimit(String),
    #[error("`audit.path`: {0}")]
    Audit(#[source] std::io::Error),
}

impl StartError {
    /// A JWKS file that could not be loaded, its I/O cause told once.
    fn jwks_file(path: &Path, error: JwksError) -> StartError {
        let reason = match error {
            JwksError::Read { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        StartError::JwksFile {
            path: path.to_path_buf(),
            reason,
        }
    }
}

/// The least time the audit queue gets to be written out at exit, even
/// when the drain used all of `server.drain_timeout_ms`.
const AUDIT_FLUSH_FLOOR: std::time::Duration = std::time::Duration::from_secs(1);

/// A spawned task that ends when its owner drops it.
struct BackgroundTask(tokio::task::JoinHandle<()>);

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything a start reads from disk, read in one place: `check-config`
/// stops here, [`Gateway::build`] goes on with it.
struct Files {
    server_tls: Option<ServerTls>,
    client_tls: rustls::ClientConfig,
    /// The key set of a `jwks_file` source.
    keys: Option<KeySet>,
    /// The tokens of a static token source.
    static_tokens: Option<TokenSource>,
}

impl Files {
    /// Creates development material if asked, then reads the TLS
    /// certificate and key, the extra CA, the JWKS file and the static token
    /// file.
    async fn load(config: &Config) -> Result<Files, StartError> {
        if let Some(dir) = &config.server.dev_certs_dir {
            devcerts::ensure(dir)?;
        }
        let keys = match &config.auth.jwks {
            JwksSource::File(path) => Some(
                KeySet::from_file(path)
                    .await
                    .map_err(|e| StartError::jwks_file(path, e))?,
            ),
            JwksSource::Url(_) => None,
        };
        let static_tokens = match &config.token {
            TokenConfig::Static { tokens_file } => {
                Some(TokenSource::from_static_file(tokens_file)?)
            }
            TokenConfig::Exchange(_) => None,
        };
        Ok(Files {
            server_tls: config
                .server
                .tls
                .as_ref()
                .map(ServerTls::load)
                .transpose()?,
            client_tls: tls::client_config(config.upstream.ca_file.as_deref())?,
            keys,
            static_tokens,
        })
    }
}

/// A built gateway: files loaded, listener bound, not yet serving.
pub struct Gateway {
    listeners: Listeners,
    pipeline: Arc<Pipeline>,
    /// The audit trail, flushed when the gateway stops.
    auditor: Option<Arc<Auditor>>,
    /// The in-process emulator when `upstream.base_url = "embedded"`.
    emulator: Option<Emulator>,
    /// Key refresh; stops with the gateway.
    tasks: Vec<BackgroundTask>,
    reloader: Reloader,
    /// `server.watch_files`.
    watch: bool,
}

impl Gateway {
    /// Reads every file the config names — TLS certificate and key, extra
    /// CA, JWKS file, static token file — and checks that the secrets it
    /// names by variable are set, as a start would, without binding ports
    /// or fetching URLs. Development material is created if asked.
    pub async fn check_files(config: &Config) -> Result<(), StartError> {
        Files::load(config).await?;
        if let TokenConfig::Exchange(exchange) = &config.token {
            if let TokenEndpoint::Url(_) = exchange.endpoint {
                token::required_secret(exchange, &Secrets::from_env(config))?;
            }
        }
        Ok(())
    }

    /// Builds the gateway from config with the secrets the config names
    /// read from the environment.
    pub async fn build(config: &Config) -> Result<Gateway, StartError> {
        Gateway::build_with(config, &Secrets::from_env(config)).await
    }

    /// Builds the gateway: loads the files, starts the embedded emulator if
    /// configured, loads keys and tokens, and binds the listeners last.
    pub async fn build_with(config: &Config, secrets: &Secrets) -> Result<Gateway, StartError> {
        let files = Files::load(config).await?;
        // One pooled client for KooDrive, its token endpoint and the JWKS URL.
        let client = http_client::build(files.client_tls);
        let (base, emulator) = match &config.upstream.target {
            UpstreamTarget::Url(uri) => (uri.clone(), None),
            UpstreamTarget::Embedded => {
                let emulator = Emulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), None)
                    .await
                    .map_err(StartError::Emulator)?;
                let base = emulator
                    .base_url()
                    .parse()
                    .map_err(|_| StartError::Emulator(std::io::Error::other("bad emulator URL")))?;
                (base, Some(emulator))
            }
        };
        let keys = KeyStore::start(&config.auth, client.clone(), files.keys).await?;
        let tokens = TokenSource::from_config(
            config,
            files.static_tokens,
            secrets,
            &client,
            emulator.as_ref(),
        )?;
        let upstream = Upstream::new(&base, client, &config.upstream);
        let cache = config
            .cache
            .as_ref()
            .map(|c| Arc::new(ResponseCache::new(c)));
        let limiter = config
            .rate_limit
            .as_ref()
            .map(RateLimiter::new)
            .transpose()
            .map_err(|e| StartError::RateLimit(e.to_string()))?;
        let auditor = config
            .audit
            .as_ref()
            .map(|audit| Auditor::start(audit).map(Arc::new))
            .transpose()
            .map_err(StartError::Audit)?;
        let server_tls = files.server_tls.map(Arc::new);
        let reloader = Reloader::new(
            server_tls.clone(),
            Arc::clone(&keys),
            match &config.auth.jwks {
                JwksSource::File(path) => Some(path.clone()),
                JwksSource::Url(_) => None,
            },
            match (&config.token, tokens.static_tokens()) {
                (TokenConfig::Static { tokens_file }, Some(tokens)) => {
                    Some((tokens, tokens_file.clone()))
                }
                _ => None,
            },
            emulator.as_ref().map(Emulator::granter),
            auditor.clone(),
        );
        // Every component registers its own metrics once.
        let mut registry = Registry::with_prefix(metrics::PREFIX);
        reloader.register(&mut registry);
        keys.register(&mut registry);
        tokens.register(&mut registry);
        upstream.register(&mut registry);
        if let Some(cache) = &cache {
            cache.register(&mut registry);
        }
        if let Some(auditor) = &auditor {
            auditor.register(&mut registry);
        }
        let connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open client connections on the public listener",
            connections.clone(),
        );
        let verifier = Verifier::new(&config.auth, keys.clone());
        verifier.register(&mut registry);
        let traced = config.telemetry.otlp_traces_url.is_some();
        let pipeline = Pipeline::new(
            RequestMetrics::new(&mut registry),
            auditor.clone(),
            verifier,
            limiter.clone(),
            tokens,
            upstream,
            cache,
        );

        let bind = |key: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { key, addr, source })
        };
        let public = bind("server.listen", config.server.listen).await?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some((
                bind("server.admin_listen", addr).await?,
                Readiness {
                    keys: keys.clone(),
                    audit: auditor.clone(),
                    metrics: Arc::new(registry),
                },
            )),
            None => None,
        };
        let mut tasks = Vec::new();
        if keys.refreshes() {
            let refresh = keys.keep_fresh().in_current_subscriber();
            tasks.push(BackgroundTask(tokio::spawn(refresh)));
        }
        if let Some(limiter) = limiter {
            let forget = limiter.forget_idle().in_current_subscriber();
            tasks.push(BackgroundTask(tokio::spawn(forget)));
        }
        Ok(Gateway {
            listeners: Listeners {
                public,
                connections,
                tls: server_tls.as_ref().map(|tls| tls.acceptor_config()),
                admin,
                grace: config.server.drain_timeout,
                limits: config.server.limits,
            },
            pipeline: Arc::new(
                pipeline
                    .traced(traced)
                    .head_limits(&config.server.limits)
                    .sample_success_lines(config.log.success_sample),
            ),
            auditor,
            emulator,
            tasks,
            reloader,
            watch: config.server.watch_files,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners.public.local_addr()
    }

    /// Whether the gateway terminates TLS.
    pub fn is_tls(&self) -> bool {
        self.listeners.tls.is_some()
    }

    /// The embedded emulator, when the config asked for one.
    pub fn emulator(&self) -> Option<&Emulator> {
        self.emulator.as_ref()
    }

    /// The response cache, when enabled (for its counters).
    pub fn cache(&self) -> Option<Arc<ResponseCache>> {
        self.pipeline.cache()
    }

    /// The admin listener's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let (listener, _) = self.listeners.admin.as_ref()?;
        listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, then drains: in-flight requests
    /// and the audit queue together get `server.drain_timeout_ms` (the
    /// audit queue at least 1 s).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
        // Keep the embedded emulator and the key refresh alive for as long
        // as the gateway serves.
        let _emulator = self.emulator;
        let _tasks = self.tasks;
        let grace = self.listeners.grace;
        let drain_started = Arc::new(std::sync::OnceLock::new());
        let started = Arc::clone(&drain_started);
        let shutdown = async move {
            shutdown.await;
            let _ = started.set(tokio::time::Instant::now());
        };
        server::run(self.listeners, self.pipeline, shutdown).await;
        // Every record of the drained requests is written before exit (a
        // sink that cannot write gets what is left of the drain time).
        if let Some(auditor) = self.auditor {
            let now = tokio::time::Instant::now();
            let left = drain_started.get().map_or(grace, |started| {
                (*started + grace).saturating_duration_since(now)
            });
            let budget = left.max(AUDIT_FLUSH_FLOOR);
            if tokio::time::timeout(budget, auditor.close()).await.is_err() {
                tracing::error!("audit records still queued at exit: the sink cannot write");
            }
        }
    }

    /// What SIGHUP and the file watcher reload, usable while the gateway
    /// runs.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Watches the files for changes, unless `server.watch_files` is off.
    pub fn watch_files(&self) -> Option<FileWatch> {
        self.watch.then(|| self.reloader.watch()).flatten()
    }
}
