//! Configuration: the TOML file (plus `KOODRIVE_GATEWAY__SECTION__KEY`
//! environment overrides) → a validated, typed [`Config`]. Fails closed:
//! unknown keys, unsupported sections and bad values are errors that name
//! the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use jsonwebtoken::Algorithm;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "config/gateway.toml";
/// Prefix of environment overrides: `KOODRIVE_GATEWAY__UPSTREAM__TIMEOUT_MS=500`.
pub const ENV_PREFIX: &str = "KOODRIVE_GATEWAY__";

/// A configuration that failed to load or validate; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or did not match the schema.
    #[error("{0}")]
    Load(Box<figment::Error>),
    /// A value is present but wrong.
    #[error("`{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// File schema (what operators write). Defaults live here.
// ---------------------------------------------------------------------------

/// The configuration file as written, with defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: FileServer,
    pub upstream: FileUpstream,
    pub auth: FileAuth,
    pub token: FileToken,
    #[serde(default)]
    pub cache: FileCache,
    #[serde(default, skip_serializing)]
    rate_limit: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    audit: Option<IgnoredAny>,
}

/// `[server]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    pub listen: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// When set, missing development material (CA, server certificate, JWT
    /// signing key and JWKS) is created in this directory at start-up.
    pub dev_certs_dir: Option<PathBuf>,
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Plain-HTTP listener for `/healthz` and `/readyz`.
    pub admin_listen: Option<String>,
}

/// `[upstream]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub base_url: String,
    pub ca_file: Option<PathBuf>,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: usize,
}

/// `[auth]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    pub issuer: String,
    pub audience: String,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    #[serde(default = "defaults::principal_claim")]
    pub principal_claim: String,
    #[serde(default = "defaults::user_id_claim")]
    pub user_id_claim: String,
    #[serde(default = "defaults::algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "defaults::leeway_s")]
    pub leeway_s: u64,
    /// Background refresh period of a `jwks_url` key set.
    #[serde(default = "defaults::jwks_refresh_s")]
    pub jwks_refresh_s: u64,
    /// Least time between two refetches caused by unknown `kid`s.
    #[serde(default = "defaults::jwks_min_refetch_s")]
    pub jwks_min_refetch_s: u64,
    /// Largest `Authorization` header decoded.
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: usize,
    /// Required JOSE `typ` header (case-insensitive), if set.
    pub typ: Option<String>,
}

/// `[cache]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    /// Freshness lifetime; 0 turns the cache off.
    #[serde(default = "defaults::cache_ttl_ms")]
    pub ttl_ms: u64,
    /// Up to this much is added to each entry's lifetime, at random, so
    /// entries filled together do not expire together.
    #[serde(default)]
    pub ttl_jitter_ms: u64,
    /// Capacity in bytes (bodies plus keys).
    #[serde(default = "defaults::cache_max_bytes")]
    pub max_bytes: u64,
    /// How long past expiry an entry may still be served when KooDrive
    /// fails; 0 = never.
    #[serde(default)]
    pub stale_if_error_ms: u64,
    /// Whether `Cache-Control: no-cache` on a request bypasses the cache.
    #[serde(default = "defaults::honor_client_no_cache")]
    pub honor_client_no_cache: bool,
}

impl Default for FileCache {
    fn default() -> Self {
        FileCache {
            ttl_ms: defaults::cache_ttl_ms(),
            ttl_jitter_ms: 0,
            max_bytes: defaults::cache_max_bytes(),
            stale_if_error_ms: 0,
            honor_client_no_cache: defaults::honor_client_no_cache(),
        }
    }
}

/// `[token]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileToken {
    pub mode: String,
    pub static_tokens_file: Option<PathBuf>,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_env: Option<String>,
    /// `token-exchange` (RFC 8693) or `client-credentials`.
    pub grant: Option<String>,
    /// Form parameter carrying the user id in the client-credentials grant.
    pub user_id_param: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Tokens are dropped this long before `expires_in` runs out.
    pub expiry_margin_s: Option<u64>,
    pub max_cached_tokens: Option<u64>,
}

mod defaults {
    pub fn cache_ttl_ms() -> u64 {
        5_000
    }
    pub fn cache_max_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub fn honor_client_no_cache() -> bool {
        true
    }
    pub fn shutdown_grace_ms() -> u64 {
        10_000
    }
    pub fn timeout_ms() -> u64 {
        10_000
    }
    pub fn max_response_bytes() -> usize {
        8 * 1024 * 1024
    }
    pub fn principal_claim() -> String {
        "sub".into()
    }
    pub fn user_id_claim() -> String {
        "koodrive_uid".into()
    }
    pub fn algorithms() -> Vec<String> {
        vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
    }
    pub fn leeway_s() -> u64 {
        60
    }
    pub fn jwks_refresh_s() -> u64 {
        300
    }
    pub fn jwks_min_refetch_s() -> u64 {
        30
    }
    pub fn max_token_bytes() -> usize {
        8 * 1024
    }
}

// ---------------------------------------------------------------------------
// Validated configuration (what the gateway uses).
// ---------------------------------------------------------------------------

/// The validated configuration the gateway is built from.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub token: TokenConfig,
    /// `None` when `cache.ttl_ms = 0`.
    pub cache: Option<CacheConfig>,
}

/// The per-user response cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub ttl_jitter: Duration,
    pub max_bytes: u64,
    pub stale_if_error: Duration,
    pub honor_client_no_cache: bool,
}

/// Where and how the gateway listens.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Certificate chain and key; `None` means plain HTTP.
    pub tls: Option<TlsFiles>,
    pub dev_certs_dir: Option<PathBuf>,
    /// Where `/healthz` and `/readyz` are served (plain HTTP).
    pub admin_listen: Option<SocketAddr>,
    /// How long in-flight requests may finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

/// PEM files of the server certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The KooDrive upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub target: UpstreamTarget,
    /// An extra trust root (PEM) for the upstream's certificate.
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub max_response_bytes: usize,
}

/// Where requests are forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// The built-in emulator, started in-process on a loopback port.
    Embedded,
    /// A real base URL (`https://…`, or `http://` on loopback).
    Url(http::Uri),
}

/// Inbound JWT verification.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub jwks_refresh: Duration,
    pub jwks_min_refetch: Duration,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub principal_claim: String,
    pub user_id_claim: String,
    pub max_token_bytes: usize,
    pub typ: Option<String>,
}

/// Where the verification keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(http::Uri),
}

/// How KooDrive access tokens are obtained.
#[derive(Clone, Debug)]
pub enum TokenConfig {
    /// A JSON file mapping KooDrive user id → access token.
    Static { tokens_file: PathBuf },
    /// Per-user tokens from a token endpoint.
    Exchange(Box<ExchangeConfig>),
}

/// The token endpoint and how to call it.
#[derive(Clone, Debug)]
pub struct ExchangeConfig {
    pub endpoint: TokenEndpoint,
    pub client_id: String,
    /// The environment variable holding the client secret; read when the
    /// gateway is built ([`Secrets`]), not when the config is validated.
    pub client_secret_env: String,
    pub grant: Grant,
    pub user_id_param: String,
    pub timeout: Duration,
    pub expiry_margin: Duration,
    pub max_cached_tokens: u64,
}

/// Where tokens are exchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// The embedded emulator's token endpoint.
    Embedded,
    Url(http::Uri),
}

/// The OAuth grant used at the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// RFC 8693 with the caller's JWT as `subject_token`.
    TokenExchange,
    /// RFC 6749 §4.4 with the user id as a form parameter.
    ClientCredentials,
}

/// A secret value whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The secret values a config names by environment variable, read when the
/// gateway is built (not when the config is checked, so `check-config`
/// needs no secret). Tests hand them in directly.
#[derive(Clone, Debug, Default)]
pub struct Secrets(std::collections::HashMap<String, Secret>);

impl Secrets {
    /// Reads every variable `config` names; unset or empty ones are absent.
    pub fn from_env(config: &Config) -> Secrets {
        let mut secrets = Secrets::default();
        if let TokenConfig::Exchange(exchange) = &config.token {
            if let Some(value) = std::env::var(&exchange.client_secret_env)
                .ok()
                .filter(|v| !v.is_empty())
            {
                secrets = secrets.with(&exchange.client_secret_env, value);
            }
        }
        secrets
    }

    /// Adds (or replaces) the value of variable `name`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Secrets {
        self.0.insert(name.to_owned(), Secret::new(value));
        self
    }

    /// The value of variable `name`, if it was set.
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.0.get(name)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Config {
    /// Loads `path`, applies environment overrides and validates.
    pub fn load(path: &Path) -> Result<(Config, FileConfig), ConfigError> {
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(figment)
    }

    /// Parses a TOML document without environment overrides (tests).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text))).map(|(config, _)| config)
    }

    fn from_figment(figment: Figment) -> Result<(Config, FileConfig), ConfigError> {
        let file: FileConfig = figment
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        let config = Config::validate(&file)?;
        Ok((config, file))
    }

    fn validate(file: &FileConfig) -> Result<Config, ConfigError> {
        for (present, key) in [
            (file.rate_limit.is_some(), "rate_limit"),
            (file.audit.is_some(), "audit"),
        ] {
            if present {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "not supported yet by this version; remove it".into(),
                });
            }
        }
        let upstream = validate_upstream(&file.upstream)?;
        Ok(Config {
            server: validate_server(&file.server)?,
            auth: validate_auth(&file.auth)?,
            token: validate_token(&file.token, &upstream.target)?,
            cache: validate_cache(&file.cache)?,
            upstream,
        })
    }
}

fn validate_server(s: &FileServer) -> Result<ServerConfig, ConfigError> {
    let listen = s.listen.parse().map_err(|_| {
        invalid(
            "server.listen",
            "expected an address such as 127.0.0.1:8443",
        )
    })?;
    let tls = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("server.tls_key", "required when tls_cert is set")),
        (None, Some(_)) => return Err(invalid("server.tls_cert", "required when tls_key is set")),
    };
    let admin_listen = s
        .admin_listen
        .as_deref()
        .map(|a| a.parse())
        .transpose()
        .map_err(|_| {
            invalid(
                "server.admin_listen",
                "expected an address such as 127.0.0.1:9091",
            )
        })?;
    Ok(ServerConfig {
        listen,
        admin_listen,
        tls,
        dev_certs_dir: s.dev_certs_dir.clone(),
        shutdown_grace: Duration::from_millis(s.shutdown_grace_ms),
    })
}

fn validate_cache(c: &FileCache) -> Result<Option<CacheConfig>, ConfigError> {
    if c.ttl_ms == 0 {
        return Ok(None);
    }
    if c.max_bytes < 1024 {
        return Err(invalid("cache.max_bytes", "must be at least 1024"));
    }
    Ok(Some(CacheConfig {
        ttl: Duration::from_millis(c.ttl_ms),
        ttl_jitter: Duration::from_millis(c.ttl_jitter_ms),
        max_bytes: c.max_bytes,
        stale_if_error: Duration::from_millis(c.stale_if_error_ms),
        honor_client_no_cache: c.honor_client_no_cache,
    }))
}

fn validate_upstream(u: &FileUpstream) -> Result<UpstreamConfig, ConfigError> {
    let target = if u.base_url == "embedded" {
        UpstreamTarget::Embedded
    } else {
        let uri = parse_url("upstream.base_url", &u.base_url)?;
        if uri.query().is_some() {
            return Err(invalid("upstream.base_url", "must not contain a query"));
        }
        UpstreamTarget::Url(uri)
    };
    if u.timeout_ms == 0 {
        return Err(invalid("upstream.timeout_ms", "must be greater than 0"));
    }
    if u.max_response_bytes < 1024 {
        return Err(invalid(
            "upstream.max_response_bytes",
            "must be at least 1024",
        ));
    }
    Ok(UpstreamConfig {
        target,
        ca_file: u.ca_file.clone(),
        timeout: Duration::from_millis(u.timeout_ms),
        max_response_bytes: u.max_response_bytes,
    })
}

fn validate_auth(a: &FileAuth) -> Result<AuthConfig, ConfigError> {
    let jwks = match (&a.jwks_file, &a.jwks_url) {
        (Some(file), None) => JwksSource::File(file.clone()),
        (None, Some(url)) => JwksSource::Url(parse_url("auth.jwks_url", url)?),
        (None, None) => {
            return Err(invalid(
                "auth.jwks_file",
                "one of auth.jwks_file or auth.jwks_url is required",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "auth.jwks_url",
                "set either auth.jwks_file or auth.jwks_url, not both",
            ))
        }
    };
    if a.jwks_refresh_s == 0 {
        return Err(invalid("auth.jwks_refresh_s", "must be greater than 0"));
    }
    if a.max_token_bytes < 256 {
        return Err(invalid("auth.max_token_bytes", "must be at least 256"));
    }
    for (key, value) in [
        ("auth.issuer", &a.issuer),
        ("auth.audience", &a.audience),
        ("auth.principal_claim", &a.principal_claim),
        ("auth.user_id_claim", &a.user_id_claim),
    ] {
        if value.trim().is_empty() {
            return Err(invalid(key, "must not be empty"));
        }
    }
    let algorithms = a
        .algorithms
        .iter()
        .map(|name| parse_algorithm(name))
        .collect::<Result<Vec<_>, _>>()?;
    if algorithms.is_empty() {
        return Err(invalid(
            "auth.algorithms",
            "must list at least one algorithm",
        ));
    }
    Ok(AuthConfig {
        issuer: a.issuer.clone(),
        audience: a.audience.clone(),
        jwks,
        jwks_refresh: Duration::from_secs(a.jwks_refresh_s),
        jwks_min_refetch: Duration::from_secs(a.jwks_min_refetch_s),
        algorithms,
        leeway: Duration::from_secs(a.leeway_s),
        principal_claim: a.principal_claim.clone(),
        user_id_claim: a.user_id_claim.clone(),
        max_token_bytes: a.max_token_bytes,
        typ: a.typ.clone(),
    })
}

/// Only asymmetric algorithms: a JWKS holds public keys, and accepting HMAC
/// would let a public key double as a shared secret (RFC 8725 §2.1).
fn parse_algorithm(name: &str) -> Result<Algorithm, ConfigError> {
    use Algorithm::*;
    match name.parse::<Algorithm>() {
        Ok(alg @ (RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA)) => Ok(alg),
        _ => Err(invalid(
            "auth.algorithms",
            format!("`{name}` is not an accepted algorithm (RS256/384/512, PS256/384/512, ES256/384, EdDSA)"),
        )),
    }
}

fn validate_token(t: &FileToken, upstream: &UpstreamTarget) -> Result<TokenConfig, ConfigError> {
    match t.mode.as_str() {
        "static" => {
            for (set, key) in [
                (t.token_url.is_some(), "token.token_url"),
                (t.client_id.is_some(), "token.client_id"),
                (t.client_secret_env.is_some(), "token.client_secret_env"),
                (t.grant.is_some(), "token.grant"),
                (t.user_id_param.is_some(), "token.user_id_param"),
                (t.timeout_ms.is_some(), "token.timeout_ms"),
                (t.expiry_margin_s.is_some(), "token.expiry_margin_s"),
                (t.max_cached_tokens.is_some(), "token.max_cached_tokens"),
            ] {
                if set {
                    return Err(invalid(key, "only used when token.mode = \"exchange\""));
                }
            }
            let tokens_file = t.static_tokens_file.clone().ok_or_else(|| {
                invalid(
                    "token.static_tokens_file",
                    "required when token.mode = \"static\"",
                )
            })?;
            Ok(TokenConfig::Static { tokens_file })
        }
        "exchange" => validate_exchange(t, upstream).map(|x| TokenConfig::Exchange(Box::new(x))),
        other => Err(invalid(
            "token.mode",
            format!("`{other}` is not one of \"static\", \"exchange\""),
        )),
    }
}

fn validate_exchange(
    t: &FileToken,
    upstream: &UpstreamTarget,
) -> Result<ExchangeConfig, ConfigError> {
    if t.static_tokens_file.is_some() {
        return Err(invalid(
            "token.static_tokens_file",
            "only used when token.mode = \"static\"",
        ));
    }
    let url = t
        .token_url
        .as_deref()
        .ok_or_else(|| invalid("token.token_url", "required when token.mode = \"exchange\""))?;
    let endpoint = if url == "embedded" {
        if *upstream != UpstreamTarget::Embedded {
            return Err(invalid(
                "token.token_url",
                "\"embedded\" requires upstream.base_url = \"embedded\"",
            ));
        }
        TokenEndpoint::Embedded
    } else {
        TokenEndpoint::Url(parse_url("token.token_url", url)?)
    };
    let client_id = t
        .client_id
        .clone()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| invalid("token.client_id", "required when token.mode = \"exchange\""))?;
    let client_secret_env = t
        .client_secret_env
        .clone()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| {
            invalid(
                "token.client_secret_env",
                "required when token.mode = \"exchange\"",
            )
        })?;
    let grant = match t.grant.as_deref().unwrap_or("token-exchange") {
        "token-exchange" => Grant::TokenExchange,
        "client-credentials" => Grant::ClientCredentials,
        other => {
            return Err(invalid(
                "token.grant",
                format!("`{other}` is not one of \"token-exchange\", \"client-credentials\""),
            ))
        }
    };
    let timeout_ms = t.timeout_ms.unwrap_or(5_000);
    if timeout_ms == 0 {
        return Err(invalid("token.timeout_ms", "must be greater than 0"));
    }
    let max_cached_tokens = t.max_cached_tokens.unwrap_or(100_000);
    if max_cached_tokens == 0 {
        return Err(invalid("token.max_cached_tokens", "must be greater than 0"));
    }
    Ok(ExchangeConfig {
        endpoint,
        client_id,
        client_secret_env,
        grant,
        user_id_param: t.user_id_param.clone().unwrap_or_else(|| "user_id".into()),
        timeout: Duration::from_millis(timeout_ms),
        expiry_margin: Duration::from_secs(t.expiry_margin_s.unwrap_or(60)),
        max_cached_tokens,
    })
}

/// Parses a URL that must be `https://`, or `http://` on a loopback host.
pub fn parse_url(key: &'static str, text: &str) -> Result<http::Uri, ConfigError> {
    let uri: http::Uri = text
        .parse()
        .map_err(|_| invalid(key, "not a valid absolute URL"))?;
    let host = uri
        .host()
        .ok_or_else(|| invalid(key, "not an absolute URL with a host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(invalid(
            key,
            "plain http:// is accepted only for loopback hosts",
        )),
        _ => Err(invalid(key, "scheme must be https://")),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
        [server]
        listen = "127.0.0.1:8443"
        tls_cert = "certs/dev/server.crt"
        tls_key = "certs/dev/server.key"
        [upstream]
        base_url = "embedded"
        [auth]
        issuer = "iss"
        audience = "aud"
        jwks_file = "certs/dev/jwks.json"
        [token]
        mode = "static"
        static_tokens_file = "config/koodrive-tokens.json"
    "#;

    fn with(replace: &str, by: &str) -> Result<Config, ConfigError> {
        assert!(VALID.contains(replace), "{replace}");
        Config::from_toml(&VALID.replace(replace, by))
    }

    fn error_of(replace: &str, by: &str) -> String {
        with(replace, by).unwrap_err().to_string()
    }

    #[test]
    fn valid_file_gets_defaults() {
        let config = Config::from_toml(VALID).unwrap();
        assert_eq!(config.upstream.target, UpstreamTarget::Embedded);
        assert_eq!(config.upstream.timeout, Duration::from_secs(10));
        assert_eq!(config.auth.principal_claim, "sub");
        assert_eq!(config.auth.user_id_claim, "koodrive_uid");
        assert_eq!(
            config.auth.algorithms,
            vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
        );
        assert!(config.server.tls.is_some());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = error_of("[upstream]", "[upstream]\ntimeout_msec = 5");
        assert!(err.contains("timeout_msec"), "{err}");
        let err = error_of("[token]", "[bogus]\nx = 1\n[token]");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn unsupported_sections_say_so() {
        let err = error_of("[token]", "[audit]\npath = \"-\"\n[token]");
        assert!(
            err.contains("`audit`") && err.contains("not supported yet"),
            "{err}"
        );
        let err = error_of("mode = \"static\"", "mode = \"sometimes\"");
        assert!(err.contains("token.mode"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(error_of("127.0.0.1:8443", "nonsense").contains("server.listen"));
        assert!(error_of("\"embedded\"", "\"http://example.com\"").contains("upstream.base_url"));
        assert!(error_of("\"embedded\"", "\"ftp://127.0.0.1\"").contains("upstream.base_url"));
        assert!(error_of("tls_key = \"certs/dev/server.key\"", "").contains("server.tls_key"));
        assert!(error_of("[auth]", "[auth]\nalgorithms = [\"HS256\"]").contains("auth.algorithms"));
        assert!(
            error_of("[upstream]", "[upstream]\ntimeout_ms = 0").contains("upstream.timeout_ms")
        );
        assert!(error_of("issuer = \"iss\"", "issuer = \" \"").contains("auth.issuer"));
    }

    const EXCHANGE: &str = "mode = \"exchange\"\ntoken_url = \"embedded\"\nclient_id = \"gw\"\nclient_secret_env = \"KOODRIVE_GATEWAY_CONFIG_TEST_UNSET\"";

    fn exchange(replace_token_url: Option<&str>) -> Result<Config, ConfigError> {
        let token = match replace_token_url {
            Some(url) => EXCHANGE.replace("\"embedded\"", url),
            None => EXCHANGE.to_owned(),
        };
        with(
            "mode = \"static\"\n        static_tokens_file = \"config/koodrive-tokens.json\"",
            &token,
        )
    }

    #[test]
    fn exchange_mode_with_the_embedded_endpoint_needs_no_secret() {
        match exchange(None).unwrap().token {
            TokenConfig::Exchange(x) => {
                assert_eq!(x.endpoint, TokenEndpoint::Embedded);
                assert_eq!(x.client_secret_env, "KOODRIVE_GATEWAY_CONFIG_TEST_UNSET");
                assert_eq!(x.grant, Grant::TokenExchange);
                assert_eq!(x.expiry_margin, Duration::from_secs(60));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exchange_mode_with_a_real_endpoint_is_valid_without_its_secret() {
        // The secret is read when the gateway is built, not validated here.
        assert!(exchange(Some("\"https://idp.example.com/token\"")).is_ok());
        let err = exchange(Some("\"http://idp.example.com/token\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("token.token_url"), "{err}");
    }

    #[test]
    fn jwks_file_and_url_are_exclusive() {
        let err = error_of(
            "jwks_file = \"certs/dev/jwks.json\"",
            "jwks_file = \"a\"\njwks_url = \"https://idp.example.com/jwks\"",
        );
        assert!(err.contains("auth.jwks_url"), "{err}");
        let config = with(
            "jwks_file = \"certs/dev/jwks.json\"",
            "jwks_url = \"https://idp.example.com/jwks\"",
        )
        .unwrap();
        assert!(matches!(config.auth.jwks, JwksSource::Url(_)));
        assert_eq!(config.auth.jwks_min_refetch, Duration::from_secs(30));
    }

    #[test]
    fn cache_defaults_on_and_ttl_zero_turns_it_off() {
        let cache = Config::from_toml(VALID).unwrap().cache.unwrap();
        assert_eq!(cache.ttl, Duration::from_secs(5));
        assert_eq!(cache.max_bytes, 64 * 1024 * 1024);
        assert_eq!(cache.stale_if_error, Duration::ZERO);
        assert!(cache.honor_client_no_cache);
        assert!(with("[token]", "[cache]\nttl_ms = 0\n[token]")
            .unwrap()
            .cache
            .is_none());
        let err = error_of("[token]", "[cache]\nttl = 5\n[token]");
        assert!(err.contains("ttl"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        assert_eq!(
            format!("{:?}", Secret::new("hunter2")),
            "Secret(<redacted>)"
        );
    }

    #[test]
    fn loopback_http_is_accepted_and_https_anywhere() {
        for ok in [
            "http://127.0.0.1:9000",
            "http://localhost:1",
            "http://[::1]:8080",
            "https://koodrive.example.com",
        ] {
            assert!(parse_url("k", ok).is_ok(), "{ok}");
        }
        assert!(parse_url("k", "http://10.0.0.1").is_err());
    }

    #[test]
    fn missing_tls_means_plain_http() {
        let text = VALID
            .replace("tls_cert = \"certs/dev/server.crt\"", "")
            .replace("tls_key = \"certs/dev/server.key\"", "");
        assert!(Config::from_toml(&text).unwrap().server.tls.is_none());
    }
}
