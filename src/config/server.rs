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
    /// PEM CA certificates: when set, every client must present a
    /// certificate issued by one of them (mTLS).
    pub client_ca: Option<PathBuf>,
    /// When set, missing development material (CA, server certificate, JWT
    /// signing key and JWKS) is created in this directory at start-up.
    pub dev_certs_dir: Option<PathBuf>,
    /// How long in-flight requests may finish after SIGTERM/SIGINT
    /// (`shutdown_grace_ms` is its earlier name).
    #[serde(default = "defaults::drain_timeout_ms", alias = "shutdown_grace_ms")]
    pub drain_timeout_ms: u64,
    /// Plain-HTTP listener for `/healthz` and `/readyz`.
    pub admin_listen: Option<SocketAddr>,
    /// Reload the TLS, JWKS and token files when they change on disk
    /// (SIGHUP reloads them either way).
    #[serde(default = "defaults::watch_files")]
    pub watch_files: bool,
    /// Request line plus headers; beyond it, 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: u64,
    /// Open client connections; beyond it, accepting waits.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u64,
    /// A TLS handshake not finished by then is dropped.
    #[serde(default = "defaults::handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// A request head not received by then is dropped (slowloris); so is a
    /// connection that sends no request that long after its handshake.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Header fields per request; beyond it, 431.
    #[serde(default = "defaults::max_headers")]
    pub max_headers: u64,
    /// Path plus query; beyond it, 414.
    #[serde(default = "defaults::max_request_target_bytes")]
    pub max_request_target_bytes: u64,
    /// A connection with no request in flight for this long is closed.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A response the client has not taken in full by then (a closed
    /// HTTP/2 window, a full TCP window) closes its connection.
    #[serde(default = "defaults::send_timeout_ms")]
    pub send_timeout_ms: u64,
    /// HTTP/2 streams open at once on one connection.
    #[serde(default = "defaults::h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u64,
    /// HTTP/2 PING sent after this long without a frame from the client.
    #[serde(default = "defaults::h2_keepalive_interval_ms")]
    pub h2_keepalive_interval_ms: u64,
    /// A PING not answered by then closes the connection.
    #[serde(default = "defaults::h2_keepalive_timeout_ms")]
    pub h2_keepalive_timeout_ms: u64,
    /// Requests a client may cancel (HTTP/2 RST_STREAM) per second on one
    /// connection; beyond it, the connection is closed (rapid reset).
    #[serde(default = "defaults::h2_max_resets_per_second")]
    pub h2_max_resets_per_second: u64,
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
    /// Whether a change of the files on disk reloads them.
    pub watch_files: bool,
    /// How long in-flight requests may finish after a shutdown signal.
    pub drain_timeout: Duration,
    pub limits: ServerLimits,
}

/// What one client may take of the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_request_target_bytes: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    pub h2_max_resets_per_second: u32,
}

impl ServerLimits {
    /// The defaults of `[server]`: what the emulator and test servers use.
    pub const DEFAULT: ServerLimits = ServerLimits {
        max_header_bytes: defaults::max_header_bytes() as usize,
        max_headers: defaults::max_headers() as usize,
        max_request_target_bytes: defaults::max_request_target_bytes() as usize,
        max_connections: defaults::max_connections() as usize,
        handshake_timeout: Duration::from_millis(defaults::handshake_timeout_ms()),
        header_read_timeout: Duration::from_millis(defaults::header_read_timeout_ms()),
        idle_timeout: Duration::from_millis(defaults::idle_timeout_ms()),
        send_timeout: Duration::from_millis(defaults::send_timeout_ms()),
        h2_max_concurrent_streams: defaults::h2_max_concurrent_streams() as u32,
        h2_keepalive_interval: Duration::from_millis(defaults::h2_keepalive_interval_ms()),
        h2_keepalive_timeout: Duration::from_millis(defaults::h2_keepalive_timeout_ms()),
        h2_max_resets_per_second: defaults::h2_max_resets_per_second() as u32,
    };
}

/// PEM files of the server certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; `None` means no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

impl FileServer {
    pub(crate) fn validate(&self) -> Result<ServerConfig, ConfigError> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            }),
            (None, None) if self.client_ca.is_some() => return Err(invalid(
                "server.client_ca",
                "needs server.tls_cert and server.tls_key: client certificates are a part of TLS",
            )),
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
            watch_files: self.watch_files,
            tls,
            dev_certs_dir: self.dev_certs_dir.clone(),
            drain_timeout: bounds::millis("server.drain_timeout_ms", self.drain_timeout_ms)?,
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
                max_headers: bounds::size("server.max_headers", self.max_headers)?,
                max_request_target_bytes: bounds::size(
                    "server.max_request_target_bytes",
                    self.max_request_target_bytes,
                )?,
                idle_timeout: bounds::millis("server.idle_timeout_ms", self.idle_timeout_ms)?,
                send_timeout: bounds::millis("server.send_timeout_ms", self.send_timeout_ms)?,
                h2_max_concurrent_streams: bounds::count(
                    "server.h2_max_concurrent_streams",
                    self.h2_max_concurrent_streams,
                )?,
                h2_keepalive_interval: bounds::millis(
                    "server.h2_keepalive_interval_ms",
                    self.h2_keepalive_interval_ms,
                )?,
                h2_keepalive_timeout: bounds::millis(
                    "server.h2_keepalive_timeout_ms",
                    self.h2_keepalive_timeout_ms,
                )?,
                h2_max_resets_per_second: bounds::count(
                    "server.h2_max_resets_per_second",
                    self.h2_max_resets_per_second,
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
    fn client_certificates_without_tls_are_refused() {
        let plain = super::super::testing::STATIC
            .replace(
                "tls_cert = \"certs/dev/server.crt\"",
                "client_ca = \"ca.pem\"",
            )
            .replace("tls_key = \"certs/dev/server.key\"", "");
        let err = super::super::Config::from_toml(&plain)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`server.client_ca`"), "{err}");
        assert!(err.contains("server.tls_cert"), "{err}");
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
