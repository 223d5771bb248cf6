//! rustls configuration, one crypto provider (aws-lc-rs) for everything:
//! the inbound server (TLS 1.2/1.3, ALPN h2 + http/1.1, optional client
//! certificates; certificate, key and client CA reloadable) and the
//! upstream client (Mozilla roots plus an optional extra CA).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;

use crate::config::TlsFiles;

/// TLS material that could not be loaded; names the config key and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("`{key}` {path}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// rustls refused the pair (`with_single_cert` checks that the key
    /// matches the certificate).
    #[error("`server.tls_cert` {cert} and `server.tls_key` {key} do not form a pair: {reason}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The process's crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process default for rustls and jsonwebtoken.
/// Idempotent; called once from `main` (and by tests).
pub fn install_default_providers() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

fn file_error(key: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        key,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate of a PEM file, named by config `key` in errors.
pub fn read_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(key, path, e))?;
    parse_certs(key, path, &pem)
}

/// Every certificate of PEM text read from `path`.
fn parse_certs(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, e))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "no certificate found"));
    }
    Ok(certs)
}

/// The inbound TLS: the server's certificate and key and, with
/// `client_ca`, the verifier of client certificates. A reload swaps either
/// for new connections only; a file that fails its checks leaves the
/// current one serving.
pub struct ServerTls {
    files: TlsFiles,
    /// The certificate every handshake presents (through [`CurrentCert`]).
    cert: Arc<CurrentCert>,
    /// What a new connection's handshake uses; replaced when `client_ca`
    /// changes (the certificate is swapped inside, in place).
    config: Arc<ArcSwap<ServerConfig>>,
    /// The bytes last loaded, so that a reload of unchanged files is a
    /// no-op.
    loaded: Mutex<Loaded>,
}

#[derive(Default)]
struct Loaded {
    cert: Vec<u8>,
    client_ca: Vec<u8>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Whether a reload replaced what was serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold what is already serving.
    Unchanged,
    /// New connections use the new files.
    Replaced,
}

impl ServerTls {
    /// Loads the certificate, its key and the client CA, refusing what a
    /// reload would refuse.
    pub fn load(files: &TlsFiles) -> Result<ServerTls, TlsError> {
        let (cert_bytes, certified) = load_certified(files, &[])?.ok_or_else(|| {
            file_error(
                "server.tls_cert",
                &files.cert,
                "empty certificate and key files",
            )
        })?;
        let cert = Arc::new(CurrentCert(ArcSwap::from_pointee(certified)));
        let (client_ca, verifier) = match &files.client_ca {
            Some(path) => {
                let bytes =
                    std::fs::read(path).map_err(|e| file_error("server.client_ca", path, e))?;
                let verifier = client_verifier(path, &bytes)?;
                (bytes, Some(verifier))
            }
            None => (Vec::new(), None),
        };
        let config = build_config(Arc::clone(&cert), verifier)?;
        Ok(ServerTls {
            files: files.clone(),
            cert,
            config: Arc::new(ArcSwap::new(config)),
            loaded: Mutex::new(Loaded {
                cert: cert_bytes,
                client_ca,
            }),
        })
    }

    /// What new connections' handshakes use, swapped by reloads.
    pub(crate) fn acceptor_config(&self) -> Arc<ArcSwap<ServerConfig>> {
        Arc::clone(&self.config)
    }

    /// Whether client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The serving certificate's end of validity (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        let certified = self.cert.0.load();
        let der = certified.cert.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(parsed.validity().not_after.timestamp())
    }

    /// Reads the certificate and key again; swaps them in when they
    /// changed and pass the checks of [`ServerTls::load`].
    pub fn reload_cert(&self) -> Result<Reloaded, TlsError> {
        // Under the lock from the read to the swap, so that two reloads
        // at once cannot leave an older read serving.
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let (bytes, certified) = match load_certified(&self.files, &loaded.cert)? {
            Some(new) => new,
            None => return Ok(Reloaded::Unchanged),
        };
        self.cert.0.store(Arc::new(certified));
        loaded.cert = bytes;
        Ok(Reloaded::Replaced)
    }

    /// Reads `client_ca` again; new handshakes verify against it when it
    /// changed and holds at least one usable CA certificate.
    pub fn reload_client_ca(&self) -> Result<Reloaded, TlsError> {
        let Some(path) = &self.files.client_ca else {
            return Ok(Reloaded::Unchanged);
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = std::fs::read(path).map_err(|e| file_error("server.client_ca", path, e))?;
        if bytes == loaded.client_ca {
            return Ok(Reloaded::Unchanged);
        }
        let verifier = client_verifier(path, &bytes)?;
        let config = build_config(Arc::clone(&self.cert), Some(verifier))?;
        self.config.store(config);
        loaded.client_ca = bytes;
        Ok(Reloaded::Replaced)
    }

    /// The files this reads, for a watcher.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        paths
    }
}

/// The inbound server configuration, fixed (the emulator and test servers;
/// the gateway's own is a [`ServerTls`]).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(ServerTls::load(files)?.config.load_full())
}

/// The certificate every handshake presents, swapped whole on reload.
#[derive(Debug)]
struct CurrentCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn build_config(
    cert: Arc<CurrentCert>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads the chain and its key, each file once, unless together they are
/// `unchanged`; what was read must parse, form a pair, and the certificate
/// must not have expired. Returns the bytes read (for the next comparison)
/// with the pair.
fn load_certified(
    files: &TlsFiles,
    unchanged: &[u8],
) -> Result<Option<(Vec<u8>, CertifiedKey)>, TlsError> {
    let cert_pem =
        std::fs::read(&files.cert).map_err(|e| file_error("server.tls_cert", &files.cert, e))?;
    let key_pem =
        std::fs::read(&files.key).map_err(|e| file_error("server.tls_key", &files.key, e))?;
    let bytes = [cert_pem.as_slice(), key_pem.as_slice()].concat();
    if bytes == unchanged {
        return Ok(None);
    }
    let chain = parse_certs("server.tls_cert", &files.cert, &cert_pem)?;
    check_validity("server.tls_cert", &files.cert, &chain[0])?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| file_error("server.tls_key", &files.key, e))?;
    // Refuses a key that does not match the certificate's public key.
    let certified =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })?;
    Ok(Some((bytes, certified)))
}

/// A certificate that has expired is refused: serving it would fail every
/// handshake.
fn check_validity(
    key: &'static str,
    path: &Path,
    cert: &CertificateDer<'_>,
) -> Result<(), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| file_error(key, path, format!("certificate does not parse: {e}")))?;
    let not_after = parsed.validity().not_after;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if not_after.timestamp() < now {
        let when = not_after
            .to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| not_after.to_string());
        return Err(file_error(
            key,
            path,
            format!("certificate expired at {when}"),
        ));
    }
    Ok(())
}

/// A verifier requiring a client certificate that chains to one of the
/// certificates of `pem` (the contents of `client_ca` at `path`).
fn client_verifier(path: &Path, pem: &[u8]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs("server.client_ca", path, pem)? {
        roots
            .add(cert)
            .map_err(|e| file_error("server.client_ca", path, e))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| file_error("server.client_ca", path, e))
}

/// Who a verified client certificate names: its first URI subject
/// alternative name (a SPIFFE id in a mesh), else its first DNS name.
pub(crate) fn client_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
    };
    uri.or_else(dns).map(str::to_owned)
}

/// The upstream client configuration: Mozilla's roots, plus `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in read_certs("upstream.ca_file", path)? {
            roots
                .add(cert)
                .map_err(|e| file_error("upstream.ca_file", path, e))?;
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

    /// A self-signed certificate with `params`, and its key, written to
    /// `dir` as `name.crt` and `name.key`.
    fn write_pair(
        dir: &Path,
        name: &str,
        params: CertificateParams,
    ) -> (PathBuf, PathBuf, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path, key)
    }

    fn files(cert: PathBuf, key: PathBuf) -> TlsFiles {
        TlsFiles {
            cert,
            key,
            client_ca: None,
        }
    }

    fn localhost() -> CertificateParams {
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap()
    }

    #[test]
    fn an_expired_certificate_is_refused_with_its_date() {
        install_default_providers();
        let dir = tempfile::tempdir().unwrap();
        let mut params = localhost();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let (cert, key, _) = write_pair(dir.path(), "old", params);
        let error = ServerTls::load(&files(cert, key)).unwrap_err().to_string();
        assert!(error.contains("`server.tls_cert`"), "{error}");
        assert!(error.contains("expired at 2021-01-01T00:00:00Z"), "{error}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        install_default_providers();
        let dir = tempfile::tempdir().unwrap();
        let (cert, _, _) = write_pair(dir.path(), "a", localhost());
        let (_, other_key, _) = write_pair(dir.path(), "b", localhost());
        let error = ServerTls::load(&files(cert, other_key))
            .unwrap_err()
            .to_string();
        assert!(error.contains("do not form a pair"), "{error}");
    }

    #[test]
    fn a_reload_swaps_only_a_changed_and_valid_pair() {
        install_default_providers();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = write_pair(dir.path(), "server", localhost());
        let tls = ServerTls::load(&files(cert.clone(), key.clone())).unwrap();
        let serving = || tls.cert.0.load_full().cert[0].clone();
        let first = serving();
        assert_eq!(tls.reload_cert().unwrap(), Reloaded::Unchanged);
        std::fs::write(&cert, "garbage").unwrap();
        assert!(tls.reload_cert().is_err());
        assert_eq!(serving(), first, "the refused file changed nothing");
        write_pair(dir.path(), "server", localhost());
        assert_eq!(tls.reload_cert().unwrap(), Reloaded::Replaced);
        assert_ne!(serving(), first);
    }

    #[test]
    fn the_client_identity_is_the_uri_name_else_the_dns_name() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut both = CertificateParams::new(vec!["app.internal".to_owned()]).unwrap();
        both.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        ));
        let both = both.self_signed(&key).unwrap();
        assert_eq!(
            client_identity(both.der()).as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/b")
        );
        let dns = CertificateParams::new(vec!["app.internal".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(client_identity(dns.der()).as_deref(), Some("app.internal"));
        let none = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(client_identity(none.der()), None);
    }
}
