//! Time from connect to `admitted`: a gateway and a client in one process
//! on loopback, full handshakes (a new client endpoint and TLS config per
//! connection, so nothing is resumed) and resumed ones.
//!
//! Run: `cargo bench --bench connect -- [ROUNDS]`. Needs `openssl` for the
//! development PKI.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use ztgate::client::{client_tls_config, Client};
use ztgate::gateway::Gateway;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{label:<28} n={:<5} median={:>8.3} ms  p90={:>8.3} ms  p99={:>8.3} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.9).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let pki = common::dev_pki();
    let p = pki.path().display();
    let config = pki.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
listen = ["127.0.0.1:0"]
certificate = "{p}/gateway-chain.pem"
private_key = "{p}/gateway.key"
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
server_name = "wiki.apps.example.test"
upstream = "127.0.0.1:9"
[application.access]
device_cas = ["dev"]
spiffe_prefixes = ["spiffe://example.test/device"]
require_hardware_bound = true
"#
        ),
    )
    .expect("write config");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let gateway = Gateway::start(&config).await.expect("gateway");
        let addr: SocketAddr = gateway.quic_addrs()[0];
        let tls = || {
            client_tls_config(
                &pki.path().join("DEV-0001-chain.pem"),
                &pki.path().join("DEV-0001.key"),
                &pki.path().join("root-ca.pem"),
            )
            .expect("client config")
        };
        let bind = Some("127.0.0.1:0".parse().expect("addr"));
        // Warm up.
        for _ in 0..10 {
            let client = Client::new(tls(), addr, "wiki.apps.example.test", bind).expect("client");
            let t = client
                .connect(Duration::from_secs(5))
                .await
                .expect("admitted");
            t.connection.close(0u32.into(), b"");
        }
        let mut full = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let client = Client::new(tls(), addr, "wiki.apps.example.test", bind).expect("client");
            let start = Instant::now();
            let t = client
                .connect(Duration::from_secs(5))
                .await
                .expect("admitted");
            full.push(start.elapsed());
            t.connection.close(0u32.into(), b"");
        }
        let client = Client::new(tls(), addr, "wiki.apps.example.test", bind).expect("client");
        let first = client
            .connect(Duration::from_secs(5))
            .await
            .expect("admitted");
        first.connection.close(0u32.into(), b"");
        let mut resumed = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            let t = client
                .connect(Duration::from_secs(5))
                .await
                .expect("admitted");
            resumed.push(start.elapsed());
            t.connection.close(0u32.into(), b"");
        }
        report("connect to admitted (full)", full);
        report("connect to admitted (resumed)", resumed);
        gateway.shutdown().await;
    });
}
