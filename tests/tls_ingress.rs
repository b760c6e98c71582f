//! The TLS-over-TCP ingress with real sockets and standard tools: curl and
//! openssl s_client with only a device certificate, rustls clients for exact
//! checks, refusals during and after the handshake, half-close and limits.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

const TLS_LISTEN: &str = "listen_tls = [\"127.0.0.1:0\"]";

async fn tls_gateway(apps: &[App], extra: &str) -> TestGateway {
    TestGateway::start_with("127.0.0.1:0", apps, TLS_LISTEN, extra).await
}

/// Reads until EOF or an error, bounded in time.
async fn read_to_end(stream: &mut TlsStream<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("no end within 10 s"))??;
    Ok(out)
}

#[tokio::test]
async fn tls_tunnel_echoes_bytes() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    let mut stream = tls_connect(gw.tls_addr(), "DEV-0001", WIKI)
        .await
        .expect("handshake");
    let data = pattern(4 * 1024 * 1024, 3);
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let expected = data.clone();
    let writer = async move {
        write.write_all(&data).await.expect("write");
        write.shutdown().await.expect("close_notify");
    };
    let reader = async move {
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.map(|_| got)
    };
    let (_, got) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("echo within 60 s");
    let got = got.expect("clean end with close_notify");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "echoed bytes differ");
    let sessions = gw.gateway.shared().stats.admitted.load(Ordering::Relaxed);
    assert_eq!(sessions, 1);
}

#[tokio::test]
async fn curl_fetches_page_with_certificate_only() {
    let site = tempfile::tempdir().expect("site dir");
    std::fs::write(
        site.path().join("index.html"),
        "<h1>ztgate TLS ingress page 2718</h1>\n",
    )
    .expect("page");
    let mut http = std::process::Command::new("python3");
    http.args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d"])
        .arg(site.path());
    let http = Running::spawn(http, false);
    let serving = http.wait_for("Serving HTTP on 127.0.0.1 port ", Duration::from_secs(20));
    let port: u16 = serving
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("http.server port");

    let mut app = App::wiki(format!("127.0.0.1:{port}").parse().expect("addr"));
    app.extra = "tls_alpn = [\"http/1.1\"]".into();
    let gw = tls_gateway(&[app], "").await;
    let tls = gw.tls_addr();
    let pki = pki();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--write-out", "\n%{http_code}"])
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--cacert")
        .arg(pki.join("root-ca.pem"))
        .arg("--resolve")
        .arg(format!("{WIKI}:{}:127.0.0.1", tls.port()))
        .arg(format!("https://{WIKI}:{}/index.html", tls.port()))
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "<h1>ztgate TLS ingress page 2718</h1>\n\n200"
    );
}

#[tokio::test]
async fn application_alpn_is_negotiated() {
    let upstream = echo_server("127.0.0.1:0").await;
    let mut app = App::wiki(upstream);
    app.extra = "tls_alpn = [\"http/1.1\"]".into();
    let gw = tls_gateway(&[app], "").await;
    let name = rustls::pki_types::ServerName::try_from(WIKI).expect("name");

    let tcp = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(device_tls("DEV-0001", &["h2", "http/1.1"]));
    let stream = connector
        .connect(name.clone(), tcp)
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // ztgate/1 belongs to the QUIC ingress and is never offered over TCP.
    let tcp = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(device_tls("DEV-0001", &["ztgate/1"]));
    let error = connector
        .connect(name, tcp)
        .await
        .expect_err("no common protocol");
    assert!(
        error.to_string().contains("NoApplicationProtocol"),
        "{error}"
    );
}

/// Runs `openssl s_client` against the TLS listener and returns the child
/// with stdin and stdout piped.
fn s_client(addr: SocketAddr, device: &str) -> tokio::process::Child {
    let pki = pki();
    tokio::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error"])
        .arg("-cert")
        .arg(pki.join(format!("{device}.pem")))
        .arg("-cert_chain")
        .arg(pki.join(if device == "DEV-ROGUE" {
            "other-ca.pem"
        } else {
            "device-ca.pem"
        }))
        .arg("-key")
        .arg(pki.join(format!("{device}.key")))
        .arg("-CAfile")
        .arg(pki.join("root-ca.pem"))
        .args(["-servername", WIKI, "-connect"])
        .arg(addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run openssl s_client")
}

#[tokio::test]
async fn openssl_s_client_reaches_echo_upstream() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    let mut child = s_client(gw.tls_addr(), "DEV-0001");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    stdin
        .write_all(b"hello through openssl\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while !got.ends_with(b"hello through openssl\n") {
            let n = stdout.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    assert!(matches!(read, Ok(Ok(()))), "no echo within 20 s: {read:?}");
    assert_eq!(String::from_utf8_lossy(&got), "hello through openssl\n");
    let _ = child.kill().await;
}

/// Connects with DEV-ROGUE, whose CA the gateway does not trust, and checks
/// that the connection ends with the unknown_ca alert.
async fn expect_unknown_ca(tls: SocketAddr) {
    let mut stream = tls_connect(tls, "DEV-ROGUE", WIKI)
        .await
        .expect("TLS 1.3 clients finish before the server's verdict");
    let _ = stream.write_all(b"x").await;
    let error = read_to_end(&mut stream)
        .await
        .expect_err("the gateway rejects the certificate");
    assert!(error.to_string().contains("UnknownCA"), "{error}");
}

#[tokio::test]
async fn rogue_certificate_gets_tls_alert() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;

    // openssl reports the alert the gateway sent.
    let mut child = s_client(gw.tls_addr(), "DEV-ROGUE");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(b"anyone there?\n").await;
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("s_client exits within 20 s")
        .expect("s_client output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("alert unknown ca"), "{stderr}");
    assert!(output.stdout.is_empty(), "no upstream byte may arrive");

    // rustls sees the same alert as the precise error.
    expect_unknown_ca(gw.tls_addr()).await;

    let stats = &gw.gateway.shared().stats;
    assert_eq!(stats.handshakes_failed.load(Ordering::Relaxed), 2);
    assert_eq!(stats.admitted.load(Ordering::Relaxed), 0);
    assert_eq!(gw.gateway.shared().registry.session_count(), 0);
}

/// Starts `ztgate serve` as a process with a TLS listener, whose log lines
/// the test reads. Returns the config directory, the process and the TLS
/// address.
fn serve_process(apps: &[App]) -> (tempfile::TempDir, Running, SocketAddr) {
    let (dir, config) = write_config_with("127.0.0.1:0", apps, TLS_LISTEN, "");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn_both(command);
    let tls = serve
        .wait_for("ztgate: listening tls ", Duration::from_secs(20))
        .parse()
        .expect("TLS address");
    (dir, serve, tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_device_gets_close_notify_and_log_line() {
    let upstream = echo_server("127.0.0.1:0").await;
    let (_dir, serve, tls) = serve_process(&[App::wiki(upstream)]);

    // DEV-0003 has no hardware-bound mark and the wiki requires one.
    let mut stream = tls_connect(tls, "DEV-0003", WIKI)
        .await
        .expect("the handshake succeeds; admission refuses after it");
    let rest = read_to_end(&mut stream)
        .await
        .expect("a close_notify, not a bare TCP close or reset");
    assert!(rest.is_empty(), "no upstream byte may arrive");
    let line = serve.wait_for_all(
        &[
            "connection refused after the handshake",
            "DEV-0003",
            "app=\"wiki\"",
            "reason=\"policy-denied\"",
        ],
        Duration::from_secs(10),
    );
    assert!(line.contains("transport=\"tls\""), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_certificate_refusal_is_logged_with_leaf() {
    let upstream = echo_server("127.0.0.1:0").await;
    let (_dir, serve, tls) = serve_process(&[App::wiki(upstream)]);

    // Two handshakes: the verifier is shared, and each must record the
    // rejection into its own connection's outcome.
    for _ in 0..2 {
        expect_unknown_ca(tls).await;
    }

    let line = serve.wait_for_all(
        &[
            "connection refused at the handshake",
            "reason=\"unknown-ca\"",
            "unverified_subject=",
            "DEV-ROGUE",
        ],
        Duration::from_secs(10),
    );
    assert!(line.contains("transport=\"tls\""), "{line}");
    assert!(line.contains("app=\"wiki"), "{line}");
}

#[tokio::test]
async fn unknown_application_is_closed_after_handshake() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    let mut stream = tls_connect(gw.tls_addr(), "DEV-0001", "nothing.apps.example.test")
        .await
        .expect("handshake");
    let rest = read_to_end(&mut stream).await.expect("close_notify");
    assert!(rest.is_empty());
    assert_eq!(gw.gateway.shared().stats.refused.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn half_close_from_client_over_tls() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    let mut stream = tls_connect(gw.tls_addr(), "DEV-0001", WIKI)
        .await
        .expect("handshake");
    stream.write_all(b"ping").await.expect("write");
    stream.shutdown().await.expect("close_notify");
    // The echo server half-closes only after it reads EOF, so the
    // close_notify reached it as a FIN and the answer still came back.
    let echoed = read_to_end(&mut stream)
        .await
        .expect("echo, then close_notify");
    assert_eq!(echoed, b"ping");
}

#[tokio::test]
async fn half_close_from_upstream_over_tls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let (rest_tx, rest_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        tcp.write_all(b"hello").await.expect("greet");
        tcp.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest)
            .await
            .expect("read after half-close");
        let _ = rest_tx.send(rest);
    });
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    let mut stream = tls_connect(gw.tls_addr(), "DEV-0001", WIKI)
        .await
        .expect("handshake");
    let mut greeting = [0u8; 5];
    stream.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"hello");
    let mut eof = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut eof))
        .await
        .expect("close_notify within 10 s")
        .expect("clean end of the upstream direction");
    assert_eq!(n, 0);
    stream
        .write_all(b"still talking")
        .await
        .expect("write after the peer's close_notify");
    stream.shutdown().await.expect("close_notify");
    let rest = tokio::time::timeout(Duration::from_secs(10), rest_rx)
        .await
        .expect("upstream saw FIN")
        .expect("upstream result");
    assert_eq!(rest, b"still talking");
}

#[tokio::test]
async fn upstream_reset_resets_tls_connection() {
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
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    let mut stream = tls_connect(gw.tls_addr(), "DEV-0001", WIKI)
        .await
        .expect("handshake");
    stream.write_all(b"data").await.expect("write");
    let error = read_to_end(&mut stream)
        .await
        .expect_err("an abort, not a clean end");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test]
async fn silent_tcp_client_is_dropped_at_handshake_deadline() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    // The test config gives handshakes 3 s.
    let mut tcp = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0)), "{read:?}");
    let stats = &gw.gateway.shared().stats;
    assert_eq!(stats.handshake_timeouts.load(Ordering::Relaxed), 1);
    assert_eq!(stats.pending_handshakes.load(Ordering::Relaxed), 0);
    assert_eq!(gw.gateway.shared().registry.connection_count(), 0);
}

#[tokio::test]
async fn per_source_cap_applies_to_tls() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(
        &[App::wiki(upstream)],
        "[limits]\nmax_connections_per_source = 1\n",
    )
    .await;
    let mut first = tls_connect(gw.tls_addr(), "DEV-0001", WIKI)
        .await
        .expect("first connection");
    first.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    first.read_exact(&mut one).await.expect("echo");
    let second = tls_connect(gw.tls_addr(), "DEV-0002", WIKI).await;
    assert!(
        second.is_err(),
        "a second connection from 127.0.0.1 is refused"
    );
    assert_eq!(
        gw.gateway
            .shared()
            .stats
            .refused_by_cap
            .load(Ordering::Relaxed),
        1
    );
}

#[test]
fn ztgate_alpn_is_rejected_in_tls_alpn() {
    let mut app = App::wiki("127.0.0.1:9".parse().expect("addr"));
    app.extra = "tls_alpn = [\"http/1.1\", \"ztgate/1\"]".into();
    let (_dir, config) = write_config_with("127.0.0.1:0", &[app], TLS_LISTEN, "");
    let errors = ztgate::config::load_generation(&config, 1)
        .expect_err("ztgate/1 is refused")
        .to_string();
    assert!(
        errors.contains("application[0].tls_alpn[1]: ztgate/1 is the QUIC ingress protocol"),
        "{errors}"
    );
}

#[test]
fn tls_only_gateway_config_is_valid() {
    let dir = tempfile::tempdir().expect("dir");
    let (_cfg_dir, config) = write_config_with(
        "127.0.0.1:0",
        &[App::wiki("127.0.0.1:9".parse().expect("addr"))],
        TLS_LISTEN,
        "",
    );
    let text = std::fs::read_to_string(&config).expect("read");
    let path = dir.path().join("tls-only.toml");
    std::fs::write(&path, text.replace("listen = [\"127.0.0.1:0\"]\n", "")).expect("write");
    let generation = ztgate::config::load_generation(&path, 1).expect("valid without QUIC");
    assert!(generation.listen.is_empty());
    assert_eq!(generation.listen_tls.len(), 1);
}

/// `ztgate connect` for DEV-0001 to the wiki on a loopback port, with `args`.
fn connect_command(args: &[String]) -> std::process::Command {
    let pki = pki();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command
        .args(["connect", "--app", WIKI, "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"))
        .args(args);
    command
}

/// Sends `payload` through the local listener, half-closes, and returns
/// what came back before the end.
async fn echo_via(local: &str, payload: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(local).await.expect("connect local");
    tcp.write_all(payload).await.expect("write");
    tcp.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut back))
        .await
        .expect("echo within 20 s")
        .expect("read");
    back
}

fn transports(gw: &TestGateway) -> Vec<ztgate::policy::Transport> {
    gw.gateway
        .shared()
        .registry
        .all()
        .iter()
        .map(|s| s.transport)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tls_transport_carries_local_connections() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    // Without --gateway-tls the TLS address is the --gateway one.
    let args = [
        "--transport".to_string(),
        "tls".into(),
        "--gateway".into(),
        gw.tls_addr().to_string(),
    ];
    let client = Running::spawn(connect_command(&args), true);
    let local = client.wait_for("listening on ", Duration::from_secs(20));
    let data = pattern(1024 * 1024, 5);
    assert!(echo_via(&local, &data).await == data, "echoed bytes differ");
    assert_eq!(echo_via(&local, b"again").await, b"again");
    let stats = &gw.gateway.shared().stats;
    assert_eq!(stats.admitted.load(Ordering::Relaxed), 2);
    assert_eq!(
        stats.admitted_resumed.load(Ordering::Relaxed),
        1,
        "the second TLS connection resumes the first one's session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_auto_falls_back_to_tls_and_returns_to_quic() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    // QUIC goes through a relay that starts out dropping every datagram.
    let relay = UdpRelay::start(gw.addr(), "127.0.0.9").await;
    relay.control.blocked.store(true, Ordering::Relaxed);
    let args = [
        "--transport".to_string(),
        "auto".into(),
        "--gateway".into(),
        relay.addr.to_string(),
        "--gateway-tls".into(),
        gw.tls_addr().to_string(),
        "--quic-timeout-ms".into(),
        "500".into(),
        "--max-backoff-secs".into(),
        "1".into(),
    ];
    let client = Running::spawn(connect_command(&args), true);
    client.wait_for("using TLS over TCP", Duration::from_secs(20));
    let local = client.wait_for("listening on ", Duration::from_secs(20));

    // A held-open connection shows which transport carries it.
    let mut held = TcpStream::connect(&local).await.expect("connect local");
    held.write_all(b"over tls").await.expect("write");
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(20), held.read_exact(&mut back))
        .await
        .expect("echo within 20 s")
        .expect("read");
    assert_eq!(&back, b"over tls");
    assert_eq!(transports(&gw), [ztgate::policy::Transport::Tls]);
    drop(held);

    // UDP gets through again: the client goes back to QUIC on its own.
    relay.control.blocked.store(false, Ordering::Relaxed);
    client.wait_for("admitted to wiki", Duration::from_secs(20));
    let mut held = TcpStream::connect(&local).await.expect("connect local");
    held.write_all(b"via quic").await.expect("write");
    tokio::time::timeout(Duration::from_secs(20), held.read_exact(&mut back))
        .await
        .expect("echo within 20 s")
        .expect("read");
    assert_eq!(&back, b"via quic");
    let quic_only = wait_for_transports(&gw, &[ztgate::policy::Transport::Quic]).await;
    assert!(quic_only, "sessions: {:?}", transports(&gw));
}

/// Waits until the live sessions use exactly `expected` transports.
async fn wait_for_transports(gw: &TestGateway, expected: &[ztgate::policy::Transport]) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if transports(gw) == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// rustls clients list AES-256-GCM first; the gateway's order wins and
/// picks AES-128-GCM with SHA-256.
#[tokio::test]
async fn gateway_cipher_suite_order_wins() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = tls_gateway(&[App::wiki(upstream)], "").await;
    let name = rustls::pki_types::ServerName::try_from(WIKI).expect("name");
    let client = device_tls("DEV-0001", &[]);
    assert_eq!(
        client.crypto_provider().cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        "the client no longer prefers AES-256, so this test proves nothing"
    );

    let tcp = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    let stream = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let suite = stream
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .expect("a negotiated suite");
    assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
}
