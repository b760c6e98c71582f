//! Mobile networks: QUIC connection migration while data is in flight, a
//! forged source address, NAT rebinding, stateless reset after a gateway
//! restart, and a real two-path network in network namespaces.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;
use ztgate::ingress::udp::{bind_udp, UdpBuffers};
use ztgate::session::SessionEntry;

const BUFFERS: UdpBuffers = UdpBuffers {
    receive: 4 * 1024 * 1024,
    send: 4 * 1024 * 1024,
};

/// Polls `condition` every 20 ms until it holds or `limit` passes.
async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

fn only_session(gw: &TestGateway) -> Arc<SessionEntry> {
    let sessions = gw.gateway.shared().registry.all();
    assert_eq!(sessions.len(), 1, "expected exactly one live session");
    sessions[0].clone()
}

fn recorded_client(entry: &SessionEntry) -> SocketAddr {
    *entry.client.lock().expect("lock")
}

fn evaluated_client(entry: &SessionEntry) -> SocketAddr {
    *entry.evaluated_client.lock().expect("lock")
}

/// Echoes `total` bytes through a stream: a writer task sends the pattern,
/// a reader task checks every byte as it arrives and publishes its count.
struct EchoTransfer {
    received: watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<Result<u64, String>>,
    writer: tokio::task::JoinHandle<Result<(), String>>,
}

impl EchoTransfer {
    fn start(send: quinn::SendStream, recv: quinn::RecvStream, total: usize) -> EchoTransfer {
        let data = Arc::new(pattern(total, 11));
        let (progress, received) = watch::channel(0u64);
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut recv = recv;
            let mut offset = 0usize;
            loop {
                match recv.read_chunk(256 * 1024, true).await {
                    Ok(Some(chunk)) => {
                        let end = offset + chunk.bytes.len();
                        if end > expected.len() || chunk.bytes[..] != expected[offset..end] {
                            return Err(format!("echoed bytes differ at offset {offset}"));
                        }
                        offset = end;
                        progress.send_replace(offset as u64);
                    }
                    Ok(None) => return Ok(offset as u64),
                    Err(e) => return Err(format!("read failed at offset {offset}: {e}")),
                }
            }
        });
        let writer = tokio::spawn(async move {
            let mut send = send;
            // Paced at about 16 MiB/s, so that a fast machine still has
            // data in flight when the test moves the client.
            for chunk in data.chunks(64 * 1024) {
                send.write_all(chunk)
                    .await
                    .map_err(|e| format!("write failed: {e}"))?;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            send.finish().map_err(|e| format!("finish failed: {e}"))
        });
        EchoTransfer {
            received,
            reader,
            writer,
        }
    }

    async fn wait_for_bytes(&mut self, bytes: u64) {
        tokio::time::timeout(
            Duration::from_secs(60),
            self.received.wait_for(|n| *n >= bytes),
        )
        .await
        .expect("transfer progresses within 60 s")
        .expect("reader alive");
    }

    fn received(&self) -> u64 {
        *self.received.borrow()
    }

    async fn finish(self) -> u64 {
        let read = tokio::time::timeout(Duration::from_secs(120), self.reader)
            .await
            .expect("transfer completes within 120 s")
            .expect("reader task");
        self.writer
            .await
            .expect("writer task")
            .expect("writer finished cleanly");
        read.expect("stream read to a clean end")
    }
}

#[tokio::test]
async fn migration_mid_transfer_keeps_stream() {
    const TOTAL: usize = 64 * 1024 * 1024;
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let (client, tunnel) = connect(gw.addr(), "DEV-0001", WIKI).await;
    let entry = only_session(&gw);
    let first = recorded_client(&entry);
    assert_eq!(first.ip().to_string(), "127.0.0.1");

    let (send, recv) = tunnel.open_stream().await.expect("open stream");
    let mut transfer = EchoTransfer::start(send, recv, TOTAL);
    transfer.wait_for_bytes(8 * 1024 * 1024).await;

    // Move to another address, as a phone moving from Wi-Fi to cellular.
    let socket = bind_udp("127.0.0.2:0".parse().expect("addr"), BUFFERS).expect("bind 127.0.0.2");
    let second = socket.local_addr().expect("local addr");
    client.endpoint().rebind(socket).expect("rebind");
    assert!(
        transfer.received() < TOTAL as u64,
        "the move must happen with data in flight"
    );
    let moved = wait_until(Duration::from_secs(15), || {
        recorded_client(&entry) == second
    })
    .await;
    assert!(
        moved,
        "registry still records {}, expected {second}",
        recorded_client(&entry)
    );

    // Then only the port changes, as behind a carrier NAT.
    transfer.wait_for_bytes(24 * 1024 * 1024).await;
    let socket = bind_udp("127.0.0.2:0".parse().expect("addr"), BUFFERS).expect("bind new port");
    let third = socket.local_addr().expect("local addr");
    client.endpoint().rebind(socket).expect("rebind");
    assert!(
        transfer.received() < TOTAL as u64,
        "the second move must happen with data in flight"
    );
    let moved = wait_until(Duration::from_secs(15), || recorded_client(&entry) == third).await;
    assert!(
        moved,
        "registry still records {}, expected {third}",
        recorded_client(&entry)
    );

    assert_eq!(transfer.finish().await, TOTAL as u64);
    assert_eq!(entry.path_changes.load(Ordering::Relaxed), 2);
    let reevaluated = wait_until(Duration::from_secs(5), || {
        evaluated_client(&entry) == third && entry.evaluations.load(Ordering::Relaxed) >= 3
    })
    .await;
    assert!(
        reevaluated,
        "policy last saw {} after {} evaluations, expected {third} after 3",
        evaluated_client(&entry),
        entry.evaluations.load(Ordering::Relaxed)
    );
    assert_eq!(
        gw.gateway
            .shared()
            .stats
            .path_changes
            .load(Ordering::Relaxed),
        2
    );
    assert!(tunnel.connection.close_reason().is_none());
}

/// Writes a 32-byte reset key file that only its owner can read.
fn write_reset_key(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("reset.key");
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(97).wrapping_add(13));
    std::fs::write(&path, key).expect("write reset key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn serve_command(config: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command.arg("serve").arg("--config").arg(config);
    command
}

/// Returns a free loopback UDP port below the kernel's ephemeral port range,
/// or `None` when that range leaves no room below it.
///
/// A socket bound to port 0 never gets such a port, so while a gateway
/// restarts on it, no other test can take the port in between. Each call
/// returns a different port, so tests that run in parallel do not collide.
fn udp_port_below_ephemeral_range() -> Option<u16> {
    static NEXT_OFFSET: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let first_ephemeral: u16 = range.split_whitespace().next()?.parse().ok()?;
    let lowest = first_ephemeral.saturating_sub(8192).max(10_000);
    let span = first_ephemeral
        .checked_sub(lowest)
        .filter(|&span| span > 0)?;
    // Another test process on the same machine starts elsewhere in the span.
    let start = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..64 {
        let offset = NEXT_OFFSET.fetch_add(1, Ordering::Relaxed);
        let port = lowest + (start.wrapping_add(offset) % span);
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Some(port);
        }
    }
    None
}

/// Starts `ztgate serve`, kills it (SIGKILL, a crash: no close reaches the
/// client), starts it again on the same port with the same config, then
/// writes on the open stream. Returns how the connection ended and how long
/// after the write, or `None` when it had not ended after `patience`.
async fn write_after_restart(
    with_reset_key: bool,
    patience: Duration,
) -> Option<(quinn::ConnectionError, Duration)> {
    let upstream = echo_server("127.0.0.1:0").await;
    let scratch = tempfile::tempdir().expect("temp dir");
    let gateway_extra = if with_reset_key {
        format!(
            "reset_key_file = \"{}\"",
            write_reset_key(scratch.path()).display()
        )
    } else {
        String::new()
    };
    let apps = [App::wiki(upstream)];
    // The port is free between the two processes, so it comes from outside
    // the range that other tests' sockets are given.
    let listen = match udp_port_below_ephemeral_range() {
        Some(port) => format!("127.0.0.1:{port}"),
        None => "127.0.0.1:0".to_string(),
    };
    let (_dir, config) = write_config_with(&listen, &apps, &gateway_extra, "");
    let first = Running::spawn(serve_command(&config), false);
    let gateway: SocketAddr = first
        .wait_for("ztgate: listening quic ", Duration::from_secs(20))
        .parse()
        .expect("gateway address");

    let (_client, tunnel) = connect(gateway, "DEV-0001", WIKI).await;
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open");
    send.write_all(b"one").await.expect("write");
    let mut echoed = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut echoed))
        .await
        .expect("echo within 10 s")
        .expect("read");
    assert_eq!(&echoed, b"one");

    // Same config, now with the port the first process was given.
    let (_dir2, config) = write_config_with(&gateway.to_string(), &apps, &gateway_extra, "");
    drop(first);
    let second = Running::spawn(serve_command(&config), false);
    let restarted = second.wait_for("ztgate: listening quic ", Duration::from_secs(20));
    assert_eq!(restarted, gateway.to_string());

    let written = Instant::now();
    send.write_all(b"two").await.expect("write after restart");
    let ended = tokio::time::timeout(patience, tunnel.connection.closed()).await;
    ended.ok().map(|error| (error, written.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_reset_after_restart() {
    // The test config's idle timeout is 30 s; the reset must come far sooner.
    let patience = Duration::from_secs(10);
    let ended = write_after_restart(true, patience).await;
    let Some((error, after)) = ended else {
        panic!("the client did not learn of the restart within {patience:?}");
    };
    assert_eq!(
        error,
        quinn::ConnectionError::Reset,
        "ended after {after:?}"
    );
    assert!(after < patience, "reset after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_reset_key_sends_no_reset() {
    // Without a shared key the new process cannot make a valid reset token,
    // so the client waits for its idle timeout instead.
    let ended = write_after_restart(false, Duration::from_secs(3)).await;
    assert!(ended.is_none(), "the connection ended early: {ended:?}");
}

#[test]
fn reset_key_file_is_checked() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = tempfile::tempdir().expect("temp dir");
    let key = write_reset_key(scratch.path());
    let apps = [App::wiki("127.0.0.1:9".parse().expect("addr"))];
    let extra = format!(
        "reset_key_file = \"{}\"\nmin_reset_interval_ms = 50",
        key.display()
    );
    let (_dir, config) = write_config_with("127.0.0.1:0", &apps, &extra, "");
    let generation = ztgate::config::load_generation(&config, 1).expect("valid config");
    assert!(generation.reset_key.is_some());
    assert_eq!(generation.min_reset_interval, Duration::from_millis(50));

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let errors = ztgate::config::load_generation(&config, 1)
        .expect_err("a group-readable key file is refused")
        .to_string();
    assert!(errors.contains("gateway.reset_key_file"), "{errors}");
    assert!(errors.contains("mode 0640"), "{errors}");

    std::fs::write(&key, b"too short").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let errors = ztgate::config::load_generation(&config, 1)
        .expect_err("a short key file is refused")
        .to_string();
    assert!(errors.contains("at least 32 random bytes"), "{errors}");
}

/// `ztgate connect` for DEV-0001 to the wiki, listening on a loopback port.
fn connect_command(args: &[&str]) -> std::process::Command {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_resumes_tls_session_on_reconnect() {
    let upstream = echo_server("127.0.0.1:0").await;
    // Sessions end after 2 s with session-expired, which ztgate connect
    // answers with a reconnect.
    let gw = TestGateway::start(
        "127.0.0.1:0",
        &[App::wiki(upstream)],
        "[policy]\nmax_session_secs = 2\n",
    )
    .await;
    let gateway = gw.addr().to_string();
    let client = Running::spawn(connect_command(&["--gateway", &gateway]), true);
    client.wait_for("listening on ", Duration::from_secs(20));
    let stats = &gw.gateway.shared().stats;
    let resumed = wait_until(Duration::from_secs(20), || {
        stats.admitted_resumed.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert!(
        resumed,
        "no resumed admission after {} admissions",
        stats.admitted.load(Ordering::Relaxed)
    );
    assert!(stats.admitted.load(Ordering::Relaxed) >= 2);
}

/// Watches a session's recorded and evaluated addresses every 5 ms and
/// remembers whether either ever had `ip`.
fn watch_for_ip(
    entry: Arc<SessionEntry>,
    ip: &str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let ip: std::net::IpAddr = ip.parse().expect("ip");
    let seen = Arc::new(AtomicBool::new(false));
    let flag = seen.clone();
    let task = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if recorded_client(&entry).ip() == ip || evaluated_client(&entry).ip() == ip {
                flag.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (seen, task)
}

#[tokio::test]
async fn forged_source_address_is_never_recorded() {
    const TOTAL: usize = 32 * 1024 * 1024;
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let relay = UdpRelay::start(gw.addr(), "127.0.0.9").await;
    let (_client, tunnel) = connect(relay.addr, "DEV-0001", WIKI).await;
    let entry = only_session(&gw);
    let genuine = relay.control.upstream();
    assert_eq!(recorded_client(&entry), genuine);
    let (forged_seen, watcher) = watch_for_ip(entry.clone(), "127.0.0.9");

    let (send, recv) = tunnel.open_stream().await.expect("open stream");
    let mut transfer = EchoTransfer::start(send, recv, TOTAL);
    transfer.wait_for_bytes(2 * 1024 * 1024).await;
    // Copies of genuine datagrams from 127.0.0.9, after each original.
    relay.control.set_spoof(Spoof::CopyAfter);
    transfer.wait_for_bytes(8 * 1024 * 1024).await;
    // Copies that arrive first, so quinn moves to 127.0.0.9 before
    // validating it. The race runs until the gateway has sent something to
    // 127.0.0.9, then for 300 ms more.
    relay.control.set_spoof(Spoof::CopyFirst);
    wait_until(Duration::from_secs(20), || {
        relay.control.forged_received.load(Ordering::Relaxed) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.control.set_spoof(Spoof::Off);
    assert_eq!(transfer.finish().await, TOTAL as u64);

    // The connection stays usable.
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open after");
    send.write_all(b"still here").await.expect("write");
    send.finish().expect("finish");
    let echoed = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(64))
        .await
        .expect("echo within 20 s")
        .expect("read");
    assert_eq!(echoed, b"still here");

    watcher.abort();
    let sent = relay.control.forged_sent.load(Ordering::Relaxed);
    let received = relay.control.forged_received.load(Ordering::Relaxed);
    assert!(sent > 0, "the relay forged no datagram");
    assert!(
        received > 0,
        "the racing copies never moved quinn to the forged address, so nothing was tested"
    );
    assert!(
        received <= 3 * sent,
        "the gateway sent {received} bytes toward the forged address, which sent {sent}"
    );
    assert!(
        !forged_seen.load(Ordering::Relaxed),
        "the forged address reached the registry or policy"
    );
    assert_eq!(recorded_client(&entry), genuine);
    assert_eq!(entry.path_changes.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn nat_rebinding_port_change_is_followed() {
    const TOTAL: usize = 16 * 1024 * 1024;
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let relay = UdpRelay::start(gw.addr(), "127.0.0.9").await;
    let (_client, tunnel) = connect(relay.addr, "DEV-0001", WIKI).await;
    let entry = only_session(&gw);
    let before = relay.control.upstream();

    let (send, recv) = tunnel.open_stream().await.expect("open stream");
    let mut transfer = EchoTransfer::start(send, recv, TOTAL);
    transfer.wait_for_bytes(2 * 1024 * 1024).await;
    // The NAT in front of the client picks a new port; the client does not know.
    relay.control.rebind();
    let after = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = relay.control.upstream();
            if now != before || Instant::now() > deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert_ne!(after, before, "the relay did not move");
    assert_eq!(after.ip(), before.ip());
    let followed = wait_until(Duration::from_secs(15), || recorded_client(&entry) == after).await;
    assert!(
        followed,
        "registry still records {}, expected {after}",
        recorded_client(&entry)
    );
    assert_eq!(transfer.finish().await, TOTAL as u64);
    assert_eq!(entry.path_changes.load(Ordering::Relaxed), 1);
    let reevaluated =
        wait_until(Duration::from_secs(5), || evaluated_client(&entry) == after).await;
    assert!(reevaluated, "policy last saw {}", evaluated_client(&entry));
}

/// Echoes `total` bytes through a local TCP listener and checks them.
async fn tcp_echo_transfer(
    local: String,
    total: usize,
    progress: watch::Sender<u64>,
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(&local)
        .await
        .map_err(|e| format!("connect {local}: {e}"))?;
    let (mut read, mut write) = tcp.into_split();
    let data = Arc::new(pattern(total, 29));
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for chunk in data.chunks(64 * 1024) {
            write.write_all(chunk).await?;
        }
        write.shutdown().await
    });
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0usize;
    loop {
        let n = read
            .read(&mut buf)
            .await
            .map_err(|e| format!("read at {offset}: {e}"))?;
        if n == 0 {
            break;
        }
        if offset + n > expected.len() || buf[..n] != expected[offset..offset + n] {
            return Err(format!("echoed bytes differ at offset {offset}"));
        }
        offset += n;
        progress.send_replace(offset as u64);
    }
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("write: {e}"))?;
    if offset == total {
        Ok(())
    } else {
        Err(format!("stream ended after {offset} of {total} bytes"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_moves_connect_to_new_socket() {
    const TOTAL: usize = 32 * 1024 * 1024;
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let gateway = gw.addr().to_string();
    let client = Running::spawn(
        connect_command(&["--transport", "quic", "--gateway", &gateway]),
        true,
    );
    let local = client.wait_for("listening on ", Duration::from_secs(20));
    let entry = only_session(&gw);
    let before = recorded_client(&entry);

    let (progress, mut received) = watch::channel(0u64);
    let transfer = tokio::spawn(tcp_echo_transfer(local, TOTAL, progress));
    tokio::time::timeout(
        Duration::from_secs(60),
        received.wait_for(|n| *n >= 4 * 1024 * 1024),
    )
    .await
    .expect("transfer progresses")
    .expect("transfer alive");
    let status = std::process::Command::new("kill")
        .args(["-USR1", &client.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let moved_to = client.wait_for("network changed (SIGUSR1", Duration::from_secs(10));
    assert!(moved_to.contains("moved to UDP"), "{moved_to}");
    let followed = wait_until(Duration::from_secs(15), || {
        let now = recorded_client(&entry);
        now != before && now.ip() == before.ip()
    })
    .await;
    assert!(followed, "registry still records {before}");
    tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .expect("transfer completes within 120 s")
        .expect("transfer task")
        .expect("byte-exact transfer");
    assert_eq!(entry.path_changes.load(Ordering::Relaxed), 1);
}

/// Network namespaces made for one test, deleted (with the veth links in
/// them) when dropped.
struct Namespaces {
    names: Vec<String>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by two veth links, "wifi" (10.213.1.0/24) and
/// "cell" (10.213.2.0/24). The gateway's service address 10.213.0.1 is on
/// its namespace's loopback; the client reaches it over wifi (metric 100)
/// or, when wifi is gone, over cell (metric 200).
fn two_path_namespaces() -> Result<(Namespaces, String, String), String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 1_000_000)
        .unwrap_or(0);
    let client = format!("ztm{}-{stamp}-c", std::process::id());
    let gateway = format!("ztm{}-{stamp}-g", std::process::id());
    let mut made = Namespaces { names: Vec::new() };
    for name in [&client, &gateway] {
        ip(&["netns", "add", name])?;
        made.names.push(name.clone());
    }
    let (c, g) = (client.as_str(), gateway.as_str());
    let steps: Vec<Vec<&str>> = vec![
        vec![
            "link", "add", "wifi", "netns", c, "type", "veth", "peer", "name", "wifi", "netns", g,
        ],
        vec![
            "link", "add", "cell", "netns", c, "type", "veth", "peer", "name", "cell", "netns", g,
        ],
        vec!["-n", c, "link", "set", "lo", "up"],
        vec!["-n", g, "link", "set", "lo", "up"],
        vec!["-n", c, "addr", "add", "10.213.1.2/24", "dev", "wifi"],
        vec!["-n", g, "addr", "add", "10.213.1.1/24", "dev", "wifi"],
        vec!["-n", c, "addr", "add", "10.213.2.2/24", "dev", "cell"],
        vec!["-n", g, "addr", "add", "10.213.2.1/24", "dev", "cell"],
        vec!["-n", c, "link", "set", "wifi", "up"],
        vec!["-n", c, "link", "set", "cell", "up"],
        vec!["-n", g, "link", "set", "wifi", "up"],
        vec!["-n", g, "link", "set", "cell", "up"],
        vec!["-n", g, "addr", "add", "10.213.0.1/32", "dev", "lo"],
        vec![
            "-n",
            c,
            "route",
            "add",
            "10.213.0.1/32",
            "via",
            "10.213.1.1",
            "dev",
            "wifi",
            "metric",
            "100",
        ],
        vec![
            "-n",
            c,
            "route",
            "add",
            "10.213.0.1/32",
            "via",
            "10.213.2.1",
            "dev",
            "cell",
            "metric",
            "200",
        ],
    ];
    for step in steps {
        ip(&step)?;
    }
    Ok((made, client, gateway))
}

fn in_netns(namespace: &str, program: &std::ffi::OsStr) -> std::process::Command {
    let mut command = std::process::Command::new("ip");
    command.args(["netns", "exec", namespace]).arg(program);
    command
}

#[test]
fn link_loss_moves_tunnel_to_other_path() {
    const TOTAL: usize = 48 * 1024 * 1024;
    let (_namespaces, client_ns, gateway_ns) = match two_path_namespaces() {
        Ok(made) => made,
        Err(reason) => {
            eprintln!("skipped: network namespaces are not available here ({reason}); run as root with iproute2");
            return;
        }
    };
    let echo_script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tcp_echo.py");
    let ztgate = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_ztgate"));

    let mut upstream = in_netns(&gateway_ns, "python3".as_ref());
    upstream
        .arg(&echo_script)
        .args(["server", "127.0.0.1", "7000", "120"]);
    let upstream = Running::spawn(upstream, false);
    upstream.wait_for("ready", Duration::from_secs(20));

    let apps = [App::wiki("127.0.0.1:7000".parse().expect("addr"))];
    let (_dir, config) = write_config_with("10.213.0.1:4433", &apps, "", "");
    let mut serve = in_netns(&gateway_ns, ztgate);
    serve.arg("serve").arg("--config").arg(&config);
    let serve = Running::spawn_both(serve);
    serve.wait_for(
        "ztgate: listening quic 10.213.0.1:4433",
        Duration::from_secs(20),
    );

    let pki = pki();
    let mut connect = in_netns(&client_ns, ztgate);
    connect
        .args([
            "connect",
            "--transport",
            "quic",
            "--gateway",
            "10.213.0.1:4433",
        ])
        .args(["--app", WIKI, "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"));
    let connect = Running::spawn(connect, true);
    let local = connect.wait_for("listening on ", Duration::from_secs(20));

    let (host, port) = local.rsplit_once(':').expect("HOST:PORT");
    let mut transfer = in_netns(&client_ns, "python3".as_ref());
    transfer
        .arg(&echo_script)
        .args(["client", host, port, &TOTAL.to_string(), "120"]);
    let transfer = Running::spawn(transfer, false);
    transfer.wait_for("progress 8388608", Duration::from_secs(60));

    // Wi-Fi goes away mid-transfer: its routes go with it, and the client
    // must carry on over the cellular link.
    ip(&["-n", &client_ns, "link", "set", "wifi", "down"]).expect("take wifi down");
    let changed = connect.wait_for("network changed", Duration::from_secs(10));
    assert!(changed.contains("moved to UDP"), "{changed}");
    let line = serve.wait_for_all(
        &["client address changed", "new=10.213.2.2:"],
        Duration::from_secs(20),
    );
    assert!(line.contains("old=10.213.1.2:"), "{line}");
    let done = transfer.wait_for("ok ", Duration::from_secs(120));
    assert_eq!(done, TOTAL.to_string());
}

/// The next stdout line of a child process, within 30 s.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> String {
    tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("a line within 30 s")
        .expect("read stdout")
        .expect("the client is still running")
}

/// aioquic version the interoperability test installs.
const AIOQUIC: &str = "aioquic==1.7.2";

/// A Python venv with aioquic under the target directory, made on first use.
/// Returns `Err` with the reason when pip cannot reach the package registry.
fn aioquic_python() -> Result<std::path::PathBuf, String> {
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("aioquic-venv");
    let python = venv.join("bin/python");
    let ready = |python: &std::path::Path| {
        std::process::Command::new(python)
            .args(["-c", "import aioquic"])
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
        .expect("run python3 -m venv");
    assert!(
        made.status.success(),
        "python3 -m venv failed (Debian needs python3-venv): {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pip = std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", AIOQUIC])
        .output()
        .expect("run pip");
    if !pip.status.success() {
        let stderr = String::from_utf8_lossy(&pip.stderr).to_string();
        let unreachable = [
            "Failed to establish a new connection",
            "Temporary failure in name resolution",
            "Network is unreachable",
            "Connection refused",
            "Read timed out",
            "ProxyError",
        ];
        if unreachable.iter().any(|m| stderr.contains(m)) {
            return Err(stderr);
        }
        panic!("pip install {AIOQUIC} failed: {stderr}");
    }
    assert!(ready(&python), "aioquic does not import after pip install");
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_client_is_admitted_and_migrates() {
    let python = match tokio::task::spawn_blocking(aioquic_python)
        .await
        .expect("venv task")
    {
        Ok(python) => python,
        Err(reason) => {
            eprintln!(
                "skipped: pip cannot reach the package registry to install {AIOQUIC}: {reason}"
            );
            return;
        }
    };
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let pki = pki();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aioquic_client.py");
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("127.0.0.1")
        .arg(gw.addr().port().to_string())
        .arg("--cert")
        .arg(pki.join("DEV-0001-chain.pem"))
        .arg("--key")
        .arg(pki.join("DEV-0001.key"))
        .arg("--ca")
        .arg(pki.join("root-ca.pem"))
        .args(["--sni", WIKI])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the aioquic client");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();

    let admitted = next_line(&mut lines).await;
    let body = admitted
        .strip_prefix("admitted ")
        .unwrap_or_else(|| panic!("expected admitted, got {admitted:?}"));
    let body: serde_json::Value = serde_json::from_str(body).expect("admitted JSON");
    assert_eq!(body["application"], "wiki");
    assert_eq!(body["device_id"], "spiffe://example.test/device/DEV-0001");
    assert_eq!(next_line(&mut lines).await, "echo 1 ok");
    let entry = only_session(&gw);
    let first = recorded_client(&entry);

    let migrated = next_line(&mut lines).await;
    let moved_to: SocketAddr = migrated
        .strip_prefix("migrated local=")
        .unwrap_or_else(|| panic!("expected migrated, got {migrated:?}"))
        .parse()
        .expect("new local address");
    assert_ne!(moved_to, first);
    let followed = wait_until(Duration::from_secs(15), || {
        recorded_client(&entry) == moved_to
    })
    .await;
    assert!(
        followed,
        "registry still records {}, expected {moved_to}",
        recorded_client(&entry)
    );
    let reevaluated = wait_until(Duration::from_secs(5), || {
        evaluated_client(&entry) == moved_to
    })
    .await;
    assert!(reevaluated, "policy last saw {}", evaluated_client(&entry));

    stdin
        .write_all(b"stop\n")
        .await
        .expect("tell the client to stop");
    let done = next_line(&mut lines).await;
    let exchanges: u32 = done
        .strip_prefix("done ")
        .unwrap_or_else(|| panic!("expected done, got {done:?}"))
        .parse()
        .expect("exchange count");
    assert!(exchanges >= 1, "no exchange after the move");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the client exits")
        .expect("wait");
    assert!(status.success());
    assert_eq!(entry.path_changes.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn quic_answer_deadline_applies_only_to_silence() {
    let upstream = echo_server("127.0.0.1:0").await;
    let gw = TestGateway::start("127.0.0.1:0", &[App::wiki(upstream)], "").await;
    let relay = UdpRelay::start(gw.addr(), "127.0.0.9").await;
    let client = device_client(relay.addr, "DEV-0001", WIKI);

    relay.control.blocked.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let silent = client
        .connect_expecting_answer(Duration::from_millis(300), Duration::from_secs(10))
        .await;
    let waited = started.elapsed();
    match silent {
        Err(ztgate::client::Ending::Transient(message)) => {
            assert!(message.contains("no QUIC answer"), "{message}")
        }
        Err(other) => panic!("expected a transient ending, got {other:?}"),
        Ok(_) => panic!("a blocked gateway cannot admit"),
    }
    // Well before the 10 s connect timeout, which would end it otherwise.
    assert!(waited < Duration::from_secs(5), "gave up after {waited:?}");

    relay.control.blocked.store(false, Ordering::Relaxed);
    let tunnel = client
        .connect_expecting_answer(Duration::from_millis(300), Duration::from_secs(10))
        .await
        .expect("an answering gateway admits the device");
    assert_eq!(tunnel.admitted.application, "wiki");
}
