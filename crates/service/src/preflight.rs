//! Everything a server or a client checks before its first side effect, so that a refused start
//! writes nothing: the values of the configuration (`*_values`, run by `validate` on every load and
//! after command-line overrides) and what needs the file system or the network (`preflight`: the
//! enrolled clients against `min_clients`, the data and state directories, certificates, key
//! files, input files, the listening address). Each message names the setting and the fix.

use std::path::Path;

use crate::config::{ClientConfig, ConfigError, InputConfig, ServerConfig};
use crate::ranges;

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// Bytes a masked-input frame carries beyond its words (header, message prefix), with margin.
const FRAME_OVERHEAD: u64 = 1024;

/// The most values one round may sum: the protocol's vector limit, less the weight word.
pub fn max_values() -> u64 {
    u64::from(fedlora_wire::MAX_VECTOR_WORDS) - 2
}

/// Checks that `values` per client (plus the weight word, at most 4 bytes a word) fit the protocol
/// and the frame limit; `what` names the setting that gives the count.
pub fn check_round_size(values: u64, max_frame_bytes: u32, what: &str) -> Result<(), ConfigError> {
    if values > max_values() {
        return Err(invalid(format!(
            "{what} gives {values} values per client, above the protocol's limit of {}: use a smaller adapter (rank, targets) or split it",
            max_values()
        )));
    }
    let frame = 4 * (values + 1) + FRAME_OVERHEAD;
    if frame > u64::from(max_frame_bytes) {
        return Err(invalid(format!(
            "{what} gives {values} values per client: masked-input frames of up to {frame} bytes, above max_frame_bytes = {max_frame_bytes}; raise max_frame_bytes on the server and the clients to at least {frame}"
        )));
    }
    Ok(())
}

/// The server configuration's values (no I/O).
pub fn server_values(cfg: &ServerConfig) -> Result<(), ConfigError> {
    let r = &cfg.rounds;
    ranges::rounds("rounds.count", r.count).map_err(invalid)?;
    ranges::timeout_ms("rounds.join_timeout_ms", r.join_timeout_ms).map_err(invalid)?;
    ranges::timeout_ms("rounds.stage_timeout_ms", r.stage_timeout_ms).map_err(invalid)?;
    ranges::int(
        "rounds.join_grace_ms",
        r.join_grace_ms,
        0,
        ranges::TIMEOUT_MS_MAX,
    )
    .map_err(invalid)?;
    if cfg.federation.is_none() {
        ranges::int(
            "rounds.parameters",
            u64::from(r.parameters),
            1,
            max_values(),
        )
        .map_err(invalid)?;
        check_round_size(
            u64::from(r.parameters),
            cfg.max_frame_bytes,
            "rounds.parameters",
        )?;
    }
    let p = &cfg.protocol;
    if !(p.clip.is_finite() && p.clip > 0.0) {
        return Err(invalid(format!(
            "protocol.clip must be a positive number, got {}",
            p.clip
        )));
    }
    if p.weight_bound == 0 {
        return Err(invalid(
            "protocol.weight_bound must be at least 1 (the largest weight a client may carry)",
        ));
    }
    if let Some(privacy) = &cfg.privacy {
        fedlora_dp::ServerPrivacy::new(privacy).map_err(|e| invalid(format!("[privacy]: {e}")))?;
    }
    for c in &cfg.clients {
        check_name(&c.name)?;
    }
    Ok(())
}

/// An enrolled client's name: shown in logs, summaries and the audit log, so printable.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "[[client]] name {name:?} must be 1 to 128 printable characters (no newlines or control characters)"
        )));
    }
    Ok(())
}

/// The `[[client]]` entry that enrolls `name` with `public_key` (hex), as TOML a server
/// configuration parses back to the same name (quotes, backslashes and the like escaped).
pub fn enrollment_entry(name: &str, public_key: &str) -> Result<String, ConfigError> {
    check_name(name)?;
    Ok(format!(
        "[[client]]\nname = {}\npublic_key = {}\n",
        toml_string(name),
        toml_string(public_key)
    ))
}

/// A TOML basic string: quotes and backslashes escaped, control characters as `\uXXXX`.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The client configuration's values (no I/O).
pub fn client_values(cfg: &ClientConfig) -> Result<(), ConfigError> {
    if cfg.input.is_none() && cfg.train.is_none() {
        return Err(invalid(
            "no [input] and no [train] section: say what this client contributes, either [input] kind = \"file\" with path = \"<little-endian f32 file>\" (an adapter delta), or a [train] section to fine-tune locally (kind = \"synthetic\" uploads made-up values: tests and demos only)",
        ));
    }
    if let Some(InputConfig::File { weight: 0, .. } | InputConfig::Synthetic { weight: 0, .. }) =
        &cfg.input
    {
        return Err(invalid("input.weight must be at least 1"));
    }
    if cfg.max_rounds == Some(0) {
        return Err(invalid(
            "max_rounds must be at least 1 (leave it out to stay until the server says done)",
        ));
    }
    ranges::timeout_ms("connect_timeout_ms", cfg.connect_timeout_ms).map_err(invalid)?;
    ranges::int(
        "reconnect_delay_ms",
        cfg.reconnect_delay_ms,
        0,
        ranges::TIMEOUT_MS_MAX,
    )
    .map_err(invalid)?;
    if let Some(p) = &cfg.privacy {
        p.resolve()
            .map_err(|e| invalid(format!("[privacy]: {e}")))?;
    }
    Ok(())
}

impl ServerConfig {
    /// What `serve` needs from the file system and the network, checked before it writes anything:
    /// enough enrolled clients for `rounds.min_clients`, a writable `data_dir`, readable
    /// certificates, the federation's layout and saved state, a free `listen` address.
    pub fn preflight(&self) -> Result<(), ConfigError> {
        self.validate()?;
        let enrolled = self.registry()?.len() as u32;
        if enrolled < self.rounds.min_clients {
            return Err(invalid(format!(
                "rounds.min_clients = {} but only {enrolled} client(s) are enrolled ([[client]] entries): no round could ever start; enroll more clients (`fedlora keygen` prints the entry) or lower rounds.min_clients",
                self.rounds.min_clients
            )));
        }
        crate::paths::check_writable_dir(&self.data_dir)
            .map_err(|e| invalid(format!("data_dir {e}")))?;
        match (&self.tls.cert, &self.tls.key) {
            (Some(c), Some(k)) => {
                crate::tls::ServerCert::load(c, k)?;
            }
            (None, None) => {
                let (c, k) = (
                    self.data_dir.join("server.crt.pem"),
                    self.data_dir.join("server.key.pem"),
                );
                if c.exists() && k.exists() {
                    crate::tls::ServerCert::load(&c, &k)?;
                }
            }
            _ => return Err(crate::tls::TlsError::HalfConfigured.into()),
        }
        if let Some(f) = &self.federation {
            let fed = crate::federated::ServerFederation::open(f.clone(), &self.data_dir)?;
            check_round_size(
                fed.train_values(),
                self.max_frame_bytes,
                "the federation's rule and layout",
            )?;
        }
        if self.listen.port() != 0 {
            std::net::UdpSocket::bind(self.listen).map_err(|e| {
                invalid(format!(
                    "listen = \"{}\": cannot bind this UDP address ({e}); is another server running on it?",
                    self.listen
                ))
            })?;
        }
        Ok(())
    }
}

impl ClientConfig {
    /// What the client needs before it connects: its identity key, the server's trust anchor, the
    /// input file (present, a whole number of finite f32 values) and a writable `state_dir`.
    pub fn preflight(&self) -> Result<(), ConfigError> {
        self.validate()?;
        self.identity.load()?;
        self.trust.to_trust()?;
        if let Some(InputConfig::File { path, .. }) = &self.input {
            check_input_file(path)?;
        }
        if let Some(dir) = &self.state_dir {
            crate::paths::check_writable_dir(dir).map_err(|e| invalid(format!("state_dir {e}")))?;
        }
        Ok(())
    }
}

/// An input file: readable, non-empty, a whole number of little-endian f32 values, all finite.
/// Returns the number of values.
pub fn check_input_file(path: &Path) -> Result<usize, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
        path: format!("input.path {}", path.display()),
        source,
    })?;
    if bytes.is_empty() || bytes.len() % 4 != 0 {
        return Err(invalid(format!(
            "input.path {}: {} bytes is not a whole, non-zero number of f32 values (4 bytes each, little-endian, in manifest order)",
            path.display(),
            bytes.len()
        )));
    }
    if let Some(i) = bytes
        .chunks_exact(4)
        .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
    {
        return Err(invalid(format!(
            "input.path {}: value {i} is not finite (NaN or infinite); an adapter delta must be finite",
            path.display()
        )));
    }
    Ok(bytes.len() / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enrollment_entry_parses_back_to_the_same_name() {
        let pk = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let name = r#"St. "Mary's" \ Ward 3"#;
        let entry = enrollment_entry(name, pk).expect("entry");
        let cfg = ServerConfig::from_toml(&entry).expect("parses");
        assert_eq!(cfg.clients[0].name, name);
        let e = enrollment_entry("a\nb", pk).expect_err("newline");
        assert!(e.to_string().contains("control characters"), "{e}");
        assert!(enrollment_entry("  ", pk).is_err());
    }
}
