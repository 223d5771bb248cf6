//! The `koodrive-gateway` binary: arguments, logging, config, run.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use koodrive_gateway::config::{Config, FileConfig, LogFormat, TokenConfig, DEFAULT_CONFIG_PATH};
use koodrive_gateway::emulator::Emulator;
use koodrive_gateway::server::tls::install_default_providers;
use koodrive_gateway::telemetry::Telemetry;
use koodrive_gateway::token::TokenSource;
use koodrive_gateway::{devcerts, Gateway};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "koodrive-gateway",
    version,
    about = "Authenticating gateway for KooDrive's List batch tasks API"
)]
struct Cli {
    /// Configuration file (for `serve`, the default command).
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the configuration (values and the files it names) and print
    /// it with defaults filled in.
    CheckConfig {
        /// Check values only, not the files (for a config meant for another
        /// machine).
        #[arg(long)]
        skip_files: bool,
    },
    /// Run the KooDrive emulator alone.
    Emulator {
        /// Address to listen on (plain HTTP).
        #[arg(long, default_value = "127.0.0.1:9443")]
        listen: SocketAddr,
        /// JSON file of access tokens it accepts: {"<user id>": "<token>"}.
        #[arg(long, default_value = "config/koodrive-tokens.json")]
        tokens: PathBuf,
        /// Client id its token endpoint accepts, with the secret in
        /// KOODRIVE_CLIENT_SECRET.
        #[arg(long, default_value = "koodrive-gateway-dev")]
        client_id: String,
    },
    /// Ask the running gateway's admin listener (`server.admin_listen`) for
    /// `/healthz`, or `/readyz` with `--ready`; exit 0 on 200, else 1. For
    /// a container's HEALTHCHECK and exec probes (the image has no curl).
    Health {
        /// Ask `/readyz` instead of `/healthz`.
        #[arg(long)]
        ready: bool,
        /// Give up after this long.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Print an internal JWT signed with the development key.
    DevToken {
        /// KooDrive user id (the `auth.user_id_claim` claim).
        #[arg(long)]
        user: String,
        /// Principal (the `auth.principal_claim` claim).
        #[arg(long, default_value = "dev-app")]
        sub: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    install_default_providers();
    let command = cli.command.unwrap_or(Command::Serve);
    // `serve` logs as its config says (`log.format`), unless `--log-json`.
    if !matches!(command, Command::Serve) {
        init_tracing(cli.log_json);
    }
    let result = match command {
        Command::Serve => serve(&cli.config, cli.log_json).await,
        Command::CheckConfig { skip_files } => check_config(&cli.config, skip_files).await,
        Command::Emulator {
            listen,
            tokens,
            client_id,
        } => emulator(listen, &tokens, &client_id).await,
        Command::DevToken { user, sub, ttl } => dev_token(&cli.config, &user, &sub, ttl),
        Command::Health { ready, timeout_ms } => {
            health(&cli.config, ready, Duration::from_millis(timeout_ms)).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: most messages
/// here already end with their cause's text.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn init_tracing(json: bool) {
    init_tracing_with(json, None);
}

/// Logs to stderr (text or JSON) at `RUST_LOG`'s level (default `info`),
/// and exports spans when telemetry is on.
fn init_tracing_with(json: bool, telemetry: Option<&Telemetry>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let spans = telemetry.map(|t| t.layer());
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter).with(spans);
    if json {
        // Event fields at the top level of each line (`status`, `trace_id`,
        // …), not nested under `fields`.
        registry.with(lines.json().flatten_event(true)).init();
    } else {
        registry.with(lines).init();
    }
}

fn load(path: &Path) -> Result<(Config, FileConfig)> {
    // The error names the file or variable and the key: no context to add.
    Ok(Config::load(path)?)
}

async fn serve(path: &Path, log_json: bool) -> Result<()> {
    // Before anything else: a signal during start-up must neither end the
    // process (SIGHUP's default) nor be missed.
    let hangups = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    let mut stops = StopSignals::new().context("handling SIGTERM and SIGINT")?;
    let (mut config, _) = load(path)?;
    let telemetry = Telemetry::start(&config.telemetry)?;
    init_tracing_with(
        log_json || config.log.format == LogFormat::Json,
        telemetry.as_ref(),
    );
    fit_to_file_limit(&mut config);
    let gateway = Gateway::build(&config).await?;
    let addr = gateway.local_addr()?;
    let scheme = if gateway.is_tls() { "https" } else { "http" };
    if let Some(emulator) = gateway.emulator() {
        tracing::info!(upstream = %emulator.base_url(), "embedded KooDrive emulator running");
    }
    if let Some(admin) = gateway.admin_addr() {
        tracing::info!(addr = %admin, "admin (healthz, readyz, metrics) on http://{admin}");
    }
    tracing::info!(addr = %addr, "listening on {scheme}://{addr}");
    let _watch = gateway.watch_files();
    tokio::spawn(reload_on_sighup(gateway.reloader(), hangups));
    // The first SIGTERM/SIGINT drains; a second one exits at once (the
    // audit records still queued are lost; a line cut short is ended when
    // the file is next opened).
    let (drain, draining) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        stops.next().await;
        tracing::info!("shutting down: draining (a second signal exits at once)");
        let _ = drain.send(());
        let status = stops.next().await;
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(status);
    });
    gateway
        .run(async {
            let _ = draining.await;
        })
        .await;
    if let Some(telemetry) = telemetry {
        // Export what is buffered before exit (blocking: off the runtime).
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Descriptors kept for everything but client connections: listeners,
/// the upstream, token and Redis pools, the audit file, JWKS fetches.
const RESERVED_FILES: u64 = 128;

/// Raises the soft open-file limit to the hard one, and lowers
/// `server.max_connections` to what the limit leaves room for: past it,
/// accepting must wait in the kernel's backlog rather than fail with
/// "too many open files" (which would also starve upstream connections).
fn fit_to_file_limit(config: &mut Config) {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "could not read or raise the open-file limit");
            return;
        }
    };
    let room = limit.saturating_sub(RESERVED_FILES).max(1);
    let wanted = config.server.limits.max_connections as u64;
    if wanted > room {
        tracing::warn!(
            max_connections = wanted,
            open_file_limit = limit,
            "server.max_connections lowered to {room} to fit the open-file limit (raise `ulimit -n` for more)"
        );
        config.server.limits.max_connections = usize::try_from(room).unwrap_or(usize::MAX);
    }
}

async fn check_config(path: &Path, skip_files: bool) -> Result<()> {
    let (config, file) = load(path)?;
    if !skip_files {
        Gateway::check_files(&config).await?;
    }
    // The file holds no secret values (only the names of variables that
    // do), so it can be printed as it is.
    println!("{}", toml::to_string_pretty(&file)?);
    eprintln!("{}: OK", path.display());
    Ok(())
}

async fn emulator(listen: SocketAddr, tokens: &Path, client_id: &str) -> Result<()> {
    let mut stops = StopSignals::new().context("handling SIGTERM and SIGINT")?;
    let source = TokenSource::from_static_file(tokens)?;
    let emulator = Emulator::start(listen, None).await?;
    for (user, token) in source.static_grants() {
        emulator.grant(token.expose(), &user);
    }
    match std::env::var("KOODRIVE_CLIENT_SECRET") {
        Ok(secret) if !secret.is_empty() => emulator.set_client(client_id, &secret),
        _ => tracing::warn!(
            "KOODRIVE_CLIENT_SECRET is not set: the token endpoint refuses every client"
        ),
    }
    tracing::info!(url = %emulator.base_url(), "KooDrive emulator listening on {}", emulator.base_url());
    stops.next().await;
    Ok(())
}

async fn health(path: &Path, ready: bool, timeout: Duration) -> Result<()> {
    let (config, _) = load(path)?;
    let Some(mut admin) = config.server.admin_listen else {
        bail!("health needs `server.admin_listen` in {}", path.display());
    };
    // A listener on every address is asked on loopback.
    if admin.ip().is_unspecified() {
        admin.set_ip(match admin {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let probe = if ready { "readyz" } else { "healthz" };
    let url = format!("http://{admin}/{probe}");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let status = tokio::time::timeout(timeout, client.get(url.parse()?))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within {timeout:?}"))?
        .with_context(|| url.clone())?
        .status();
    if status != http::StatusCode::OK {
        bail!("{url}: {status}");
    }
    println!("{url}: {status}");
    Ok(())
}

fn dev_token(path: &Path, user: &str, sub: &str, ttl: u64) -> Result<()> {
    let (config, _) = load(path)?;
    let Some(dir) = &config.server.dev_certs_dir else {
        bail!(
            "dev-token needs `server.dev_certs_dir` in {}",
            path.display()
        );
    };
    // With static tokens, only users in the file can be served: warn early.
    if let TokenConfig::Static { tokens_file } = &config.token {
        if let Ok(TokenSource::Static(tokens)) = TokenSource::from_static_file(tokens_file) {
            if tokens.get(user).is_none() {
                eprintln!(
                    "warning: user `{user}` has no token in {}",
                    tokens_file.display()
                );
            }
        }
    }
    devcerts::ensure(dir)?;
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({
        "iss": config.auth.issuer,
        "aud": config.auth.audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
    });
    claims[&config.auth.principal_claim] = sub.into();
    claims[&config.auth.user_id_claim] = user.into();
    println!("{}", devcerts::sign_dev_token(dir, &claims)?);
    Ok(())
}

/// SIGHUP reloads the certificate and key, the client CA, the JWKS and
/// static token files, and reopens the audit file, instead of ending the
/// process.
async fn reload_on_sighup(reloader: koodrive_gateway::Reloader, mut hangups: Signal) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading");
        reloader.reload().await;
    }
}

/// SIGTERM and SIGINT, listened for from the start, so that none is
/// missed (during start-up, or between the first and the second).
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next one; returns the exit status a shell reports
    /// for a process that signal ended (128 + its number).
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => 143,
            _ = self.int.recv() => 130,
        }
    }
}
