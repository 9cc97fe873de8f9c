//! The server address a client connects to: `host:port`, where the host is an IP address
//! (`10.0.0.10:4433`, `[2001:db8::1]:4433`) or a DNS name (`localhost:4433`,
//! `fedlora-server.fedlora.svc:4433`). Names are resolved at every connection attempt, so a client
//! follows a Kubernetes service or a DNS change across reconnections.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer};

/// A checked `host:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerAddr {
    text: String,
    host: String,
    port: u16,
}

impl fmt::Debug for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<SocketAddr> for ServerAddr {
    fn from(a: SocketAddr) -> Self {
        ServerAddr {
            text: a.to_string(),
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::str::FromStr for ServerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = |why: &str| {
            Err(format!(
                "`{s}` is not a server address: {why} (write host:port, e.g. 10.0.0.10:4433, localhost:4433 or fedlora-server.fedlora.svc:4433)"
            ))
        };
        let Some((host, port)) = s.rsplit_once(':') else {
            return bad("no port");
        };
        let Ok(port) = port.parse::<u16>() else {
            return bad("the port is not a number in 1..=65535");
        };
        if port == 0 {
            return bad("port 0");
        }
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(valid_label) {
            return bad("the host is neither an IP address nor a DNS name");
        }
        Ok(ServerAddr {
            text: s.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for ServerAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl ServerAddr {
    /// The host part (an IP address or a name).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Resolves the address (DNS for names; immediate for IP addresses), IPv4 first.
    pub async fn resolve(&self) -> std::io::Result<SocketAddr> {
        if let Ok(a) = self.text.parse::<SocketAddr>() {
            return Ok(a);
        }
        let mut found: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        found.sort_by_key(|a| !a.is_ipv4());
        found.into_iter().next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} resolves to no address", self.host),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses_and_names_parse_and_nonsense_is_refused() {
        for ok in [
            "10.0.0.10:4433",
            "[::1]:4433",
            "localhost:4433",
            "fedlora-server.fedlora.svc.cluster.local:4433",
        ] {
            let a: ServerAddr = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(a.to_string(), ok);
        }
        for bad in ["localhost", "host:0", "host:http", ":4433", "a b:1", "-x:1"] {
            let e = bad.parse::<ServerAddr>().expect_err(bad);
            assert!(e.contains("host:port"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn localhost_resolves() {
        let a: ServerAddr = "localhost:4433".parse().expect("parse");
        let r = a.resolve().await.expect("resolve");
        assert_eq!(r.port(), 4433);
        assert!(r.ip().is_loopback());
    }
}
