//! TLS 1.3 (rustls on ring) for QUIC: the server certificate (from config, or generated on first
//! start with rcgen and persisted), and the client's pin on the server certificate's SHA-256
//! fingerprint, or on a CA.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a certificate or key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A PEM file did not hold what was expected.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the configuration.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A fingerprint is not 64 hex digits.
    #[error("malformed certificate fingerprint: expected 64 hex digits (SHA-256)")]
    BadFingerprint,
    /// Only one of `cert` and `key` was configured.
    #[error("tls.cert and tls.key must be given together")]
    HalfConfigured,
}

/// The server's certificate chain and private key.
pub struct ServerCert {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("fingerprint", &hex::encode(self.fingerprint()))
            .field("key", &"[redacted]")
            .finish()
    }
}

impl ServerCert {
    /// SHA-256 of the leaf certificate (DER): what clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.chain
            .first()
            .map(|c| fingerprint(c))
            .unwrap_or([0; 32])
    }

    /// A certificate chain and key given directly (e.g. issued by a CA).
    pub fn from_parts(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Self { chain, key }
    }

    /// A fresh self-signed certificate for `names`, kept in memory only (tests, benchmarks, demo).
    pub fn generate(names: &[String]) -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
        Ok(Self {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
    }

    /// The configured certificate and key (PEM), or else `dir/server.crt.pem` + `dir/server.key.pem`,
    /// generated (and persisted, key mode 0600) on first start.
    pub fn load_or_generate(
        cert: Option<&Path>,
        key: Option<&Path>,
        dir: &Path,
        names: &[String],
    ) -> Result<Self, TlsError> {
        match (cert, key) {
            (Some(c), Some(k)) => return Self::load(c, k),
            (None, None) => {}
            _ => return Err(TlsError::HalfConfigured),
        }
        let cert_path = dir.join("server.crt.pem");
        let key_path = dir.join("server.key.pem");
        if cert_path.exists() && key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
        let key_pem = zeroize::Zeroizing::new(ck.signing_key.serialize_pem());
        write_private(&key_path, key_pem.as_bytes())?;
        write_atomic(&cert_path, ck.cert.pem().as_bytes())?;
        tracing::info!(path = %cert_path.display(), "generated a self-signed server certificate");
        Self::load(&cert_path, &key_path)
    }

    /// Reads a PEM certificate chain and a PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_err = |p: &Path, reason: String| TlsError::Pem {
            path: p.display().to_string(),
            reason,
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err(cert, "no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e.to_string()))?;
        Ok(Self { chain, key })
    }

    /// The rustls server configuration (TLS 1.3 only, ALPN `fedlora/1`, no client certificates:
    /// clients authenticate with their Ed25519 identity inside the connection).
    pub fn rustls_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
        Ok(cfg)
    }
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// Parses a fingerprint written as 64 hex digits, optionally with `:` separators.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], TlsError> {
    let clean: String = text.trim().chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(clean, &mut out).map_err(|_| TlsError::BadFingerprint)?;
    Ok(out)
}

/// The ring crypto provider (no aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a client decides to trust the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Exactly this leaf certificate (SHA-256 of its DER).
    Pin([u8; 32]),
    /// Any certificate for the server name issued by these CA certificates.
    Ca(Vec<CertificateDer<'static>>),
}

impl ServerTrust {
    /// Reads CA certificates from a PEM file.
    pub fn ca_from_file(path: &Path) -> Result<Self, TlsError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Pem {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self::Ca(certs))
    }
}

/// The certificate fingerprint a server presented to a pinning client, kept so that a refused
/// handshake can say which certificate it got ("expected X, presented Y").
#[derive(Debug, Clone, Default)]
pub struct Presented(Arc<std::sync::Mutex<Option<[u8; 32]>>>);

impl Presented {
    /// The fingerprint of the last certificate presented, if a handshake got that far.
    pub fn get(&self) -> Option<[u8; 32]> {
        self.0.lock().ok().and_then(|g| *g)
    }

    fn set(&self, fp: [u8; 32]) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(fp);
        }
    }
}

/// The rustls client configuration for a trust decision.
pub fn client_rustls_config(trust: &ServerTrust) -> Result<rustls::ClientConfig, TlsError> {
    client_rustls_config_seen(trust, &Presented::default())
}

/// [`client_rustls_config`] that records the presented certificate's fingerprint in `seen`.
pub fn client_rustls_config_seen(
    trust: &ServerTrust,
    seen: &Presented,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match trust {
        ServerTrust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                pin: *pin,
                provider: provider(),
                seen: seen.clone(),
            }))
            .with_no_client_auth(),
        ServerTrust::Ca(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca.clone())?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(cfg)
}

/// Accepts exactly one server certificate, identified by the SHA-256 of its DER (constant-time
/// compare). The handshake signature is still verified, so the peer must hold the pinned key.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    seen: Presented,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity);
        self.seen.set(presented);
        if bool::from(presented.ct_eq(&self.pin)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.display().to_string();
    move |source| TlsError::Io { path, source }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    crate::store::write_atomic(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("fedlora-tls-{}", rand::random::<u64>()));
        let names = vec!["localhost".to_string()];
        let a = ServerCert::load_or_generate(None, None, &dir, &names).expect("generate");
        let b = ServerCert::load_or_generate(None, None, &dir, &names).expect("reload");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.rustls_config().is_ok());
        let dbg = format!("{a:?}");
        assert!(dbg.contains("[redacted]") && !dbg.contains("PRIVATE"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn half_configured_is_refused() {
        let p = Path::new("/nonexistent");
        assert!(matches!(
            ServerCert::load_or_generate(Some(p), None, p, &[]),
            Err(TlsError::HalfConfigured)
        ));
    }

    #[test]
    fn fingerprint_parsing() {
        let fp = [0xabu8; 32];
        assert_eq!(parse_fingerprint(&hex::encode(fp)).expect("plain"), fp);
        let colons = fp
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&colons).expect("colons"), fp);
        assert!(parse_fingerprint("abcd").is_err());
    }

    #[test]
    fn pin_verifier_accepts_only_the_pinned_cert() {
        let a = ServerCert::generate(&["localhost".into()]).expect("a");
        let b = ServerCert::generate(&["localhost".into()]).expect("b");
        let v = PinnedCert {
            pin: a.fingerprint(),
            provider: provider(),
            seen: Presented::default(),
        };
        let name = ServerName::try_from("localhost").expect("name");
        assert!(v
            .verify_server_cert(&a.chain[0], &[], &name, &[], UnixTime::now())
            .is_ok());
        assert!(v
            .verify_server_cert(&b.chain[0], &[], &name, &[], UnixTime::now())
            .is_err());
    }
}
