//! The binaries as an operator runs them: `ztgate serve` and `ztgate
//! connect` as processes, a real HTTP server behind the gateway, and curl.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn connect_command(gateway: &str, device: &str) -> Command {
    let pki = pki();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command
        .args([
            "connect",
            "--gateway",
            gateway,
            "--app",
            WIKI,
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--cert")
        .arg(pki.join(format!("{device}-chain.pem")))
        .arg("--key")
        .arg(pki.join(format!("{device}.key")))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"));
    command
}

#[test]
fn curl_fetches_a_page_through_ztgate_connect() {
    let site = tempfile::tempdir().expect("site dir");
    std::fs::write(
        site.path().join("index.html"),
        "<h1>ztgate test page 4711</h1>\n",
    )
    .expect("page");
    let mut http = Command::new("python3");
    http.args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d"])
        .arg(site.path());
    let http = Running::spawn(http, false);
    let serving = http.wait_for("Serving HTTP on 127.0.0.1 port ", Duration::from_secs(20));
    let port: u16 = serving
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("http.server port");

    let (_dir, config) = write_config(
        "127.0.0.1:0",
        &[App::wiki(
            format!("127.0.0.1:{port}").parse().expect("addr"),
        )],
        "",
    );
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    serve.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn(serve, false);
    let gateway = serve.wait_for("ztgate: listening quic ", Duration::from_secs(20));

    let client = Running::spawn(connect_command(&gateway, "DEV-0001"), true);
    let local = client.wait_for("listening on ", Duration::from_secs(20));

    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{local}/index.html"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "<h1>ztgate test page 4711</h1>\n"
    );
}

#[test]
fn connect_prints_a_plain_refusal_and_stops() {
    let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let (_dir, config) = write_config("127.0.0.1:0", &[App::wiki(upstream)], "");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    serve.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn(serve, false);
    let gateway = serve.wait_for("ztgate: listening quic ", Duration::from_secs(20));

    for (device, sentence) in [
        (
            "DEV-ROGUE",
            "not issued by a CA the gateway trusts (unknown_ca)",
        ),
        (
            "DEV-0003",
            "Access policy does not allow this device to reach the application.",
        ),
    ] {
        let mut command = connect_command(&gateway, device);
        command.stdin(Stdio::null());
        let child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = wait_with_limit(child, Duration::from_secs(30));
        assert!(!out.status.success(), "{device}: connect must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(sentence), "{device}: {stderr}");
        assert!(
            !stderr.contains("reconnecting"),
            "{device}: a refusal is final: {stderr}"
        );
    }
}

fn wait_with_limit(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                panic!("process did not exit within {limit:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn connect_rejects_non_loopback_listen() {
    let pki = pki();
    let out = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args([
            "connect",
            "--gateway",
            "127.0.0.1:9",
            "--app",
            WIKI,
            "--listen",
            "0.0.0.0:0",
        ])
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"))
        .output()
        .expect("run connect");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a loopback address"), "{stderr}");
    assert!(stderr.contains("--allow-non-loopback"), "{stderr}");
}

#[test]
fn stdio_mode_carries_one_stream() {
    use std::io::Write;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = runtime.block_on(echo_server("127.0.0.1:0"));
    let (_dir, config) = write_config("127.0.0.1:0", &[App::wiki(upstream)], "");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    serve.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn(serve, false);
    let gateway = serve.wait_for("ztgate: listening quic ", Duration::from_secs(20));
    let pki = pki();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["connect", "--gateway", &gateway, "--app", WIKI, "--stdio"])
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn connect --stdio");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"SSH-2.0-test\r\nhello over stdio\n")
        .expect("write stdin");
    drop(stdin);
    let out = wait_with_limit(child, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"SSH-2.0-test\r\nhello over stdio\n");
    drop(runtime);
}

#[test]
fn audit_log_gets_one_json_line_per_decision() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = runtime.block_on(echo_server("127.0.0.1:0"));
    let audit_dir = tempfile::tempdir().expect("dir");
    let audit = audit_dir.path().join("audit.jsonl");
    let (_dir, config) = write_config(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        &format!("[log]\naudit = \"{}\"\n", audit.display()),
    );
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    serve.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn(serve, false);
    let gateway: std::net::SocketAddr = serve
        .wait_for("ztgate: listening quic ", Duration::from_secs(20))
        .parse()
        .expect("gateway address");
    runtime.block_on(async {
        let (_c, _t) = connect(gateway, "DEV-0001", WIKI).await;
        let _ = refusal(gateway, "DEV-0003", WIKI).await;
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
            .collect();
        if lines.len() >= 2 || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let allow = &lines[0]["fields"];
    assert_eq!(allow["kind"], "decision");
    assert_eq!(allow["outcome"], "allow");
    assert_eq!(allow["engine"], "builtin");
    assert_eq!(allow["device"], "spiffe://example.test/device/DEV-0001");
    assert_eq!(allow["application"], "wiki");
    assert_eq!(allow["rule"], "builtin:wiki:spiffe-prefix");
    assert_eq!(allow["cache_hit"], false);
    assert!(allow["latency_us"].is_u64());
    assert!(lines[0]["timestamp"].is_string());
    let deny = &lines[1]["fields"];
    assert_eq!(deny["outcome"], "deny");
    assert_eq!(deny["rule"], "builtin:wiki:hardware-bound");
}
