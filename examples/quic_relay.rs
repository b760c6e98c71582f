//! Reference relay for the throughput benchmark: TCP to one bare quinn
//! connection to TCP, with no admission, policy or session state. It runs in
//! the same topology as `ztgate connect` to `ztgate serve`, so the gap between
//! the two measures what the gateway adds on top of quinn.
//!
//!     quic_relay server --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
//!     quic_relay client --listen 127.0.0.1:PORT --server 127.0.0.1:PORT
//!
//! The client accepts TCP connections and opens one bidirectional stream per
//! connection on one shared QUIC connection. The server dials the upstream
//! for each stream. Both print `ready ADDR` on stdout once they listen.
//! Transport settings are quinn's defaults with a client keep-alive, and the
//! UDP socket buffers are 4 MiB like ztgate's defaults. The server makes a
//! self-signed P-256 certificate with `openssl` at start-up, and the client
//! accepts any certificate, so the relay is for loopback benchmarks only.

use clap::{Parser, Subcommand};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztgate::ingress::udp::{bind_udp, UdpBuffers};

const ALPN: &[u8] = b"quic-relay";
/// The same sizes as ztgate's `udp_receive_buffer_bytes` and `udp_send_buffer_bytes` defaults.
const UDP_BUFFERS: UdpBuffers = UdpBuffers {
    receive: 4 * 1024 * 1024,
    send: 4 * 1024 * 1024,
};
/// The keep-alive interval of `ztgate connect`.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// The same size as ztgate's `limits.copy_buffer_bytes` default.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "Bare quinn TCP relay, the reference for the throughput benchmark")]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Accepts QUIC streams and connects each to the upstream over TCP.
    Server {
        /// UDP address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// TCP address that every stream is forwarded to.
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// Accepts TCP connections and forwards each as a stream to the server.
    Client {
        /// TCP address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// UDP address of the relay server.
        #[arg(long)]
        server: SocketAddr,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    ztgate::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("quic_relay: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.role {
            Role::Server { listen, upstream } => run_server(listen, upstream).await,
            Role::Client { listen, server } => run_client(listen, server).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quic_relay: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_server(listen: SocketAddr, upstream: SocketAddr) -> Result<(), String> {
    let (chain, key) = self_signed_certificate()?;
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("invalid generated certificate: {e}"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let socket =
        bind_udp(listen, UDP_BUFFERS).map_err(|e| format!("failed to bind UDP {listen}: {e}"))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("failed to start the QUIC endpoint: {e}"))?;
    let local = endpoint.local_addr().map_err(|e| e.to_string())?;
    println!("ready {local}");

    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => return eprintln!("quic_relay: handshake with {remote} failed: {e}"),
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(async move {
                    match TcpStream::connect(upstream).await {
                        Ok(tcp) => relay(tcp, send, recv).await,
                        Err(e) => eprintln!("quic_relay: failed to connect to {upstream}: {e}"),
                    }
                });
            }
        });
    }
    Ok(())
}

async fn run_client(listen: SocketAddr, server: SocketAddr) -> Result<(), String> {
    let mut tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCertificate))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let bind = SocketAddr::new(listen.ip(), 0);
    let socket =
        bind_udp(bind, UDP_BUFFERS).map_err(|e| format!("failed to bind UDP {bind}: {e}"))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("failed to start the QUIC endpoint: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // Without keep-alives the one connection would reach quinn's 30 s idle
    // timeout between benchmark runs.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    let connection = endpoint
        .connect(server, "relay")
        .map_err(|e| format!("failed to connect to {server}: {e}"))?
        .await
        .map_err(|e| format!("handshake with {server} failed: {e}"))?;

    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("failed to listen on TCP {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("ready {local}");

    loop {
        let (tcp, peer) = listener
            .accept()
            .await
            .map_err(|e| format!("accept on {local} failed: {e}"))?;
        let connection = connection.clone();
        tokio::spawn(async move {
            match connection.open_bi().await {
                Ok((send, recv)) => relay(tcp, send, recv).await,
                Err(e) => eprintln!("quic_relay: failed to open a stream for {peer}: {e}"),
            }
        });
    }
}

/// Copies both ways until both directions have ended, passing a FIN on as
/// `finish` or as a TCP write shutdown.
async fn relay(mut tcp: TcpStream, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let _ = tcp.set_nodelay(true);
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let upload = async {
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
        loop {
            let read = tcp_read.read(&mut buffer).await?;
            if read == 0 {
                return send.finish().map_err(std::io::Error::other);
            }
            send.write_all(&buffer[..read]).await?;
        }
    };
    let download = async {
        // quinn returns about one packet per chunk, so reading into a large
        // buffer saves a write system call per packet.
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
        while let Some(read) = recv
            .read(&mut buffer)
            .await
            .map_err(std::io::Error::other)?
        {
            tcp_write.write_all(&buffer[..read]).await?;
        }
        tcp_write.shutdown().await
    };
    // An error in one direction (a TCP reset, a stream reset) drops the other
    // direction and resets the stream both ways.
    if let Err(e) = tokio::try_join!(upload, download) {
        let _ = send.reset(0u32.into());
        let _ = recv.stop(0u32.into());
        eprintln!("quic_relay: stream ended with an error: {e}");
    }
}

/// Generates a self-signed P-256 certificate and key with `openssl req`.
fn self_signed_certificate(
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("failed to create a temp dir: {e}"))?;
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=relay", "-addext", "subjectAltName=DNS:relay"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| format!("failed to run openssl (install it): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("failed to read {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| format!("failed to read {}: {e}", key.display()))?;
    Ok((chain, key))
}

/// Accepts any server certificate but still verifies the handshake signature
/// against the certificate's key.
#[derive(Debug)]
struct AnyServerCertificate;

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
