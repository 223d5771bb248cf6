//! Configuration errors: each names the key and where its value came from
//! (the file or a `KOODRIVE_GATEWAY__…` variable), once, on one line.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::Figment;

use super::ENV_PREFIX;

/// A configuration that failed to load or validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML.
    #[error("{source_name}: {reason}")]
    Unreadable { source_name: String, reason: String },
    /// A key the schema does not have.
    #[error("unknown key `{key}` {origin}{}", DidYouMean(*suggestion))]
    UnknownKey {
        key: String,
        origin: Origin,
        suggestion: Option<&'static str>,
    },
    /// A value is missing or wrong.
    #[error("`{key}` {origin}: {reason}")]
    Invalid {
        key: String,
        origin: Origin,
        reason: String,
    },
}

/// Where a key's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file.
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
    /// A TOML document handed over as text ([`super::Config::from_toml`]).
    Text,
    /// Neither the file nor the environment sets it.
    Unset,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Env(name) => write!(f, "from {name}"),
            Origin::Text => f.write_str("in the TOML text"),
            Origin::Unset => f.write_str("(not set)"),
        }
    }
}

struct DidYouMean(Option<&'static str>);

impl fmt::Display for DidYouMean {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "; did you mean `{name}`?"),
            None => Ok(()),
        }
    }
}

/// A validation failure of `key`; its origin is filled in by [`Sources::locate`].
pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        origin: Origin::Unset,
        reason: reason.into(),
    }
}

/// The providers a configuration was merged from, to say where a key's
/// value came from.
pub(crate) struct Sources<'a> {
    pub figment: &'a Figment,
    /// The file as the operator named it (figment's metadata holds it made
    /// absolute).
    pub file: Option<&'a Path>,
}

impl Sources<'_> {
    /// Where the value of `key` (dotted, as `auth.jwks_refresh_s`) came from.
    pub(super) fn origin(&self, key: &str) -> Origin {
        let Some(metadata) = self.figment.find_metadata(key) else {
            return Origin::Unset;
        };
        match &metadata.source {
            Some(figment::Source::File(path)) => {
                Origin::File(self.file.map_or_else(|| path.clone(), Path::to_path_buf))
            }
            // figment's own interpolation of an `Env` key is `AUTH.JWKS_REFRESH_S`,
            // not the variable's name: rebuild the name the operator set.
            _ if metadata.name.contains("environment") => Origin::Env(env_var(key)),
            _ => Origin::Text,
        }
    }

    /// Fills in the origin of a validation error.
    pub(super) fn locate(&self, error: ConfigError) -> ConfigError {
        match error {
            ConfigError::Invalid {
                key,
                origin: Origin::Unset,
                reason,
            } => ConfigError::Invalid {
                origin: self.origin(&key),
                key,
                reason,
            },
            other => other,
        }
    }

    /// Turns a figment (serde) error into one line naming the key.
    /// `prefix` is the path of a focused figment (`token`), if any.
    pub(super) fn describe(&self, error: figment::Error, prefix: &[&str]) -> ConfigError {
        let mut path: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        path.extend(error.path.iter().cloned());
        // figment puts an unknown field in the path itself, serde's
        // buffered (tagged) data does not: add it once.
        let join = |field: &str| {
            let mut key = path.clone();
            if key.last().map(String::as_str) != Some(field) {
                key.push(field.to_owned());
            }
            key.join(".")
        };
        match &error.kind {
            Kind::UnknownField(field, expected) => {
                let key = join(field);
                ConfigError::UnknownKey {
                    origin: self.origin(&key),
                    suggestion: did_you_mean(field, expected),
                    key,
                }
            }
            Kind::MissingField(field) => ConfigError::Invalid {
                key: join(field),
                origin: Origin::Unset,
                reason: "required".into(),
            },
            kind if path.is_empty() => ConfigError::Unreadable {
                source_name: self
                    .file
                    .map_or_else(|| "TOML text".into(), |file| file.display().to_string()),
                reason: kind.to_string().trim_end().to_owned(),
            },
            kind => {
                let key = path.join(".");
                ConfigError::Invalid {
                    origin: self.origin(&key),
                    key,
                    reason: kind.to_string(),
                }
            }
        }
    }
}

/// The environment variable that sets `key`.
fn env_var(key: &str) -> String {
    let parts: Vec<String> = key.split('.').map(|p| p.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", parts.join("__"))
}

/// The expected name closest to a misspelt one, if any is close.
fn did_you_mean(unknown: &str, expected: &'static [&'static str]) -> Option<&'static str> {
    expected
        .iter()
        .map(|name| (strsim::jaro_winkler(unknown, name), *name))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_misspelling_gets_a_suggestion_and_a_far_one_none() {
        const EXPECTED: &[&str] = &["base_url", "ca_file", "timeout_ms"];
        assert_eq!(did_you_mean("timeout_msec", EXPECTED), Some("timeout_ms"));
        assert_eq!(did_you_mean("base_uri", EXPECTED), Some("base_url"));
        assert_eq!(did_you_mean("retries", EXPECTED), None);
    }

    #[test]
    fn environment_variable_names_are_rebuilt_from_the_key() {
        assert_eq!(
            env_var("auth.jwks_refresh_s"),
            "KOODRIVE_GATEWAY__AUTH__JWKS_REFRESH_S"
        );
    }

    #[test]
    fn unknown_keys_print_on_one_line_with_the_suggestion() {
        let error = ConfigError::UnknownKey {
            key: "upstream.timeout_msec".into(),
            origin: Origin::File("config/gateway.toml".into()),
            suggestion: Some("timeout_ms"),
        };
        assert_eq!(
            error.to_string(),
            "unknown key `upstream.timeout_msec` in config/gateway.toml; did you mean `timeout_ms`?"
        );
    }
}
