//! `[log]`: the operational log (stderr). `RUST_LOG` sets the level.

use serde::{Deserialize, Serialize};

/// `[log]` as written, defaults filled in.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` or `"json"` (one object per line, fields at the top level);
    /// `--log-json` forces JSON.
    #[serde(default)]
    pub format: LogFormat,
    /// Access-log lines of successful requests (2xx): one in this many is
    /// written (1 = all). Every other request's line is always written.
    /// The text line is about a third of a logged cache hit's instructions
    /// (bench/RESULTS.md).
    #[serde(default = "one")]
    pub success_sample: u64,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            format: LogFormat::default(),
            success_sample: one(),
        }
    }
}

fn one() -> u64 {
    1
}

impl LogConfig {
    /// The section with its bounds checked.
    pub(crate) fn validate(&self) -> Result<LogConfig, super::ConfigError> {
        super::bounds::check("log.success_sample", self.success_sample)?;
        Ok(self.clone())
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
