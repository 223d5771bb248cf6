//! `[telemetry]`: OTLP/HTTP trace export, off unless an endpoint is set.

use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};

/// `[telemetry]` as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileTelemetry {
    /// OTLP/HTTP collector base URL, e.g. `http://127.0.0.1:4318`; spans go
    /// to `<endpoint>/v1/traces`.
    pub otlp_endpoint: Option<String>,
}

/// Validated `[telemetry]`.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// The traces URL, when export is on.
    pub otlp_traces_url: Option<String>,
}

impl FileTelemetry {
    pub(crate) fn validate(&self) -> Result<TelemetryConfig, ConfigError> {
        let key = "telemetry.otlp_endpoint";
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(TelemetryConfig::default());
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|_| invalid(key, "not a valid absolute URL"))?;
        let loopback = uri.host().is_some_and(super::is_loopback);
        match uri.scheme_str() {
            Some("http") if loopback => {}
            Some("https") => {
                return Err(invalid(
                    key,
                    "https:// is not supported yet; run a collector on loopback (http://127.0.0.1:4318)",
                ))
            }
            _ => {
                return Err(invalid(
                    key,
                    "expected http:// on a loopback host (a local collector)",
                ))
            }
        }
        Ok(TelemetryConfig {
            otlp_traces_url: Some(format!("{}/v1/traces", endpoint.trim_end_matches('/'))),
        })
    }
}
