//! Criterion benches of the per-tunnel work on the gateway: the client chain
//! check, identity extraction and admission as a whole, with and without a
//! loaded CRL. Two more benches time the copy loops: `forward::pump` between
//! a quinn stream and a TCP socket, and `ingress::duplex::copy_duplex`
//! between two in-memory streams.
//!
//! Run: `cargo bench --bench admission`. Needs `openssl` for the development
//! PKI and its CRL.

mod common;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztgate::admission::{admit, AdmissionRequest};
use ztgate::forward::{pump, ResetCodes};
use ztgate::gateway::Gateway;
use ztgate::identity::extract_identity;
use ztgate::ingress::duplex::copy_duplex;

const HARDWARE_BOUND_OID: &str = "1.3.6.1.4.1.55555.1.1";
/// Bytes sent through a copy loop per iteration.
const TRANSFER_BYTES: usize = 8 * 1024 * 1024;
/// The default of `limits.copy_buffer_bytes`.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// A development PKI with a device CA CRL, and a gateway that loads both.
struct Fixture {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    gateway: Gateway,
}

fn fixture() -> Fixture {
    ztgate::install_crypto_provider();
    let dir = common::dev_pki();
    let pki = dir.path();
    let revoked = pki.join("DEV-0002.pem");
    common::openssl_ca(pki, &["-revoke", revoked.to_str().expect("UTF-8 path")]);
    let crl = pki.join("device-ca.crl.pem");
    common::openssl_ca(
        pki,
        &[
            "-gencrl",
            "-crlhours",
            "2",
            "-out",
            crl.to_str().expect("UTF-8 path"),
        ],
    );
    let p = pki.display();
    let config = pki.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
listen = ["127.0.0.1:0"]
certificate = "{p}/gateway-chain.pem"
private_key = "{p}/gateway.key"
[log]
level = "error"
[identity]
hardware_bound_oid = "{HARDWARE_BOUND_OID}"
[[device_ca]]
name = "dev"
certificates = ["{p}/device-ca.pem"]
crl_files = ["{p}/device-ca.crl.pem"]
[[application]]
name = "wiki"
server_name = "wiki.apps.example.test"
upstream = "127.0.0.1:9"
[application.access]
device_cas = ["dev"]
spiffe_prefixes = ["spiffe://example.test/device"]
require_hardware_bound = true
"#
        ),
    )
    .expect("write config");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let gateway = runtime
        .block_on(Gateway::start(&config))
        .expect("gateway starts");
    Fixture {
        dir,
        runtime,
        gateway,
    }
}

fn read_chain(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("chain file")
        .map(|cert| cert.expect("PEM certificate"))
        .collect()
}

fn identity_benches(c: &mut Criterion, fixture: &Fixture) {
    let chain = read_chain(&fixture.dir.path().join("DEV-0001-chain.pem"));
    let generation = fixture.gateway.shared().config.current();
    let now = UnixTime::now();
    let mut group = c.benchmark_group("identity");
    group.bench_function("chain_check", |b| {
        b.iter(|| {
            let verified =
                generation
                    .trust
                    .verify(black_box(&chain[0]), black_box(&chain[1..]), now);
            black_box(verified.is_ok())
        })
    });
    group.bench_function("extract_identity", |b| {
        b.iter(|| {
            let identity = extract_identity(black_box(&chain[0]), Some(HARDWARE_BOUND_OID));
            black_box(identity.is_ok())
        })
    });
    group.finish();
}

fn admission_benches(c: &mut Criterion, fixture: &Fixture) {
    let chain = read_chain(&fixture.dir.path().join("DEV-0001-chain.pem"));
    let generation = fixture.gateway.shared().config.current();
    let store = &fixture.gateway.shared().crl;
    let mut group = c.benchmark_group("admission");
    for (name, with_crl) in [("builtin_policy", false), ("builtin_policy_with_crl", true)] {
        let request = AdmissionRequest {
            chain: &chain,
            server_name: Some("wiki.apps.example.test"),
            client: "127.0.0.1:40000".parse().expect("address"),
            path_changes: 0,
            previous_address: None,
            transport: ztgate::policy::Transport::Quic,
            now: SystemTime::now(),
            session_started: None,
            previous: None,
            ocsp: None,
            posture: None,
            crl: with_crl.then_some(&**store),
            allow_step_up: false,
        };
        if let Err(refused) = fixture.runtime.block_on(admit(&generation, &request)) {
            panic!("admission rejected DEV-0001: {}", refused.reason);
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                let admitted = fixture.runtime.block_on(admit(&generation, &request));
                black_box(admitted.is_ok())
            })
        });
    }
    group.finish();
}

/// A quinn connection over loopback and a TCP listener, for the pump bench.
struct PumpRig {
    client: quinn::Connection,
    server: quinn::Connection,
    listener: TcpListener,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

async fn pump_rig(pki: &Path) -> PumpRig {
    let chain = read_chain(&pki.join("gateway-chain.pem"));
    let key = PrivateKeyDer::from_pem_file(pki.join("gateway.key")).expect("gateway key");
    let server_tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server TLS config");
    let server_crypto = QuicServerConfig::try_from(server_tls).expect("QUIC server config");
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let server_endpoint = quinn::Endpoint::server(server_config, loopback).expect("server");

    let mut roots = rustls::RootCertStore::empty();
    for ca in read_chain(&pki.join("root-ca.pem")) {
        roots.add(ca).expect("root CA");
    }
    let client_tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client_crypto = QuicClientConfig::try_from(client_tls).expect("QUIC client config");
    let mut client_endpoint = quinn::Endpoint::client(loopback).expect("client");
    client_endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));

    let server_addr = server_endpoint.local_addr().expect("server address");
    let connecting = client_endpoint
        .connect(server_addr, "wiki.apps.example.test")
        .expect("connect");
    let accepting = async {
        let incoming = server_endpoint.accept().await.expect("incoming connection");
        incoming.await.expect("server handshake")
    };
    let (client, server) = tokio::join!(connecting, accepting);
    PumpRig {
        client: client.expect("client handshake"),
        server,
        listener: TcpListener::bind(loopback).await.expect("TCP listener"),
        _endpoints: (client_endpoint, server_endpoint),
    }
}

impl PumpRig {
    /// Opens one stream and one TCP connection and runs `pump` between the
    /// server's end of the stream and the accepted TCP connection. Returns
    /// the client's stream and the TCP peer.
    async fn start_pump(&self) -> (quinn::SendStream, quinn::RecvStream, TcpStream) {
        let (mut send, recv) = self.client.open_bi().await.expect("open stream");
        // The peer learns of a stream from its first frame.
        send.write_all(&[0]).await.expect("first byte");
        let (server_send, mut server_recv) = self.server.accept_bi().await.expect("accept stream");
        let mut first = [0u8; 1];
        server_recv
            .read_exact(&mut first)
            .await
            .expect("first byte");
        let address = self.listener.local_addr().expect("listener address");
        let (peer, accepted) = tokio::join!(TcpStream::connect(address), self.listener.accept());
        let (tcp, _) = accepted.expect("accept TCP");
        let codes = ResetCodes {
            tcp_reset: 0u32.into(),
        };
        tokio::spawn(pump(
            server_send,
            server_recv,
            tcp,
            codes,
            COPY_BUFFER_BYTES,
        ));
        (send, recv, peer.expect("connect TCP"))
    }
}

async fn stream_to_tcp(rig: &PumpRig, payload: &[u8]) {
    let (mut send, mut recv, mut tcp) = rig.start_pump().await;
    let writer = async {
        send.write_all(payload).await.expect("write stream");
        send.finish().expect("finish stream");
    };
    let reader = async {
        let mut sink = Vec::with_capacity(payload.len());
        tcp.read_to_end(&mut sink).await.expect("read TCP");
        assert_eq!(sink.len(), payload.len(), "bytes through the pump");
    };
    tokio::join!(writer, reader);
    tcp.shutdown().await.expect("shutdown TCP");
    recv.read_to_end(0).await.expect("stream FIN");
}

async fn tcp_to_stream(rig: &PumpRig, payload: &[u8]) {
    let (mut send, mut recv, mut tcp) = rig.start_pump().await;
    send.finish().expect("finish stream");
    let writer = async {
        tcp.write_all(payload).await.expect("write TCP");
        tcp.shutdown().await.expect("shutdown TCP");
    };
    let reader = async {
        let received = recv.read_to_end(payload.len()).await.expect("read stream");
        assert_eq!(received.len(), payload.len(), "bytes through the pump");
    };
    tokio::join!(writer, reader);
}

fn copy_benches(c: &mut Criterion, fixture: &Fixture) {
    let payload = vec![0x5a_u8; TRANSFER_BYTES];
    let rig = fixture.runtime.block_on(pump_rig(fixture.dir.path()));
    let mut group = c.benchmark_group("copy");
    group.throughput(Throughput::Bytes(TRANSFER_BYTES as u64));
    group.sample_size(20);
    group.bench_function("pump_stream_to_tcp", |b| {
        b.iter(|| fixture.runtime.block_on(stream_to_tcp(&rig, &payload)))
    });
    group.bench_function("pump_tcp_to_stream", |b| {
        b.iter(|| fixture.runtime.block_on(tcp_to_stream(&rig, &payload)))
    });
    group.bench_function("copy_duplex_in_memory", |b| {
        b.iter_batched(
            || {
                let (client, gateway_side) = tokio::io::duplex(COPY_BUFFER_BYTES);
                let (upstream_side, upstream) = tokio::io::duplex(COPY_BUFFER_BYTES);
                (client, gateway_side, upstream_side, upstream)
            },
            |(mut client, mut gateway_side, mut upstream_side, mut upstream)| {
                fixture.runtime.block_on(async {
                    let copy = tokio::spawn(async move {
                        copy_duplex(&mut gateway_side, &mut upstream_side, COPY_BUFFER_BYTES).await
                    });
                    let writer = async {
                        client.write_all(&payload).await.expect("write");
                        client.shutdown().await.expect("shutdown");
                    };
                    let reader = async {
                        let mut sink = Vec::with_capacity(payload.len());
                        upstream.read_to_end(&mut sink).await.expect("read");
                        assert_eq!(sink.len(), payload.len(), "bytes through copy_duplex");
                        upstream.shutdown().await.expect("shutdown");
                    };
                    tokio::join!(writer, reader);
                    copy.await.expect("copy task");
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn all_benches(c: &mut Criterion) {
    let fixture = fixture();
    identity_benches(c, &fixture);
    admission_benches(c, &fixture);
    copy_benches(c, &fixture);
}

criterion_group!(benches, all_benches);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
