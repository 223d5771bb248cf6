//! Configuration: the TOML file (plus `KOODRIVE_GATEWAY__SECTION__KEY`
//! environment overrides) → a validated, typed [`Config`]. Fails closed:
//! unknown keys, unsupported sections and bad values are errors that name
//! the key.

mod audit;
mod auth;
mod bounds;
mod cache;
mod defaults;
mod error;
mod log;
mod rate_limit;
mod server;
mod telemetry;
mod token;
mod upstream;

use std::net::IpAddr;
use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use audit::{AuditConfig, AuditSink, Durability, FileAudit, OnAuditError};
pub use auth::{AuthConfig, FileAuth, JwksSource};
pub use bounds::{Bound, NUMERIC_KEYS};
pub use cache::{CacheConfig, FileCache};
pub use error::{ConfigError, Origin};
pub use log::{LogConfig, LogFormat};
pub use rate_limit::{
    FileQuota, FileRateLimit, OnBackendError, Quota, RateLimitConfig, SharedLimit,
};
pub use server::{FileServer, ServerConfig, ServerLimits, TlsFiles};
pub use telemetry::{FileTelemetry, TelemetryConfig};
pub use token::{
    ExchangeConfig, FileExchangeToken, FileStaticToken, FileToken, Grant, TokenConfig,
    TokenEndpoint,
};
pub use upstream::{FileUpstream, UpstreamConfig, UpstreamTarget};

use error::{invalid, Sources};

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "config/gateway.toml";
/// Prefix of environment overrides: `KOODRIVE_GATEWAY__UPSTREAM__TIMEOUT_MS=500`.
pub const ENV_PREFIX: &str = "KOODRIVE_GATEWAY__";

/// The configuration file as written, with every default filled in: what
/// `check-config` prints. It holds names of secret variables, never secrets.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: FileServer,
    pub upstream: FileUpstream,
    pub auth: FileAuth,
    pub token: FileToken,
    #[serde(default)]
    pub cache: FileCache,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<FileRateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<FileAudit>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub telemetry: FileTelemetry,
}

/// The validated configuration the gateway is built from.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub token: TokenConfig,
    /// `None` when `cache.ttl_ms = 0`.
    pub cache: Option<CacheConfig>,
    /// `None` when the section is absent: no limit.
    pub rate_limit: Option<RateLimitConfig>,
    /// `None` when the section is absent: no audit trail.
    pub audit: Option<AuditConfig>,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
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
        Self::from_figment(&figment, Some(path))
    }

    /// Parses a TOML document without environment overrides (tests).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(&Figment::from(Toml::string(text)), None).map(|(config, _)| config)
    }

    /// Extracts and validates `figment`; `file` is the configuration file
    /// as the operator named it, for messages.
    fn from_figment(
        figment: &Figment,
        file: Option<&Path>,
    ) -> Result<(Config, FileConfig), ConfigError> {
        let sources = Sources { figment, file };
        let file = match figment.extract::<FileConfig>() {
            Ok(file) => file,
            Err(error) => {
                let error = if error.path == ["token"] {
                    token::locate_error(figment).unwrap_or(error)
                } else {
                    error
                };
                return Err(sources.describe(error, &[]));
            }
        };
        let config = Config::validate(&file).map_err(|e| sources.locate(e))?;
        Ok((config, file))
    }

    fn validate(file: &FileConfig) -> Result<Config, ConfigError> {
        let upstream = file.upstream.validate()?;
        Ok(Config {
            server: file.server.validate()?,
            auth: file.auth.validate()?,
            token: file.token.validate(&upstream.target)?,
            cache: file.cache.validate()?,
            rate_limit: file
                .rate_limit
                .as_ref()
                .map(FileRateLimit::validate)
                .transpose()?,
            audit: file.audit.as_ref().map(FileAudit::validate).transpose()?,
            log: file.log.validate()?,
            telemetry: file.telemetry.validate()?,
            upstream,
        })
    }
}

/// Parses a URL that must be `https://`, or `http://` on a loopback host.
pub fn parse_url(key: &str, text: &str) -> Result<http::Uri, ConfigError> {
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

/// Configurations for the tests of every section.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A valid configuration with static tokens and only required keys.
    pub(crate) const STATIC: &str = r#"
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

    /// The same with the embedded token endpoint.
    pub(crate) const EXCHANGE: &str = r#"
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
mode = "exchange"
token_url = "embedded"
client_id = "gw"
client_secret_env = "KOODRIVE_GATEWAY_CONFIG_TEST_UNSET"
[rate_limit]
requests_per_second = 10
burst = 20
redis_url = "redis://127.0.0.1:6379"
[audit]
path = "audit.log"
"#;

    /// `base` with `lines` set in `[section]` (created if absent; a key
    /// already there takes the new value).
    pub(crate) fn add(base: &str, section: &str, lines: &str) -> String {
        let header = format!("[{section}]\n");
        let Ok(mut table) = base.parse::<toml::Table>() else {
            return format!("{base}{header}{lines}\n");
        };
        let Ok(added) = format!("{header}{lines}\n").parse::<toml::Table>() else {
            // Not TOML on its own (a test of bad syntax): append as text.
            return base.replace(&header, &format!("{header}{lines}\n"));
        };
        for (name, value) in added {
            match (table.get_mut(&name), value) {
                (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
                    existing.extend(new)
                }
                (_, value) => {
                    table.insert(name, value);
                }
            }
        }
        toml::to_string(&table).unwrap()
    }

    pub(crate) fn static_with(section: &str, lines: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&add(STATIC, section, lines))
    }

    pub(crate) fn exchange_with(section: &str, lines: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&add(EXCHANGE, section, lines))
    }

    /// The file as `check-config` would print it.
    pub(crate) fn effective(text: &str) -> String {
        let (_, file) = Config::from_figment(&Figment::from(Toml::string(text)), None).unwrap();
        toml::to_string_pretty(&file).unwrap()
    }

    /// Every integer key of the exchange fixture with defaults filled in.
    pub(crate) fn numeric_keys_of() -> Vec<String> {
        let printed: toml::Table = effective(EXCHANGE).parse().unwrap();
        let mut keys = Vec::new();
        for (section, table) in printed {
            for (key, value) in table.as_table().unwrap() {
                if value.is_integer() {
                    keys.push(format!("{section}.{key}"));
                }
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use figment::Jail;
    use jsonwebtoken::Algorithm;

    use super::testing::{effective, static_with, EXCHANGE, STATIC};
    use super::*;

    fn error_of(section: &str, lines: &str) -> String {
        static_with(section, lines).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_file_gets_defaults() {
        let config = Config::from_toml(STATIC).unwrap();
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
    fn unknown_keys_are_refused_with_a_suggestion() {
        let err = error_of("upstream", "timeout_msec = 5");
        assert!(
            err.contains("unknown key `upstream.timeout_msec`")
                && err.ends_with("did you mean `timeout_ms`?"),
            "{err}"
        );
        let err = error_of("bogus", "x = 1");
        assert!(err.contains("unknown key `bogus`"), "{err}");
    }

    #[test]
    fn the_audit_section_is_checked() {
        let audit = static_with("audit", "path = \"-\"").unwrap().audit.unwrap();
        assert_eq!(audit.sink, AuditSink::Stdout);
        assert_eq!(audit.on_error, OnAuditError::Reject);
        assert_eq!(audit.max_file_bytes, Some(100 * 1024 * 1024));
        let never = static_with("audit", "path = \"a.log\"\nmax_file_bytes = 0")
            .unwrap()
            .audit
            .unwrap();
        assert_eq!(never.max_file_bytes, None);
        let err = error_of("audit", "path = \"-\"\ndurability = \"fsynced\"");
        assert!(err.contains("audit.durability"), "{err}");
        let err = error_of("audit", "path = \"-\"\non_error = \"shrug\"");
        assert!(err.contains("on_error"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                STATIC.replace("127.0.0.1:8443", "nonsense"),
                "`server.listen`",
            ),
            (
                STATIC.replace("\"embedded\"", "\"http://example.com\""),
                "`upstream.base_url`",
            ),
            (
                STATIC.replace("\"embedded\"", "\"ftp://127.0.0.1\""),
                "`upstream.base_url`",
            ),
            (
                STATIC.replace("tls_key = \"certs/dev/server.key\"", ""),
                "`server.tls_key`",
            ),
            (
                testing::add(STATIC, "auth", "algorithms = [\"HS256\"]"),
                "`auth.algorithms`",
            ),
            (
                STATIC.replace("issuer = \"iss\"", "issuer = \" \""),
                "`auth.issuer`",
            ),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
            assert!(!err.contains("default."), "figment profile leaked: {err}");
        }
    }

    #[test]
    // figment's `Jail` closure returns its own (large) error type.
    #[allow(clippy::result_large_err)]
    fn a_file_value_names_the_file_and_an_environment_value_its_variable() {
        Jail::expect_with(|jail| {
            jail.create_file("gateway.toml", &testing::add(STATIC, "cache", "ttl_ms = 0"))?;
            jail.set_env("KOODRIVE_GATEWAY__AUTH__JWKS_REFRESH_S", i64::MAX);
            let err = Config::load(Path::new("gateway.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(
                    "`auth.jwks_refresh_s` from KOODRIVE_GATEWAY__AUTH__JWKS_REFRESH_S: "
                ),
                "{err}"
            );

            jail.set_env("KOODRIVE_GATEWAY__AUTH__JWKS_REFRESH_S", 300);
            jail.create_file(
                "gateway.toml",
                &testing::add(STATIC, "cache", "ttl_ms = 40000000000000"),
            )?;
            let err = Config::load(Path::new("gateway.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("`cache.ttl_ms` in gateway.toml: "), "{err}");

            jail.set_env("KOODRIVE_GATEWAY__UPSTREAM__TIMEOUT_MSEC", 5);
            let err = Config::load(Path::new("gateway.toml"))
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                "unknown key `upstream.timeout_msec` from KOODRIVE_GATEWAY__UPSTREAM__TIMEOUT_MSEC; did you mean `timeout_ms`?"
            );
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = Config::load(Path::new("no/such/gateway.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("no/such/gateway.toml: "), "{err}");
    }

    #[test]
    fn the_printed_file_shows_every_default_and_no_secret() {
        let printed = effective(EXCHANGE);
        for line in [
            "grant = \"token-exchange\"",
            "timeout_ms = 5000",
            "expiry_margin_s = 60",
            "max_cached_tokens = 100000",
            "user_id_param = \"user_id\"",
            "leeway_s = 60",
            "jwks_refresh_s = 300",
            "jwks_min_refetch_s = 30",
            "max_token_bytes = 8192",
            "verified_cache_bytes = 16777216",
            "ttl_ms = 5000",
            "ttl_jitter_ms = 0",
            "max_bytes = 67108864",
            "stale_if_error_ms = 0",
            "honor_client_no_cache = true",
            "drain_timeout_ms = 30000",
            "max_response_bytes = 8388608",
            "mode = \"exchange\"",
            "client_secret_env = \"KOODRIVE_GATEWAY_CONFIG_TEST_UNSET\"",
        ] {
            assert!(printed.contains(line), "{line} missing from:\n{printed}");
        }
        assert_eq!(printed.matches("mode = ").count(), 1, "{printed}");
        // The printed file is itself a valid configuration.
        assert!(Config::from_toml(&printed).is_ok(), "{printed}");
    }

    #[test]
    fn the_earlier_name_of_the_drain_timeout_is_still_accepted() {
        let old = EXCHANGE.replace("[server]", "[server]\nshutdown_grace_ms = 1234");
        let config = Config::from_toml(&old).map_err(|e| e.to_string());
        assert_eq!(
            config.map(|c| c.server.drain_timeout),
            Ok(Duration::from_millis(1234))
        );
    }

    #[test]
    fn exchange_mode_with_a_real_endpoint_is_valid_without_its_secret() {
        // The secret is read when the gateway is built, not validated here.
        let https = EXCHANGE.replace(
            "\"embedded\"\nclient_id",
            "\"https://idp.example.com/token\"\nclient_id",
        );
        assert!(Config::from_toml(&https).is_ok());
        let http = https.replace("https://idp", "http://idp");
        let err = Config::from_toml(&http).unwrap_err().to_string();
        assert!(err.contains("`token.token_url`"), "{err}");
    }

    #[test]
    fn jwks_file_and_url_are_exclusive() {
        let err = error_of("auth", "jwks_url = \"https://idp.example.com/jwks\"");
        assert!(err.contains("`auth.jwks_url`"), "{err}");
        let config = Config::from_toml(&STATIC.replace(
            "jwks_file = \"certs/dev/jwks.json\"",
            "jwks_url = \"https://idp.example.com/jwks\"",
        ))
        .unwrap();
        assert!(matches!(config.auth.jwks, JwksSource::Url(_)));
        assert_eq!(config.auth.jwks_min_refetch, Duration::from_secs(30));
    }

    #[test]
    fn cache_defaults_on_and_ttl_zero_turns_it_off() {
        let cache = Config::from_toml(STATIC).unwrap().cache.unwrap();
        assert_eq!(cache.ttl, Duration::from_secs(5));
        assert_eq!(cache.max_bytes, 64 * 1024 * 1024);
        assert_eq!(cache.stale_if_error, Duration::ZERO);
        assert!(cache.honor_client_no_cache);
        assert!(static_with("cache", "ttl_ms = 0").unwrap().cache.is_none());
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
        let text = STATIC
            .replace("tls_cert = \"certs/dev/server.crt\"", "")
            .replace("tls_key = \"certs/dev/server.key\"", "");
        assert!(Config::from_toml(&text).unwrap().server.tls.is_none());
    }
}
