//! The server secret: the key of every keyed hash the service stores or logs (verification codes
//! now; numbers and IP addresses in limiter keys and logs), so that a copy of the database reveals
//! neither codes nor whom they were for. Instances behind one database share it.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// The server secret. `Debug` never shows it.
#[derive(Clone)]
pub struct ServerSecret(Vec<u8>);

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecret(<redacted>)")
    }
}

/// A secret that is too short or unreadable.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Shorter than [`MIN_SECRET_BYTES`].
    #[error("the server secret must have at least {MIN_SECRET_BYTES} bytes (64 hex digits)")]
    TooShort,
    /// The file could not be read or written.
    #[error("server secret file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
}

impl ServerSecret {
    /// A secret from text (a hex string, or any string of at least 32 bytes).
    pub fn from_text(text: &str) -> Result<Self, SecretError> {
        let text = text.trim();
        let bytes = match hex::decode(text) {
            Ok(b) => b,
            Err(_) => text.as_bytes().to_vec(),
        };
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort);
        }
        Ok(Self(bytes))
    }

    /// Generates a fresh 32-byte secret.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(bytes.to_vec())
    }

    /// Reads the secret file at `path`.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_text(&text)
    }

    /// Writes the secret as hex to a new file with owner-only permissions.
    pub fn save(&self, path: &Path) -> Result<(), SecretError> {
        crate::fsutil::write_private(path, format!("{}\n", hex::encode(&self.0)).as_bytes())
            .map_err(|source| SecretError::Io {
                path: path.display().to_string(),
                source,
            })
    }

    fn mac(&self, domain: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        // Infallible: HMAC takes keys of any length.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(domain);
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    /// The keyed hash stored for `code` of verification `id`.
    pub fn code_hash(&self, id: &str, code: &str) -> Vec<u8> {
        self.mac(b"code", &[id.as_bytes(), code.as_bytes()])
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Whether `code` matches `stored`, compared in constant time.
    pub fn code_matches(&self, id: &str, code: &str, stored: &[u8]) -> bool {
        self.mac(b"code", &[id.as_bytes(), code.as_bytes()])
            .verify_slice(stored)
            .is_ok()
    }

    /// The keyed hash under which a bearer secret (a key transfer token) is stored: whoever reads
    /// the database cannot present it. Hex, 64 digits.
    pub fn token_id(&self, kind: &str, token: &str) -> String {
        hex::encode(
            self.mac(b"token", &[kind.as_bytes(), token.as_bytes()])
                .finalize()
                .into_bytes(),
        )
    }

    /// A short stable pseudonym for personal data (a number, an address) in logs and limiter
    /// keys: 16 hex digits of a keyed hash.
    pub fn pseudonym(&self, kind: &str, value: &str) -> String {
        let out = self
            .mac(b"pseudonym", &[kind.as_bytes(), value.as_bytes()])
            .finalize()
            .into_bytes();
        hex::encode(&out[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_hash_is_keyed_bound_to_the_verification_and_compared_exactly() {
        let s = ServerSecret::generate();
        let h = s.code_hash("v1", "123456");
        assert!(s.code_matches("v1", "123456", &h));
        assert!(!s.code_matches("v1", "123457", &h));
        assert!(!s.code_matches("v2", "123456", &h));
        assert!(!s.code_matches("v1", "12345", &h));
        assert!(!s.code_matches("v1", "123456", &h[..31]));
        let other = ServerSecret::generate();
        assert!(!other.code_matches("v1", "123456", &h));
        // Length-prefixing keeps ("v1", "23") and ("v12", "3") apart.
        assert_ne!(s.code_hash("v1", "23"), s.code_hash("v12", "3"));
    }

    #[test]
    fn short_secrets_are_refused_and_debug_is_redacted() {
        assert!(matches!(
            ServerSecret::from_text("abc"),
            Err(SecretError::TooShort)
        ));
        let s = ServerSecret::from_text(&"ab".repeat(32)).unwrap();
        assert_eq!(format!("{s:?}"), "ServerSecret(<redacted>)");
        assert_eq!(s.pseudonym("phone", "+1").len(), 16);
        assert_ne!(s.pseudonym("phone", "+1"), s.pseudonym("ip", "+1"));
    }

    #[test]
    fn saved_secret_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        let s = ServerSecret::generate();
        s.save(&p).unwrap();
        let l = ServerSecret::load(&p).unwrap();
        assert_eq!(s.code_hash("a", "1"), l.code_hash("a", "1"));
        assert!(s.save(&p).is_err());
    }
}
