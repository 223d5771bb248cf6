//! The verification key set: a standard JWKS document (RFC 7517) turned into
//! one `DecodingKey` per usable key, looked up by `kid`.

use std::path::Path;

use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// A JWKS that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a JWKS document: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the JWKS holds no usable signing key")]
    Empty,
}

/// One verification key.
struct Key {
    kid: Option<String>,
    /// The `alg` the key is restricted to, if the JWKS says.
    alg: Option<KeyAlgorithm>,
    key: DecodingKey,
}

/// The keys tokens may be verified with.
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

impl KeySet {
    /// Reads and parses a JWKS file.
    pub fn from_file(path: &Path) -> Result<KeySet, JwksError> {
        let bytes = std::fs::read(path).map_err(|source| JwksError::Read {
            path: path.display().to_string(),
            source,
        })?;
        KeySet::from_json(&bytes)
    }

    /// Parses a JWKS document. Keys that are not for signatures, not
    /// supported, or symmetric (`oct`) are skipped: a public key set must
    /// never hold a shared secret.
    pub fn from_json(bytes: &[u8]) -> Result<KeySet, JwksError> {
        let set: JwkSet = serde_json::from_slice(bytes)?;
        let keys: Vec<Key> = set
            .keys
            .iter()
            .filter(|jwk| jwk.is_supported())
            .filter(|jwk| !matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature))
            .filter(|jwk| !matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)))
            .filter_map(|jwk| {
                DecodingKey::from_jwk(jwk).ok().map(|key| Key {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm,
                    key,
                })
            })
            .collect();
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        Ok(KeySet { keys })
    }

    /// The key for a token signed with `alg` and carrying `kid`. Without a
    /// `kid`, only an unambiguous key (exactly one of the right family) is
    /// used. A key never verifies an algorithm outside its family or other
    /// than the `alg` the JWKS pins it to.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        let usable = |k: &&Key| {
            k.key.family() == alg.family() && k.alg.is_none_or(|a| a == KeyAlgorithm::from(alg))
        };
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(usable)
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key),
            None => {
                let mut candidates = self.keys.iter().filter(usable);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(&only.key),
                    _ => None,
                }
            }
        }
    }
}
