//! Revocation through the gateway: OCSP answers from a real `openssl ocsp`
//! responder, and operator pushes through the admin API closing live tunnels.
//!
//! In this test binary DEV-0002 is revoked in the device CA's database from
//! the start; DEV-0001 stays good.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use ztgate::client::Ending;
use ztgate::protocol::Code;

/// The shared PKI with DEV-0002 revoked in the device CA's database.
fn revoked_pki() -> &'static std::path::Path {
    static DONE: OnceLock<()> = OnceLock::new();
    let pki = pki();
    DONE.get_or_init(|| {
        let out = Command::new("openssl")
            .args(["ca", "-config"])
            .arg(pki.join("ca/ca.cnf"))
            .args(["-name", "device_ca", "-revoke"])
            .arg(pki.join("DEV-0002.pem"))
            .args(["-crl_reason", "keyCompromise"])
            .output()
            .expect("openssl ca -revoke");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    pki
}

/// A running scripts/ocsp-responder.py, stopped on drop.
struct Responder {
    child: Child,
    addr: SocketAddr,
}

impl Responder {
    fn start(extra: &[&str]) -> Responder {
        let pki = revoked_pki();
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ocsp-responder.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", "0", "--max-seconds", "300", "--nmin", "5"])
            .arg("--index")
            .arg(pki.join("ca/device-ca/index.txt"))
            .arg("--ca")
            .arg(pki.join("device-ca.pem"))
            .arg("--rsigner")
            .arg(pki.join("device-ca.pem"))
            .arg("--rkey")
            .arg(pki.join("device-ca.key"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the OCSP responder");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("responder prints its address");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Responder { child, addr }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The responder runs `openssl ocsp` for every request, which can take a
/// while on a loaded machine, so the timeout is generous. It stays below the
/// 10 s connect timeout of the test clients.
fn ocsp_section(responder: SocketAddr) -> String {
    format!("[ocsp]\nresponder_url = \"http://{responder}\"\ntimeout_ms = 5000\n")
}

fn assert_code(ending: &Ending, code: Code) {
    match ending {
        Ending::Refused {
            code: Some(c),
            message,
        } => assert_eq!(*c, code, "{message}"),
        Ending::Transient(message) if code.is_transient() => {
            assert!(message.starts_with(code.sentence()), "{message}")
        }
        other => panic!("expected {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn ocsp_hard_fail_admits_good_and_refuses_revoked() {
    let _ = revoked_pki();
    let responder = Responder::start(&[]);
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[ocsp_app_plain(upstream, "hard-fail")],
        &ocsp_section(responder.addr),
    )
    .await;
    let (_c, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    assert_eq!(tunnel.admitted.application, "wiki");
    let revoked = refusal(gw.addr(), "DEV-0002", WIKI).await;
    assert_code(&revoked, Code::CertificateRevoked);
}

#[tokio::test]
async fn ocsp_responder_down_hard_fail_refuses_soft_fail_admits() {
    let _ = revoked_pki();
    let upstream = echo_server("127.0.0.1:0").await;
    let closed = closed_port();
    let nobody = closed.addr;
    let hard = TestGateway::start(
        "127.0.0.1:0",
        &[ocsp_app_plain(upstream, "hard-fail")],
        &ocsp_section(nobody),
    )
    .await;
    let refused = refusal(hard.addr(), "DEV-0001", WIKI).await;
    assert_code(&refused, Code::RevocationUnknown);
    let soft = TestGateway::start(
        "127.0.0.1:0",
        &[ocsp_app_plain(upstream, "soft-fail")],
        &ocsp_section(nobody),
    )
    .await;
    let (_c, tunnel) = connect(soft.addr(), "DEV-0001", WIKI).await;
    assert_eq!(tunnel.admitted.application, "wiki");
}

#[tokio::test]
async fn ocsp_garbage_reply_refuses_under_hard_fail() {
    let _ = revoked_pki();
    let responder = Responder::start(&["--mode", "garbage"]);
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[ocsp_app_plain(upstream, "hard-fail")],
        &ocsp_section(responder.addr),
    )
    .await;
    let refused = refusal(gw.addr(), "DEV-0001", WIKI).await;
    assert_code(&refused, Code::RevocationUnknown);
    // The gateway keeps serving other applications and devices.
    assert_eq!(gw.gateway.shared().registry.session_count(), 0);
}

fn ocsp_app_plain(upstream: SocketAddr, mode: &str) -> App {
    let mut app = App::wiki(upstream);
    // The config writer quotes the upstream value; the extra keys ride
    // between the quotes.
    app.upstream = format!(
        "{upstream}\"\nocsp = \"{mode}\"\nocsp_max_staleness_secs = 3600\non_policy_failure = \"refuse"
    );
    app
}

#[tokio::test]
async fn admin_push_closes_live_tunnel() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("admin.sock");
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        &format!("[admin]\nsocket_path = \"{}\"\n", socket.display()),
    )
    .await;
    let (_c1, mut victim) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (_c2, bystander) = connect(gw.addr(), "DEV-0002", WIKI).await;
    let cert = std::fs::read(pki().join("DEV-0001.pem")).expect("cert");
    let der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(&cert).expect("pem");
    let identity = ztgate::identity::extract_identity(&der, None).expect("identity");
    let body = format!(
        "{{\"cert_sha256\": \"{}\", \"reason\": \"lost phone\"}}",
        identity.cert_sha256
    );
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket"])
        .arg(&socket)
        .args([
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &body,
        ])
        .arg("http://localhost/v1/revocations")
        .output()
        .await
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json answer");
    assert_eq!(answer["closed_sessions"], 1, "{answer}");
    let ending = tokio::time::timeout(Duration::from_secs(5), victim.ended())
        .await
        .expect("closed");
    assert_code(&ending, Code::CertificateRevoked);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The other device's tunnel keeps flowing.
    let (mut send, mut recv) = bystander.open_stream().await.expect("open");
    send.write_all(b"still here").await.expect("write");
    send.finish().expect("finish");
    let echoed = recv.read_to_end(64).await.expect("echo");
    assert_eq!(echoed, b"still here");
}

/// Serializes `openssl ca` runs, which rewrite the CA database files.
fn openssl_ca(args: &[&str]) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let pki = revoked_pki();
    let out = Command::new("openssl")
        .args(["ca", "-config"])
        .arg(pki.join("ca/ca.cnf"))
        .args(["-name", "device_ca"])
        .args(args)
        .output()
        .expect("openssl ca");
    assert!(
        out.status.success(),
        "openssl ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the device CA's current CRL, DER, into `dir/device-ca.crl`.
fn write_crl(dir: &std::path::Path) {
    write_crl_valid_for(dir, "-crlhours", "1");
}

/// Writes the device CA's CRL whose nextUpdate is the given `openssl ca`
/// period option and value after now, such as ("-crlsec", "2").
fn write_crl_valid_for(dir: &std::path::Path, period: &str, value: &str) {
    let pem = dir.join("device-ca.crl.pem");
    openssl_ca(&[
        "-gencrl",
        period,
        value,
        "-out",
        pem.to_str().expect("path"),
    ]);
    let out = Command::new("openssl")
        .args(["crl", "-in"])
        .arg(&pem)
        .args(["-outform", "DER", "-out"])
        .arg(dir.join("device-ca.crl"))
        .output()
        .expect("openssl crl");
    assert!(out.status.success());
}

/// A `python3 -m http.server` on loopback serving `dir`, stopped on drop.
struct CrlServer {
    child: Child,
    port: u16,
}

impl CrlServer {
    fn start(dir: &std::path::Path) -> CrlServer {
        CrlServer::start_on(dir, 0)
    }

    /// Serves `dir` on `port`, or on a free port when it is 0.
    fn start_on(dir: &std::path::Path, port: u16) -> CrlServer {
        let mut child = Command::new("python3")
            .args(["-u", "-m", "http.server"])
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "-d"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("http.server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("serving line");
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        CrlServer { child, port }
    }
}

impl Drop for CrlServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn crl_cas(port: u16) -> String {
    format!(
        "[[device_ca]]\nname = \"dev-devices\"\ncertificates = [\"{}/device-ca.pem\"]\ncrl_urls = [\"http://127.0.0.1:{port}/device-ca.crl\"]\n",
        revoked_pki().display()
    )
}

fn any_device_app(upstream: SocketAddr) -> App {
    let mut app = App::wiki(upstream);
    app.access = "device_cas = [\"dev-devices\"]\nallow_any_device = true".into();
    app
}

#[tokio::test]
async fn crl_refuses_revoked_and_closes_live_tunnel() {
    let crl_dir = tempfile::tempdir().expect("dir");
    write_crl(crl_dir.path());
    let server = CrlServer::start(crl_dir.path());
    let upstream = echo_server("127.0.0.1:0").await;
    let (_cfg, config) = write_config_with_cas(
        "127.0.0.1:0",
        &[any_device_app(upstream)],
        &crl_cas(server.port),
        "",
    );
    let gateway = ztgate::gateway::Gateway::start(&config)
        .await
        .expect("gateway");
    let addr = gateway.quic_addrs()[0];
    // DEV-0002 is on the CRL fetched at start.
    let revoked = refusal(addr, "DEV-0002", WIKI).await;
    assert_code(&revoked, Code::CertificateRevoked);
    // DEV-0003 and DEV-0001 connect; then DEV-0003 is revoked and the CRL
    // fetched again: its tunnel closes, DEV-0001's keeps flowing.
    let (_c3, mut victim) = connect(addr, "DEV-0003", WIKI).await;
    let (_c1, bystander) = connect(addr, "DEV-0001", WIKI).await;
    openssl_ca(&[
        "-revoke",
        revoked_pki().join("DEV-0003.pem").to_str().expect("path"),
        "-crl_reason",
        "keyCompromise",
    ]);
    write_crl(crl_dir.path());
    let fetched = std::time::Instant::now();
    let reports = gateway.shared().crl.refresh_now(None).await;
    assert!(reports.iter().all(|r| r.result.is_ok()), "{reports:?}");
    let ending = tokio::time::timeout(Duration::from_secs(5), victim.ended())
        .await
        .expect("closed within 5 s");
    assert_code(&ending, Code::CertificateRevoked);
    assert!(fetched.elapsed() < Duration::from_secs(5));
    let (mut send, mut recv) = bystander.open_stream().await.expect("open");
    send.write_all(b"flowing").await.expect("write");
    send.finish().expect("finish");
    assert_eq!(recv.read_to_end(64).await.expect("echo"), b"flowing");
}

async fn push_cert(socket: &std::path::Path, device: &str) -> serde_json::Value {
    let cert = std::fs::read(pki().join(format!("{device}.pem"))).expect("cert");
    let der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(&cert).expect("pem");
    let identity = ztgate::identity::extract_identity(&der, None).expect("identity");
    let body = format!(
        "{{\"cert_sha256\": \"{}\", \"reason\": \"lost\"}}",
        identity.cert_sha256
    );
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket"])
        .arg(socket)
        .args([
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &body,
        ])
        .arg("http://localhost/v1/revocations")
        .output()
        .await
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test]
async fn pushed_revocation_survives_restart() {
    let upstream = echo_server("127.0.0.1:0").await;
    let state = tempfile::tempdir().expect("state dir");
    let run = tempfile::tempdir().expect("run dir");
    let socket = run.path().join("admin.sock");
    let extra = format!("[admin]\nsocket_path = \"{}\"\n", socket.display());
    let (_cfg, config) = write_config_with(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        &format!("state_dir = \"{}\"", state.path().display()),
        &extra,
    );
    let first = ztgate::gateway::Gateway::start(&config)
        .await
        .expect("gateway");
    push_cert(&socket, "DEV-0001").await;
    let refused = refusal(first.quic_addrs()[0], "DEV-0001", WIKI).await;
    assert_code(&refused, Code::CertificateRevoked);
    first.shutdown().await;
    assert!(state.path().join("pushed-revocations.json").exists());
    let second = ztgate::gateway::Gateway::start(&config)
        .await
        .expect("restarted gateway");
    let refused = refusal(second.quic_addrs()[0], "DEV-0001", WIKI).await;
    assert_code(&refused, Code::CertificateRevoked);
    second.shutdown().await;
}

#[tokio::test]
async fn resumption_does_not_bypass_revocation() {
    let upstream = echo_server("127.0.0.1:0").await;
    let run = tempfile::tempdir().expect("run dir");
    let socket = run.path().join("admin.sock");
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[any_device_app(upstream)],
        &format!("[admin]\nsocket_path = \"{}\"\n", socket.display()),
    )
    .await;
    let client = device_client(gw.addr(), "DEV-0001", WIKI);
    let first = client
        .connect(Duration::from_secs(10))
        .await
        .expect("first admitted");
    let (mut send, mut recv) = first.open_stream().await.expect("open");
    send.write_all(b"x").await.expect("write");
    send.finish().expect("finish");
    recv.read_to_end(8).await.expect("echo");
    push_cert(&socket, "DEV-0001").await;
    let ending = match client.connect(Duration::from_secs(10)).await {
        Ok(_) => panic!("a revoked device must not get back in by resuming"),
        Err(e) => e,
    };
    assert_code(&ending, Code::CertificateRevoked);
}

/// Fetches GET /v1/ready over the admin socket: (HTTP status, body).
async fn readiness(socket: &std::path::Path) -> (u16, serde_json::Value) {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(socket)
        .arg("http://localhost/v1/ready")
        .output()
        .await
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (
        code.trim().parse().expect("HTTP status"),
        serde_json::from_str(body).expect("readiness JSON"),
    )
}

/// Polls readiness until its `ready` field equals `ready`, for at most 30 s,
/// and returns the last body.
async fn wait_for_readiness(socket: &std::path::Path, ready: bool) -> (u16, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        let (status, body) = readiness(socket).await;
        if body["ready"] == ready {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness did not become {ready} within 30 s: {status} {body}"
        );
    }
}

#[tokio::test]
async fn readiness_follows_crl_staleness() {
    let crl_dir = tempfile::tempdir().expect("dir");
    write_crl(crl_dir.path());
    let server = CrlServer::start(crl_dir.path());
    let upstream = echo_server("127.0.0.1:0").await;
    let run = tempfile::tempdir().expect("run dir");
    let socket = run.path().join("admin.sock");
    let cas = format!(
        "{}stale_grace_secs = 0\non_stale = \"admit\"\n",
        crl_cas(server.port)
    );
    let (_cfg, config) = write_config_with_cas(
        "127.0.0.1:0",
        &[any_device_app(upstream)],
        &cas,
        &format!("[admin]\nsocket_path = \"{}\"\n", socket.display()),
    );
    let gateway = ztgate::gateway::Gateway::start(&config)
        .await
        .expect("gateway");

    let (status, body) = wait_for_readiness(&socket, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revocation_sources"][0]["stale"], false, "{body}");
    let fetch = || async {
        gateway
            .shared()
            .crl
            .refresh_now(None)
            .await
            .into_iter()
            .map(|report| report.result.map(|_| ()))
            .collect::<Vec<_>>()
    };

    // A CRL whose nextUpdate passes 4 s after it was made is fetched, then
    // the server stops serving: the source goes stale and stays stale.
    write_crl_valid_for(crl_dir.path(), "-crlsec", "4");
    let fetched = fetch().await;
    assert!(fetched.iter().all(Result::is_ok), "{fetched:?}");
    let port = server.port;
    drop(server);
    let (status, body) = wait_for_readiness(&socket, false).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["revocation_sources"][0]["stale"], true, "{body}");
    let failed = fetch().await;
    assert!(failed.iter().all(Result::is_err), "{failed:?}");
    let (status, body) = readiness(&socket).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["revocation_sources"][0]["last_error"].is_string(),
        "{body}"
    );

    // The server is back with a fresh CRL: after a successful fetch the
    // gateway is ready again.
    write_crl(crl_dir.path());
    let _server = CrlServer::start_on(crl_dir.path(), port);
    let fetched = fetch().await;
    assert!(fetched.iter().all(Result::is_ok), "{fetched:?}");
    let (status, body) = wait_for_readiness(&socket, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revocation_sources"][0]["stale"], false, "{body}");
    gateway.shutdown().await;
}
