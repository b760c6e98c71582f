//! The device side of the TLS-over-TCP ingress: one TLS connection per
//! tunnel, for networks that block UDP.

use crate::ingress::read_buffer::ReleasingReader;
use crate::protocol;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A client TLS-over-TCP tunnel. rustls reads at most 4 KiB per call
/// (`read_tls` in rustls 0.23), so the TCP side is read through a buffer
/// that takes one large read per system call instead, and is freed while
/// the tunnel is idle.
pub type TlsTunnel = TlsStream<ReleasingReader<TcpStream>>;

/// Opens TLS-over-TCP tunnels to one application. Every tunnel shares one
/// rustls config, and so one session cache: after the first, each
/// handshake resumes.
pub struct TlsDialer {
    connector: tokio_rustls::TlsConnector,
    gateway: SocketAddr,
    server_name: ServerName<'static>,
    timeout: Duration,
    read_buffer: usize,
}

impl TlsDialer {
    /// Builds a dialer from the QUIC client's TLS config: the same device
    /// certificate and CA, no ALPN (the TLS ingress carries the
    /// application's own protocol), and a session cache of its own.
    /// `read_buffer` is the size of each TCP read, in bytes.
    pub fn new(
        quic_tls: &rustls::ClientConfig,
        gateway: SocketAddr,
        server_name: &str,
        timeout: Duration,
        read_buffer: usize,
    ) -> Result<TlsDialer, String> {
        let mut config = quic_tls.clone();
        config.alpn_protocols = Vec::new();
        config.resumption = rustls::client::Resumption::in_memory_sessions(64);
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("{server_name:?} is not a valid TLS server name: {e}"))?;
        Ok(TlsDialer {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            gateway,
            server_name,
            timeout,
            read_buffer,
        })
    }

    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// Connects and completes the handshake within the dialer's timeout.
    pub async fn dial(&self) -> Result<TlsTunnel, String> {
        let attempt = async {
            let tcp = TcpStream::connect(self.gateway)
                .await
                .map_err(|e| format!("cannot connect to {} over TCP: {e}", self.gateway))?;
            let _ = tcp.set_nodelay(true);
            let tcp = ReleasingReader::new(tcp, self.read_buffer);
            self.connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| describe_handshake_error(&e))
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no TLS handshake with {} within {:?}",
                self.gateway, self.timeout
            )),
        }
    }
}

/// Turns a failed TLS handshake into a plain sentence.
fn describe_handshake_error(error: &std::io::Error) -> String {
    let tls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "The gateway refused the connection during the TLS handshake: {}.",
            protocol::tls_alert_sentence(u8::from(*alert))
        ),
        Some(other) => format!(
            "This client rejected the gateway during the TLS handshake: {other}. Check --ca and --app."
        ),
        None => format!("the TLS handshake failed: {error}"),
    }
}
