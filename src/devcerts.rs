//! Development key material, created on first start when missing: a CA and a
//! server certificate for localhost/127.0.0.1/::1 (TLS), and an ES256 JWT
//! signing key with its public half as a JWKS (inbound auth, `dev-token`).
//! Private keys are written 0600 and git-ignored; the CA key is never stored.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// The dev CA certificate (trust it in clients).
pub const CA_CERT: &str = "ca.crt";
/// The dev server certificate.
pub const SERVER_CERT: &str = "server.crt";
/// The dev server private key.
pub const SERVER_KEY: &str = "server.key";
/// The dev JWT signing key (PKCS#8 PEM, P-256).
pub const SIGNING_KEY: &str = "jwt-signing.key";
/// The dev JWKS with the signing key's public half.
pub const JWKS: &str = "jwks.json";
/// The `kid` of the dev signing key.
pub const DEV_KID: &str = "koodrive-gateway-dev-1";

/// Failure to create or read development material.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("JWT key: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DevCertError + '_ {
    move |source| DevCertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates whatever development material is missing in `dir`.
pub fn ensure(dir: &Path) -> Result<(), DevCertError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    if [CA_CERT, SERVER_CERT, SERVER_KEY]
        .iter()
        .any(|f| !dir.join(f).exists())
    {
        create_tls_material(dir)?;
    }
    if [SIGNING_KEY, JWKS].iter().any(|f| !dir.join(f).exists()) {
        create_jwt_material(dir)?;
    }
    Ok(())
}

fn create_tls_material(dir: &Path) -> Result<(), DevCertError> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "koodrive-gateway development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_file(
        &dir.join(SERVER_KEY),
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&dir.join(SERVER_CERT), server_cert.pem().as_bytes(), false)?;
    write_file(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), false)?;
    Ok(())
}

fn create_jwt_material(dir: &Path) -> Result<(), DevCertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let pem = key.serialize_pem();
    let encoding = EncodingKey::from_ec_pem(pem.as_bytes())?;
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)?;
    jwk.common.key_id = Some(DEV_KID.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    let jwks = JwkSet { keys: vec![jwk] };
    let json = serde_json::to_vec_pretty(&jwks).map_err(|e| DevCertError::Io {
        path: dir.join(JWKS),
        source: e.into(),
    })?;
    write_file(&dir.join(SIGNING_KEY), pem.as_bytes(), true)?;
    write_file(&dir.join(JWKS), &json, false)?;
    Ok(())
}

/// Writes atomically (temp file + rename), private files with mode 0600.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), DevCertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Signs `claims` with the development key in `dir` (ES256, `kid` set).
pub fn sign_dev_token(dir: &Path, claims: &serde_json::Value) -> Result<String, DevCertError> {
    let path = dir.join(SIGNING_KEY);
    let pem = fs::read(&path).map_err(io_err(&path))?;
    let key = EncodingKey::from_ec_pem(&pem)?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(DEV_KID.to_owned());
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_creates_everything_once_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path()).unwrap();
        for f in [CA_CERT, SERVER_CERT, SERVER_KEY, SIGNING_KEY, JWKS] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        let before = fs::read(dir.path().join(SERVER_CERT)).unwrap();
        ensure(dir.path()).unwrap();
        assert_eq!(before, fs::read(dir.path().join(SERVER_CERT)).unwrap());
    }

    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path()).unwrap();
        for f in [SERVER_KEY, SIGNING_KEY] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others");
        }
    }

    #[test]
    fn jwks_holds_the_public_key_only() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path()).unwrap();
        let jwks: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(JWKS)).unwrap()).unwrap();
        let key = &jwks["keys"][0];
        assert_eq!(key["kid"], DEV_KID);
        assert_eq!(key["kty"], "EC");
        assert!(key.get("d").is_none(), "private part leaked into the JWKS");
    }
}
