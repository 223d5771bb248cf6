//! `[audit]`: one JSON line per request, with a delivery guarantee.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};
use super::{bounds, defaults};

/// `[audit]` as written, defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileAudit {
    /// `"-"` for standard output, else a file (appended).
    pub path: String,
    #[serde(default)]
    pub on_error: OnAuditError,
    /// Rotate beyond this size; 0 = never.
    #[serde(default = "defaults::audit_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Rotated files kept (`<path>.1` … `<path>.N`).
    #[serde(default = "defaults::audit_max_files")]
    pub max_files: u64,
    /// Records waiting for the writer.
    #[serde(default = "defaults::audit_queue_records")]
    pub queue_records: u64,
    /// When a response may be released.
    #[serde(default)]
    pub durability: Durability,
}

/// What happens to a request whose record cannot be kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnAuditError {
    /// Fail closed: 503 `audit_unavailable`, nothing served unaudited.
    #[default]
    Reject,
    /// Fail open: served, and counted as dropped.
    Continue,
}

/// How far a record must have got before its response is released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// In the writer's bounded queue (in memory).
    #[default]
    Queued,
    /// Handed to the operating system (`write` returned).
    Written,
    /// On disk (`fsync` returned).
    Fsynced,
}

/// Where audit records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

/// Validated `[audit]`.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub sink: AuditSink,
    pub on_error: OnAuditError,
    /// `None`: never rotate.
    pub max_file_bytes: Option<u64>,
    pub max_files: usize,
    pub queue_records: usize,
    pub durability: Durability,
}

impl FileAudit {
    pub(crate) fn validate(&self) -> Result<AuditConfig, ConfigError> {
        let sink = match self.path.as_str() {
            "" => return Err(invalid("audit.path", "must be \"-\" or a file path")),
            "-" => AuditSink::Stdout,
            path => AuditSink::File(PathBuf::from(path)),
        };
        let max_file_bytes = bounds::check("audit.max_file_bytes", self.max_file_bytes)?;
        if sink == AuditSink::Stdout && self.durability == Durability::Fsynced {
            return Err(invalid(
                "audit.durability",
                "\"fsynced\" needs a file (audit.path), not standard output",
            ));
        }
        Ok(AuditConfig {
            sink,
            on_error: self.on_error,
            max_file_bytes: (max_file_bytes > 0).then_some(max_file_bytes),
            max_files: bounds::size("audit.max_files", self.max_files)?,
            queue_records: bounds::size("audit.queue_records", self.queue_records)?,
            durability: self.durability,
        })
    }
}
