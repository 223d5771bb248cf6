//! KooDrive access tokens for an authenticated caller: the "token" step of
//! the flow. Two sources: a static file (user id → token) and per-user
//! exchange at a token endpoint, cached with single-flight refresh.

pub(crate) mod endpoint;
pub(crate) mod exchange;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::Authenticated;
use crate::config::{Config, ExchangeConfig, Secret, Secrets, TokenConfig, TokenEndpoint};
use crate::emulator::Emulator;
use crate::error::GatewayError;
use crate::http_client::HttpsClient;
use endpoint::HttpTokenEndpoint;
use exchange::TokenCache;

/// A KooDrive access token. Its `Debug` never shows the value, so it cannot
/// reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    /// Wraps a token value.
    pub fn new(value: impl Into<Arc<str>>) -> AccessToken {
        AccessToken(value.into())
    }

    /// The secret value, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// A static token file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Only where: serde's message may quote a value, and the values are
    /// tokens.
    #[error("{path}: expected a JSON object {{\"<user id>\": \"<token>\"}} (not so at line {line}, column {column})")]
    Parse {
        path: String,
        line: usize,
        column: usize,
    },
    #[error("{path}: the token for user `{user}` is not a valid header value")]
    BadToken { path: String, user: String },
}

/// Why the token source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    #[error("token.static_tokens_file: {0}")]
    File(#[from] TokenFileError),
    #[error("token.client_secret_env: the environment variable `{0}` is not set")]
    MissingSecret(String),
    #[error("token.token_url = \"embedded\" needs the embedded emulator (upstream.base_url = \"embedded\")")]
    NoEmulator,
    #[error("the embedded emulator's token URL is not a valid URI")]
    EmulatorUrl,
}

/// Fixed tokens per KooDrive user id, from `token.static_tokens_file`;
/// replaced whole by a reload.
#[derive(Default)]
pub struct StaticTokens {
    map: ArcSwap<HashMap<String, AccessToken>>,
}

impl StaticTokens {
    /// The token of `user_id`, if the file has one.
    pub fn get(&self, user_id: &str) -> Option<AccessToken> {
        self.map.load().get(user_id).cloned()
    }

    /// How many users the file provisions.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    /// Whether the file provisions no user.
    pub fn is_empty(&self) -> bool {
        self.map.load().is_empty()
    }

    /// Reads `path` again; on success serves its tokens from now on and
    /// returns whether they differ from the previous ones. A file that
    /// cannot be used leaves the previous tokens in place.
    pub(crate) fn reload(&self, path: &Path) -> Result<bool, TokenFileError> {
        let map = read_static_file(path)?;
        let changed = **self.map.load() != map;
        if changed {
            self.map.store(Arc::new(map));
        }
        Ok(changed)
    }

    pub(crate) fn grants(&self) -> Vec<(String, AccessToken)> {
        let map = self.map.load();
        map.iter().map(|(u, t)| (u.clone(), t.clone())).collect()
    }
}

/// Where KooDrive tokens come from.
pub enum TokenSource {
    /// Fixed tokens per KooDrive user id.
    Static(Arc<StaticTokens>),
    /// Tokens exchanged per (principal, user id) and cached.
    Exchange(TokenCache<HttpTokenEndpoint>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Static(tokens) => {
                write!(f, "TokenSource::Static({} users)", tokens.len())
            }
            TokenSource::Exchange(_) => f.write_str("TokenSource::Exchange"),
        }
    }
}

/// The client secret a real token endpoint needs: an unset variable fails
/// `check-config` and the start alike.
pub(crate) fn required_secret(
    exchange: &ExchangeConfig,
    secrets: &Secrets,
) -> Result<Secret, TokenSetupError> {
    secrets
        .get(&exchange.client_secret_env)
        .cloned()
        .ok_or_else(|| TokenSetupError::MissingSecret(exchange.client_secret_env.clone()))
}

impl TokenSource {
    /// The token source `config` asks for. `static_tokens` is the static
    /// file if the caller already read it. With the embedded emulator, static tokens
    /// are granted to it, or it is told the exchange client's credentials (a
    /// random per-process secret when the configured variable is unset).
    pub(crate) fn from_config(
        config: &Config,
        static_tokens: Option<TokenSource>,
        secrets: &Secrets,
        client: &HttpsClient,
        emulator: Option<&Emulator>,
    ) -> Result<TokenSource, TokenSetupError> {
        let exchange = match (&config.token, static_tokens) {
            (TokenConfig::Exchange(exchange), _) => exchange,
            (TokenConfig::Static { tokens_file }, loaded) => {
                let source = match loaded {
                    Some(source) => source,
                    None => TokenSource::from_static_file(tokens_file)?,
                };
                if let Some(emulator) = emulator {
                    for (user, token) in source.static_grants() {
                        emulator.grant(token.expose(), &user);
                    }
                }
                return Ok(source);
            }
        };
        let secret = secrets.get(&exchange.client_secret_env).cloned();
        let (url, client_secret) = match (&exchange.endpoint, emulator) {
            (TokenEndpoint::Url(url), _) => (url.clone(), required_secret(exchange, secrets)?),
            (TokenEndpoint::Embedded, Some(emulator)) => {
                // 128 random bits, known only to this process and its emulator.
                let secret = secret
                    .unwrap_or_else(|| Secret::new(format!("{:032x}", rand::random::<u128>())));
                emulator.set_client(&exchange.client_id, secret.expose());
                emulator.set_user_claim(&config.auth.user_id_claim);
                let url = emulator
                    .token_url()
                    .parse()
                    .map_err(|_| TokenSetupError::EmulatorUrl)?;
                (url, secret)
            }
            (TokenEndpoint::Embedded, None) => return Err(TokenSetupError::NoEmulator),
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

    /// Loads a static token file: `{"<user id>": "<token>", …}`.
    pub fn from_static_file(path: &Path) -> Result<TokenSource, TokenFileError> {
        let map = read_static_file(path)?;
        Ok(TokenSource::Static(Arc::new(StaticTokens {
            map: ArcSwap::from_pointee(map),
        })))
    }

    /// The KooDrive token to use for this caller's requests.
    pub async fn token_for(&self, caller: &Authenticated) -> Result<AccessToken, GatewayError> {
        match self {
            TokenSource::Static(tokens) => tokens
                .get(&caller.principal.user_id)
                .ok_or(GatewayError::UserNotProvisioned),
            TokenSource::Exchange(cache) => cache.token_for(caller).await,
        }
    }

    /// Registers the exchange metrics (a static source has none).
    pub(crate) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        if let TokenSource::Exchange(cache) = self {
            cache.register(registry);
        }
    }

    /// Whether a token KooDrive refused can be replaced by a fresh one.
    pub fn can_renew(&self) -> bool {
        matches!(self, TokenSource::Exchange(_))
    }

    /// Forgets `refused` for this caller, so the next call obtains a new
    /// token. A newer token already cached is kept.
    pub async fn invalidate(&self, caller: &Authenticated, refused: &AccessToken) {
        if let TokenSource::Exchange(cache) = self {
            cache.invalidate(&caller.principal, refused).await;
        }
    }

    /// The static tokens, reloadable, when this is a static source.
    pub(crate) fn static_tokens(&self) -> Option<Arc<StaticTokens>> {
        match self {
            TokenSource::Static(tokens) => Some(Arc::clone(tokens)),
            TokenSource::Exchange(_) => None,
        }
    }

    /// Every (user id, token) pair a static source holds; used to provision
    /// the embedded emulator with the same credentials.
    pub fn static_grants(&self) -> Vec<(String, AccessToken)> {
        match self {
            TokenSource::Static(tokens) => tokens.grants(),
            TokenSource::Exchange(_) => Vec::new(),
        }
    }
}

/// Reads and checks a static token file: `{"<user id>": "<token>", …}`,
/// every token usable in a header.
fn read_static_file(path: &Path) -> Result<HashMap<String, AccessToken>, TokenFileError> {
    let display = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TokenFileError::Read {
        path: display.clone(),
        source,
    })?;
    let map: HashMap<String, String> =
        serde_json::from_slice(&bytes).map_err(|error| TokenFileError::Parse {
            path: display.clone(),
            line: error.line(),
            column: error.column(),
        })?;
    let mut tokens = HashMap::with_capacity(map.len());
    for (user, token) in map {
        if token.is_empty() || http::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            return Err(TokenFileError::BadToken {
                path: display,
                user,
            });
        }
        tokens.insert(user, AccessToken::new(token));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(user: &str) -> Authenticated {
        exchange::tests::caller("app", user)
    }

    fn source(json: &str) -> Result<TokenSource, TokenFileError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, json).unwrap();
        TokenSource::from_static_file(&path)
    }

    #[tokio::test]
    async fn static_source_maps_user_ids_to_tokens() {
        let source = source(r#"{"u1": "t1", "u2": "t2"}"#).unwrap();
        assert_eq!(
            source.token_for(&caller("u2")).await.unwrap().expose(),
            "t2"
        );
        assert!(matches!(
            source.token_for(&caller("u3")).await,
            Err(GatewayError::UserNotProvisioned)
        ));
    }

    #[test]
    fn tokens_that_cannot_be_headers_are_refused() {
        assert!(matches!(
            source(r#"{"u1": "line\nbreak"}"#),
            Err(TokenFileError::BadToken { .. })
        ));
        assert!(matches!(source("[1,2]"), Err(TokenFileError::Parse { .. })));
        // A token of the wrong type is not quoted in the error.
        let error = source(r#"{"u-1": 9876543210}"#).unwrap_err().to_string();
        assert!(!error.contains("9876543210"), "{error}");
        assert!(error.contains("line 1, column"), "{error}");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let token = AccessToken::new("very-secret");
        assert!(!format!("{token:?}").contains("very-secret"));
    }
}
