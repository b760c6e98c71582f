//! Policy decision latency: the example Rego policy evaluated by the
//! embedded engine, a cached decision, and an OPA-shaped HTTP round trip on
//! loopback. Prints p50 and p99 over many evaluations.
//!
//! Run: `cargo bench --bench policy -- [ITERATIONS]`. Needs `openssl`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztgate::policy::{
    AppInput, CachedPolicy, NetworkInput, OpaPolicy, OpaSettings, PolicyClient, PolicyInput,
    RegoPolicy, SessionInput, Transport,
};

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{label:<34} n={:<7} p50={:>9.2} us  p99={:>9.2} us",
        samples.len(),
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6
    );
}

fn input(root: &Path) -> PolicyInput {
    let pki = tempfile::tempdir().expect("dir");
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/dev-pki.sh"))
        .arg(pki.path())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("dev-pki.sh");
    assert!(status.success());
    let pem = std::fs::read(pki.path().join("DEV-0001.pem")).expect("cert");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .expect("pem");
    let device =
        ztgate::identity::extract_identity(&der, Some("1.3.6.1.4.1.55555.1.1")).expect("identity");
    PolicyInput {
        device,
        issuing_ca: "dev-devices".into(),
        application: AppInput {
            name: "wiki".into(),
            server_name: "wiki.apps.example.test".into(),
            labels: [("sensitivity".to_string(), "medium".to_string())].into(),
        },
        network: NetworkInput {
            client_address: "10.20.1.5".parse().expect("ip"),
            client_port: 50000,
            transport: Transport::Quic,
            path_changes: 0,
            previous_address: None,
        },
        time: "2026-12-04T10:00:00Z".into(),
        now_unix: 1_796_378_400,
        session: SessionInput {
            age_secs: 0,
            previous_decision: None,
            posture: serde_json::json!({}),
        },
    }
}

async fn fake_opa() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut filled = 0;
                loop {
                    let n = match tcp.read(&mut buf[filled..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    filled += n;
                    let text = &buf[..filled];
                    let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&text[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .and_then(|v| v.trim().parse().ok())
                        })
                        .unwrap_or(0);
                    if filled < end + 4 + length {
                        continue;
                    }
                    filled = 0;
                    let body =
                        br#"{"result":{"outcome":"allow","rule":"bench","lifetime_secs":300}}"#;
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
                    // One write: a separate small body write would wait for
                    // the client's delayed ACK (Nagle), adding about 40 ms.
                    let mut response = head.into_bytes();
                    response.extend_from_slice(body);
                    if tcp.write_all(&response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let input = input(root);
    let rego = RegoPolicy::load(
        &[root.join("config/policy.rego")],
        Some(&root.join("config/policy-data.json")),
        "data.ztgate.decision",
        Duration::from_secs(300),
    )
    .expect("example policy");
    let decision = rego.evaluate(&input).expect("decision");
    assert_eq!(
        decision.outcome(),
        "allow",
        "the bench input is allowed by the example"
    );
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let d = rego.evaluate(&input).expect("decision");
        samples.push(start.elapsed());
        std::hint::black_box(d);
    }
    report("embedded Rego, example policy", samples);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let cached = CachedPolicy::new(Arc::new(rego), 1000);
        cached.decide(&input).await.expect("first");
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let start = Instant::now();
            let d = cached.decide(&input).await.expect("cached");
            samples.push(start.elapsed());
            std::hint::black_box(d);
        }
        report("cached decision (audit off)", samples);

        let addr = fake_opa().await;
        let opa = OpaPolicy::new(OpaSettings {
            url: format!("http://{addr}"),
            path: "ztgate/decision".into(),
            timeout: Duration::from_secs(2),
            retries: 0,
            retry_backoff: Duration::from_millis(10),
            circuit_failures: 5,
            circuit_open: Duration::from_secs(1),
            default_lifetime: Duration::from_secs(300),
        })
        .expect("opa client");
        opa.decide(&input).await.expect("warm up");
        let rounds = (iterations / 10).max(100);
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            let d = opa.decide(&input).await.expect("opa");
            samples.push(start.elapsed());
            std::hint::black_box(d);
        }
        report("OPA REST round trip (loopback)", samples);
    });
}
