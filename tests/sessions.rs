//! Live sessions: re-evaluation on reload and on decision expiry, deadlines,
//! shutdown, and the addresses sessions record.

mod common;

use common::*;
use std::time::Duration;
use ztgate::client::Ending;
use ztgate::protocol::Code;

async fn echo_once(tunnel: &ztgate::client::Tunnel, payload: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    send.write_all(payload).await.expect("write");
    send.finish().expect("finish");
    tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("echo within 10 s")
        .expect("read")
}

async fn ending_within(tunnel: &mut ztgate::client::Tunnel, limit: Duration) -> Ending {
    tokio::time::timeout(limit, tunnel.ended())
        .await
        .expect("the tunnel ends in time")
}

fn assert_closed_with(ending: &Ending, code: Code) {
    match ending {
        Ending::Refused {
            code: Some(c),
            message,
        } => {
            assert_eq!(*c, code, "{message}");
        }
        Ending::Transient(message) if code.is_transient() => {
            assert!(message.starts_with(code.sentence()), "{message}");
        }
        other => panic!("expected a close with {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn reload_removing_ca_closes_live_session() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, mut tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    assert_eq!(echo_once(&tunnel, b"before").await, b"before");
    let pki = pki();
    let text = std::fs::read_to_string(&gw.config).expect("read");
    std::fs::write(
        &gw.config,
        text.replace(
            &format!("{}/device-ca.pem", pki.display()),
            &format!("{}/other-ca.pem", pki.display()),
        ),
    )
    .expect("write");
    gw.gateway.reload().await.expect("reload");
    let ending = ending_within(&mut tunnel, Duration::from_secs(10)).await;
    assert_closed_with(&ending, Code::CertificateUntrusted);
    assert_eq!(gw.gateway.shared().registry.session_count(), 0);
}

#[tokio::test]
async fn reload_that_denies_device_closes_its_session_only() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_c1, mut first) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (_c2, second) = connect(gw.addr(), "DEV-0002", WIKI).await;
    let mut app = App::wiki(upstream);
    app.access = r#"device_cas = ["dev-devices"]
spiffe_prefixes = ["spiffe://example.test/device/DEV-0002"]"#
        .to_string();
    rewrite_config(&gw.config, "127.0.0.1:0", &[app], "");
    gw.gateway.reload().await.expect("reload");
    let ending = ending_within(&mut first, Duration::from_secs(10)).await;
    assert_closed_with(&ending, Code::PolicyDenied);
    assert_eq!(echo_once(&second, b"still allowed").await, b"still allowed");
}

#[tokio::test]
async fn reload_adding_application_keeps_tunnels() {
    let upstream = echo_server("127.0.0.1:0").await;
    let other_upstream = banner_server().await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let mut mail = App::wiki(other_upstream);
    mail.name = "mail";
    mail.server_name = "mail.apps.example.test".into();
    rewrite_config(&gw.config, "127.0.0.1:0", &[App::wiki(upstream), mail], "");
    gw.gateway.reload().await.expect("reload");
    assert_eq!(echo_once(&tunnel, b"same tunnel").await, b"same tunnel");
    let (_c2, mail_tunnel) = connect(gw.addr(), "DEV-0001", "mail.apps.example.test").await;
    assert_eq!(mail_tunnel.admitted.application, "mail");
}

#[tokio::test]
async fn invalid_reload_keeps_serving() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let good = std::fs::read_to_string(&gw.config).expect("read");
    std::fs::write(
        &gw.config,
        good.replace("[[application]]", "[[aplication]]"),
    )
    .expect("write");
    let errors = gw
        .gateway
        .reload()
        .await
        .expect_err("invalid config rejected");
    assert!(errors.to_string().contains("aplication"), "{errors}");
    assert_eq!(
        gw.gateway.shared().config.current().id,
        1,
        "the old generation stays"
    );
    assert_eq!(echo_once(&tunnel, b"alive").await, b"alive");
    let (_c2, _t2) = connect(gw.addr(), "DEV-0002", WIKI).await;
}

#[tokio::test]
async fn session_outlives_decision_expiry_and_ends_at_max_length() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[policy]\ndecision_lifetime_secs = 1\nmax_session_secs = 3\n",
    )
    .await;
    let (_client, mut tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let admitted = std::time::Instant::now();
    assert_eq!(tunnel.admitted.expires_in_secs, Some(1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(echo_once(&tunnel, b"re-evaluated").await, b"re-evaluated");
    let ending = ending_within(&mut tunnel, Duration::from_secs(10)).await;
    assert_closed_with(&ending, Code::SessionExpired);
    let length = admitted.elapsed();
    assert!(
        length < Duration::from_secs(6),
        "closed {length:?} after admission; the maximum is 3 s"
    );
}

#[tokio::test]
async fn shutdown_drains_streams_then_closes() {
    // The upstream answers each line one second late, so a stream is in
    // progress when the gateway starts to shut down.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 64];
                if let Ok(n) = tcp.read(&mut buf).await {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = tcp.write_all(&buf[..n]).await;
                }
            });
        }
    });
    // The drain deadline is far beyond the one-second reply, so an early close
    // shows that the session closed when its stream finished.
    let (_dir, config) =
        write_config_with("127.0.0.1:0", &[App::wiki(upstream)], "drain_secs = 30", "");
    let gateway = ztgate::gateway::Gateway::start(&config)
        .await
        .expect("gateway");
    let addr = gateway.quic_addrs()[0];
    let (_client, mut tunnel) = connect(addr, "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    send.write_all(b"in progress").await.expect("write");
    send.finish().expect("finish");
    // Wait until the gateway forwards the stream.
    let session = gateway.shared().registry.all().pop().expect("one session");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while session
        .streams_active
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream never became active"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    let stop = tokio::spawn(gateway.shutdown());
    // The stream in progress completes during the drain.
    let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(64))
        .await
        .expect("reply during the drain")
        .expect("read");
    assert_eq!(reply, b"in progress");
    // The client was told, then the session closed with going-away once its
    // stream finished, long before the 30 s drain deadline.
    let ending = ending_within(&mut tunnel, Duration::from_secs(15)).await;
    let closed_after = started.elapsed();
    assert_closed_with(&ending, Code::GoingAway);
    let going_away = tunnel.going_away.clone().expect("a going-away message");
    assert_eq!(going_away.drain_secs, 30);
    assert!(
        closed_after < Duration::from_secs(10),
        "closed after {closed_after:?}"
    );
    // New connections are refused.
    let late = device_client(addr, "DEV-0002", WIKI)
        .connect(Duration::from_secs(3))
        .await;
    assert!(
        late.is_err(),
        "a new connection during shutdown must be refused"
    );
    stop.await.expect("shutdown completes");
}

#[tokio::test]
async fn dual_stack_listener_records_canonical_ipv4() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("[::]:0", &[App::wiki(upstream)], "").await;
    let port = gw.addr().port();
    let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (_client, tunnel) = connect(target, "DEV-0001", WIKI).await;
    let sessions = gw.gateway.shared().registry.all();
    assert_eq!(sessions.len(), 1);
    let client = *sessions[0].client.lock().expect("lock");
    assert!(
        client.is_ipv4(),
        "recorded {client}, expected an IPv4 address"
    );
    assert_eq!(client.ip().to_string(), "127.0.0.1");
    assert_eq!(echo_once(&tunnel, b"v4").await, b"v4");
}

#[tokio::test]
async fn reload_moving_upstream_applies_to_new_streams() {
    let old_upstream = echo_server("127.0.0.1:0").await;
    let new_upstream = banner_server().await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(old_upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    assert_eq!(echo_once(&tunnel, b"old").await, b"old");
    rewrite_config(&gw.config, "127.0.0.1:0", &[App::wiki(new_upstream)], "");
    gw.gateway.reload().await.expect("reload");
    // The session is re-evaluated on the reload; poll until new streams reach
    // the new upstream, which greets first.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_send, mut recv) = tunnel.open_stream().await.expect("open");
        let mut banner = [0u8; 3];
        let read =
            tokio::time::timeout(Duration::from_millis(500), recv.read_exact(&mut banner)).await;
        if matches!(read, Ok(Ok(()))) && &banner == b"220" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new streams never reached the new upstream"
        );
    }
}

#[tokio::test]
async fn metrics_count_the_traffic_sent() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let metrics_addr = gw.gateway.metrics_addr().expect("metrics listener");
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let payload = pattern(100_000, 3);
    assert_eq!(echo_once(&tunnel, &payload).await, payload);
    let _ = refusal(gw.addr(), "DEV-0003", WIKI).await;
    // Metrics are process-wide and other tests run in this process, so the
    // check is that this test's traffic is counted, at least.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{metrics_addr}/metrics"))
            .output()
            .await
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let bytes = metric_value(
            &text,
            "ztgate_bytes_total{application=\"wiki\",direction=\"to_upstream\"}",
        );
        if bytes >= 100_000.0 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metric_value(
            &text,
            "ztgate_bytes_total{application=\"wiki\",direction=\"to_upstream\"}"
        ) >= 100_000.0,
        "{text}"
    );
    assert!(
        metric_value(
            &text,
            "ztgate_bytes_total{application=\"wiki\",direction=\"to_client\"}"
        ) >= 100_000.0,
        "{text}"
    );
    assert!(
        metric_value(
            &text,
            "ztgate_connections_total{outcome=\"admitted\",code=\"no-error\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric_value(
            &text,
            "ztgate_connections_total{outcome=\"refused\",code=\"policy-denied\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric_value(&text, "ztgate_streams_total{application=\"wiki\"}") >= 1.0,
        "{text}"
    );
    assert!(
        metric_value(
            &text,
            "ztgate_policy_decisions_total{engine=\"builtin\",outcome=\"deny\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("ztgate_policy_decision_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("ztgate_upstream_connect_duration_seconds_bucket"),
        "{text}"
    );
}

fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
