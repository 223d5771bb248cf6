//! `[token]`: how KooDrive access tokens are obtained. The section is a
//! tagged enum on `mode`: each mode admits only its own keys, so a key of
//! the other mode is an unknown key, refused by name.

use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};
use super::{bounds, defaults, parse_url, UpstreamTarget};

/// `[token]` as written, defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum FileToken {
    Static(FileStaticToken),
    Exchange(FileExchangeToken),
}

/// `token.mode`, read alone to locate an error in the section.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum TokenMode {
    Static,
    Exchange,
}

/// `[token]` with `mode = "static"`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileStaticToken {
    /// The tag, which serde removes before this struct sees the section;
    /// present only when [`locate_error`] reads the section again.
    #[serde(default, rename = "mode", skip_serializing)]
    _mode: Option<TokenMode>,
    pub static_tokens_file: PathBuf,
}

/// `[token]` with `mode = "exchange"`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileExchangeToken {
    /// As in [`FileStaticToken`].
    #[serde(default, rename = "mode", skip_serializing)]
    _mode: Option<TokenMode>,
    /// `"embedded"` or an `https://` URL.
    pub token_url: String,
    pub client_id: String,
    /// The name of the variable holding the secret, never the secret.
    pub client_secret_env: String,
    #[serde(default = "defaults::grant")]
    pub grant: Grant,
    /// Form parameter carrying the user id in the client-credentials grant.
    #[serde(default = "defaults::user_id_param")]
    pub user_id_param: String,
    #[serde(default = "defaults::token_timeout_ms")]
    pub timeout_ms: u64,
    /// Tokens are dropped this long before `expires_in` runs out.
    #[serde(default = "defaults::expiry_margin_s")]
    pub expiry_margin_s: u64,
    #[serde(default = "defaults::max_cached_tokens")]
    pub max_cached_tokens: u64,
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
    /// gateway is built ([`super::Secrets`]), not when the config is validated.
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    /// RFC 8693 with the caller's JWT as `subject_token`.
    TokenExchange,
    /// RFC 6749 §4.4 with the user id as a form parameter.
    ClientCredentials,
}

impl FileToken {
    pub(crate) fn validate(&self, upstream: &UpstreamTarget) -> Result<TokenConfig, ConfigError> {
        match self {
            FileToken::Static(s) => Ok(TokenConfig::Static {
                tokens_file: s.static_tokens_file.clone(),
            }),
            FileToken::Exchange(x) => x
                .validate(upstream)
                .map(|x| TokenConfig::Exchange(Box::new(x))),
        }
    }
}

impl FileExchangeToken {
    fn validate(&self, upstream: &UpstreamTarget) -> Result<ExchangeConfig, ConfigError> {
        let endpoint = if self.token_url == "embedded" {
            if *upstream != UpstreamTarget::Embedded {
                return Err(invalid(
                    "token.token_url",
                    "\"embedded\" requires upstream.base_url = \"embedded\"",
                ));
            }
            TokenEndpoint::Embedded
        } else {
            TokenEndpoint::Url(parse_url("token.token_url", &self.token_url)?)
        };
        for (key, value) in [
            ("token.client_id", &self.client_id),
            ("token.client_secret_env", &self.client_secret_env),
            ("token.user_id_param", &self.user_id_param),
        ] {
            if value.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        Ok(ExchangeConfig {
            endpoint,
            client_id: self.client_id.clone(),
            client_secret_env: self.client_secret_env.clone(),
            grant: self.grant,
            user_id_param: self.user_id_param.clone(),
            timeout: bounds::millis("token.timeout_ms", self.timeout_ms)?,
            expiry_margin: bounds::secs("token.expiry_margin_s", self.expiry_margin_s)?,
            max_cached_tokens: bounds::check("token.max_cached_tokens", self.max_cached_tokens)?,
        })
    }
}

/// serde reads a tagged enum from a buffered copy of the section, so an
/// error inside `[token]` (a wrong type, an unknown grant) arrives without
/// its key. Reading the section again as the variant `mode` names, without
/// buffering, yields the same error with its full path.
pub(crate) fn locate_error(figment: &Figment) -> Option<figment::Error> {
    let mode = match figment.extract_inner::<TokenMode>("token.mode") {
        Ok(mode) => mode,
        Err(e) => return Some(e),
    };
    let section = figment.focus("token");
    let error = match mode {
        TokenMode::Static => section.extract::<FileStaticToken>().err(),
        TokenMode::Exchange => section.extract::<FileExchangeToken>().err(),
    };
    error.map(|mut e| {
        e.path.insert(0, "token".into());
        e
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{exchange_with, static_with};
    use super::*;

    #[test]
    fn a_key_of_exchange_mode_under_static_mode_is_refused_by_name() {
        for key in [
            "client_id = \"gw\"",
            "token_url = \"embedded\"",
            "timeout_ms = 5000",
            "grant = \"token-exchange\"",
        ] {
            let err = static_with("token", key).unwrap_err().to_string();
            let name = key.split(' ').next().unwrap();
            assert!(
                err.contains(&format!("unknown key `token.{name}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_static_file_under_exchange_mode_is_refused_by_name() {
        let err = exchange_with("token", "static_tokens_file = \"t.json\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`token.static_tokens_file`"), "{err}");
    }

    #[test]
    fn an_unknown_mode_names_token_mode() {
        let err = super::super::Config::from_toml(
            &super::super::testing::STATIC.replace("\"static\"", "\"sometimes\""),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`token.mode`"), "{err}");
    }

    #[test]
    fn a_wrong_type_or_unknown_grant_inside_token_names_its_key() {
        let err = exchange_with("token", "timeout_ms = \"5s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`token.timeout_ms`"), "{err}");
        let err = exchange_with("token", "grant = \"password\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`token.grant`"), "{err}");
    }

    #[test]
    fn a_missing_exchange_key_is_named() {
        let text = super::super::testing::EXCHANGE.replace("client_id = \"gw\"", "");
        let err = super::super::Config::from_toml(&text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`token.client_id`"), "{err}");
    }

    #[test]
    fn exchange_defaults_are_filled_in() {
        match exchange_with("token", "").unwrap().token {
            TokenConfig::Exchange(x) => {
                assert_eq!(x.grant, Grant::TokenExchange);
                assert_eq!(x.user_id_param, "user_id");
                assert_eq!(x.timeout, Duration::from_secs(5));
                assert_eq!(x.expiry_margin, Duration::from_secs(60));
                assert_eq!(x.max_cached_tokens, 100_000);
            }
            other => panic!("{other:?}"),
        }
    }
}
