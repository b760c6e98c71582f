//! End-to-end tunnels over real QUIC sockets on loopback: data, endings,
//! concurrency, refusals and limits.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztgate::client::Ending;
use ztgate::protocol::Code;

async fn echo_round_trip(gateway_bind: &str, upstream_bind: &str) {
    let upstream = echo_server(upstream_bind).await;
    let gw = TestGateway::start(gateway_bind, &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    assert_eq!(tunnel.admitted.application, "wiki");
    assert_eq!(
        tunnel.admitted.device_id,
        "spiffe://example.test/device/DEV-0001"
    );
    echo_through(&tunnel, 8 * 1024 * 1024).await;
}

#[tokio::test]
async fn eight_mib_echo_ipv4() {
    echo_round_trip("127.0.0.1:0", "127.0.0.1:0").await;
}

#[tokio::test]
async fn eight_mib_echo_ipv6() {
    echo_round_trip("[::1]:0", "[::1]:0").await;
}

#[tokio::test]
async fn half_close_from_upstream_keeps_client_direction_open() {
    // The upstream sends a greeting and half-closes; it then counts what the
    // client still sends until the client half-closes too.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let (count_tx, count_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        tcp.write_all(b"hello").await.expect("greet");
        tcp.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest)
            .await
            .expect("read after half-close");
        let _ = count_tx.send(rest);
    });
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    let greeting = recv.read_to_end(1024).await.expect("greeting then FIN");
    assert_eq!(greeting, b"hello");
    send.write_all(b"still talking")
        .await
        .expect("write after peer FIN");
    send.finish().expect("finish");
    let rest = tokio::time::timeout(Duration::from_secs(10), count_rx)
        .await
        .expect("upstream saw FIN")
        .expect("upstream result");
    assert_eq!(rest, b"still talking");
}

#[tokio::test]
async fn half_close_from_client_reaches_upstream_as_fin() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    send.write_all(b"ping").await.expect("write");
    send.finish().expect("finish");
    // The echo server only half-closes after it reads EOF, so FIN came through.
    let echoed = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1024))
        .await
        .expect("FIN back within 10 s")
        .expect("read");
    assert_eq!(echoed, b"ping");
}

#[tokio::test]
async fn client_reset_reaches_upstream_as_rst() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let (received_tx, received_rx) = tokio::sync::oneshot::channel();
    let (result_tx, result_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut received_tx = Some(received_tx);
        let mut buf = vec![0u8; 4096];
        let outcome = loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(_) => {
                    if let Some(tx) = received_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = result_tx.send(outcome);
    });
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut send, _recv) = tunnel.open_stream().await.expect("open");
    send.write_all(b"some bytes").await.expect("write");
    // Reset only once the gateway has dialed the upstream and forwarded data,
    // so that there is an upstream connection for the reset to reach.
    tokio::time::timeout(Duration::from_secs(10), received_rx)
        .await
        .expect("the upstream receives the first bytes within 10 s")
        .expect("upstream task");
    send.reset(quinn::VarInt::from_u32(77)).expect("reset");
    let outcome = tokio::time::timeout(Duration::from_secs(10), result_rx)
        .await
        .expect("upstream sees the end within 10 s")
        .expect("result");
    assert_eq!(outcome, Err(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn upstream_reset_reaches_client_as_stream_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 4];
        let _ = tcp.read_exact(&mut buf).await;
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(tcp);
    });
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    send.write_all(b"data").await.expect("write");
    let result = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1024))
        .await
        .expect("reset within 10 s");
    match result {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code.into_inner(), u64::from(Code::UpstreamReset.value()));
        }
        other => panic!("expected a stream reset with upstream-reset, got {other:?}"),
    }
}

#[tokio::test]
async fn fifty_concurrent_streams_complete() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let tunnel = std::sync::Arc::new(tunnel);
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let tunnel = tunnel.clone();
        tasks.push(tokio::spawn(async move {
            let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
            let data = pattern(64 * 1024, i);
            send.write_all(&data).await.expect("write");
            send.finish().expect("finish");
            let back = recv.read_to_end(1024 * 1024).await.expect("read");
            back == data
        }));
    }
    let mut ok = 0;
    for task in tasks {
        if tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("stream within 60 s")
            .expect("task")
        {
            ok += 1;
        }
    }
    assert_eq!(ok, 50);
}

#[tokio::test]
async fn server_speaks_first_upstream_works() {
    let upstream = banner_server().await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (_send, mut recv) = tunnel.open_stream().await.expect("open");
    let mut banner = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut banner))
        .await
        .expect("banner within 10 s without sending anything")
        .expect("read banner");
    assert_eq!(&banner, b"220 banner ready\r\n");
}

fn assert_handshake_refusal(ending: &Ending, alert_name: &str) {
    match ending {
        Ending::Refused {
            code: None,
            message,
        } => {
            assert!(
                message.contains(alert_name),
                "expected TLS alert {alert_name}, got: {message}"
            );
            assert!(
                message.starts_with("The gateway refused the connection during the TLS handshake")
            );
        }
        other => panic!("expected a handshake refusal with {alert_name}, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_refusals_carry_tls_alerts() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let cases = [
        ("DEV-ROGUE", "unknown_ca"),
        ("DEV-EXPIRED", "certificate_expired"),
        ("DEV-SERVERAUTH", "unsupported_certificate"),
        ("DEV-NOEKU", "unsupported_certificate"),
    ];
    for (device, alert) in cases {
        let ending = refusal(gw.addr(), device, WIKI).await;
        assert_handshake_refusal(&ending, alert);
    }
    assert_eq!(gw.gateway.shared().registry.session_count(), 0);
}

#[tokio::test]
async fn missing_client_certificate_is_refused() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let pki = pki();
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::pem::PemObject::pem_file_iter(pki.join("root-ca.pem")).expect("ca")
    {
        roots.add(cert.expect("pem")).expect("add root");
    }
    ztgate::install_crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ztgate::protocol::ALPN.to_vec()];
    let client = ztgate::client::Client::new(
        tls,
        gw.addr(),
        WIKI,
        Some("127.0.0.1:0".parse().expect("addr")),
    )
    .expect("client");
    let ending = match client.connect(Duration::from_secs(10)).await {
        Ok(_) => panic!("a client without a certificate must not be admitted"),
        Err(e) => e,
    };
    assert_handshake_refusal(&ending, "certificate_required");
}

fn assert_code(ending: &Ending, expected: Code) {
    match ending {
        Ending::Transient(message) if expected.is_transient() => {
            assert!(
                message.starts_with(expected.sentence()),
                "message: {message}"
            );
        }
        Ending::Refused {
            code: Some(code),
            message,
        } => {
            assert_eq!(*code, expected, "message: {message}");
            assert!(
                message.starts_with(expected.sentence()),
                "message: {message}"
            );
        }
        other => panic!("expected refusal with {expected}, got {other:?}"),
    }
}

#[tokio::test]
async fn refusals_after_handshake_carry_codes() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let unknown = refusal(gw.addr(), "DEV-0001", "nothing.apps.example.test").await;
    assert_code(&unknown, Code::UnknownApplication);
    // DEV-0003 has no hardware-bound mark and the wiki requires one.
    let denied = refusal(gw.addr(), "DEV-0003", WIKI).await;
    assert_code(&denied, Code::PolicyDenied);
    assert!(
        denied.message().contains("hardware-bound"),
        "{}",
        denied.message()
    );
    let bad_identity = refusal(gw.addr(), "DEV-BADID", WIKI).await;
    assert_code(&bad_identity, Code::InvalidIdentity);
    assert!(
        bad_identity.message().contains("permanentIdentifier"),
        "{}",
        bad_identity.message()
    );
    assert_eq!(gw.gateway.shared().registry.session_count(), 0);
}

#[tokio::test]
async fn resumption_after_ca_removal_is_refused() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let client = device_client(gw.addr(), "DEV-0001", WIKI);
    let first = client
        .connect(Duration::from_secs(10))
        .await
        .expect("first connection admitted");
    // Let the session tickets arrive, then close.
    let (mut send, mut recv) = first.open_stream().await.expect("open");
    send.write_all(b"x").await.expect("write");
    send.finish().expect("finish");
    recv.read_to_end(16).await.expect("echo");
    first.connection.close(0u32.into(), b"done");
    // Replace the trusted device CA with an unrelated one and reload.
    let pki = pki();
    let text = std::fs::read_to_string(&gw.config).expect("read config");
    let text = text.replace(
        &format!("{}/device-ca.pem", pki.display()),
        &format!("{}/other-ca.pem", pki.display()),
    );
    std::fs::write(&gw.config, text).expect("write config");
    gw.gateway.reload().await.expect("reload accepted");
    // The same client resumes: the handshake skips verification, so only
    // admission can refuse it, with a ztgate code rather than a TLS alert.
    let ending = match client.connect(Duration::from_secs(10)).await {
        Ok(_) => panic!("a resumed session must be re-checked and refused"),
        Err(e) => e,
    };
    assert_code(&ending, Code::CertificateUntrusted);
    // A fresh client without a ticket fails in the handshake instead.
    let fresh = refusal(gw.addr(), "DEV-0001", WIKI).await;
    assert_handshake_refusal(&fresh, "unknown_ca");
}

#[tokio::test]
async fn unreachable_upstream_resets_only_that_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        drop(listener);
        // Keep the port bound without listening, so later dials are refused
        // and no other test can start listening on it.
        let _closed_port = hold_port(upstream);
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut live_send, mut live_recv) = tunnel.open_stream().await.expect("open live");
    live_send.write_all(b"one").await.expect("write");
    let mut buf = [0u8; 3];
    live_recv.read_exact(&mut buf).await.expect("echo one");
    // The listener closed after its only accept (the echo above ran after
    // that), so new dials are refused.
    let refused = tokio::net::TcpStream::connect(upstream).await;
    assert!(refused.is_err(), "the upstream listener must be closed");
    let (_dead_send, mut dead_recv) = tunnel.open_stream().await.expect("open second");
    match tokio::time::timeout(Duration::from_secs(10), dead_recv.read_to_end(16)).await {
        Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))) => {
            assert_eq!(
                code.into_inner(),
                u64::from(Code::UpstreamUnreachable.value())
            );
        }
        other => panic!("expected upstream-unreachable reset, got {other:?}"),
    }
    live_send
        .write_all(b"two")
        .await
        .expect("live stream still writable");
    live_recv
        .read_exact(&mut buf)
        .await
        .expect("live stream still echoes");
    assert_eq!(&buf, b"two");
    assert!(
        tunnel.connection.close_reason().is_none(),
        "connection must stay open"
    );
}

#[tokio::test]
async fn per_device_cap_refuses_extra_connection() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[limits]\nmax_connections_per_device = 1\n",
    )
    .await;
    let (_client, _tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let second = refusal(gw.addr(), "DEV-0001", WIKI).await;
    assert_code(&second, Code::ConnectionLimit);
    // Another device is unaffected.
    let (_c2, _t2) = connect(gw.addr(), "DEV-0002", WIKI).await;
}

#[tokio::test]
async fn stream_limit_is_enforced_by_flow_control() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[limits]\nmax_streams_per_connection = 4\n",
    )
    .await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let (mut send, mut recv) = tunnel.open_stream().await.expect("open within limit");
        send.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.expect("echo");
        open.push((send, recv));
    }
    let fifth = tokio::time::timeout(Duration::from_millis(500), tunnel.connection.open_bi()).await;
    assert!(fifth.is_err(), "a fifth stream must wait for credit");
    // Finishing one stream returns credit and the fifth opens.
    let (mut send, mut recv) = open.remove(0);
    send.finish().expect("finish");
    recv.read_to_end(16).await.expect("end");
    let fifth = tokio::time::timeout(Duration::from_secs(10), tunnel.open_stream()).await;
    assert!(
        matches!(fifth, Ok(Ok(_))),
        "the fifth stream opens once credit returns"
    );
    assert!(tunnel.connection.close_reason().is_none());
}

#[tokio::test]
async fn upstream_host_name_is_resolved() {
    let upstream = echo_server("127.0.0.1:0").await;
    let mut app = App::wiki(upstream);
    app.upstream = format!("localhost:{}", upstream.port());
    let gw = TestGateway::start("127.0.0.1:0", &[app], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    send.write_all(b"by name").await.expect("write");
    send.finish().expect("finish");
    let echoed = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(64))
        .await
        .expect("echo within 10 s")
        .expect("read");
    assert_eq!(echoed, b"by name");
}

#[tokio::test]
async fn per_source_cap_refuses_extra_connection() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[limits]\nmax_connections_per_source = 1\n",
    )
    .await;
    let (_client, _tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let client = device_client(gw.addr(), "DEV-0002", WIKI);
    let second = client.connect(Duration::from_secs(10)).await;
    assert!(
        second.is_err(),
        "a second connection from 127.0.0.1 must be refused"
    );
    assert_eq!(
        gw.gateway
            .shared()
            .stats
            .refused_by_cap
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// Binds `addr` again without listening. SO_REUSEADDR lets it share the port
/// with the connection the closed listener accepted.
fn hold_port(addr: std::net::SocketAddr) -> socket2::Socket {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("reuse address");
    socket.bind(&addr.into()).expect("bind the closed port");
    socket
}
