//! QUIC endpoints (quinn on tokio, rustls on ring) shared by the server, the clients, the
//! benchmarks and the raw-throughput baseline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::pacing::Windows;
use crate::tls::{client_rustls_config_seen, Presented, ServerCert, ServerTrust, TlsError};

/// Errors setting up or using QUIC endpoints.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// rustls config unusable for QUIC (e.g. no TLS 1.3 suite).
    #[error("QUIC crypto config: {0}")]
    Crypto(String),
    /// Binding the UDP socket failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Starting a connection failed.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed (handshake, certificate, timeout, closed by peer).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

/// Transport settings: keep-alives so idle clients between rounds stay connected, and a
/// per-connection receive window of `window` bytes.
pub fn transport_config(window: u32) -> Arc<quinn::TransportConfig> {
    transport_config_windows(Windows::uniform(window))
}

/// A client's transport: a 16 MiB window for what the server sends (the global state), and an idle
/// timeout of [`CLIENT_IDLE_TIMEOUT`] (the shorter of both ends' applies): with keep-alives every
/// 5 s a live server never idles out, and a dead one is noticed within that time, after which the
/// client reconnects (`reconnect_attempts`).
pub fn client_transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = transport_config(16 << 20);
    if let Some(t) = Arc::get_mut(&mut t) {
        if let Ok(idle) = quinn::IdleTimeout::try_from(CLIENT_IDLE_TIMEOUT) {
            t.max_idle_timeout(Some(idle));
        }
    }
    t
}

/// How long a client waits for any packet from the server before it gives the connection up.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// [`transport_config`] with separate stream and connection receive windows: a paced server
/// (`pacing`) starts every connection at the idle window and opens it for an upload.
pub fn transport_config_windows(windows: Windows) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(60)) {
        t.max_idle_timeout(Some(idle));
    }
    t.stream_receive_window(quinn::VarInt::from_u32(windows.stream));
    t.receive_window(quinn::VarInt::from_u32(windows.idle));
    t.send_window(64 << 20);
    Arc::new(t)
}

/// Receive window a client connection gets from the server when `clients` may upload at once:
/// their in-flight bytes together stay within the socket buffer, so simultaneous uploads are paced
/// by flow control instead of by kernel drops and retransmissions. Between 16 KiB and 16 MiB.
pub fn server_window(clients: u32) -> u32 {
    let share = SOCKET_BUFFER_BYTES as u64 / 2 / u64::from(clients.max(1));
    share.clamp(16 << 10, 16 << 20) as u32
}

/// Socket buffer size asked for (the kernel caps it at `net.core.{r,w}mem_max`). The server
/// receives every client's upload on one UDP socket; with the default ~200 KiB buffer, simultaneous
/// uploads overflow it and QUIC has to resend what the kernel dropped.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// A UDP socket bound to `addr` with enlarged kernel buffers.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer only costs retransmissions.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    config: quinn::EndpointConfig,
) -> Result<quinn::Endpoint, QuicError> {
    let socket = udp_socket(addr).map_err(|source| QuicError::Bind { addr, source })?;
    let runtime = quinn::default_runtime().ok_or_else(|| QuicError::Bind {
        addr,
        source: std::io::Error::other("no async runtime"),
    })?;
    quinn::Endpoint::new(config, server, socket, runtime)
        .map_err(|source| QuicError::Bind { addr, source })
}

/// A server endpoint bound to `addr` presenting `cert`, giving each connection the receive
/// `windows` (see [`server_window`] and `pacing::Windows`).
pub fn server_endpoint(
    addr: SocketAddr,
    cert: &ServerCert,
    windows: Windows,
) -> Result<quinn::Endpoint, QuicError> {
    let crypto = QuicServerConfig::try_from(cert.rustls_config()?)
        .map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config_windows(windows));
    endpoint(addr, Some(cfg), quinn::EndpointConfig::default())
}

/// A client endpoint (ephemeral port, same address family as `server`) trusting the server as told.
pub fn client_endpoint(
    server: SocketAddr,
    trust: &ServerTrust,
) -> Result<quinn::Endpoint, QuicError> {
    client_endpoint_seen(server, trust, &Presented::default())
}

/// [`client_endpoint`] that records the certificate fingerprint the server presents in `seen`.
pub fn client_endpoint_seen(
    server: SocketAddr,
    trust: &ServerTrust,
    seen: &Presented,
) -> Result<quinn::Endpoint, QuicError> {
    let crypto = QuicClientConfig::try_from(client_rustls_config_seen(trust, seen)?)
        .map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(client_transport_config());
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let mut ep = endpoint(bind, None, quinn::EndpointConfig::default())?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connects and completes the handshake (certificate checked by the endpoint's trust).
pub async fn connect(
    ep: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, QuicError> {
    Ok(ep.connect(server, server_name)?.await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_shares_the_socket_buffer() {
        assert_eq!(server_window(1), (SOCKET_BUFFER_BYTES / 2) as u32);
        assert_eq!(server_window(100), 41_943);
        assert_eq!(server_window(1000), 16 << 10);
        assert_eq!(server_window(0), server_window(1));
    }

    /// A loopback server presenting `cert` that accepts connections and holds them until the
    /// peer closes; abort the handle to stop it.
    fn accepting_server(cert: &ServerCert) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let server = server_endpoint(
            ([127, 0, 0, 1], 0).into(),
            cert,
            Windows::uniform(server_window(1)),
        )
        .expect("server");
        let addr = server.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            while let Some(inc) = server.accept().await {
                if let Ok(conn) = inc.await {
                    let _ = conn.closed().await;
                }
            }
        });
        (addr, accept)
    }

    #[tokio::test]
    async fn pinned_connects_and_wrong_pin_fails() {
        let cert = ServerCert::generate(&["localhost".into()]).expect("cert");
        let (addr, accept) = accepting_server(&cert);
        let good = client_endpoint(addr, &ServerTrust::Pin(cert.fingerprint())).expect("client");
        let conn = connect(&good, addr, "localhost")
            .await
            .expect("pinned connect");
        conn.close(0u32.into(), b"bye");
        let bad = client_endpoint(addr, &ServerTrust::Pin([0u8; 32])).expect("client");
        let err = connect(&bad, addr, "localhost")
            .await
            .expect_err("wrong pin must fail");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );
        accept.abort();
    }

    #[tokio::test]
    async fn ca_trust_checks_chain_and_name() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use rustls::pki_types::PrivateKeyDer;
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(vec!["fedlora-server".to_string()])
            .expect("params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf");
        let cert = ServerCert::from_parts(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        );
        let (addr, accept) = accepting_server(&cert);
        let dir = std::env::temp_dir().join(format!("fedlora-ca-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        let trust = ServerTrust::ca_from_file(&ca_file).expect("ca file");
        let ep = client_endpoint(addr, &trust).expect("client");
        let conn = connect(&ep, addr, "fedlora-server")
            .await
            .expect("CA-issued certificate accepted");
        conn.close(0u32.into(), b"bye");
        let err = connect(&ep, addr, "other-name")
            .await
            .expect_err("name must match");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );
        let stranger_key = KeyPair::generate().expect("key");
        let mut stranger_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        stranger_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let stranger = stranger_params
            .self_signed(&stranger_key)
            .expect("other ca");
        let other_file = dir.join("other.pem");
        std::fs::write(&other_file, stranger.pem()).expect("write");
        let other = client_endpoint(addr, &ServerTrust::ca_from_file(&other_file).expect("ca"))
            .expect("client");
        let err = connect(&other, addr, "fedlora-server")
            .await
            .expect_err("unknown CA must fail");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
        accept.abort();
    }
}
