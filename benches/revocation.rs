//! Revocation-to-close latency: how long after the gateway obtains
//! revocation data a live tunnel of that certificate is closed, for an
//! operator push and for a CRL fetch, each over 20 trials. Also times
//! admission with and without a loaded CRL.
//!
//! Run: `cargo bench --bench revocation -- [TRIALS]`. Needs `openssl` and
//! `python3` for the PKI and the CRL server.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use ztgate::client::{client_tls_config, Client};
use ztgate::gateway::Gateway;
use ztgate::identity::revocation::{PushTarget, PushedRevocation};

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{label:<40} n={:<3} median={:>8.2} ms  max={:>8.2} ms",
        samples.len(),
        at(0.5).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    );
}

fn write_crl(pki: &Path, dir: &Path) {
    let pem = dir.join("crl.pem");
    common::openssl_ca(
        pki,
        &[
            "-gencrl",
            "-crlhours",
            "1",
            "-out",
            pem.to_str().expect("path"),
        ],
    );
    let status = Command::new("openssl")
        .args(["crl", "-outform", "DER", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(dir.join("device-ca.crl"))
        .status()
        .expect("openssl crl");
    assert!(status.success());
}

/// Issues a device certificate BENCH-`n` from the device CA, with the
/// extensions of the development PKI's DEV-0003, and writes its chain file.
fn issue(pki: &Path, n: usize) -> String {
    let name = format!("BENCH-{n}");
    let key = pki.join(format!("{name}.key"));
    let csr = pki.join(format!("{name}.csr"));
    let pem = pki.join(format!("{name}.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
        ])
        .arg(&key)
        .args(["-subj", &format!("/O=ztgate Bench/CN={name}"), "-out"])
        .arg(&csr)
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(status.success());
    common::openssl_ca(
        pki,
        &[
            "-batch",
            "-extensions",
            "ext_dev_0003",
            "-days",
            "30",
            "-notext",
            "-in",
            csr.to_str().expect("path"),
            "-out",
            pem.to_str().expect("path"),
        ],
    );
    let mut chain = std::fs::read(&pem).expect("leaf");
    chain.extend(std::fs::read(pki.join("device-ca.pem")).expect("device CA"));
    std::fs::write(pki.join(format!("{name}-chain.pem")), chain).expect("chain");
    name
}

fn main() {
    let trials: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pki_dir = tempfile::tempdir().expect("dir");
    let pki = pki_dir.path();
    let status = Command::new("bash")
        .arg(root.join("scripts/dev-pki.sh"))
        .arg(pki)
        .stdout(Stdio::null())
        .status()
        .expect("dev-pki.sh");
    assert!(status.success());
    let devices: Vec<String> = (0..2 * trials).map(|n| issue(pki, n)).collect();
    let crl_dir = tempfile::tempdir().expect("dir");
    write_crl(pki, crl_dir.path());
    let mut server = Command::new("python3")
        .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d"])
        .arg(crl_dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("http.server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    let port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("port");
    let p = pki.display();
    let config = pki.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
listen = ["127.0.0.1:0"]
certificate = "{p}/gateway-chain.pem"
private_key = "{p}/gateway.key"
[log]
level = "warn"
audit = "off"
[limits]
max_connections_per_device = 1000
[[device_ca]]
name = "dev"
certificates = ["{p}/device-ca.pem"]
crl_urls = ["http://127.0.0.1:{port}/device-ca.crl"]
[[application]]
name = "wiki"
server_name = "wiki.apps.example.test"
upstream = "127.0.0.1:9"
[application.access]
device_cas = ["dev"]
allow_any_device = true
"#
        ),
    )
    .expect("config");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let gateway = Gateway::start(&config).await.expect("gateway");
        let addr = gateway.quic_addrs()[0];
        let client_for = |device: &str| {
            let tls = client_tls_config(
                &pki.join(format!("{device}-chain.pem")),
                &pki.join(format!("{device}.key")),
                &pki.join("root-ca.pem"),
            )
            .expect("client config");
            Client::new(
                tls,
                addr,
                "wiki.apps.example.test",
                Some("127.0.0.1:0".parse().expect("a")),
            )
            .expect("client")
        };
        let leaf = |device: &str| {
            let pem = std::fs::read(pki.join(format!("{device}.pem"))).expect("pem");
            let der: rustls::pki_types::CertificateDer<'static> =
                rustls::pki_types::pem::PemObject::from_pem_slice(&pem).expect("der");
            ztgate::identity::extract_identity(&der, None).expect("identity")
        };

        let now_unix = || {
            SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        };
        // Push: what the admin API does, the store records the revocation
        // and the registry closes the certificate's sessions.
        let mut push = Vec::with_capacity(trials);
        for device in &devices[..trials] {
            let mut tunnel = client_for(device)
                .connect(Duration::from_secs(5))
                .await
                .expect("admitted");
            let identity = leaf(device);
            let start = Instant::now();
            gateway
                .shared()
                .crl
                .push(PushedRevocation {
                    target: PushTarget::CertSha256 {
                        sha256: identity.cert_sha256.clone(),
                    },
                    not_after_unix: identity.not_after_unix,
                    reason: Some("bench".into()),
                    pushed_at_unix: now_unix(),
                })
                .expect("push");
            let closed = gateway.shared().registry.close_matching(
                &ztgate::session::Selector::CertSha256(identity.cert_sha256.clone()),
                ztgate::session::CloseRequest::new(
                    ztgate::protocol::Code::CertificateRevoked,
                    "bench",
                ),
            );
            assert_eq!(closed, 1);
            let _ = tunnel.ended().await;
            push.push(start.elapsed());
        }
        report("push to tunnel closed at the client", push);

        // CRL: revoke a device in the CA database, write the CRL, fetch it,
        // and time from the end of the fetch to the client seeing the close.
        let mut crl = Vec::with_capacity(trials);
        for device in &devices[trials..] {
            let mut tunnel = client_for(device)
                .connect(Duration::from_secs(5))
                .await
                .expect("admitted");
            common::openssl_ca(
                pki,
                &[
                    "-revoke",
                    pki.join(format!("{device}.pem")).to_str().expect("path"),
                ],
            );
            write_crl(pki, crl_dir.path());
            let reports = gateway.shared().crl.refresh_now(None).await;
            let start = Instant::now();
            assert!(reports.iter().all(|r| r.result.is_ok()), "{reports:?}");
            let _ = tunnel.ended().await;
            crl.push(start.elapsed());
        }
        report("CRL fetched to tunnel closed at the client", crl);

        // Pushed revocation by SPKI, checked in admission: a refused
        // reconnect proves the store is consulted.
        let identity = leaf("DEV-0001");
        gateway
            .shared()
            .crl
            .push(PushedRevocation {
                target: PushTarget::SpkiSha256 {
                    sha256: identity.spki_sha256.clone(),
                },
                not_after_unix: identity.not_after_unix,
                reason: Some("bench".into()),
                pushed_at_unix: now_unix(),
            })
            .expect("push");
        assert!(client_for("DEV-0001")
            .connect(Duration::from_secs(5))
            .await
            .is_err());

        // Admission CPU time per connection, with the revocation store
        // (a loaded CRL, answered from memory) and without it. The chain is
        // what a client sends; admission re-verifies it, checks revocation,
        // reads the identity and asks the built-in policy.
        let generation = gateway.shared().config.current();
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_file_iter(pki.join("DEV-0003-chain.pem"))
                .expect("chain")
                .map(|c| c.expect("pem"))
                .collect();
        let rounds = 20_000u32;
        for (label, with_crl) in [
            ("admission without revocation", false),
            ("admission with CRL in memory", true),
        ] {
            let request = ztgate::admission::AdmissionRequest {
                chain: &chain,
                server_name: Some("wiki.apps.example.test"),
                client: "127.0.0.1:40000".parse().expect("addr"),
                path_changes: 0,
                previous_address: None,
                transport: ztgate::policy::Transport::Quic,
                now: SystemTime::now(),
                session_started: None,
                previous: None,
                ocsp: None,
                posture: None,
                crl: with_crl.then(|| &*gateway.shared().crl),
                allow_step_up: false,
            };
            let start = Instant::now();
            for _ in 0..rounds {
                let admitted = ztgate::admission::admit(&generation, &request).await;
                std::hint::black_box(admitted.is_ok());
            }
            let per = start.elapsed() / rounds;
            println!(
                "{label:<40} {:>8.1} us per connection ({rounds} rounds, one thread)",
                per.as_secs_f64() * 1e6
            );
        }
        gateway.shutdown().await;
    });
    let _ = server.kill();
    let _ = server.wait();
}
