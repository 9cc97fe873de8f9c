//! Long-term Ed25519 identities: key generation and files, the server's enrollment registry, and
//! the signatures clients put on their hello and on their ephemeral protocol keys.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Domain separator for the connection hello signature.
pub const HELLO_CONTEXT: &[u8] = b"fedlora/hello/v1\0";
/// Domain separator for signatures on advertised ephemeral protocol keys.
pub const ADVERTISE_CONTEXT: &[u8] = b"fedlora/advertise-keys/v1\0";

/// Errors handling identity keys.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a key file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key is not 64 hex digits.
    #[error("malformed key: expected 64 hex digits")]
    Malformed,
    /// A public key is not a valid Ed25519 point.
    #[error("invalid Ed25519 public key")]
    InvalidPublicKey,
    /// The key file exists already and overwriting was not asked for.
    #[error("{0} exists; refusing to overwrite an identity")]
    Exists(String),
    /// Two enrolled clients share a name or a key.
    #[error("duplicate enrollment: {0}")]
    Duplicate(String),
}

/// A client's long-term Ed25519 signing key. Zeroized on drop; Debug shows only the public key.
pub struct IdentityKey(SigningKey);

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IdentityKey(public={}, secret=[redacted])",
            self.public().to_hex()
        )
    }
}

impl IdentityKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(seed.as_mut());
        Self(SigningKey::from_bytes(&seed))
    }

    /// The key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// Parses the hex seed (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, IdentityError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), seed.as_mut()).map_err(|_| IdentityError::Malformed)?;
        Ok(Self::from_seed(&seed))
    }

    /// Reads a secret key file written by [`IdentityKey::write_files`].
    pub fn read_file(path: &Path) -> Result<Self, IdentityError> {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Self::from_hex(&text)
    }

    /// Writes `<stem>.key` (hex seed, mode 0600) and `<stem>.pub` (hex public key).
    pub fn write_files(&self, stem: &Path, overwrite: bool) -> Result<(), IdentityError> {
        let key_path = stem.with_extension("key");
        let pub_path = stem.with_extension("pub");
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Io { path, source }
        };
        if !overwrite && key_path.exists() {
            return Err(IdentityError::Exists(key_path.display().to_string()));
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&key_path).map_err(io(&key_path))?;
        let secret = Zeroizing::new(hex::encode(self.0.to_bytes()));
        file.write_all(secret.as_bytes()).map_err(io(&key_path))?;
        file.write_all(b"\n").map_err(io(&key_path))?;
        file.sync_all().map_err(io(&key_path))?;
        std::fs::write(&pub_path, format!("{}\n", self.public().to_hex()))
            .map_err(io(&pub_path))?;
        Ok(())
    }

    /// The 32-byte seed (secret; zeroized when dropped).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity(self.0.verifying_key())
    }

    /// Signs `context || message`.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> [u8; 64] {
        let mut buf = Vec::with_capacity(context.len() + message.len());
        buf.extend_from_slice(context);
        buf.extend_from_slice(message);
        self.0.sign(&buf).to_bytes()
    }
}

/// An enrolled client's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicIdentity(VerifyingKey);

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({})", self.to_hex())
    }
}

impl PublicIdentity {
    /// Parses 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| IdentityError::InvalidPublicKey)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, IdentityError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| IdentityError::Malformed)?;
        Self::from_bytes(&bytes)
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// Verifies a signature over `context || message` (strict: no malleable encodings).
    pub fn verify(&self, context: &[u8], message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(signature) else {
            return false;
        };
        let mut buf = Vec::with_capacity(context.len() + message.len());
        buf.extend_from_slice(context);
        buf.extend_from_slice(message);
        self.0
            .verify_strict(&buf, &Signature::from_bytes(&sig))
            .is_ok()
    }
}

/// The server's registry of enrolled client identities. Unknown keys are refused.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    entries: Vec<(String, PublicIdentity)>,
}

impl Registry {
    /// Builds the registry from (name, public key) pairs; names and keys must be unique.
    pub fn new(
        entries: impl IntoIterator<Item = (String, PublicIdentity)>,
    ) -> Result<Self, IdentityError> {
        let mut names = HashMap::new();
        let mut out = Vec::new();
        for (name, key) in entries {
            if names.insert(name.clone(), ()).is_some() {
                return Err(IdentityError::Duplicate(format!("name {name}")));
            }
            if out
                .iter()
                .any(|(_, k): &(String, PublicIdentity)| *k == key)
            {
                return Err(IdentityError::Duplicate(format!("key of {name}")));
            }
            out.push((name, key));
        }
        Ok(Self { entries: out })
    }

    /// The enrolled name for a presented key, comparing every entry in constant time.
    pub fn lookup(&self, presented: &[u8; 32]) -> Option<(&str, PublicIdentity)> {
        let mut found = None;
        for (name, key) in &self.entries {
            if bool::from(key.to_bytes().ct_eq(presented)) {
                found = Some((name.as_str(), *key));
            }
        }
        found
    }

    /// Number of enrolled identities.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nobody is enrolled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_domain_separation() {
        let k = IdentityKey::generate();
        let sig = k.sign(HELLO_CONTEXT, b"abc");
        assert!(k.public().verify(HELLO_CONTEXT, b"abc", &sig));
        assert!(!k.public().verify(ADVERTISE_CONTEXT, b"abc", &sig));
        assert!(!k.public().verify(HELLO_CONTEXT, b"abd", &sig));
        assert!(!k.public().verify(HELLO_CONTEXT, b"abc", &sig[..63]));
        let other = IdentityKey::generate();
        assert!(!other.public().verify(HELLO_CONTEXT, b"abc", &sig));
    }

    #[test]
    fn debug_is_redacted() {
        let k = IdentityKey::from_seed(&[7u8; 32]);
        let d = format!("{k:?}");
        assert!(d.contains("[redacted]"));
        assert!(!d.contains(&hex::encode([7u8; 32])));
    }

    #[test]
    fn files_round_trip_and_refuse_overwrite() {
        let dir = std::env::temp_dir().join(format!("fedlora-id-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let stem = dir.join("alice");
        let k = IdentityKey::generate();
        k.write_files(&stem, false).expect("write");
        let back = IdentityKey::read_file(&stem.with_extension("key")).expect("read");
        assert_eq!(back.public(), k.public());
        let pub_text = std::fs::read_to_string(stem.with_extension("pub")).expect("pub");
        assert_eq!(
            PublicIdentity::from_hex(&pub_text).expect("parse"),
            k.public()
        );
        assert!(matches!(
            k.write_files(&stem, false),
            Err(IdentityError::Exists(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(stem.with_extension("key"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn registry_lookup_and_duplicates() {
        let a = IdentityKey::generate().public();
        let b = IdentityKey::generate().public();
        let reg = Registry::new([("a".to_string(), a), ("b".to_string(), b)]).expect("registry");
        assert_eq!(reg.lookup(&b.to_bytes()).map(|(n, _)| n), Some("b"));
        assert!(reg
            .lookup(&IdentityKey::generate().public().to_bytes())
            .is_none());
        assert!(Registry::new([("a".to_string(), a), ("a".to_string(), b)]).is_err());
        assert!(Registry::new([("a".to_string(), a), ("b".to_string(), a)]).is_err());
    }

    #[test]
    fn malformed_hex_is_an_error_not_a_panic() {
        assert!(matches!(
            IdentityKey::from_hex("zz"),
            Err(IdentityError::Malformed)
        ));
        assert!(matches!(
            PublicIdentity::from_hex("00"),
            Err(IdentityError::Malformed)
        ));
    }
}
