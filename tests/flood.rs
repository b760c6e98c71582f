//! Load shedding: floods of QUIC Initials and of stalled TLS handshakes from
//! several loopback addresses while a real device connects, the
//! per-connection stream rate, and the per-application upstream dial cap.

mod common;

use common::*;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// Lists the flood's source addresses: 127.0.0.2 to 127.0.0.9.
fn flood_sources() -> impl Iterator<Item = IpAddr> {
    (2..=9u8).map(|last| IpAddr::from([127, 0, 0, last]))
}

/// Makes fresh, valid QUIC Initial datagrams, each opening a new connection
/// with its own connection IDs, without sending anything itself.
struct InitialFactory {
    endpoint: quinn_proto::Endpoint,
    config: quinn::ClientConfig,
    gateway: SocketAddr,
}

impl InitialFactory {
    fn new(gateway: SocketAddr) -> InitialFactory {
        let pki = pki();
        let tls = ztgate::client::client_tls_config(
            &pki.join("DEV-0002-chain.pem"),
            &pki.join("DEV-0002.key"),
            &pki.join("root-ca.pem"),
        )
        .expect("client TLS config");
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client config");
        InitialFactory {
            endpoint: quinn_proto::Endpoint::new(
                Arc::new(quinn::EndpointConfig::default()),
                None,
                false,
                None,
            ),
            config: quinn::ClientConfig::new(Arc::new(crypto)),
            gateway,
        }
    }

    fn next(&mut self) -> Vec<u8> {
        let now = std::time::Instant::now();
        let (_, mut connection) = self
            .endpoint
            .connect(now, self.config.clone(), self.gateway, WIKI)
            .expect("start a client connection");
        let mut datagram = Vec::new();
        let transmit = connection
            .poll_transmit(now, 1, &mut datagram)
            .expect("an Initial to send");
        datagram.truncate(transmit.size);
        datagram
    }
}

/// Whether a datagram is a QUIC version 1 Retry packet (RFC 9000, 17.2.5).
fn is_retry(datagram: &[u8]) -> bool {
    datagram.len() > 5 && datagram[0] & 0xf0 == 0xf0 && datagram[1..5] == [0, 0, 0, 1]
}

/// Reads the resident set size of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line in /proc/{pid}/status"))
}

/// Opens a tunnel as `device`, echoes `len` bytes through one stream and
/// checks they come back intact.
async fn echo_through(gateway: SocketAddr, device: &str, len: usize, seed: u8) {
    let client = device_client(gateway, device, WIKI);
    let tunnel = client
        .connect(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{device} should be admitted during the flood: {e:?}"));
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open stream");
    let data = pattern(len, seed);
    let ((), echoed) = tokio::join!(
        async {
            send.write_all(&data).await.expect("write");
            send.finish().expect("finish");
        },
        async {
            tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(len + 1))
                .await
                .expect("echo within 20 s")
                .expect("read echo")
        }
    );
    assert_eq!(echoed.len(), data.len(), "{device}: echoed length");
    assert!(echoed == data, "{device}: echoed bytes differ");
}

/// Sends `per_source` Initials from each flood address, paced in rounds,
/// and counts the Retry packets that come back until `listen_until`.
async fn flood_quic(gateway: SocketAddr, per_source: usize, listen_until: Instant) -> u64 {
    let mut sockets = Vec::new();
    for ip in flood_sources() {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        sockets.push(Arc::new(socket));
    }
    let retries = Arc::new(AtomicU64::new(0));
    let mut listeners = Vec::new();
    for socket in &sockets {
        let (socket, retries) = (socket.clone(), retries.clone());
        listeners.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Some(left) = listen_until.checked_duration_since(Instant::now()) {
                let Ok(Ok((n, _))) = tokio::time::timeout(left, socket.recv_from(&mut buf)).await
                else {
                    break;
                };
                if is_retry(&buf[..n]) {
                    retries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut factory = InitialFactory::new(gateway);
    for _ in 0..per_source {
        for socket in &sockets {
            let initial = factory.next();
            let _ = socket.send_to(&initial, gateway).await;
        }
        // Pace the rounds so that the kernel's socket buffers keep up.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for listener in listeners {
        listener.await.expect("Retry listener");
    }
    retries.load(Ordering::Relaxed)
}

/// Opens `per_source` TCP connections from each flood address that never
/// send a ClientHello, and returns how many the gateway closed within
/// `early` of their start (the rate limit closes them before TLS work;
/// the others wait for the handshake deadline).
async fn flood_tls(gateway: SocketAddr, per_source: usize, early: Duration) -> usize {
    let mut watchers = Vec::new();
    for ip in flood_sources() {
        for _ in 0..per_source {
            let socket = TcpSocket::new_v4().expect("TCP socket");
            socket
                .bind(SocketAddr::new(ip, 0))
                .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
            let Ok(mut tcp): std::io::Result<TcpStream> = socket.connect(gateway).await else {
                continue;
            };
            watchers.push(tokio::spawn(async move {
                let opened = Instant::now();
                let mut byte = [0u8; 1];
                // Any outcome (EOF, reset) is the gateway closing it.
                let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut byte)).await;
                opened.elapsed() < early
            }));
        }
    }
    let mut closed_early = 0;
    for watcher in watchers {
        if watcher.await.expect("TCP watcher") {
            closed_early += 1;
        }
    }
    closed_early
}

#[tokio::test]
async fn flood_gets_retry_device_admitted() {
    const PER_SOURCE_INITIALS: usize = 250;
    const PER_SOURCE_TCP: usize = 30;
    let upstream = echo_server("127.0.0.1:0").await;
    let (_dir, config) = write_config_with(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "listen_tls = [\"127.0.0.1:0\"]",
        "[limits]\nretry_pending_handshakes = 16\nhandshakes_per_source_per_sec = 5\nhandshake_burst_per_source = 10\n",
    );
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn(command, false);
    let quic: SocketAddr = serve
        .wait_for("ztgate: listening quic ", Duration::from_secs(20))
        .parse()
        .expect("QUIC address");
    let tls: SocketAddr = serve
        .wait_for("ztgate: listening tls ", Duration::from_secs(20))
        .parse()
        .expect("TLS address");
    let pid = serve.child.id();

    // A first tunnel brings the gateway to its steady state before the baseline.
    echo_through(quic, "DEV-0001", 64 * 1024, 1).await;
    let baseline = vm_rss_kib(pid);

    let listen_until = Instant::now() + Duration::from_secs(8);
    let quic_flood = tokio::spawn(flood_quic(quic, PER_SOURCE_INITIALS, listen_until));
    let tls_flood = tokio::spawn(flood_tls(tls, PER_SOURCE_TCP, Duration::from_millis(1500)));
    // The device connects while both floods run, and receives a Retry
    // itself once the flood keeps 16 handshakes pending.
    echo_through(quic, "DEV-0001", 256 * 1024, 2).await;
    let retries = quic_flood.await.expect("QUIC flood");
    let closed_early = tls_flood.await.expect("TLS flood");
    let peak = vm_rss_kib(pid);

    let initials = (flood_sources().count() * PER_SOURCE_INITIALS) as u64;
    // Loopback may drop some datagrams on a loaded machine, so a quarter is
    // the bound; without Retry, none would come back.
    assert!(
        retries >= initials / 4,
        "{retries} Retry packets for {initials} Initials"
    );
    let rate_limited_minimum = flood_sources().count() * (PER_SOURCE_TCP - 20);
    assert!(
        closed_early >= rate_limited_minimum,
        "{closed_early} TCP connections closed early; expected at least {rate_limited_minimum} closed by the rate limit"
    );
    let growth = peak.saturating_sub(baseline);
    assert!(
        growth < 64 * 1024,
        "gateway RSS grew by {growth} KiB during the flood (from {baseline} KiB)"
    );
    // The gateway still admits devices once the flood is over.
    echo_through(quic, "DEV-0001", 64 * 1024, 3).await;
    eprintln!(
        "flood: {retries} Retry packets seen, {closed_early} TCP connections closed early, RSS {baseline} KiB -> {peak} KiB"
    );
}

/// Reads from a stream the gateway reset and returns the reset code.
async fn reset_code(recv: &mut quinn::RecvStream) -> Option<u64> {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf)).await {
        Ok(Err(quinn::ReadError::Reset(code))) => Some(code.into_inner()),
        _ => None,
    }
}

/// Writes `message` on a stream and reads its echo.
async fn echo_on(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, message: &[u8]) {
    send.write_all(message).await.expect("write");
    let mut buf = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut buf))
        .await
        .expect("echo within 10 s")
        .expect("read echo");
    assert_eq!(buf, message);
}

const STREAM_RATE_LIMITED: u64 = 0x23;
const UPSTREAM_BUSY: u64 = 0x24;

#[tokio::test]
async fn fast_streams_reset_while_others_continue() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[limits]\nstreams_per_connection_per_sec = 1\nstream_burst_per_connection = 3\nmax_rate_limited_streams_per_connection = 0\n",
    )
    .await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut steady_send, mut steady_recv) = tunnel.open_stream().await.expect("open");
    echo_on(&mut steady_send, &mut steady_recv, b"first").await;

    let mut streams = Vec::new();
    for _ in 0..20 {
        let (mut send, recv) = tunnel.open_stream().await.expect("open fast stream");
        // Queue a byte so that the echo of an accepted stream can be read;
        // the write fails when the gateway has already reset the stream.
        let _ = send.write_all(b"x").await;
        streams.push((send, recv));
    }
    let mut reset = 0;
    for (_send, recv) in &mut streams {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut byte)).await {
            Ok(Ok(())) => assert_eq!(&byte, b"x", "an accepted stream echoes"),
            Ok(Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)))) => {
                assert_eq!(code.into_inner(), STREAM_RATE_LIMITED);
                reset += 1;
            }
            other => panic!("a fast stream neither echoed nor was reset: {other:?}"),
        }
    }
    // Three tokens at most remain from the burst, plus one per second.
    assert!(reset >= 10, "only {reset} of 20 fast streams were reset");
    let stats = &gw.gateway.shared().stats;
    assert_eq!(stats.streams_rate_limited.load(Ordering::Relaxed), reset);
    echo_on(&mut steady_send, &mut steady_recv, b"still open").await;
    assert!(tunnel.connection.close_reason().is_none());
}

#[tokio::test]
async fn persistent_stream_flood_closes_connection() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[limits]\nstreams_per_connection_per_sec = 1\nstream_burst_per_connection = 1\nmax_rate_limited_streams_per_connection = 5\n",
    )
    .await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let mut streams = Vec::new();
    for _ in 0..10 {
        match tunnel.open_stream().await {
            Ok(stream) => streams.push(stream),
            Err(_) => break,
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), tunnel.connection.closed())
        .await
        .expect("connection closed within 10 s");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code.into_inner(), STREAM_RATE_LIMITED)
        }
        other => panic!("expected a close with stream-rate-limited, got {other:?}"),
    }
    let stats = &gw.gateway.shared().stats;
    assert!(stats.streams_rate_limited.load(Ordering::Relaxed) >= 5);
}

/// Makes a listener whose accept queue is full and never drained. Further
/// SYNs are dropped, so connects to it hang until they time out.
fn stalled_listener() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    // Linux queues backlog + 1 connections; fill the queue so that the
    // gateway's SYNs find it full.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(tcp) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            fillers.push(tcp);
        }
    }
    (socket, fillers, addr)
}

#[tokio::test]
async fn dial_cap_resets_extra_stream_with_upstream_busy() {
    let (_listener, _fillers, slow) = stalled_listener();
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(slow)],
        "[limits]\nmax_upstream_dials_per_application = 2\nupstream_dial_wait_ms = 300\nupstream_connect_timeout_ms = 20000\n",
    )
    .await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let shared = gw.gateway.shared();
    let mut dialing = Vec::new();
    for _ in 0..2 {
        dialing.push(tunnel.open_stream().await.expect("open"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.dials.in_progress("wiki") < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(shared.dials.in_progress("wiki"), 2, "two dials hang");

    let started = Instant::now();
    let (_send, mut recv) = tunnel.open_stream().await.expect("open third");
    assert_eq!(reset_code(&mut recv).await, Some(UPSTREAM_BUSY));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the stream waited for a slot first"
    );
    assert_eq!(shared.stats.upstream_dials_busy.load(Ordering::Relaxed), 1);
    assert_eq!(
        shared.dials.in_progress("wiki"),
        2,
        "the hanging dials keep their slots"
    );
    assert!(tunnel.connection.close_reason().is_none());
}
