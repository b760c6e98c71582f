//! Data-path tuning keys: config validation, the start-up report of GSO,
//! GRO and UDP buffer sizes, and tunnels that run with non-default settings.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;
use ztgate::client::{Client, QuicOptions};
use ztgate::tuning::CongestionController;

/// Far above any `net.core.rmem_max` a test machine has, so the kernel
/// always grants less.
const HUGE_BUFFER: usize = 1 << 30;

#[test]
fn bad_tuning_keys_are_named_with_accepted_values() {
    let upstream = "127.0.0.1:9".parse().expect("addr");
    let (_dir, path) = write_config_with(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "congestion_controller = \"reno\"\nworker_threads = 5000",
        "[limits]\nack_eliciting_threshold = 65",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    for expected in [
        format!("{file}: gateway.congestion_controller: \"reno\" is not a congestion controller; use \"cubic\", \"newreno\" or \"bbr\""),
        format!("{file}: gateway.worker_threads: 5000 is out of range; use 0 (one per CPU core) or a count from 1 to 1024"),
        format!("{file}: limits.ack_eliciting_threshold: 65 is out of range; use a packet count from 0 to 64"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn good_tuning_keys_pass_check_config() {
    let upstream = "127.0.0.1:9".parse().expect("addr");
    let (_dir, path) = write_config_with(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "congestion_controller = \"bbr\"\ngso = false\nworker_threads = 2",
        "[limits]\nack_eliciting_threshold = 8\ncopy_buffer_bytes = 262144",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    assert!(
        out.status.success(),
        "check-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn connect_rejects_unknown_congestion_controller() {
    let pki = pki();
    let out = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["connect", "--gateway", "127.0.0.1:9", "--app", WIKI])
        .args(["--listen", "127.0.0.1:0", "--congestion-controller", "reno"])
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"))
        .output()
        .expect("run connect");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "\"reno\" is not a congestion controller; use \"cubic\", \"newreno\" or \"bbr\""
        ),
        "{stderr}"
    );
}

#[test]
fn startup_logs_offloads_and_buffer_shortfall() {
    let upstream = "127.0.0.1:9".parse().expect("addr");
    let (_dir, config) = write_config_with(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        &format!("gso = false\nudp_receive_buffer_bytes = {HUGE_BUFFER}"),
        "[log]\nlevel = \"info\"",
    );
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    serve.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn(serve, true);

    let report = serve.wait_for_all(
        &["UDP socket offloads and buffers", "gro="],
        Duration::from_secs(20),
    );
    assert!(report.contains("gso=false"), "{report}");
    let granted: usize = report
        .split_whitespace()
        .find_map(|field| field.strip_prefix("receive_buffer="))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no receive_buffer=N in {report}"));
    assert!(granted > 0, "{report}");
    assert!(granted < HUGE_BUFFER, "{report}");

    let warning = serve.wait_for_all(
        &["UDP receive buffer", "net.core.rmem_max"],
        Duration::from_secs(20),
    );
    assert!(
        warning.contains("systemd/99-ztgate-udp-buffers.conf"),
        "{warning}"
    );
    assert!(warning.contains(&HUGE_BUFFER.to_string()), "{warning}");
}

#[tokio::test]
async fn tuned_tunnel_echoes_data() {
    let upstream = echo_server("127.0.0.1:0").await;
    // Small windows make flow control block often, and the ACK_FREQUENCY
    // extension is negotiated in both directions.
    let gw = TestGateway::start_with(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "congestion_controller = \"newreno\"\ngso = false",
        "[limits]\nack_eliciting_threshold = 4\nstream_receive_window = 65536\nconnection_receive_window = 131072\nsend_window = 131072\ncopy_buffer_bytes = 4096",
    )
    .await;
    let tls = device_tls_config("DEV-0001");
    let mut options = QuicOptions::default();
    options.tuning.congestion_controller = CongestionController::Bbr;
    options.tuning.ack_eliciting_threshold = Some(10);
    options.tuning.stream_receive_window = 32 * 1024;
    options.tuning.receive_window = 64 * 1024;
    let bind = "127.0.0.1:0".parse().expect("addr");
    let client = Client::with_options(tls, gw.addr(), WIKI, Some(bind), options).expect("client");
    let tunnel = client
        .connect(Duration::from_secs(10))
        .await
        .expect("DEV-0001 is admitted");
    echo_through(&tunnel, 4 * 1024 * 1024).await;
}
