//! Bad input and stalled peers: junk datagrams, truncated Initial packets,
//! handshakes that never finish, broken configs and key files.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Relays a client's datagrams to the gateway and drops every answer, so the
/// gateway sees a handshake start and never finish. Returns the relay
/// address and a receiver for the first datagram the client sent.
async fn black_hole_relay(
    gateway: SocketAddr,
) -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind relay");
    let back = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind relay back");
    let addr = front.local_addr().expect("addr");
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut first_tx = Some(first_tx);
        let mut buf = vec![0u8; 65536];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let received =
                tokio::time::timeout(Duration::from_secs(1), front.recv_from(&mut buf)).await;
            let Ok(Ok((n, _))) = received else { continue };
            if let Some(tx) = first_tx.take() {
                let _ = tx.send(buf[..n].to_vec());
            }
            let _ = back.send_to(&buf[..n], gateway).await;
        }
    });
    (addr, first_rx)
}

#[tokio::test]
async fn stalled_handshake_is_dropped_at_deadline() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    // Shorten the handshake deadline for this test.
    let text = std::fs::read_to_string(&gw.config).expect("config");
    std::fs::write(
        &gw.config,
        text.replace("handshake_timeout_ms = 3000", "handshake_timeout_ms = 800"),
    )
    .expect("write");
    gw.gateway.reload().await.expect("reload");
    let (relay, _first) = black_hole_relay(gw.addr()).await;
    let client = device_client(relay, "DEV-0001", WIKI);
    let attempt = tokio::spawn(async move { client.connect(Duration::from_secs(5)).await.is_ok() });
    let stats = &gw.gateway.shared().stats;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.handshake_timeouts.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.handshake_timeouts.load(Ordering::Relaxed), 1);
    assert_eq!(stats.pending_handshakes.load(Ordering::Relaxed), 0);
    assert_eq!(
        gw.gateway.shared().registry.connection_count(),
        0,
        "the source slot is released"
    );
    assert!(
        !attempt.await.expect("client task"),
        "the stalled client is never admitted"
    );
}

#[tokio::test]
async fn junk_datagrams_do_not_disturb_a_live_tunnel() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (_client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    send.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    recv.read_exact(&mut buf).await.expect("echo before");

    // Capture a genuine Initial packet through a relay that drops answers.
    let (relay, first) = black_hole_relay(gw.addr()).await;
    let probe = device_client(relay, "DEV-0002", WIKI);
    let probe_task =
        tokio::spawn(async move { probe.connect(Duration::from_secs(2)).await.is_ok() });
    let initial = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("initial captured")
        .expect("initial");
    assert!(
        initial.len() >= 1200,
        "client Initial datagrams are padded to 1200 bytes"
    );

    let attacker = UdpSocket::bind("127.0.0.1:0").await.expect("bind attacker");
    let mut rng_state: u32 = 0x1234_5678;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 17;
        rng_state ^= rng_state << 5;
        rng_state
    };
    for i in 0..500usize {
        let datagram: Vec<u8> = match i % 3 {
            0 => (0..(next() % 1500) as usize)
                .map(|_| next() as u8)
                .collect(),
            1 => initial[..(next() as usize % initial.len())].to_vec(),
            _ => {
                let mut corrupted = initial.clone();
                let at = next() as usize % corrupted.len();
                corrupted[at] ^= 0xff;
                corrupted
            }
        };
        attacker
            .send_to(&datagram, gw.addr())
            .await
            .expect("send junk");
    }
    assert!(
        !probe_task.await.expect("probe"),
        "the black-holed probe is never admitted"
    );

    send.write_all(b"after!").await.expect("write after junk");
    recv.read_exact(&mut buf).await.expect("echo after junk");
    assert_eq!(&buf, b"after!");
    assert!(tunnel.connection.close_reason().is_none());
    assert_eq!(gw.gateway.shared().registry.session_count(), 1);
}

#[test]
fn malformed_config_names_each_key() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.toml");
    let pki = pki();
    std::fs::write(
        &path,
        format!(
            r#"[gateway]
listen = ["127.0.0.1:notaport"]
certificate = "{pki}/gateway-chain.pem"
private_key = "{pki}/gateway.key"
tls_versoin = "1.3"

[[device_ca]]
name = "dev-devices"
certificates = ["{pki}/device-ca.pem"]

[[application]]
name = "wiki"
server_name = "wiki.elsewhere.test"
upstream = "127.0.0.1"
[application.access]
device_cas = ["nope"]
allow_any_device = true
"#,
            pki = pki.display()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "gateway.tls_versoin: unknown key",
        "gateway.listen[0]: invalid listen address",
        "application[0].server_name: \"wiki.elsewhere.test\" is not covered by the gateway certificate",
        "application[0].upstream: \"127.0.0.1\" has no port",
        "application[0].access.device_cas[0]: no [[device_ca]] is named \"nope\"",
    ] {
        assert!(stderr.contains(key), "missing {key:?} in:\n{stderr}");
    }
    assert!(
        stderr.contains(&path.display().to_string()),
        "errors name the file"
    );
}

#[test]
fn toml_syntax_error_names_the_line() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[gateway]\nlisten = [\"127.0.0.1:4433\"\n").expect("write");
    let errors = ztgate::config::load_generation(&path, 1).expect_err("must fail");
    let text = errors.to_string();
    assert!(text.contains("invalid TOML"), "{text}");
    assert!(text.contains("line 2"), "{text}");
}

/// Copies the development gateway key into a new directory, lets `prepare`
/// change the copy, and writes a config that uses it. Returns the key
/// directory, the config directory, the key path and the config path.
fn config_with_key_copy(
    prepare: impl FnOnce(&std::path::Path),
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("gateway.key");
    std::fs::copy(pki().join("gateway.key"), &key).expect("copy key");
    prepare(&key);
    let (cfg_dir, path) = write_config(
        "127.0.0.1:0",
        &[App::wiki("127.0.0.1:9".parse().expect("addr"))],
        "",
    );
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replace(
        &format!("{}/gateway.key", pki().display()),
        &key.display().to_string(),
    );
    std::fs::write(&path, text).expect("write");
    (dir, cfg_dir, key, path)
}

#[test]
fn world_readable_private_key_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, _cfg_dir, key, path) = config_with_key_copy(|key| {
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run serve");
    assert_eq!(out.status.code(), Some(2), "serve refuses to start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gateway.private_key"), "{stderr}");
    assert!(stderr.contains("mode 0644"), "{stderr}");
    assert!(
        stderr.contains(&format!("chmod 0600 {}", key.display())),
        "{stderr}"
    );
}

#[test]
fn foreign_owned_private_key_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to give the key file to another user");
        return;
    }
    let (_dir, _cfg_dir, key, path) = config_with_key_copy(|key| {
        nix::unistd::chown(key, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["check-config"])
        .arg(&path)
        .output()
        .expect("run check-config");
    assert_eq!(out.status.code(), Some(2), "check-config rejects the key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gateway.private_key"), "{stderr}");
    assert!(stderr.contains("(uid 65534)"), "{stderr}");
    assert!(stderr.contains("(uid 0)"), "{stderr}");
    assert!(
        stderr.contains(&format!("chown root:root {}", key.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("chmod 0600 {}", key.display())),
        "{stderr}"
    );
}

/// Reads `path` until it contains `marker`, for at most 30 s.
fn wait_for_file_text(path: &std::path::Path, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(marker) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} in {} within 30 s:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn secrets_stay_out_of_logs_and_check_config() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let token = "tok-9f8e7d6c5b4a39281706f5e4d3c2b1a0";
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    let reset_secret = "reset-5d41402abc4b2a76b9719d911017c592aa";
    let reset_file = dir.path().join("reset.key");
    std::fs::write(&reset_file, reset_secret).expect("reset key");
    for file in [&token_file, &reset_file] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let (_cfg, config) = write_config_with(
        "127.0.0.1:0",
        &[App::wiki("127.0.0.1:9".parse().expect("addr"))],
        &format!("reset_key_file = \"{}\"\ndrain_secs = 1", reset_file.display()),
        &format!(
            "[log]\nlevel = \"trace\"\n\n[admin]\ntcp_address = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    );
    // Every line of the PEM body of the gateway key, which a leak would print.
    let key_pem = std::fs::read_to_string(pki().join("gateway.key")).expect("key");
    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!key_lines.is_empty());

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .arg("check-config")
        .arg(&config)
        .output()
        .expect("run check-config");
    assert!(check.status.success(), "{check:?}");

    let log = dir.path().join("serve.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(log_file.try_clone().expect("clone"))
        .stderr(log_file)
        .spawn()
        .expect("spawn serve");
    let text = wait_for_file_text(&log, "admin API listening on TCP");
    let address = text
        .lines()
        .find(|l| l.contains("admin API listening on TCP"))
        .and_then(|l| l.split("address=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap_or_default().to_string())
        .expect("admin address in the log");
    let curl = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H"])
        .arg(format!("authorization: Bearer {token}"))
        .arg(format!("http://{address}/v1/sessions"))
        .output()
        .expect("curl");
    assert!(curl.status.success(), "{curl:?}");
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().expect("serve exits");
    assert!(status.success(), "serve exit: {status}");
    let logged = std::fs::read_to_string(&log).expect("read log");
    assert!(logged.contains("gateway stopped"), "{logged}");

    let outputs = [
        (
            "check-config stdout",
            String::from_utf8_lossy(&check.stdout).to_string(),
        ),
        (
            "check-config stderr",
            String::from_utf8_lossy(&check.stderr).to_string(),
        ),
        ("serve log", logged),
    ];
    for (name, text) in &outputs {
        assert!(!text.contains(token), "{name} contains the admin token");
        assert!(
            !text.contains(reset_secret),
            "{name} contains the reset key"
        );
        for line in &key_lines {
            assert!(!text.contains(line), "{name} contains the gateway key");
        }
    }
}
