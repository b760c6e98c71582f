//! Load generator for the handshake and idle-memory benchmarks in
//! scripts/bench.sh, against ztgate or any TLS server that checks client
//! certificates (stunnel, HAProxy).
//!
//!     tunnel_load echo --listen 127.0.0.1:0
//!     tunnel_load handshakes --transport quic|tls --target ADDR --server-name NAME \
//!         --cert CHAIN --key KEY --ca CA [--seconds 5] [--concurrency 16] [--server-pid PID]
//!     tunnel_load idle --transport quic|tls --count N --server-pid PID --target ADDR ...
//!
//! `echo` is a TCP echo server to use as the upstream. `handshakes` opens new
//! tunnels for a fixed time, each with a full mutual-TLS handshake (resumption
//! is off). A one-byte echo proves that each tunnel reached the upstream. Over
//! QUIC the byte goes on a stream opened after `admitted`, and over TLS on the
//! TLS connection itself. `idle` opens N tunnels the same way and keeps
//! them open with no traffic. QUIC tunnels open no stream, so they are
//! admitted connections only, and TLS tunnels are connected upstream.
//! Results are one line of `key=value` pairs on stdout. With `--server-pid`,
//! they include the server's CPU time per tunnel (`handshakes`) or its VmRSS
//! growth per tunnel (`idle`), both read from /proc.

use clap::{Args, Parser, Subcommand, ValueEnum};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztgate::client::{Client, Tunnel};

/// Time limit for one tunnel to be open and echo its byte.
const TUNNEL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "Opens tunnels for ztgate's handshake and idle-memory benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a TCP echo server and prints `ready ADDR`.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Opens new tunnels as fast as possible for a fixed time.
    Handshakes {
        #[command(flatten)]
        target: Target,
        /// Length of the run, in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Tunnels being opened at the same time.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Opens COUNT tunnels, keeps them idle and reports the server's memory growth.
    Idle {
        #[command(flatten)]
        target: Target,
        /// Number of idle tunnels to keep open.
        #[arg(long)]
        count: usize,
        /// Tunnels being opened at the same time.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to wait after the last tunnel opened before reading VmRSS.
        #[arg(long, default_value_t = 2.0)]
        settle_seconds: f64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// ztgate's QUIC ingress.
    Quic,
    /// Plain TLS over TCP: ztgate's TLS ingress, stunnel or HAProxy.
    Tls,
}

#[derive(Args, Clone)]
struct Target {
    #[arg(long, value_enum)]
    transport: Transport,
    /// Server address: UDP for QUIC, TCP for TLS.
    #[arg(long)]
    target: SocketAddr,
    /// TLS server name, which for ztgate selects the application.
    #[arg(long)]
    server_name: String,
    /// PEM file with the client certificate chain, leaf first.
    #[arg(long)]
    cert: PathBuf,
    /// PEM file with the client's private key.
    #[arg(long)]
    key: PathBuf,
    /// PEM file with the CA certificates that the server certificate must chain to.
    #[arg(long)]
    ca: PathBuf,
    /// Process whose CPU time and VmRSS are read from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ztgate::install_crypto_provider();
    raise_descriptor_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tunnel_load: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Echo { listen } => run_echo(listen).await,
            Command::Handshakes {
                target,
                seconds,
                concurrency,
            } => run_handshakes(target, Duration::from_secs_f64(seconds), concurrency).await,
            Command::Idle {
                target,
                count,
                concurrency,
                settle_seconds,
            } => {
                let settle = Duration::from_secs_f64(settle_seconds);
                run_idle(target, count, concurrency, settle).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel_load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft descriptor limit to the hard limit, because the idle
/// benchmark keeps one socket per TLS tunnel open.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                eprintln!("tunnel_load: failed to raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("tunnel_load: failed to read RLIMIT_NOFILE: {e}"),
    }
}

async fn run_echo(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("failed to listen on TCP {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("ready {local}");
    loop {
        let (mut tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Running out of descriptors is transient here, so wait and retry.
                eprintln!("tunnel_load: accept on {local} failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let (mut read, mut write) = tcp.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

/// An open tunnel. The streams are kept only so that they stay open.
enum OpenTunnel {
    Quic {
        tunnel: Box<Tunnel>,
        _stream: Option<(quinn::SendStream, quinn::RecvStream)>,
    },
    Tls {
        _stream: Box<tokio_rustls::client::TlsStream<TcpStream>>,
    },
}

impl OpenTunnel {
    fn close(self) {
        match self {
            OpenTunnel::Quic { tunnel, .. } => tunnel.connection.close(0u32.into(), b"done"),
            OpenTunnel::Tls { .. } => {}
        }
    }
}

/// Connection settings for one target, which open tunnels with full handshakes only.
enum Opener {
    Quic(Client),
    Tls {
        connector: tokio_rustls::TlsConnector,
        target: SocketAddr,
        server_name: ServerName<'static>,
    },
}

impl Opener {
    fn new(target: &Target) -> Result<Opener, String> {
        match target.transport {
            Transport::Quic => {
                let mut tls =
                    ztgate::client::client_tls_config(&target.cert, &target.key, &target.ca)?;
                tls.resumption = rustls::client::Resumption::disabled();
                let bind = Some(SocketAddr::new(target.target.ip(), 0));
                let client = Client::new(tls, target.target, &target.server_name, bind)?;
                Ok(Opener::Quic(client))
            }
            Transport::Tls => {
                let tls = plain_tls_config(target)?;
                let server_name =
                    ServerName::try_from(target.server_name.clone()).map_err(|e| {
                        format!("invalid TLS server name {:?}: {e}", target.server_name)
                    })?;
                Ok(Opener::Tls {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
                    target: target.target,
                    server_name,
                })
            }
        }
    }

    /// Opens one tunnel and echoes one byte through it. With `with_stream`
    /// false, a QUIC tunnel opens no stream and so is an admitted connection
    /// only, and a TLS tunnel is unaffected.
    async fn open(&self, with_stream: bool) -> Result<OpenTunnel, String> {
        match self {
            Opener::Quic(client) => {
                let tunnel = client
                    .connect(TUNNEL_TIMEOUT)
                    .await
                    .map_err(|e| format!("QUIC tunnel failed: {}", e.message()))?;
                if !with_stream {
                    return Ok(OpenTunnel::Quic {
                        tunnel: Box::new(tunnel),
                        _stream: None,
                    });
                }
                let (mut send, mut recv) = tunnel
                    .open_stream()
                    .await
                    .map_err(|e| format!("failed to open a stream: {e}"))?;
                send.write_all(b"x")
                    .await
                    .map_err(|e| format!("failed to write on the stream: {e}"))?;
                let mut byte = [0u8; 1];
                recv.read_exact(&mut byte)
                    .await
                    .map_err(|e| format!("no echo on the stream: {e}"))?;
                Ok(OpenTunnel::Quic {
                    tunnel: Box::new(tunnel),
                    _stream: Some((send, recv)),
                })
            }
            Opener::Tls {
                connector,
                target,
                server_name,
            } => {
                let tcp = TcpStream::connect(target)
                    .await
                    .map_err(|e| format!("failed to connect to {target}: {e}"))?;
                let _ = tcp.set_nodelay(true);
                let mut tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {target} failed: {e}"))?;
                tls.write_all(b"x")
                    .await
                    .map_err(|e| format!("failed to write to {target}: {e}"))?;
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte)
                    .await
                    .map_err(|e| format!("no echo from {target}: {e}"))?;
                Ok(OpenTunnel::Tls {
                    _stream: Box::new(tls),
                })
            }
        }
    }
}

/// Builds a TLS 1.3 client config with the client certificate, no ALPN and
/// no resumption.
fn plain_tls_config(target: &Target) -> Result<rustls::ClientConfig, String> {
    let chain = CertificateDer::pem_file_iter(&target.cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("failed to read {}: {e}", target.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&target.key)
        .map_err(|e| format!("failed to read {}: {e}", target.key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&target.ca)
        .map_err(|e| format!("failed to read {}: {e}", target.ca.display()))?
    {
        let ca = ca.map_err(|e| format!("failed to read {}: {e}", target.ca.display()))?;
        roots
            .add(ca)
            .map_err(|e| format!("invalid CA certificate in {}: {e}", target.ca.display()))?;
    }
    let mut config =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("invalid client certificate or key: {e}"))?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

async fn run_handshakes(
    target: Target,
    length: Duration,
    concurrency: usize,
) -> Result<(), String> {
    let opener = Arc::new(Opener::new(&target)?);
    // One tunnel first, so a wrong address or certificate fails fast.
    opener.open(true).await?.close();

    let completed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = target.server_pid.map(process_cpu_seconds).transpose()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (opener, completed, failed, stop) = (
            opener.clone(),
            completed.clone(),
            failed.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                match opener.open(true).await {
                    Ok(tunnel) => {
                        tunnel.close();
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(e);
                    }
                }
            }
            last_error
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut last_error = None;
    for worker in workers {
        if let Ok(Some(e)) = worker.await {
            last_error = Some(e);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = target.server_pid.map(process_cpu_seconds).transpose()?;

    let count = completed.load(Ordering::Relaxed);
    let failures = failed.load(Ordering::Relaxed);
    if let Some(e) = &last_error {
        eprintln!("tunnel_load: {failures} tunnels failed, the last with: {e}");
    }
    if count == 0 {
        return Err("no tunnel completed".into());
    }
    let mut line = format!(
        "handshakes count={count} failed={failures} seconds={elapsed:.3} per_second={:.1}",
        count as f64 / elapsed
    );
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        line += &format!(
            " server_cpu_ms_per_tunnel={:.4}",
            (after - before) * 1e3 / count as f64
        );
    }
    println!("{line}");
    Ok(())
}

async fn run_idle(
    target: Target,
    count: usize,
    concurrency: usize,
    settle: Duration,
) -> Result<(), String> {
    let opener = Arc::new(Opener::new(&target)?);
    let rss_before = target.server_pid.map(process_rss_kib).transpose()?;

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let (opener, next) = (opener.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count as u64 {
                held.push(opener.open(false).await?);
            }
            Ok::<_, String>(held)
        }));
    }
    let mut tunnels = Vec::with_capacity(count);
    for worker in workers {
        let held = worker
            .await
            .map_err(|e| format!("a worker failed: {e}"))??;
        tunnels.extend(held);
    }
    let open_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let rss_after = target.server_pid.map(process_rss_kib).transpose()?;

    let mut line = format!(
        "idle count={} open_seconds={open_seconds:.3}",
        tunnels.len()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per_tunnel = (after as f64 - before as f64) / tunnels.len() as f64;
        line += &format!(
            " rss_before_kib={before} rss_after_kib={after} kib_per_tunnel={per_tunnel:.2}"
        );
    }
    println!("{line}");
    for tunnel in tunnels {
        tunnel.close();
    }
    if let Opener::Quic(client) = opener.as_ref() {
        client.endpoint().wait_idle().await;
    }
    Ok(())
}

/// Reads the utime and stime of a process from /proc/PID/stat, in seconds.
fn process_cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("failed to read {path}: {e}"))?;
    // The fields after the command name, which is in brackets and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, at indexes 11 and 12 after the name.
    let ticks = |index: usize| -> Result<u64, String> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| format!("invalid {path}: no field {}", index + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|value| *value > 0)
        .unwrap_or(100);
    Ok(total as f64 / per_second as f64)
}

/// Reads VmRSS of a process from /proc/PID/status, in KiB.
fn process_rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).map_err(|e| format!("failed to read {path}: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS line in {path}"))
}
