//! `[server]`: where and how the gateway listens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};
use super::{bounds, defaults};

/// `[server]` as written, defaults filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// When set, missing development material (CA, server certificate, JWT
    /// signing key and JWKS) is created in this directory at start-up.
    pub dev_certs_dir: Option<PathBuf>,
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Plain-HTTP listener for `/healthz` and `/readyz`.
    pub admin_listen: Option<SocketAddr>,
    /// Request line plus headers; beyond it, 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: u64,
    /// Open client connections; beyond it, accepting waits.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u64,
    /// A TLS handshake not finished by then is dropped.
    #[serde(default = "defaults::handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// A request head not received by then is dropped (slowloris).
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
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
    pub limits: ServerLimits,
}

/// What one client may take of the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
}

/// PEM files of the server certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl FileServer {
    pub(crate) fn validate(&self) -> Result<ServerConfig, ConfigError> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "server.tls_key",
                    "required when server.tls_cert is set",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "server.tls_cert",
                    "required when server.tls_key is set",
                ))
            }
        };
        if let Some(admin) = self.admin_listen {
            if same_port(self.listen, admin) {
                return Err(invalid(
                    "server.admin_listen",
                    format!("{admin} collides with server.listen = {}", self.listen),
                ));
            }
        }
        Ok(ServerConfig {
            listen: self.listen,
            admin_listen: self.admin_listen,
            tls,
            dev_certs_dir: self.dev_certs_dir.clone(),
            shutdown_grace: bounds::millis("server.shutdown_grace_ms", self.shutdown_grace_ms)?,
            limits: ServerLimits {
                max_header_bytes: bounds::size("server.max_header_bytes", self.max_header_bytes)?,
                max_connections: bounds::size("server.max_connections", self.max_connections)?,
                handshake_timeout: bounds::millis(
                    "server.handshake_timeout_ms",
                    self.handshake_timeout_ms,
                )?,
                header_read_timeout: bounds::millis(
                    "server.header_read_timeout_ms",
                    self.header_read_timeout_ms,
                )?,
            },
        })
    }
}

/// Whether two listeners would claim the same port: the same fixed port on
/// the same address, or on any address when either is unspecified
/// (`0.0.0.0`). Port 0 picks a free port each time, so it never collides.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::super::testing::static_with;
    use super::*;

    #[test]
    fn listen_and_admin_listen_on_the_same_address_are_refused() {
        let err = static_with("server", "admin_listen = \"127.0.0.1:8443\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`server.admin_listen`"), "{err}");
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn an_unspecified_address_collides_with_any_address_on_its_port() {
        let any: SocketAddr = "0.0.0.0:8443".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:9091".parse().unwrap();
        let ephemeral: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(same_port(any, local));
        assert!(!same_port(local, other));
        assert!(!same_port(ephemeral, ephemeral));
    }

    #[test]
    fn a_listen_address_that_does_not_parse_names_the_key() {
        let err = static_with("server", "admin_listen = \"nonsense\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`server.admin_listen`"), "{err}");
    }
}
