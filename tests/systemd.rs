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
    let out = Command::new(tool)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("Unknown key"), "{stderr}");
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
