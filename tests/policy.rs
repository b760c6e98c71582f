//! Policy engines through the gateway: the example Rego policy, an OPA REST
//! API server, the decision cache, shadow mode and engine failures.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztgate::client::Ending;
use ztgate::protocol::Code;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Writes the example data with working hours and networks chosen by the
/// test, so outcomes never depend on the time of day the test runs.
fn example_data(dir: &Path, working_hours: (u32, u32), office: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo("config/policy-data.json")).expect("example data");
    let mut data: serde_json::Value = serde_json::from_str(&text).expect("json");
    data["access"]["working_hours"] =
        serde_json::json!({"start": working_hours.0, "end": working_hours.1});
    data["access"]["networks"]["office"] = serde_json::json!([office]);
    let path = dir.join("policy-data.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&data).expect("encode")).expect("write data");
    path
}

fn rego_policy_section(data: &Path) -> String {
    format!(
        "[policy]\nengine = \"rego\"\nrego_files = [\"{}\"]\ndata_file = \"{}\"\n",
        repo("config/policy.rego").display(),
        data.display()
    )
}

fn app(name: &'static str, upstream: SocketAddr, sensitivity: &str) -> App {
    App {
        name,
        server_name: format!("{name}.apps.example.test"),
        upstream: upstream.to_string(),
        access: String::new(),
        extra: String::new(),
    }
    .with_labels(sensitivity)
}

trait WithLabels {
    fn with_labels(self, sensitivity: &str) -> App;
}

impl WithLabels for App {
    fn with_labels(mut self, sensitivity: &str) -> App {
        // The access table is unused by the Rego engine; the labels table
        // follows the application's keys.
        self.access = String::new();
        self.upstream = format!(
            "{}\"\n[application.labels]\nsensitivity = \"{sensitivity}",
            self.upstream
        );
        self
    }
}

fn assert_refused(ending: &Ending, code: Code, reason_part: &str) {
    match ending {
        Ending::Refused {
            code: Some(c),
            message,
        } => {
            assert_eq!(*c, code, "{message}");
            assert!(message.contains(reason_part), "{message}");
        }
        other => panic!("expected {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn example_rego_allows_denies_and_steps_up() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    // Working hours never, and 127.0.0.0/8 is not an office network: every
    // connection from loopback must step up unless posture says otherwise.
    let after_hours = example_data(dir.path(), (0, 0), "10.20.0.0/16");
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[
            app("wiki", upstream, "medium"),
            app("vault", upstream, "high"),
        ],
        &rego_policy_section(&after_hours),
    )
    .await;
    let step_up = refusal(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    assert_refused(
        &step_up,
        Code::StepUpRequired,
        "https://idp.example.test/step-up",
    );

    // The office network now contains loopback: allow, deny by grant and by
    // hardware binding.
    let in_office = example_data(dir.path(), (0, 0), "127.0.0.0/8");
    let text = std::fs::read_to_string(&gw.config).expect("config");
    std::fs::write(
        &gw.config,
        text.replace(
            &after_hours.display().to_string(),
            &in_office.display().to_string(),
        ),
    )
    .expect("write");
    gw.gateway.reload().await.expect("reload");
    let (_c, tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    assert_eq!(tunnel.admitted.application, "wiki");
    let (_c, vault) = connect(gw.addr(), "DEV-0001", "vault.apps.example.test").await;
    assert_eq!(vault.admitted.application, "vault");
    // DEV-0003 is in sales, which is not granted the high-sensitivity vault.
    let denied = refusal(gw.addr(), "DEV-0003", "vault.apps.example.test").await;
    assert_refused(&denied, Code::PolicyDenied, "no group of device");
    // DEV-0002 is in the inventory and allowed.
    let (_c, _t) = connect(gw.addr(), "DEV-0002", "wiki.apps.example.test").await;

    // Put DEV-0003 (no hardware-bound key) in engineering: the high
    // sensitivity vault now denies it for the missing hardware binding.
    let mut data: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&in_office).expect("read")).expect("json");
    data["access"]["devices"]["spiffe://example.test/device/DEV-0003"]["groups"] =
        serde_json::json!(["engineering"]);
    std::fs::write(&in_office, serde_json::to_vec(&data).expect("encode")).expect("write");
    gw.gateway.reload().await.expect("reload");
    let unbound = refusal(gw.addr(), "DEV-0003", "vault.apps.example.test").await;
    assert_refused(
        &unbound,
        Code::PolicyDenied,
        "requires a hardware-bound key",
    );
}

#[tokio::test]
async fn rego_syntax_error_names_file_and_line() {
    let dir = tempfile::tempdir().expect("dir");
    let broken = dir.path().join("broken.rego");
    std::fs::write(
        &broken,
        "package ztgate\n\nimport rego.v1\n\ndecision := {\"outcome\": \"allow\"\n",
    )
    .expect("write");
    let (_cfg, path) = write_config(
        "127.0.0.1:0",
        &[app("wiki", "127.0.0.1:9".parse().expect("addr"), "low")],
        &format!(
            "[policy]\nengine = \"rego\"\nrego_files = [\"{}\"]\n",
            broken.display()
        ),
    );
    let errors = ztgate::config::load_generation(&path, 1).expect_err("syntax error rejected");
    let text = errors.to_string();
    assert!(text.contains("policy.rego_files"), "{text}");
    assert!(text.contains("broken.rego"), "{text}");
    assert!(
        text.contains(":5") || text.contains("line 5") || text.contains(":6"),
        "no line number in: {text}"
    );
}

#[tokio::test]
async fn rego_reload_with_syntax_error_keeps_old_policy() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let data = example_data(dir.path(), (0, 24), "10.20.0.0/16");
    let policy = dir.path().join("policy.rego");
    std::fs::copy(repo("config/policy.rego"), &policy).expect("copy policy");
    let section = format!(
        "[policy]\nengine = \"rego\"\nrego_files = [\"{}\"]\ndata_file = \"{}\"\n",
        policy.display(),
        data.display()
    );
    let gw = TestGateway::start("127.0.0.1:0", &[app("wiki", upstream, "low")], &section).await;
    let (_c, _t) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    std::fs::write(&policy, "package ztgate\ndecision := {").expect("break policy");
    let errors = gw
        .gateway
        .reload()
        .await
        .expect_err("broken policy rejected at reload");
    assert!(errors.to_string().contains("policy.rego"), "{errors}");
    let (_c2, _t2) = connect(gw.addr(), "DEV-0002", "wiki.apps.example.test").await;
}

#[tokio::test]
async fn policy_reload_closes_live_session() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let data = example_data(dir.path(), (0, 24), "10.20.0.0/16");
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[app("wiki", upstream, "low")],
        &rego_policy_section(&data),
    )
    .await;
    let (_c, mut tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    // Remove DEV-0001 from the inventory and reload.
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&data).expect("read")).expect("json");
    value["access"]["devices"]
        .as_object_mut()
        .expect("devices")
        .remove("spiffe://example.test/device/DEV-0001");
    std::fs::write(&data, serde_json::to_vec(&value).expect("encode")).expect("write");
    gw.gateway.reload().await.expect("reload");
    let ending = tokio::time::timeout(Duration::from_secs(10), tunnel.ended())
        .await
        .expect("closed");
    assert_refused(&ending, Code::PolicyDenied, "not in the inventory");
    let new = refusal(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    assert_refused(&new, Code::PolicyDenied, "not in the inventory");
}

/// How the fake OPA server answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpaMode {
    Allow,
    Deny,
    Malformed,
    Hang,
}

/// A server of the OPA REST Data API's shape: POST /v1/data/ztgate/decision.
struct FakeOpa {
    addr: SocketAddr,
    mode: Arc<std::sync::Mutex<OpaMode>>,
    requests: Arc<AtomicUsize>,
    last_input: Arc<std::sync::Mutex<serde_json::Value>>,
}

impl FakeOpa {
    async fn start() -> FakeOpa {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(std::sync::Mutex::new(OpaMode::Allow));
        let requests = Arc::new(AtomicUsize::new(0));
        let last_input = Arc::new(std::sync::Mutex::new(serde_json::Value::Null));
        let (m, r, l) = (mode.clone(), requests.clone(), last_input.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (m, r, l) = (m.clone(), r.clone(), l.clone());
                tokio::spawn(async move { serve_opa(tcp, m, r, l).await });
            }
        });
        FakeOpa {
            addr,
            mode,
            requests,
            last_input,
        }
    }

    fn set(&self, mode: OpaMode) {
        *self.mode.lock().expect("lock") = mode;
    }
}

async fn serve_opa(
    mut tcp: tokio::net::TcpStream,
    mode: Arc<std::sync::Mutex<OpaMode>>,
    requests: Arc<AtomicUsize>,
    last_input: Arc<std::sync::Mutex<serde_json::Value>>,
) {
    loop {
        // Read one request: headers, then Content-Length bytes.
        let mut buf = Vec::new();
        let header_end = loop {
            let mut chunk = [0u8; 4096];
            let n = match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        while buf.len() < header_end + length {
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        assert!(
            head.starts_with("post /v1/data/ztgate/decision "),
            "unexpected request: {head}"
        );
        requests.fetch_add(1, Ordering::SeqCst);
        let body: serde_json::Value =
            serde_json::from_slice(&buf[header_end..header_end + length]).unwrap_or_default();
        *last_input.lock().expect("lock") = body["input"].clone();
        let current = *mode.lock().expect("lock");
        let answer = match current {
            OpaMode::Allow => r#"{"result":{"outcome":"allow","rule":"opa-allow","lifetime_secs":2}}"#.to_string(),
            OpaMode::Deny => r#"{"result":{"outcome":"deny","rule":"opa-deny","reason":"denied by the test OPA"}}"#.to_string(),
            OpaMode::Malformed => "{\"result\": {\"outcome\": ".to_string(),
            OpaMode::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if tcp.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The OPA timeout leaves room for a loaded machine. A hanging engine still
/// fails within 2 s, well inside the clients' 10 s connect timeout.
fn opa_section(opa: SocketAddr, extra: &str) -> String {
    format!(
        "[policy]\nengine = \"opa\"\nopa_url = \"http://{opa}\"\nopa_timeout_ms = 2000\nopa_retries = 0\nopa_circuit_failures = 100\nfailure_grace_secs = 2\n{extra}"
    )
}

#[tokio::test]
async fn opa_decisions_flow_and_failures_refuse() {
    let upstream = echo_server("127.0.0.1:0").await;
    let opa = FakeOpa::start().await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[app("wiki", upstream, "low")],
        &opa_section(opa.addr, "cache_size = 0\n"),
    )
    .await;
    let (_c, _t) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    let input = opa.last_input.lock().expect("lock").clone();
    assert_eq!(
        input["device"]["device_id"],
        "spiffe://example.test/device/DEV-0001"
    );
    assert_eq!(input["application"]["name"], "wiki");
    assert_eq!(input["application"]["labels"]["sensitivity"], "low");
    assert_eq!(input["network"]["client_address"], "127.0.0.1");
    assert_eq!(input["network"]["transport"], "quic");
    assert_eq!(input["issuing_ca"], "dev-devices");
    assert!(
        input["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{input}"
    );

    opa.set(OpaMode::Deny);
    let denied = refusal(gw.addr(), "DEV-0002", "wiki.apps.example.test").await;
    assert_refused(&denied, Code::PolicyDenied, "denied by the test OPA");

    opa.set(OpaMode::Malformed);
    let malformed = refusal(gw.addr(), "DEV-0002", "wiki.apps.example.test").await;
    assert!(
        matches!(&malformed, Ending::Transient(m) if m.contains("invalid JSON")),
        "{malformed:?}"
    );

    opa.set(OpaMode::Hang);
    let hung = refusal(gw.addr(), "DEV-0002", "wiki.apps.example.test").await;
    assert!(
        matches!(&hung, Ending::Transient(m) if m.starts_with(Code::PolicyUnavailable.sentence())),
        "{hung:?}"
    );
}

#[tokio::test]
async fn opa_outage_honours_cache_then_grace() {
    let upstream = echo_server("127.0.0.1:0").await;
    let opa = FakeOpa::start().await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[app("wiki", upstream, "low")],
        &opa_section(opa.addr, ""),
    )
    .await;
    let (_c, mut tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    let before = opa.requests.load(Ordering::SeqCst);
    // The engine goes down; the cached allow (lifetime 2 s) still admits.
    opa.set(OpaMode::Hang);
    let (_c2, _t2) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    assert_eq!(
        opa.requests.load(Ordering::SeqCst),
        before,
        "answered from the cache"
    );
    // The live session's decision expires at 2 s; with a 2 s grace the
    // session is closed within a few seconds after that.
    let started = std::time::Instant::now();
    let ending = tokio::time::timeout(Duration::from_secs(20), tunnel.ended())
        .await
        .expect("closed");
    assert!(
        matches!(&ending, Ending::Transient(m) if m.starts_with(Code::PolicyUnavailable.sentence())),
        "{ending:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed only after expiry and grace"
    );
}

#[tokio::test]
async fn concurrent_identical_requests_share_one_evaluation() {
    let upstream = echo_server("127.0.0.1:0").await;
    let opa = FakeOpa::start().await;
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[app("wiki", upstream, "low")],
        &opa_section(opa.addr, "[limits]\nmax_connections_per_device = 64\n"),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let addr = gw.addr();
        tasks.push(tokio::spawn(async move {
            connect(addr, "DEV-0001", "wiki.apps.example.test").await
        }));
    }
    let mut kept = Vec::new();
    for t in tasks {
        kept.push(t.await.expect("task"));
    }
    assert_eq!(
        opa.requests.load(Ordering::SeqCst),
        1,
        "eight identical requests, one evaluation"
    );
}

#[tokio::test]
async fn shadow_mode_logs_disagreement_and_enforces_only_enforced() {
    let upstream = echo_server("127.0.0.1:0").await;
    let opa = FakeOpa::start().await;
    opa.set(OpaMode::Deny);
    let shadow = format!(
        "[policy.shadow]\nengine = \"opa\"\nopa_url = \"http://{}\"\nopa_timeout_ms = 300\nopa_retries = 0\n",
        opa.addr
    );
    let mut wiki = App::wiki(upstream);
    wiki.access.push('\n');
    let gw = TestGateway::start("127.0.0.1:0", &[wiki], &shadow).await;
    let (_c, _t) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while opa.requests.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        opa.requests.load(Ordering::SeqCst),
        1,
        "the candidate was evaluated"
    );
}

#[tokio::test]
async fn undefined_decision_is_refused_not_crashed() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("partial.rego");
    std::fs::write(
        &policy,
        "package ztgate\n\nimport rego.v1\n\ndecision := {\"outcome\": \"allow\"} if input.device.never_set == 42\n",
    )
    .expect("write");
    let section = format!(
        "[policy]\nengine = \"rego\"\nrego_files = [\"{}\"]\n",
        policy.display()
    );
    let gw = TestGateway::start("127.0.0.1:0", &[app("wiki", upstream, "low")], &section).await;
    let ending = refusal(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    assert!(
        matches!(&ending, Ending::Transient(m) if m.contains("undefined")),
        "{ending:?}"
    );
    // The gateway keeps serving.
    let again = refusal(gw.addr(), "DEV-0002", "wiki.apps.example.test").await;
    assert!(matches!(again, Ending::Transient(_)));
}

async fn push_posture(
    socket: &Path,
    device: &str,
    attributes: serde_json::Value,
) -> serde_json::Value {
    let body = serde_json::json!({"device_id": device, "attributes": attributes}).to_string();
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
        .arg("http://localhost/v1/posture")
        .output()
        .await
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json answer")
}

#[tokio::test]
async fn posture_push_satisfies_step_up_and_downgrade_closes() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let after_hours = example_data(dir.path(), (0, 0), "10.20.0.0/16");
    let socket = dir.path().join("admin.sock");
    let section = format!(
        "{}\n[admin]\nsocket_path = \"{}\"\n",
        rego_policy_section(&after_hours),
        socket.display()
    );
    let gw = TestGateway::start("127.0.0.1:0", &[app("wiki", upstream, "low")], &section).await;
    let device = "spiffe://example.test/device/DEV-0001";
    let step_up = refusal(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    assert_refused(&step_up, Code::StepUpRequired, "idp.example.test");

    // The identity provider reports the step-up done: the device gets in.
    push_posture(
        &socket,
        device,
        serde_json::json!({"step_up_done": true, "compliant": true}),
    )
    .await;
    let (_c, mut tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;

    // The MDM reports the device non-compliant: its live tunnel closes.
    let answer = push_posture(
        &socket,
        device,
        serde_json::json!({"step_up_done": true, "compliant": false}),
    )
    .await;
    assert!(
        answer.to_string().contains('1'),
        "one session re-evaluated: {answer}"
    );
    let ending = tokio::time::timeout(Duration::from_secs(10), tunnel.ended())
        .await
        .expect("closed");
    assert_refused(&ending, Code::PolicyDenied, "non-compliant");
}

const STEP_UP_POLICY: &str = r#"package ztgate

import rego.v1

decision := {
	"outcome": "step_up",
	"rule": "test-step-up",
	"reason": "confirm it is you",
	"challenge": "https://idp.example.test/mfa",
	"grace_secs": 2,
} if {
	input.session.posture.mode == "step"
} else := {"outcome": "allow", "rule": "test-allow", "lifetime_secs": 300}
"#;

async fn step_up_gateway(dir: &Path, upstream: SocketAddr) -> (TestGateway, PathBuf) {
    let policy = dir.join("step-up.rego");
    std::fs::write(&policy, STEP_UP_POLICY).expect("write policy");
    let socket = dir.join("admin.sock");
    let section = format!(
        "[policy]\nengine = \"rego\"\nrego_files = [\"{}\"]\n[admin]\nsocket_path = \"{}\"\n",
        policy.display(),
        socket.display()
    );
    let gw = TestGateway::start("127.0.0.1:0", &[app("wiki", upstream, "low")], &section).await;
    (gw, socket)
}

async fn echo(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    payload: &[u8],
) -> Vec<u8> {
    send.write_all(payload).await.expect("write");
    let mut buf = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut buf))
        .await
        .expect("echo within 10 s")
        .expect("read");
    buf
}

#[tokio::test]
async fn step_up_holds_new_streams_until_satisfied() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let (gw, socket) = step_up_gateway(dir.path(), upstream).await;
    let device = "spiffe://example.test/device/DEV-0001";
    let (_c, tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    let (mut open_send, mut open_recv) = tunnel.open_stream().await.expect("open");
    assert_eq!(
        echo(&mut open_send, &mut open_recv, b"before").await,
        b"before"
    );

    push_posture(&socket, device, serde_json::json!({"mode": "step"})).await;
    let (mut held_send, mut held_recv) = tunnel.open_stream().await.expect("open held");
    held_send.write_all(b"held").await.expect("write held");
    let mut buf = [0u8; 4];
    let early =
        tokio::time::timeout(Duration::from_millis(400), held_recv.read_exact(&mut buf)).await;
    assert!(
        early.is_err(),
        "a new stream must be held during the step-up"
    );
    // The stream opened before keeps flowing.
    assert_eq!(
        echo(&mut open_send, &mut open_recv, b"during").await,
        b"during"
    );

    push_posture(&socket, device, serde_json::json!({"mode": "done"})).await;
    tokio::time::timeout(Duration::from_secs(5), held_recv.read_exact(&mut buf))
        .await
        .expect("released after the step-up")
        .expect("read");
    assert_eq!(&buf, b"held");
    assert!(tunnel.connection.close_reason().is_none());
}

#[tokio::test]
async fn unsatisfied_step_up_resets_held_streams_and_closes() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let (gw, socket) = step_up_gateway(dir.path(), upstream).await;
    let device = "spiffe://example.test/device/DEV-0001";
    let (_c, mut tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    push_posture(&socket, device, serde_json::json!({"mode": "step"})).await;
    let (mut held_send, mut held_recv) = tunnel.open_stream().await.expect("open held");
    held_send.write_all(b"never").await.expect("write");
    let result = tokio::time::timeout(Duration::from_secs(10), held_recv.read_to_end(64))
        .await
        .expect("the held stream ends after the grace period");
    match result {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code.into_inner(), u64::from(Code::StepUpRequired.value()));
        }
        Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(_))) => {}
        other => panic!("expected a step-up reset, got {other:?}"),
    }
    let ending = tokio::time::timeout(Duration::from_secs(10), tunnel.ended())
        .await
        .expect("closed");
    assert_refused(&ending, Code::StepUpRequired, "not completed in time");
}

// Multi-threaded: the test blocks a thread while it reads the client's
// output, and the in-process gateway must keep answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_waits_for_step_up_then_carries_on() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("gate.rego");
    std::fs::write(
        &policy,
        STEP_UP_POLICY.replace(
            "input.session.posture.mode == \"step\"",
            "not input.session.posture.mode == \"done\"",
        ),
    )
    .expect("write policy");
    let socket = dir.path().join("admin.sock");
    let section = format!(
        "[policy]\nengine = \"rego\"\nrego_files = [\"{}\"]\n[admin]\nsocket_path = \"{}\"\n",
        policy.display(),
        socket.display()
    );
    let gw = TestGateway::start("127.0.0.1:0", &[app("wiki", upstream, "low")], &section).await;
    let pki = pki();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command
        .args([
            "connect",
            "--gateway",
            &gw.addr().to_string(),
            "--app",
            "wiki.apps.example.test",
        ])
        .args(["--listen", "127.0.0.1:0", "--max-backoff-secs", "1"])
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"));
    let client = Running::spawn(command, true);
    let waiting = client.wait_for("complete the step-up at ", Duration::from_secs(20));
    assert!(
        waiting.starts_with("https://idp.example.test/mfa"),
        "{waiting}"
    );
    assert!(
        waiting.contains("retrying until the step-up is done"),
        "{waiting}"
    );
    push_posture(
        &socket,
        "spiffe://example.test/device/DEV-0001",
        serde_json::json!({"mode": "done"}),
    )
    .await;
    let local = client.wait_for("listening on ", Duration::from_secs(20));
    let mut tcp = tokio::net::TcpStream::connect(local.as_str())
        .await
        .expect("local port");
    tcp.write_all(b"after step-up").await.expect("write");
    let mut buf = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf))
        .await
        .expect("echo")
        .expect("read");
    assert_eq!(&buf, b"after step-up");
}

/// A venv with the real OPA engine (opa-golib-python-bindings) under the
/// target directory, made on first use. `Err` when pip cannot install it.
fn opa_python() -> Result<PathBuf, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("opa-venv");
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        std::process::Command::new(python)
            .args(["-c", "import opa_bindings"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return Ok(python);
    }
    let made = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|e| e.to_string())?;
    if !made.status.success() {
        return Err(String::from_utf8_lossy(&made.stderr).to_string());
    }
    // The package declares Python 3.14 but runs on 3.11.
    let pip = std::process::Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--ignore-requires-python",
        ])
        .arg("opa-golib-python-bindings==0.4.4")
        .output()
        .map_err(|e| e.to_string())?;
    if !pip.status.success() || !ready(&python) {
        return Err(String::from_utf8_lossy(&pip.stderr).to_string());
    }
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_opa_engine_decides_through_the_gateway() {
    let python = match tokio::task::spawn_blocking(opa_python).await.expect("task") {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped: the real OPA engine could not be installed from PyPI: {e}");
            return;
        }
    };
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let data = example_data(dir.path(), (0, 24), "10.20.0.0/16");
    let mut server = std::process::Command::new(python)
        .arg(repo("scripts/opa-server.py"))
        .arg(repo("config/policy.rego"))
        .arg(&data)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start opa-server.py");
    let stdout = server.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await
    .expect("task")
    .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .expect("listening line")
        .to_string();
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[app("wiki", upstream, "low"), app("vault", upstream, "high")],
        &format!(
            "[policy]\nengine = \"opa\"\nopa_url = \"http://{addr}\"\nopa_timeout_ms = 2000\n"
        ),
    )
    .await;
    let (_c, tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    assert_eq!(tunnel.admitted.application, "wiki");
    let denied = refusal(gw.addr(), "DEV-0003", "vault.apps.example.test").await;
    assert_refused(&denied, Code::PolicyDenied, "no group of device");
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test]
async fn policy_data_file_change_reloads_without_signal() {
    let upstream = echo_server("127.0.0.1:0").await;
    let dir = tempfile::tempdir().expect("dir");
    let data = example_data(dir.path(), (0, 24), "10.20.0.0/16");
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[app("wiki", upstream, "low")],
        &rego_policy_section(&data),
    )
    .await;
    let (_c, mut tunnel) = connect(gw.addr(), "DEV-0001", "wiki.apps.example.test").await;
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&data).expect("read")).expect("json");
    value["access"]["devices"]
        .as_object_mut()
        .expect("devices")
        .remove("spiffe://example.test/device/DEV-0001");
    std::fs::write(&data, serde_json::to_vec(&value).expect("encode")).expect("write");
    // No reload call: the gateway notices the file change by itself.
    let ending = tokio::time::timeout(Duration::from_secs(15), tunnel.ended())
        .await
        .expect("closed");
    assert_refused(&ending, Code::PolicyDenied, "not in the inventory");
}
