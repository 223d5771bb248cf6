//! `[upstream]`: the KooDrive API requests are forwarded to.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};
use super::{bounds, defaults, parse_url};

/// `[upstream]` as written, defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub base_url: String,
    pub ca_file: Option<PathBuf>,
    #[serde(default = "defaults::upstream_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: u64,
    /// Upstream requests in flight, all callers together.
    #[serde(default = "defaults::max_concurrency")]
    pub max_concurrency: u64,
    /// How long a request may wait for one of those slots.
    #[serde(default = "defaults::queue_timeout_ms")]
    pub queue_timeout_ms: u64,
}

/// The KooDrive upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub target: UpstreamTarget,
    /// An extra trust root (PEM) for the upstream's certificate.
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub max_concurrency: usize,
    pub queue_timeout: Duration,
}

/// Where requests are forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// The built-in emulator, started in-process on a loopback port.
    Embedded,
    /// A real base URL (`https://…`, or `http://` on loopback).
    Url(http::Uri),
}

impl FileUpstream {
    pub(crate) fn validate(&self) -> Result<UpstreamConfig, ConfigError> {
        let target = if self.base_url == "embedded" {
            UpstreamTarget::Embedded
        } else {
            let uri = parse_url("upstream.base_url", &self.base_url)?;
            if uri.query().is_some() {
                return Err(invalid("upstream.base_url", "must not contain a query"));
            }
            UpstreamTarget::Url(uri)
        };
        Ok(UpstreamConfig {
            target,
            ca_file: self.ca_file.clone(),
            timeout: bounds::millis("upstream.timeout_ms", self.timeout_ms)?,
            max_response_bytes: bounds::size(
                "upstream.max_response_bytes",
                self.max_response_bytes,
            )?,
            max_concurrency: bounds::size("upstream.max_concurrency", self.max_concurrency)?,
            queue_timeout: bounds::millis("upstream.queue_timeout_ms", self.queue_timeout_ms)?,
        })
    }
}
