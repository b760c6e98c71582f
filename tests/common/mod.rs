//! Shared fixtures for the end-to-end tests: the openssl-made PKI, config
//! files, upstream servers and clients, all on loopback with port 0.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
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
    /// More TOML lines of the `[[application]]` table, such as `tls_alpn`.
    pub extra: String,
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
            extra: String::new(),
        }
    }
}

/// Writes a config into its own temp dir and returns (dir, path).
pub fn write_config(listen: &str, apps: &[App], extra: &str) -> (tempfile::TempDir, PathBuf) {
    write_config_with(listen, apps, "", extra)
}

fn dev_device_cas() -> String {
    format!(
        "[[device_ca]]\nname = \"dev-devices\"\ncertificates = [\"{}/device-ca.pem\"]\n",
        pki().display()
    )
}

/// Like [`write_config`], with `gateway_extra` lines added to `[gateway]`.
pub fn write_config_with(
    listen: &str,
    apps: &[App],
    gateway_extra: &str,
    extra: &str,
) -> (tempfile::TempDir, PathBuf) {
    write_config_full(listen, apps, gateway_extra, &dev_device_cas(), extra)
}

/// Writes a config whose `[[device_ca]]` tables are the TOML in `device_cas`
/// instead of the development PKI's device CA, and returns (dir, path).
pub fn write_config_with_cas(
    listen: &str,
    apps: &[App],
    device_cas: &str,
    extra: &str,
) -> (tempfile::TempDir, PathBuf) {
    write_config_full(listen, apps, "", device_cas, extra)
}

fn write_config_full(
    listen: &str,
    apps: &[App],
    gateway_extra: &str,
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
{gateway_extra}

[identity]
hardware_bound_oid = "1.3.6.1.4.1.55555.1.1"

{device_cas}
{extra}
"#,
        pki = pki.display()
    );
    for app in apps {
        text.push_str(&format!(
            "\n[[application]]\nname = \"{}\"\nserver_name = \"{}\"\nupstream = \"{}\"\n{}\n[application.access]\n{}\n",
            app.name, app.server_name, app.upstream, app.extra, app.access
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
        TestGateway::start_with(listen, apps, "", extra).await
    }

    /// Like [`TestGateway::start`], with `gateway_extra` lines added to `[gateway]`.
    pub async fn start_with(
        listen: &str,
        apps: &[App],
        gateway_extra: &str,
        extra: &str,
    ) -> TestGateway {
        let (dir, config) = write_config_with(listen, apps, gateway_extra, extra);
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

    /// The first TLS-over-TCP listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.gateway.tls_addrs()[0]
    }
}

/// Builds a rustls client config for a PKI device that offers `alpn`.
pub fn device_tls(device: &str, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut config = device_tls_config(device);
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// Opens a TLS-over-TCP connection as a PKI device, bounded in time.
pub async fn tls_connect(
    addr: SocketAddr,
    device: &str,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(device_tls(device, &[]));
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(std::io::Error::other)?;
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Builds the rustls client config of the named PKI device, e.g. "DEV-0001".
pub fn device_tls_config(device: &str) -> rustls::ClientConfig {
    let pki = pki();
    client_tls_config(
        &pki.join(format!("{device}-chain.pem")),
        &pki.join(format!("{device}.key")),
        &pki.join("root-ca.pem"),
    )
    .expect("client TLS config")
}

/// Makes a device client for the named PKI device, e.g. "DEV-0001".
pub fn device_client(gateway: SocketAddr, device: &str, server_name: &str) -> Client {
    let tls = device_tls_config(device);
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

/// Sends `len` bytes on a new stream of `tunnel` to an echo upstream and
/// checks that the same bytes come back, within 60 s.
pub async fn echo_through(tunnel: &Tunnel, len: usize) {
    let (mut send, mut recv) = tunnel.open_stream().await.expect("open stream");
    let data = pattern(len, 7);
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        send.write_all(&data).await.expect("write");
        send.finish().expect("finish");
    });
    let received = tokio::time::timeout(Duration::from_secs(60), recv.read_to_end(len * 2))
        .await
        .expect("echo within 60 s")
        .expect("read to end");
    writer.await.expect("writer");
    assert_eq!(received.len(), expected.len());
    assert!(received == expected, "echoed bytes differ");
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

/// A loopback TCP port that refuses connections for as long as it is held.
///
/// The port stays bound without listening, so no other test can take it and
/// every connection attempt gets a reset.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

pub fn closed_port() -> ClosedPort {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet address");
    ClosedPort {
        addr,
        _socket: socket,
    }
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

/// Kills the child when the test ends, whatever happens.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts `command` and forwards the lines of stdout or stderr.
    pub fn spawn(mut command: Command, from_stderr: bool) -> Running {
        command.stdin(Stdio::null());
        if from_stderr {
            command.stderr(Stdio::piped()).stdout(Stdio::null());
        } else {
            command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        }
        let mut child = command.spawn().expect("spawn");
        let pipe: Box<dyn std::io::Read + Send> = if from_stderr {
            Box::new(child.stderr.take().expect("stderr"))
        } else {
            Box::new(child.stdout.take().expect("stdout"))
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    /// Starts `command` and forwards the lines of both stdout and stderr.
    pub fn spawn_both(mut command: Command) -> Running {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let (tx, lines) = mpsc::channel();
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for pipe in pipes {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Running { child, lines }
    }

    /// Waits (bounded) for a line containing every marker and returns the whole line.
    pub fn wait_for_all(&self, markers: &[&str], limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if markers.iter().all(|m| line.contains(m)) {
                        return line;
                    }
                    seen.push(line);
                }
                Err(_) => break,
            }
        }
        panic!("no line with all of {markers:?} within {limit:?}; saw: {seen:#?}");
    }

    /// Waits (bounded) for a line containing `marker` and returns the text after it.
    pub fn wait_for(&self, marker: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(pos) = line.find(marker) {
                        return line[pos + marker.len()..].trim().to_string();
                    }
                    seen.push(line);
                }
                Err(_) => break,
            }
        }
        panic!("no line with {marker:?} within {limit:?}; saw: {seen:#?}");
    }
}

/// What a [`UdpRelay`] does with a client datagram besides forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spoof {
    Off,
    /// Also send a copy from the forged address, after the original.
    CopyAfter,
    /// Also send a copy from the forged address, before the original, so
    /// the copy arrives first.
    CopyFirst,
}

/// Switches and counters of a [`UdpRelay`].
pub struct RelayControl {
    /// Drop every datagram in both directions, like a network that blocks UDP.
    pub blocked: std::sync::atomic::AtomicBool,
    spoof: Mutex<Spoof>,
    rebind: tokio::sync::Notify,
    /// Bytes sent to the target from the forged address.
    pub forged_sent: std::sync::atomic::AtomicU64,
    /// Bytes the target sent to the forged address (the relay drops them).
    pub forged_received: std::sync::atomic::AtomicU64,
    /// The relay's genuine address as the target sees it.
    pub upstream: Mutex<SocketAddr>,
}

impl RelayControl {
    pub fn set_spoof(&self, spoof: Spoof) {
        *self.spoof.lock().expect("lock") = spoof;
    }

    /// Moves the genuine upstream side to a new port, as a NAT rebinding does.
    pub fn rebind(&self) {
        self.rebind.notify_one();
    }

    pub fn upstream(&self) -> SocketAddr {
        *self.upstream.lock().expect("lock")
    }
}

/// A UDP relay on loopback for one client: datagrams from the client go to
/// `target` from the relay's own upstream socket, and answers come back,
/// like a NAT. It can block traffic, forge copies from `forged_ip`, and
/// move its upstream port. It stops when dropped or after five minutes.
pub struct UdpRelay {
    pub addr: SocketAddr,
    pub control: Arc<RelayControl>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpRelay {
    pub async fn start(target: SocketAddr, forged_ip: &str) -> UdpRelay {
        use std::sync::atomic::Ordering;
        use tokio::net::UdpSocket;
        let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = front.local_addr().expect("addr");
        let mut upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream");
        let forged = UdpSocket::bind(format!("{forged_ip}:0"))
            .await
            .expect("bind forged address");
        let control = Arc::new(RelayControl {
            blocked: Default::default(),
            spoof: Mutex::new(Spoof::Off),
            rebind: tokio::sync::Notify::new(),
            forged_sent: Default::default(),
            forged_received: Default::default(),
            upstream: Mutex::new(upstream.local_addr().expect("addr")),
        });
        let c = control.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut from_client = vec![0u8; 65536];
            let mut from_target = vec![0u8; 65536];
            let mut to_forged = vec![0u8; 65536];
            let stop = tokio::time::sleep(Duration::from_secs(300));
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = c.rebind.notified() => {
                        upstream = UdpSocket::bind("127.0.0.1:0").await.expect("rebind upstream");
                        *c.upstream.lock().expect("lock") = upstream.local_addr().expect("addr");
                    }
                    received = front.recv_from(&mut from_client) => {
                        let Ok((n, peer)) = received else { continue };
                        client = Some(peer);
                        if c.blocked.load(Ordering::Relaxed) {
                            continue;
                        }
                        let datagram = &from_client[..n];
                        let spoof = *c.spoof.lock().expect("lock");
                        if spoof == Spoof::CopyFirst {
                            let _ = forged.send_to(datagram, target).await;
                            c.forged_sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = upstream.send_to(datagram, target).await;
                        if spoof == Spoof::CopyAfter {
                            let _ = forged.send_to(datagram, target).await;
                            c.forged_sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    received = upstream.recv_from(&mut from_target) => {
                        let Ok((n, _)) = received else { continue };
                        if let (Some(client), false) = (client, c.blocked.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&from_target[..n], client).await;
                        }
                    }
                    received = forged.recv_from(&mut to_forged) => {
                        if let Ok((n, _)) = received {
                            c.forged_received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        UdpRelay {
            addr,
            control,
            task,
        }
    }
}
