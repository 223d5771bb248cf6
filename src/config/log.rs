//! `[log]`: the operational log (stderr). `RUST_LOG` sets the level.

use serde::{Deserialize, Serialize};

/// `[log]` as written, defaults filled in.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` or `"json"` (one object per line, fields at the top level);
    /// `--log-json` forces JSON.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
