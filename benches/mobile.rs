//! Mobile network figures, measured through a userspace UDP relay that adds
//! a fixed one-way delay in each direction (the kernel here has no netem):
//!
//! - the stall in a download when the client moves to a new UDP port
//!   (the largest gap between received chunks in the 2 s after the move),
//!   next to the largest gap in the second before it, which starts a
//!   second after the previous trial's 2 s window ends;
//! - how long after the move the gateway records the validated address;
//! - the time from connect to `admitted`, with a full TLS handshake and
//!   with a resumed one.
//!
//! Run: `cargo bench --bench mobile -- [TRIALS] [ONE_WAY_DELAY_MS]`
//! (defaults 20 and 25, so an RTT of 50 ms). Needs `openssl` for the
//! development PKI. Everything listens on 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use ztgate::client::{client_tls_config, Client};
use ztgate::gateway::Gateway;
use ztgate::ingress::udp::{bind_udp, UdpBuffers};

const APP: &str = "wiki.apps.example.test";

type Delayed = (Instant, Arc<UdpSocket>, SocketAddr, Vec<u8>);

/// Sends each queued datagram at its deadline, in order.
async fn send_when_due(mut queue: mpsc::UnboundedReceiver<Delayed>) {
    while let Some((due, socket, to, datagram)) = queue.recv().await {
        tokio::time::sleep_until(due.into()).await;
        let _ = socket.send_to(&datagram, to).await;
    }
}

/// Starts a NAT-like relay: each client address gets its own upstream socket, so a
/// client that moves to a new port shows up at the gateway with a new port
/// too. Every datagram is held `delay` in each direction.
async fn delay_relay(target: SocketAddr, delay: Duration) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
    let addr = front.local_addr().expect("addr");
    let (up_tx, up_rx) = mpsc::unbounded_channel::<Delayed>();
    let (down_tx, down_rx) = mpsc::unbounded_channel::<Delayed>();
    tokio::spawn(send_when_due(up_rx));
    tokio::spawn(send_when_due(down_rx));
    tokio::spawn(async move {
        let mut mappings: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, client)) = front.recv_from(&mut buf).await else {
                continue;
            };
            let upstream = match mappings.get(&client) {
                Some(socket) => socket.clone(),
                None => {
                    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                    let (reader, front, down) = (socket.clone(), front.clone(), down_tx.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                            let due = Instant::now() + delay;
                            let _ = down.send((due, front.clone(), client, buf[..n].to_vec()));
                        }
                    });
                    mappings.insert(client, socket.clone());
                    socket
                }
            };
            let _ = up_tx.send((Instant::now() + delay, upstream, target, buf[..n].to_vec()));
        }
    });
    addr
}

/// Starts an upstream that sends 16 KiB chunks without pause until the client leaves.
async fn source_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 16 * 1024];
                while tcp.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let median = samples[(samples.len() - 1) / 2];
    let max = samples[samples.len() - 1];
    println!(
        "{label:<52} n={:<3} median={:>8.1} ms  max={:>8.1} ms",
        samples.len(),
        millis(median),
        millis(max)
    );
}

/// Returns the largest gap between consecutive arrivals that ends inside [from, to).
fn largest_gap(arrivals: &[Instant], from: Instant, to: Instant) -> Duration {
    arrivals
        .windows(2)
        .filter(|w| w[1] >= from && w[1] < to)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(to - from)
}

fn write_config(pki: &Path, upstream: SocketAddr) -> std::path::PathBuf {
    let p = pki.display();
    let config = pki.join("bench-mobile.toml");
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
listen = ["127.0.0.1:0"]
certificate = "{p}/gateway-chain.pem"
private_key = "{p}/gateway.key"
[log]
level = "warn"
[identity]
hardware_bound_oid = "1.3.6.1.4.1.55555.1.1"
[[device_ca]]
name = "dev"
certificates = ["{p}/device-ca.pem"]
[limits]
max_connections_per_source = 100000
max_connections_per_device = 100000
[[application]]
name = "wiki"
server_name = "{APP}"
upstream = "{upstream}"
[application.access]
device_cas = ["dev"]
spiffe_prefixes = ["spiffe://example.test/device"]
"#
        ),
    )
    .expect("write config");
    config
}

fn main() {
    let mut numbers = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok());
    let trials = numbers.next().unwrap_or(20).max(1) as usize;
    let delay = Duration::from_millis(numbers.next().unwrap_or(25));
    let pki = tempfile::tempdir().expect("temp dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dev-pki.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(pki.path())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run dev-pki.sh");
    assert!(status.success(), "dev-pki.sh failed");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        ztgate::install_crypto_provider();
        let upstream = source_upstream().await;
        let config = write_config(pki.path(), upstream);
        let gateway = Gateway::start(&config).await.expect("gateway");
        let relay = delay_relay(gateway.quic_addrs()[0], delay).await;
        let tls = || {
            client_tls_config(
                &pki.path().join("DEV-0001-chain.pem"),
                &pki.path().join("DEV-0001.key"),
                &pki.path().join("root-ca.pem"),
            )
            .expect("client config")
        };
        let bind: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        println!(
            "one-way delay {} ms each direction (RTT {} ms), {trials} trials",
            delay.as_millis(),
            2 * delay.as_millis()
        );

        // Migration stall during a download.
        let client = Client::new(tls(), relay, APP, Some(bind)).expect("client");
        let tunnel = client
            .connect(Duration::from_secs(10))
            .await
            .expect("admitted");
        let (_send, mut recv) = tunnel.open_stream().await.expect("open stream");
        let arrivals = Arc::new(Mutex::new(Vec::<Instant>::with_capacity(1 << 20)));
        let log = arrivals.clone();
        tokio::spawn(async move {
            while let Ok(Some(_)) = recv.read_chunk(1 << 20, true).await {
                log.lock().expect("lock").push(Instant::now());
            }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let registry = gateway.shared().registry.clone();
        let recorded = || {
            registry
                .all()
                .first()
                .map(|s| *s.client.lock().expect("lock"))
        };
        let (mut stalls, mut steady, mut recorded_after) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..trials {
            let before = recorded();
            let socket = bind_udp(
                bind,
                UdpBuffers {
                    receive: 4 << 20,
                    send: 4 << 20,
                },
            )
            .expect("bind");
            let moved = Instant::now();
            client.endpoint().rebind(socket).expect("rebind");
            let deadline = moved + Duration::from_secs(10);
            while recorded() == before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            recorded_after.push(moved.elapsed());
            // Three seconds per trial, so the next trial's baseline second
            // starts after this trial's stall window ends.
            tokio::time::sleep_until((moved + Duration::from_secs(3)).into()).await;
            let arrivals = arrivals.lock().expect("lock");
            stalls.push(largest_gap(
                &arrivals,
                moved,
                moved + Duration::from_secs(2),
            ));
            steady.push(largest_gap(
                &arrivals,
                moved - Duration::from_secs(1),
                moved,
            ));
        }
        summary("largest gap in the 1 s before a move (baseline)", steady);
        summary("stall: largest gap in the 2 s after a port move", stalls);
        summary("move to validated address in the registry", recorded_after);
        tunnel.connection.close(0u32.into(), b"");

        // Reconnect: a new client each time (full handshake) or the same
        // client again (resumed).
        let mut full = Vec::with_capacity(trials);
        for _ in 0..trials {
            let client = Client::new(tls(), relay, APP, Some(bind)).expect("client");
            let start = Instant::now();
            let t = client
                .connect(Duration::from_secs(10))
                .await
                .expect("admitted");
            full.push(start.elapsed());
            t.connection.close(0u32.into(), b"");
        }
        let client = Client::new(tls(), relay, APP, Some(bind)).expect("client");
        let first = client
            .connect(Duration::from_secs(10))
            .await
            .expect("admitted");
        // Tickets arrive after the handshake; give them a round trip.
        tokio::time::sleep(4 * delay).await;
        first.connection.close(0u32.into(), b"");
        let mut resumed = Vec::with_capacity(trials);
        for _ in 0..trials {
            let start = Instant::now();
            let t = client
                .connect(Duration::from_secs(10))
                .await
                .expect("admitted");
            resumed.push(start.elapsed());
            tokio::time::sleep(4 * delay).await;
            t.connection.close(0u32.into(), b"");
        }
        summary("reconnect to admitted, full handshake", full);
        summary("reconnect to admitted, resumed session", resumed);
        let stats = &gateway.shared().stats;
        println!(
            "gateway: {} admitted, {} resumed, {} validated path changes",
            stats.admitted.load(std::sync::atomic::Ordering::Relaxed),
            stats
                .admitted_resumed
                .load(std::sync::atomic::Ordering::Relaxed),
            stats
                .path_changes
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        gateway.shutdown().await;
    });
}
