//! The device side: one QUIC connection per application, admitted by the
//! gateway's control stream, carrying one stream per local TCP connection.

pub mod netwatch;
mod run;
mod tls;

use crate::ingress::udp::{bind_udp, log_udp_report, UdpBuffers};
use crate::protocol::{self, Admitted, Code, ControlMessage, ControlReader};
use crate::tuning::{CongestionController, QuicTuning};
use quinn::crypto::rustls::QuicClientConfig;
pub use run::{run_connect, ConnectOptions, TransportChoice};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
pub use tls::TlsDialer;

/// Outcome of a failed connection attempt or an ended tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The gateway refused this device; reconnecting will not help.
    Refused { code: Option<Code>, message: String },
    /// Worth a reconnect after a backoff.
    Transient(String),
}

impl Ending {
    pub fn message(&self) -> &str {
        match self {
            Ending::Refused { message, .. } | Ending::Transient(message) => message,
        }
    }
}

/// Turns a QUIC connection error into a plain sentence and a retry class.
pub fn classify(error: &quinn::ConnectionError) -> Ending {
    use quinn::ConnectionError as E;
    match error {
        E::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            if (0x100..0x200).contains(&code) {
                let alert = (code - 0x100) as u8;
                Ending::Refused {
                    code: None,
                    message: format!(
                        "The gateway refused the connection during the TLS handshake: {}.",
                        protocol::tls_alert_sentence(alert)
                    ),
                }
            } else {
                Ending::Transient(format!("the gateway closed the connection: {close}"))
            }
        }
        E::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).to_string();
            application_ending(Code::from_value(close.error_code.into_inner()), &reason)
        }
        E::TransportError(e) => {
            let code = u64::from(e.code);
            if (0x100..0x200).contains(&code) {
                Ending::Refused {
                    code: None,
                    message: format!(
                        "This client rejected the gateway during the TLS handshake: {}. Check --ca and --app.",
                        e.reason
                    ),
                }
            } else {
                Ending::Transient(format!("QUIC transport error: {e}"))
            }
        }
        E::VersionMismatch => Ending::Refused {
            code: None,
            message: "The gateway speaks no QUIC version this client supports.".into(),
        },
        E::TimedOut => Ending::Transient("the gateway stopped answering (idle timeout)".into()),
        E::Reset => {
            Ending::Transient("the gateway reset the connection (it may have restarted)".into())
        }
        E::LocallyClosed => Ending::Transient("the connection was closed locally".into()),
        E::CidsExhausted => Ending::Transient("connection IDs exhausted".into()),
    }
}

fn application_ending(code: Option<Code>, reason: &str) -> Ending {
    let Some(code) = code else {
        return Ending::Transient(format!("the gateway closed the connection: {reason}"));
    };
    let message = if reason.is_empty() {
        code.sentence().to_string()
    } else {
        format!("{} Reason: {reason}", code.sentence())
    };
    if code.is_transient() || code == Code::NoError {
        Ending::Transient(message)
    } else {
        Ending::Refused {
            code: Some(code),
            message,
        }
    }
}

/// A device's client credentials and the gateway it talks to.
pub struct Client {
    endpoint: quinn::Endpoint,
    gateway: SocketAddr,
    server_name: String,
    /// The address the endpoint's sockets bind to; a rebind takes a new port.
    bind: SocketAddr,
    udp_buffers: UdpBuffers,
}

/// QUIC settings of the client side.
#[derive(Debug, Clone)]
pub struct QuicOptions {
    /// Interval of keep-alive (PING) packets on an idle connection, so NAT
    /// and carrier mappings stay open.
    pub keep_alive: Duration,
    /// Idle timeout the client advertises; QUIC uses the smaller of both sides'.
    pub idle_timeout: Duration,
    /// Congestion controller, GSO, flow-control windows and acknowledgement
    /// frequency. The client sends the upload direction, so its congestion
    /// controller and send path set that direction's throughput.
    pub tuning: QuicTuning,
    /// Receive and send buffer sizes of the client's UDP sockets.
    pub udp_buffers: UdpBuffers,
}

/// The client's default flow-control windows and buffers, in bytes.
pub mod defaults {
    pub const STREAM_RECEIVE_WINDOW: u64 = 8 * 1024 * 1024;
    pub const RECEIVE_WINDOW: u64 = 16 * 1024 * 1024;
    pub const SEND_WINDOW: u64 = 16 * 1024 * 1024;
    pub const UDP_BUFFER: usize = 4 * 1024 * 1024;
    pub const COPY_BUFFER: usize = 64 * 1024;
}

impl Default for QuicOptions {
    fn default() -> Self {
        QuicOptions {
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tuning: QuicTuning {
                congestion_controller: CongestionController::default(),
                gso: true,
                stream_receive_window: defaults::STREAM_RECEIVE_WINDOW,
                receive_window: defaults::RECEIVE_WINDOW,
                send_window: defaults::SEND_WINDOW,
                ack_eliciting_threshold: None,
            },
            udp_buffers: UdpBuffers {
                receive: defaults::UDP_BUFFER,
                send: defaults::UDP_BUFFER,
            },
        }
    }
}

/// An admitted connection.
pub struct Tunnel {
    pub connection: quinn::Connection,
    pub admitted: Admitted,
    /// The `going-away` message, once the gateway has sent one.
    pub going_away: Option<crate::protocol::GoingAway>,
    control: ControlReader<quinn::RecvStream>,
}

/// Builds the rustls client config: TLS 1.3, ALPN `ztgate/1`, the device
/// certificate chain and key, and the CA that issued the gateway certificate.
pub fn client_tls_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<rustls::ClientConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} contains no PEM certificate", cert.display()));
    }
    crate::config::check_secret_file(key)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(format!(
            "{} contains no usable CA certificate",
            ca.display()
        ));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key_der)
    .map_err(|e| {
        format!(
            "the key in {} does not fit the certificate in {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    config.alpn_protocols = vec![protocol::ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

impl Client {
    /// Creates the client endpoint with the default [`QuicOptions`]. `bind`
    /// defaults to the unspecified address of the gateway's family with port 0.
    pub fn new(
        tls: rustls::ClientConfig,
        gateway: SocketAddr,
        server_name: &str,
        bind: Option<SocketAddr>,
    ) -> Result<Client, String> {
        Client::with_options(tls, gateway, server_name, bind, QuicOptions::default())
    }

    /// Creates the client endpoint. Every connection it makes shares `tls`,
    /// and so its TLS session cache: a reconnect resumes the session.
    pub fn with_options(
        tls: rustls::ClientConfig,
        gateway: SocketAddr,
        server_name: &str,
        bind: Option<SocketAddr>,
        options: QuicOptions,
    ) -> Result<Client, String> {
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        options.tuning.apply(&mut transport);
        transport
            .keep_alive_interval(Some(options.keep_alive))
            .max_idle_timeout(quinn::IdleTimeout::try_from(options.idle_timeout).ok())
            .max_concurrent_uni_streams(1u32.into())
            .max_concurrent_bidi_streams(0u32.into());
        config.transport_config(Arc::new(transport));
        let bind = bind.unwrap_or_else(|| match gateway {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        });
        let socket = bind_udp(bind, options.udp_buffers)
            .map_err(|e| format!("cannot bind a UDP socket on {bind}: {e}"))?;
        log_udp_report(&socket, options.udp_buffers, options.tuning.gso);
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| format!("cannot start the QUIC endpoint on {bind}: {e}"))?;
        endpoint.set_default_client_config(config);
        Ok(Client {
            endpoint,
            gateway,
            server_name: server_name.to_string(),
            bind,
            udp_buffers: options.udp_buffers,
        })
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Returns the gateway's QUIC address.
    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// Moves the endpoint to a fresh UDP socket on the bind address with a
    /// new port, keeping every connection and stream. Each connection
    /// switches to a new connection ID and sends a PING from the new socket,
    /// and the gateway validates the new path. Returns the new local address.
    pub fn rebind(&self) -> Result<SocketAddr, String> {
        let addr = SocketAddr::new(self.bind.ip(), 0);
        let socket = bind_udp(addr, self.udp_buffers)
            .map_err(|e| format!("cannot bind a new UDP socket on {addr}: {e}"))?;
        let local = socket
            .local_addr()
            .map_err(|e| format!("cannot read the new UDP socket's address: {e}"))?;
        self.endpoint
            .rebind(socket)
            .map_err(|e| format!("cannot move the QUIC endpoint to {local}: {e}"))?;
        Ok(local)
    }

    /// Connects and waits for `admitted` on the control stream.
    pub async fn connect(&self, timeout: Duration) -> Result<Tunnel, Ending> {
        self.connect_within(None, timeout).await
    }

    /// Connects like [`Client::connect`], but gives up after `answer_within`
    /// when the gateway has not answered at all by then (no server handshake
    /// flight arrived), for example because UDP is blocked. A slow gateway
    /// that does answer still has all of `timeout`.
    pub async fn connect_expecting_answer(
        &self,
        answer_within: Duration,
        timeout: Duration,
    ) -> Result<Tunnel, Ending> {
        self.connect_within(Some(answer_within), timeout).await
    }

    async fn connect_within(
        &self,
        answer_within: Option<Duration>,
        timeout: Duration,
    ) -> Result<Tunnel, Ending> {
        let attempt = async {
            let mut connecting = self
                .endpoint
                .connect(self.gateway, &self.server_name)
                .map_err(|e| Ending::Refused {
                    code: None,
                    message: format!("cannot connect to {}: {e}", self.gateway),
                })?;
            if let Some(limit) = answer_within {
                // The handshake data is ready once the server's first flight
                // has been processed.
                match tokio::time::timeout(limit, connecting.handshake_data()).await {
                    Err(_) => {
                        return Err(Ending::Transient(format!(
                            "no QUIC answer from {} within {limit:?}",
                            self.gateway
                        )))
                    }
                    Ok(Err(e)) => return Err(classify(&e)),
                    Ok(Ok(_)) => {}
                }
            }
            let connection = connecting.await.map_err(|e| classify(&e))?;
            let recv = connection.accept_uni().await.map_err(|e| classify(&e))?;
            let mut control = ControlReader::new(recv);
            let first = control.next().await;
            match first {
                Ok(Some(ControlMessage::Admitted(admitted))) => Ok(Tunnel {
                    going_away: None,
                    connection,
                    admitted,
                    control,
                }),
                Ok(Some(ControlMessage::Refused(refusal))) => {
                    Err(application_ending(Some(refusal.code), &refusal.reason))
                }
                Ok(other) => {
                    // The stream ended or carried something else, so the close
                    // reason, if any, explains more.
                    let closed =
                        tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
                    match closed {
                        Ok(e) => Err(classify(&e)),
                        Err(_) => Err(Ending::Refused {
                            code: Some(Code::ProtocolViolation),
                            message: format!("the gateway sent {other:?} instead of admitted"),
                        }),
                    }
                }
                Err(_) => {
                    let closed =
                        tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
                    match closed {
                        Ok(e) => Err(classify(&e)),
                        Err(_) => Err(Ending::Transient("the control stream failed".into())),
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Ending::Transient(format!(
                "no answer from {} within {timeout:?}",
                self.gateway
            ))),
        }
    }
}

impl Tunnel {
    /// Opens a stream and sends the preamble.
    pub async fn open_stream(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError> {
        open_stream(&self.connection).await
    }

    /// Waits until the tunnel ends, reading control messages on the way.
    pub async fn ended(&mut self) -> Ending {
        let mut last_close: Option<Ending> = None;
        loop {
            match self.control.next().await {
                Ok(Some(ControlMessage::Closing(refusal))) => {
                    last_close = Some(application_ending(Some(refusal.code), &refusal.reason));
                }
                Ok(Some(ControlMessage::GoingAway(g))) => {
                    tracing::info!(drain_secs = g.drain_secs, reason = %g.reason, "the gateway is going away");
                    self.going_away = Some(g);
                }
                Ok(Some(ControlMessage::StepUp(s))) => {
                    eprintln!(
                        "ztgate connect: additional verification required: {} ({})",
                        s.challenge, s.reason
                    );
                }
                Ok(Some(other)) => tracing::debug!(message = ?other, "control message"),
                Ok(None) | Err(_) => break,
            }
        }
        let error = self.connection.closed().await;
        match last_close {
            Some(ending) => ending,
            None => classify(&error),
        }
    }
}

/// Opens a bidirectional stream and writes the preamble.
pub async fn open_stream(
    connection: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError> {
    let (mut send, recv) = connection.open_bi().await?;
    send.write_all(&protocol::preamble())
        .await
        .map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => e,
            _ => quinn::ConnectionError::LocallyClosed,
        })?;
    Ok((send, recv))
}
