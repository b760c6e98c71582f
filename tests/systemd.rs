//! The systemd integration: the shipped unit passes `systemd-analyze verify`
//! and reaches the hardening target, and `ztgate serve` reports readiness
//! over the notify socket.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        eprintln!("skipped: systemd-analyze is not installed on this machine");
    }
    found.then_some("systemd-analyze")
}

/// A copy of the shipped unit whose ExecStart points at the built binary.
fn unit_copy(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/ztgate.service"),
    )
    .expect("read the unit");
    let path = dir.join("ztgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/ztgate", env!("CARGO_BIN_EXE_ztgate")),
    )
    .expect("write the unit");
    path
}

#[test]
fn gateway_unit_verifies() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let unit = unit_copy(dir.path());
    assert_verifies(tool, &unit);
}

/// Runs `systemd-analyze verify` on `unit` and asserts it passes without
/// unknown keys.
fn assert_verifies(tool: &str, unit: &Path) {
    let out = Command::new(tool)
        .arg("verify")
        .arg(unit)
        .output()
        .expect("run verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("Unknown key"), "{stderr}");
}

#[test]
fn socket_unit_verifies() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    unit_copy(dir.path());
    let socket = dir.path().join("ztgate.socket");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/ztgate.socket"),
        &socket,
    )
    .expect("copy the socket unit");
    assert_verifies(tool, &socket);
}

#[test]
fn socket_unit_matches_example_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/ztgate.socket")).expect("socket unit");
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .collect()
    };
    let example: toml::Table = toml::from_str(
        &std::fs::read_to_string(root.join("config/ztgate.example.toml")).expect("example"),
    )
    .expect("example TOML");
    let listed = |key: &str| -> Vec<String> {
        example["gateway"][key]
            .as_array()
            .expect("address list")
            .iter()
            .map(|v| v.as_str().expect("address").to_string())
            .collect()
    };
    assert_eq!(values("ListenDatagram="), listed("listen"));
    assert_eq!(values("ListenStream="), listed("listen_tls"));
    assert_eq!(values("Service="), ["ztgate.service"]);
}

#[test]
fn gateway_unit_exposure_is_low() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let unit = unit_copy(dir.path());
    let out = Command::new(tool)
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .expect("run security");
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for ztgate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level} is above 2.0:\n{text}");
}

#[test]
fn serve_notifies_readiness() {
    let dir = tempfile::tempdir().expect("dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let (_cfg, config) = write_config(
        "127.0.0.1:0",
        &[App::wiki("127.0.0.1:9".parse().expect("addr"))],
        "",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let mut buf = [0u8; 256];
    let received = socket.recv(&mut buf);
    let _ = child.kill();
    let _ = child.wait();
    let n = received.expect("a notification within 20 s");
    assert_eq!(&buf[..n], b"READY=1\n");
}

/// Starts `ztgate serve` the way systemd starts a socket-activated
/// service: `sockets` become descriptors 3, 4, ... with LISTEN_FDS set to
/// their count and LISTEN_PID to the pid that runs ztgate. A shell exports
/// its own pid and execs ztgate, which keeps that pid.
fn spawn_activated(config: &Path, sockets: &[std::os::fd::RawFd]) -> Running {
    use std::os::fd::BorrowedFd;
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" serve --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_ztgate"))
        .arg(config)
        .env("LISTEN_FDS", sockets.len().to_string());
    let sockets = sockets.to_vec();
    // SAFETY: the closure runs in the child between fork and exec and makes
    // only fcntl and dup2 system calls, which are async-signal-safe. The
    // descriptors stay open in the parent until the child has been spawned.
    unsafe {
        command.pre_exec(move || {
            // Move every socket above the target range first, so that a
            // socket already at 3 or 4 is not overwritten before it is copied.
            let mut high = Vec::with_capacity(sockets.len());
            for fd in &sockets {
                let borrowed = BorrowedFd::borrow_raw(*fd);
                high.push(nix::fcntl::fcntl(borrowed, nix::fcntl::F_DUPFD(64))?);
            }
            for (i, fd) in high.iter().enumerate() {
                let target = 3 + i as std::os::fd::RawFd;
                let copied = nix::unistd::dup2_raw(BorrowedFd::borrow_raw(*fd), target)?;
                std::mem::forget(copied);
            }
            Ok(())
        });
    }
    Running::spawn(command, true)
}

#[tokio::test]
async fn serve_adopts_activated_sockets() {
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = echo_server("127.0.0.1:0").await;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TCP");
    let udp_addr = udp.local_addr().expect("UDP address");
    let tcp_addr = tcp.local_addr().expect("TCP address");
    let (_cfg, config) = write_config_with(
        &udp_addr.to_string(),
        &[App::wiki(upstream)],
        &format!("listen_tls = [\"{tcp_addr}\"]"),
        "",
    );
    let gateway = spawn_activated(&config, &[udp.as_raw_fd(), tcp.as_raw_fd()]);
    let limit = Duration::from_secs(30);
    gateway.wait_for_all(&["using the inherited UDP socket", "fd=3"], limit);
    gateway.wait_for_all(&["using the inherited TCP socket", "fd=4"], limit);
    gateway.wait_for_all(&["gateway started"], limit);
    // The test's own copies close, so only the gateway's descriptors serve.
    drop(udp);
    drop(tcp);

    let (_client, tunnel) = connect(udp_addr, "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open a QUIC stream");
    send.write_all(b"over quic").await.expect("write");
    send.finish().expect("finish");
    let echoed = recv.read_to_end(64).await.expect("QUIC echo");
    assert_eq!(echoed, b"over quic");

    let mut stream = tls_connect(tcp_addr, "DEV-0001", WIKI)
        .await
        .expect("TLS handshake");
    stream.write_all(b"over tls").await.expect("write");
    stream.shutdown().await.expect("close_notify");
    let mut echoed = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut echoed))
        .await
        .expect("TLS echo within 30 s")
        .expect("TLS echo");
    assert_eq!(echoed, b"over tls");
}

#[test]
fn serve_rejects_unconfigured_activated_socket() {
    use std::os::fd::AsRawFd;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TCP");
    let udp_addr = udp.local_addr().expect("UDP address");
    let tcp_addr = tcp.local_addr().expect("TCP address");
    let (_cfg, config) = write_config(
        &udp_addr.to_string(),
        &[App::wiki("127.0.0.1:9".parse().expect("addr"))],
        "",
    );
    let mut gateway = spawn_activated(&config, &[udp.as_raw_fd(), tcp.as_raw_fd()]);
    let line = gateway.wait_for_all(&["match no gateway.listen"], Duration::from_secs(30));
    assert!(line.contains(&format!("fd 4 (TCP {tcp_addr})")), "{line}");
    assert!(line.contains("ztgate.socket"), "{line}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = gateway.child.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "serve must fail: {status}");
}
