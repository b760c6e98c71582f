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

fn ocsp_section(responder: SocketAddr) -> String {
    format!("[ocsp]\nresponder_url = \"http://{responder}\"\ntimeout_ms = 1000\n")
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
    let nobody = closed_port().await;
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
