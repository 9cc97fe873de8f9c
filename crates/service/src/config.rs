//! Configuration files (TOML). Unknown fields are errors, every optional field has a default from
//! a function, and secrets never appear in `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::identity::{IdentityError, IdentityKey, PublicIdentity, Registry};
use crate::tls::{parse_fingerprint, ServerTrust, TlsError};

/// Errors loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has unknown fields, or wrong types.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Underlying error.
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// An identity key or enrollment entry is malformed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A TLS setting is malformed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A configuration file's content is invalid: the file, then what and how to fix it.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        source: Box<ConfigError>,
    },
}

/// A secret string (e.g. an inline identity key): zeroized on drop, `[redacted]` in Debug.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from)
    }
}

impl Secret {
    /// The secret text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("fedlora-data")
}
fn default_names() -> Vec<String> {
    vec!["localhost".to_string()]
}
fn default_rounds() -> u64 {
    1
}
fn default_min_clients() -> u32 {
    3
}
fn default_max_clients() -> u32 {
    100
}
fn default_join_timeout_ms() -> u64 {
    30_000
}
fn default_stage_timeout_ms() -> u64 {
    30_000
}
fn default_parameters() -> u32 {
    4096
}
fn default_join_grace_ms() -> u64 {
    500
}
fn default_expected_dropout() -> f64 {
    0.1
}
fn default_corrupt_fraction() -> f64 {
    0.05
}
fn default_security_bits() -> f64 {
    40.0
}
fn default_failure_bits() -> f64 {
    20.0
}
fn default_clip() -> f32 {
    1.0
}
fn default_min_quant_bits() -> u8 {
    16
}
fn default_upload_slots() -> u32 {
    crate::pacing::DEFAULT_UPLOAD_SLOTS
}
fn default_max_frame() -> u32 {
    crate::framing::DEFAULT_MAX_FRAME
}
fn default_server_name() -> String {
    "localhost".to_string()
}
fn default_seed() -> u64 {
    0
}
fn default_weight() -> u32 {
    1
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_reconnect_attempts() -> u32 {
    10
}
fn default_reconnect_delay_ms() -> u64 {
    1_000
}

/// `fedlora server` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address to listen on (an IP address of this host and a port).
    #[serde(default = "default_listen", deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// Directory for the SQLite store, aggregates, and a generated certificate.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// TLS settings.
    #[serde(default)]
    pub tls: ServerTlsConfig,
    /// Round schedule and deadlines.
    #[serde(default)]
    pub rounds: RoundsConfig,
    /// Parameters of the SecAgg+ protocol (derived per round from the number of clients).
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// Hard maximum frame size in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// QUIC receive window per client connection; default: the socket buffer shared among
    /// `rounds.max_clients` (see `quic::server_window`).
    #[serde(default)]
    pub receive_window_bytes: Option<u32>,
    /// How many clients may stream their masked vector at once (`pacing`); the others wait with
    /// their flow-control credit spent. 0 turns pacing off (every upload at once).
    #[serde(default = "default_upload_slots")]
    pub upload_slots: u32,
    /// Differential privacy (protocol-spec §7): the accountant, the budget and, for `central`
    /// mode only, the server's own noise. Absent means mode `none`.
    #[serde(default)]
    pub privacy: Option<fedlora_dp::PrivacyConfig>,
    /// Federated fine-tuning: the aggregation rule, the adapter layout and the training round
    /// deadlines. Absent: rounds sum raw vectors of `rounds.parameters` values.
    #[serde(default)]
    pub federation: Option<crate::federated::FederationSection>,
    /// Enrolled client identities.
    #[serde(default, rename = "client")]
    pub clients: Vec<EnrolledClient>,
}

/// Server TLS settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain; when absent one is generated in `data_dir` on first start.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// DNS names for a generated certificate.
    #[serde(default = "default_names")]
    pub names: Vec<String>,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            names: default_names(),
        }
    }
}

/// Round schedule and deadlines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsConfig {
    /// How many rounds to run (R).
    #[serde(default = "default_rounds")]
    pub count: u64,
    /// A round starts once this many enrolled clients are connected and ready.
    #[serde(default = "default_min_clients")]
    pub min_clients: u32,
    /// At most this many clients take part in a round.
    #[serde(default = "default_max_clients")]
    pub max_clients: u32,
    /// How long to wait for `min_clients` before giving up on the round.
    #[serde(default = "default_join_timeout_ms")]
    pub join_timeout_ms: u64,
    /// Once `min_clients` are connected, wait this long for more before starting.
    #[serde(default = "default_join_grace_ms")]
    pub join_grace_ms: u64,
    /// Per-stage deadline: clients that have not answered are dropped for the round.
    #[serde(default = "default_stage_timeout_ms")]
    pub stage_timeout_ms: u64,
    /// Number of adapter parameters aggregated per round (L).
    #[serde(default = "default_parameters")]
    pub parameters: u32,
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            count: default_rounds(),
            min_clients: default_min_clients(),
            max_clients: default_max_clients(),
            join_timeout_ms: default_join_timeout_ms(),
            join_grace_ms: default_join_grace_ms(),
            stage_timeout_ms: default_stage_timeout_ms(),
            parameters: default_parameters(),
        }
    }
}

/// Inputs to the SecAgg+ parameter derivation (protocol-spec §5): the degree, threshold and ring
/// width follow from these and the number of clients in the round.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolConfig {
    /// Expected fraction of clients dropping out during a round.
    #[serde(default = "default_expected_dropout")]
    pub expected_dropout: f64,
    /// Assumed fraction of clients colluding with the server.
    #[serde(default = "default_corrupt_fraction")]
    pub corrupt_fraction: f64,
    /// Privacy failure allowed: 2^-security_bits.
    #[serde(default = "default_security_bits")]
    pub security_bits: f64,
    /// Correctness failure allowed: 2^-failure_bits.
    #[serde(default = "default_failure_bits")]
    pub failure_bits: f64,
    /// Values are clipped into [-clip, clip].
    #[serde(default = "default_clip")]
    pub clip: f32,
    /// Largest client weight.
    #[serde(default = "default_weight")]
    pub weight_bound: u32,
    /// Minimum fixed-point precision in bits.
    #[serde(default = "default_min_quant_bits")]
    pub min_quant_bits: u8,
    /// Force a ring width (8, 16, 24 or 32) instead of the smallest that fits.
    #[serde(default)]
    pub ring_bits: Option<u8>,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        Self {
            expected_dropout: default_expected_dropout(),
            corrupt_fraction: default_corrupt_fraction(),
            security_bits: default_security_bits(),
            failure_bits: default_failure_bits(),
            clip: default_clip(),
            weight_bound: default_weight(),
            min_quant_bits: default_min_quant_bits(),
            ring_bits: None,
        }
    }
}

impl ProtocolConfig {
    /// The parameter request for a round of `clients` clients.
    pub fn request(&self, clients: u32) -> fedlora_secagg::ParamRequest {
        let mut r = fedlora_secagg::ParamRequest::new(clients);
        r.expected_dropout = self.expected_dropout;
        r.corrupt_fraction = self.corrupt_fraction;
        r.security_bits = self.security_bits;
        r.failure_bits = self.failure_bits;
        r.clip = self.clip;
        r.weight_bound = self.weight_bound;
        r.min_quant_bits = self.min_quant_bits;
        r.ring_bits = self.ring_bits;
        r
    }
}

/// One enrolled client: a name for the audit log and its Ed25519 public key (hex).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolledClient {
    /// Human-readable name (unique).
    pub name: String,
    /// Ed25519 public key, 64 hex digits (from `fedlora keygen`).
    pub public_key: String,
}

/// `listen`: a local IP address and port, with a message that says so.
fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "listen = \"{s}\" is not an IP address and port of this host: write e.g. \"0.0.0.0:4433\" (all IPv4 interfaces) or \"[::]:4433\""
        ))
    })
}

/// Parses a configuration file, resolves its relative paths against the file's directory and
/// validates it: the one load path of both the server and the client configuration.
fn load_file<T: serde::de::DeserializeOwned>(
    path: &Path,
    resolve_paths: fn(&mut T, &Path),
    validate: fn(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let mut cfg: T = parse_file(path)?;
    if let Some(base) = path.parent() {
        resolve_paths(&mut cfg, base);
    }
    validate(&cfg).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        source: Box::new(e),
    })?;
    Ok(cfg)
}

/// Parses and validates TOML text (no file-relative resolution).
fn parse_inline<T: serde::de::DeserializeOwned>(
    text: &str,
    validate: fn(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let cfg: T = toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: "<inline>".into(),
        source,
    })?;
    validate(&cfg)?;
    Ok(cfg)
}

impl ServerConfig {
    /// Reads and validates a server configuration file.
    /// Relative paths are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_file(path, Self::resolve_paths, Self::validate)
    }

    /// Parses TOML text (no file-relative resolution).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        parse_inline(text, Self::validate)
    }

    /// Checks every value (no side effect); also after command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::preflight::server_values(self)?;
        let r = &self.rounds;
        if r.min_clients < 2 {
            return Err(ConfigError::Invalid(
                "rounds.min_clients must be at least 2".into(),
            ));
        }
        if r.max_clients < r.min_clients {
            return Err(ConfigError::Invalid(
                "rounds.max_clients < rounds.min_clients".into(),
            ));
        }
        if r.parameters == 0 {
            return Err(ConfigError::Invalid(
                "rounds.parameters must be positive".into(),
            ));
        }
        if r.stage_timeout_ms == 0 || r.join_timeout_ms == 0 {
            return Err(ConfigError::Invalid("timeouts must be positive".into()));
        }
        if self.max_frame_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_frame_bytes must be at least 1024".into(),
            ));
        }
        if self.receive_window_bytes.is_some_and(|w| w < 16 << 10) {
            return Err(ConfigError::Invalid(
                "receive_window_bytes must be at least 16384".into(),
            ));
        }
        if self.upload_slots > crate::pacing::MAX_UPLOAD_SLOTS {
            return Err(ConfigError::Invalid(format!(
                "upload_slots must be at most {} (0 turns pacing off)",
                crate::pacing::MAX_UPLOAD_SLOTS
            )));
        }
        fedlora_secagg::derive(&self.protocol.request(r.min_clients))
            .map_err(|e| ConfigError::Invalid(format!("protocol: {e}")))?;
        if let Some(f) = &self.federation {
            f.validate()?;
        }
        self.registry()?;
        Ok(())
    }

    /// The enrollment registry.
    pub fn registry(&self) -> Result<Registry, ConfigError> {
        let entries = self
            .clients
            .iter()
            .map(|c| Ok((c.name.clone(), PublicIdentity::from_hex(&c.public_key)?)))
            .collect::<Result<Vec<_>, IdentityError>>()?;
        Ok(Registry::new(entries)?)
    }

    /// Resolves relative paths against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        self.data_dir = base.join(&self.data_dir);
        self.tls.cert = self.tls.cert.as_ref().map(|p| base.join(p));
        self.tls.key = self.tls.key.as_ref().map(|p| base.join(p));
        if let Some(f) = self.federation.as_mut() {
            f.resolve_paths(base);
        }
    }
}

/// `fedlora client` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Server address: `host:port` with an IP address or a DNS name (resolved at every connection
    /// attempt).
    pub server: crate::addr::ServerAddr,
    /// TLS server name to present (SNI).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// How to trust the server.
    pub trust: TrustConfig,
    /// The long-term identity key.
    pub identity: IdentityConfig,
    /// Where the client's contribution to plain (vector) rounds comes from. Required unless a
    /// `[train]` section is given: a client never contributes made-up values unless told to
    /// (`kind = "synthetic"`, for tests and demos).
    #[serde(default)]
    pub input: Option<InputConfig>,
    /// Differential privacy (protocol-spec §7): L2 clipping of the contribution and, in
    /// `distributed` or `local` mode, the noise this client adds inside its masks, calibrated from
    /// this section (never from the server). Absent means mode `none`.
    #[serde(default)]
    pub privacy: Option<fedlora_dp::PrivacyConfig>,
    /// Stop after this many rounds (default: until the server says done).
    #[serde(default)]
    pub max_rounds: Option<u64>,
    /// Connection establishment deadline.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// After a connection the server had admitted is lost, how many times in a row to try
    /// connecting again before giving up (0: exit at once, leaving restarts to a supervisor).
    #[serde(default = "default_reconnect_attempts")]
    pub reconnect_attempts: u32,
    /// Delay before the first reconnection attempt; it doubles per failed attempt, up to 30 s.
    #[serde(default = "default_reconnect_delay_ms")]
    pub reconnect_delay_ms: u64,
    /// Hard maximum frame size in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// Directory where received global states are written (atomically); none when absent.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Federated fine-tuning: what this client trains on and how (needed when the server runs a
    /// `[federation]`; `[input]` is then unused).
    #[serde(default)]
    pub train: Option<crate::federated::TrainSection>,
    /// The federation's enrolled identity keys (hex), obtained out of band. When given, the client
    /// refuses any round whose roster names a key not in this list, so a malicious server cannot
    /// slip in identities of its own to sign substituted keys (protocol-spec §8.3).
    #[serde(default)]
    pub known_peers: Vec<String>,
}

/// How a client trusts the server: exactly one of a pinned fingerprint or a CA file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// SHA-256 of the server certificate (DER), 64 hex digits (colons allowed).
    #[serde(default)]
    pub server_fingerprint: Option<String>,
    /// PEM file of CA certificates.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
}

impl TrustConfig {
    /// The trust decision.
    pub fn to_trust(&self) -> Result<ServerTrust, ConfigError> {
        match (&self.server_fingerprint, &self.ca_cert) {
            (Some(fp), None) => Ok(ServerTrust::Pin(parse_fingerprint(fp)?)),
            (None, Some(ca)) => Ok(ServerTrust::ca_from_file(ca)?),
            _ => Err(ConfigError::Invalid(
                "trust: give exactly one of server_fingerprint and ca_cert".into(),
            )),
        }
    }
}

/// The identity key: a file from `fedlora keygen`, or the hex seed inline (redacted in Debug).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Path to the `.key` file.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Inline hex seed (prefer `key_file`).
    #[serde(default)]
    pub key: Option<Secret>,
}

impl IdentityConfig {
    /// Loads the key.
    pub fn load(&self) -> Result<IdentityKey, ConfigError> {
        match (&self.key_file, &self.key) {
            (Some(p), None) => Ok(IdentityKey::read_file(p)?),
            (None, Some(s)) => Ok(IdentityKey::from_hex(s.expose())?),
            _ => Err(ConfigError::Invalid(
                "identity: give exactly one of key_file and key".into(),
            )),
        }
    }
}

/// The client's contribution per round.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum InputConfig {
    /// Deterministic pseudo-random values in [-0.5, 0.5) from a seed (demos and tests).
    Synthetic {
        /// Seed.
        #[serde(default = "default_seed")]
        seed: u64,
        /// Weight of this client in the weighted mean.
        #[serde(default = "default_weight")]
        weight: u32,
    },
    /// Little-endian f32 values from a file (the adapter delta in manifest order).
    File {
        /// Path.
        path: PathBuf,
        /// Weight of this client in the weighted mean.
        #[serde(default = "default_weight")]
        weight: u32,
    },
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig::Synthetic {
            seed: default_seed(),
            weight: default_weight(),
        }
    }
}

impl ClientConfig {
    /// Reads and validates a client configuration file; relative paths are resolved against the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_file(path, Self::resolve_paths, Self::validate)
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        parse_inline(text, Self::validate)
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.identity.key_file = self.identity.key_file.as_ref().map(|p| base.join(p));
        self.trust.ca_cert = self.trust.ca_cert.as_ref().map(|p| base.join(p));
        self.state_dir = self.state_dir.as_ref().map(|p| base.join(p));
        if let Some(InputConfig::File { path, .. }) = &mut self.input {
            *path = base.join(&*path);
        }
        if let Some(t) = self.train.as_mut() {
            // A data file or model directory named relative to the config file.
            for p in [Some(&mut t.task), t.model.as_mut()].into_iter().flatten() {
                let candidate = base.join(&*p);
                if !["spam", "gsm", "minilm", "smollm2"].contains(&p.as_str()) && candidate.exists()
                {
                    *p = candidate.display().to_string();
                }
            }
        }
    }

    /// Checks every value (no side effect); also after command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::preflight::client_values(self)?;
        if self.trust.server_fingerprint.is_some() == self.trust.ca_cert.is_some() {
            return Err(ConfigError::Invalid(
                "trust: give exactly one of server_fingerprint and ca_cert".into(),
            ));
        }
        if let Some(fp) = &self.trust.server_fingerprint {
            parse_fingerprint(fp)?;
        }
        if self.identity.key_file.is_some() == self.identity.key.is_some() {
            return Err(ConfigError::Invalid(
                "identity: give exactly one of key_file and key".into(),
            ));
        }
        if self.max_frame_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_frame_bytes must be at least 1024".into(),
            ));
        }
        self.known_peers()?;
        if let Some(t) = &self.train {
            t.validate()?;
        }
        Ok(())
    }

    /// The parsed `known_peers` list.
    pub fn known_peers(&self) -> Result<Vec<PublicIdentity>, ConfigError> {
        Ok(self
            .known_peers
            .iter()
            .map(|k| PublicIdentity::from_hex(k))
            .collect::<Result<Vec<_>, _>>()?)
    }
}

fn parse_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PK: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    #[test]
    fn server_defaults() {
        let cfg = ServerConfig::from_toml("").expect("empty config uses defaults");
        assert_eq!(cfg.listen, default_listen());
        assert_eq!(cfg.rounds.min_clients, 3);
        assert!(cfg.clients.is_empty());
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(matches!(
            ServerConfig::from_toml("lisen = \"1.2.3.4:5\""),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            ServerConfig::from_toml("[rounds]\ncont = 3"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn enrollment_is_validated() {
        let ok = format!("[[client]]\nname = \"a\"\npublic_key = \"{PK}\"\n");
        assert_eq!(
            ServerConfig::from_toml(&ok)
                .expect("ok")
                .registry()
                .expect("reg")
                .len(),
            1
        );
        let bad = "[[client]]\nname = \"a\"\npublic_key = \"1234\"\n";
        assert!(matches!(
            ServerConfig::from_toml(bad),
            Err(ConfigError::Identity(_))
        ));
        let dup = format!("{ok}{ok}");
        assert!(matches!(
            ServerConfig::from_toml(&dup),
            Err(ConfigError::Identity(_))
        ));
    }

    #[test]
    fn client_secret_is_redacted() {
        let seed = "11".repeat(32);
        let text = format!(
            "server = \"127.0.0.1:4433\"\n[trust]\nserver_fingerprint = \"{}\"\n[identity]\nkey = \"{seed}\"\n[input]\nkind = \"synthetic\"\n",
            "ab".repeat(32)
        );
        let cfg = ClientConfig::from_toml(&text).expect("parse");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains(&seed), "{dbg}");
        assert!(dbg.contains("[redacted]"));
        assert!(cfg.identity.load().is_ok());
        assert!(matches!(
            cfg.input,
            Some(InputConfig::Synthetic { seed: 0, weight: 1 })
        ));
    }

    #[test]
    fn a_client_without_input_or_train_is_refused() {
        let text = format!(
            "server = \"localhost:4433\"\n[trust]\nserver_fingerprint = \"{}\"\n[identity]\nkey = \"{}\"\n",
            "ab".repeat(32),
            "11".repeat(32)
        );
        let e = ClientConfig::from_toml(&text).expect_err("no input");
        assert!(e.to_string().contains("[input]"), "{e}");
        let e = ClientConfig::from_toml(&text.replace("localhost:4433", "localhost"))
            .expect_err("no port");
        assert!(e.to_string().contains("host:port"), "{e}");
    }

    #[test]
    fn client_needs_exactly_one_trust() {
        let text = "server = \"127.0.0.1:4433\"\n[trust]\n[identity]\nkey_file = \"x.key\"\n";
        assert!(matches!(
            ClientConfig::from_toml(text),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn range_checks() {
        assert!(ServerConfig::from_toml("[rounds]\nmin_clients = 1").is_err());
        assert!(ServerConfig::from_toml("[rounds]\nmin_clients = 5\nmax_clients = 4").is_err());
        assert!(ServerConfig::from_toml("max_frame_bytes = 10").is_err());
        assert!(ServerConfig::from_toml("upload_slots = 4097").is_err());
        let paced = ServerConfig::from_toml("").expect("defaults");
        assert_eq!(paced.upload_slots, crate::pacing::DEFAULT_UPLOAD_SLOTS);
        let unpaced = ServerConfig::from_toml("upload_slots = 0").expect("pacing off");
        assert_eq!(unpaced.upload_slots, 0);
    }
}
