//! Shared fixtures for the end-to-end tests: the openssl-made PKI, config
//! files, upstream servers and clients, all on loopback with port 0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztgate::client::{client_tls_config, Client, Tunnel};
use ztgate::gateway::Gateway;

/// The PKI made once per test binary by scripts/dev-pki.sh.
pub fn pki() -> &'static Path {
    static PKI: OnceLock<tempfile::TempDir> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dev-pki.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir.path())
            .output()
            .expect("run dev-pki.sh");
        assert!(
            out.status.success(),
            "dev-pki.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

pub const WIKI: &str = "wiki.apps.example.test";

/// One application of a test config.
pub struct App {
    pub name: &'static str,
    pub server_name: String,
    pub upstream: String,
    /// TOML lines of the access table.
    pub access: String,
}

impl App {
    pub fn wiki(upstream: SocketAddr) -> App {
        App {
            name: "wiki",
            server_name: WIKI.to_string(),
            upstream: upstream.to_string(),
            access: r#"device_cas = ["dev-devices"]
spiffe_prefixes = ["spiffe://example.test/device"]
require_hardware_bound = true"#
                .to_string(),
        }
    }
}

/// Writes a config into its own temp dir and returns (dir, path).
pub fn write_config(listen: &str, apps: &[App], extra: &str) -> (tempfile::TempDir, PathBuf) {
    let device_cas = format!(
        "[[device_ca]]\nname = \"dev-devices\"\ncertificates = [\"{}/device-ca.pem\"]\n",
        pki().display()
    );
    write_config_with_cas(listen, apps, &device_cas, extra)
}

/// Writes a config whose `[[device_ca]]` tables are the TOML in `device_cas`
/// instead of the development PKI's device CA, and returns (dir, path).
pub fn write_config_with_cas(
    listen: &str,
    apps: &[App],
    device_cas: &str,
    extra: &str,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki();
    let mut text = format!(
        r#"[gateway]
listen = ["{listen}"]
certificate = "{pki}/gateway-chain.pem"
private_key = "{pki}/gateway.key"
handshake_timeout_ms = 3000
idle_timeout_secs = 30
keep_alive_secs = 5

[identity]
hardware_bound_oid = "1.3.6.1.4.1.55555.1.1"

{device_cas}
{extra}
"#,
        pki = pki.display()
    );
    for app in apps {
        text.push_str(&format!(
            "\n[[application]]\nname = \"{}\"\nserver_name = \"{}\"\nupstream = \"{}\"\n[application.access]\n{}\n",
            app.name, app.server_name, app.upstream, app.access
        ));
    }
    let path = dir.path().join("ztgate.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

pub fn rewrite_config(path: &Path, listen: &str, apps: &[App], extra: &str) {
    let (_dir, fresh) = write_config(listen, apps, extra);
    std::fs::copy(&fresh, path).expect("replace config");
}

/// A started gateway with its config kept alive.
pub struct TestGateway {
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl TestGateway {
    pub async fn start(listen: &str, apps: &[App], extra: &str) -> TestGateway {
        let (dir, config) = write_config(listen, apps, extra);
        let gateway = Gateway::start(&config).await.expect("gateway starts");
        TestGateway {
            gateway,
            dir,
            config,
        }
    }

    /// Starts a gateway whose `[[device_ca]]` tables are the TOML in `device_cas`.
    pub async fn start_with_cas(
        listen: &str,
        apps: &[App],
        device_cas: &str,
        extra: &str,
    ) -> TestGateway {
        let (dir, config) = write_config_with_cas(listen, apps, device_cas, extra);
        let gateway = Gateway::start(&config).await.expect("gateway starts");
        TestGateway {
            gateway,
            dir,
            config,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.quic_addrs()[0]
    }
}

/// A device client for the named PKI device, e.g. "DEV-0001".
pub fn device_client(gateway: SocketAddr, device: &str, server_name: &str) -> Client {
    let pki = pki();
    let tls = client_tls_config(
        &pki.join(format!("{device}-chain.pem")),
        &pki.join(format!("{device}.key")),
        &pki.join("root-ca.pem"),
    )
    .expect("client TLS config");
    let bind: SocketAddr = if gateway.is_ipv4() {
        "127.0.0.1:0".parse().expect("addr")
    } else {
        "[::1]:0".parse().expect("addr")
    };
    Client::new(tls, gateway, server_name, Some(bind)).expect("client")
}

/// Sends one fixed certificate chain and key without checking them, so that a
/// test can present a certificate that rustls itself would not load.
#[derive(Debug)]
struct UncheckedClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for UncheckedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A device client that sends the certificates of `chain` (leaf first) and
/// signs with `key`. Unlike `client_tls_config`, it does not check that the
/// key matches the leaf or that rustls can parse the leaf, so the gateway
/// alone decides about certificates such as one with an unknown critical
/// extension.
pub fn chain_client(gateway: SocketAddr, chain: &Path, key: &Path, server_name: &str) -> Client {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
        .and_then(|iter| iter.collect())
        .unwrap_or_else(|e| panic!("read certificates from {}: {e}", chain.display()));
    let key_der = PrivateKeyDer::from_pem_file(key)
        .unwrap_or_else(|e| panic!("read a private key from {}: {e}", key.display()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .unwrap_or_else(|e| panic!("load the private key {}: {e}", key.display()));
    let resolver = UncheckedClientCert(Arc::new(rustls::sign::CertifiedKey::new(
        certs,
        signing_key,
    )));

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki().join("root-ca.pem")).expect("read root-ca.pem")
    {
        roots.add(cert.expect("root-ca.pem PEM")).expect("add root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![ztgate::protocol::ALPN.to_vec()];
    tls.enable_early_data = false;

    let bind: SocketAddr = if gateway.is_ipv4() {
        "127.0.0.1:0".parse().expect("addr")
    } else {
        "[::1]:0".parse().expect("addr")
    };
    Client::new(tls, gateway, server_name, Some(bind)).expect("client")
}

pub async fn connect(gateway: SocketAddr, device: &str, server_name: &str) -> (Client, Tunnel) {
    let client = device_client(gateway, device, server_name);
    let tunnel = client
        .connect(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{device} should be admitted: {e:?}"));
    (client, tunnel)
}

/// A TCP echo server: echoes every byte and half-closes after the client does.
pub async fn echo_server(bind: &str) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server that speaks first: sends a banner, then echoes one line.
pub async fn banner_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.write_all(b"220 banner ready\r\n").await;
                let mut buf = [0u8; 256];
                if let Ok(n) = tcp.read(&mut buf).await {
                    let _ = tcp.write_all(&buf[..n]).await;
                }
            });
        }
    });
    addr
}

/// A loopback port with nothing listening (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub fn shared<T>(value: T) -> Arc<T> {
    Arc::new(value)
}

/// The gateway's close of a refused connection, read as the client sees it.
pub async fn refusal(
    gateway: SocketAddr,
    device: &str,
    server_name: &str,
) -> ztgate::client::Ending {
    let client = device_client(gateway, device, server_name);
    match client.connect(Duration::from_secs(10)).await {
        Ok(t) => panic!(
            "{device} to {server_name} should be refused, got admitted {:?}",
            t.admitted
        ),
        Err(e) => e,
    }
}
