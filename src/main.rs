//! The `ztgate` command line: `serve`, `connect`, `check-config`, and the
//! admin API client commands `sessions`, `close-session`, `revoke` and `reload`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use ztgate::client::defaults as client_defaults;
use ztgate::client::{run_connect, ConnectOptions, TransportChoice};
use ztgate::config::ConfigHandle;
use ztgate::gateway::Gateway;
use ztgate::ingress::udp::UdpBuffers;
use ztgate::ingress::{inherited_sockets, open_listeners};
use ztgate::sandbox;
use ztgate::tuning::{build_runtime, CongestionController, QuicTuning};

#[derive(Parser)]
#[command(
    name = "ztgate",
    version,
    about = "Zero-trust network access gateway: one mutual-TLS tunnel per application"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Path of the TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Open a tunnel to one application through a gateway.
    Connect {
        /// Gateway QUIC address, HOST:PORT.
        #[arg(long)]
        gateway: String,
        /// Gateway TLS-over-TCP address, HOST:PORT; the --gateway address when absent.
        #[arg(long)]
        gateway_tls: Option<String>,
        /// Transport to the gateway: quic, tls (TLS over TCP, for networks that block UDP), or auto (QUIC, falling back to TLS while QUIC does not respond).
        #[arg(long, value_enum, default_value_t = TransportChoice::Auto)]
        transport: TransportChoice,
        /// Milliseconds auto waits for the gateway's first QUIC handshake response before it uses TLS over TCP; a gateway that responds in time has --connect-timeout-secs to admit.
        #[arg(long, default_value_t = 1500)]
        quic_timeout_ms: u64,
        /// The application's TLS server name, for example wiki.apps.example.com.
        #[arg(long)]
        app: String,
        /// Local TCP address to accept connections on (loopback only unless --allow-non-loopback).
        #[arg(long, conflicts_with = "stdio")]
        listen: Option<SocketAddr>,
        /// Carry one stream on standard input and output (for ssh's ProxyCommand).
        #[arg(long)]
        stdio: bool,
        /// Device certificate chain (PEM), leaf first.
        #[arg(long)]
        cert: PathBuf,
        /// Device private key (PEM); must not be readable by group or others.
        #[arg(long)]
        key: PathBuf,
        /// CA certificate(s) that issued the gateway's certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Accept --listen addresses that are not loopback.
        #[arg(long)]
        allow_non_loopback: bool,
        /// Seconds to wait for the gateway to admit a connection.
        #[arg(long, default_value_t = 10)]
        connect_timeout_secs: u64,
        /// Longest pause between reconnect attempts, in seconds.
        #[arg(long, default_value_t = 30)]
        max_backoff_secs: u64,
        /// Interval of QUIC keep-alive packets on an idle tunnel, in seconds; keeps NAT mappings open.
        #[arg(long, default_value_t = 10)]
        keep_alive_secs: u64,
        /// QUIC idle timeout this client advertises, in seconds; the smaller of both sides' values applies.
        #[arg(long, default_value_t = 60)]
        idle_timeout_secs: u64,
        #[command(flatten)]
        tuning: ConnectTuning,
    },
    /// Validate a config file and report every error.
    CheckConfig {
        /// Path of the TOML config file.
        file: PathBuf,
    },
    #[command(flatten)]
    Admin(ztgate::admin::client::AdminCommand),
}

/// Data-path settings of `ztgate connect`; docs/tuning.md gives their
/// measured effect.
#[derive(clap::Args)]
struct ConnectTuning {
    /// QUIC congestion controller for the data this client sends: cubic, newreno or bbr (experimental in quinn).
    #[arg(long, default_value = "cubic", value_parser = CongestionController::parse)]
    congestion_controller: CongestionController,
    /// Generic segmentation offload (several QUIC datagrams per sendmsg): true or false.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    gso: bool,
    /// QUIC flow-control window of each stream, in bytes.
    #[arg(long, default_value_t = client_defaults::STREAM_RECEIVE_WINDOW, value_parser = clap::value_parser!(u64).range(1024..=(1 << 62) - 1))]
    stream_receive_window: u64,
    /// QUIC flow-control window of the whole connection, in bytes.
    #[arg(long, default_value_t = client_defaults::RECEIVE_WINDOW, value_parser = clap::value_parser!(u64).range(1024..=(1 << 62) - 1))]
    receive_window: u64,
    /// Unacknowledged bytes QUIC keeps buffered for sending, in bytes.
    #[arg(long, default_value_t = client_defaults::SEND_WINDOW, value_parser = clap::value_parser!(u64).range(1024..))]
    send_window: u64,
    /// Ack-eliciting packets the gateway may receive before it must acknowledge (QUIC ACK_FREQUENCY extension, 0 to 64); unset leaves the extension off.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
    ack_eliciting_threshold: Option<u32>,
    /// Receive buffer of the UDP socket, in bytes (capped by net.core.rmem_max).
    #[arg(long, default_value_t = client_defaults::UDP_BUFFER)]
    udp_receive_buffer_bytes: usize,
    /// Send buffer of the UDP socket, in bytes (capped by net.core.wmem_max).
    #[arg(long, default_value_t = client_defaults::UDP_BUFFER)]
    udp_send_buffer_bytes: usize,
    /// Size of each read from a local TCP connection or a TLS-over-TCP tunnel, in bytes.
    #[arg(long, default_value_t = client_defaults::COPY_BUFFER as u64, value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    copy_buffer_bytes: u64,
    /// Tokio worker threads; 0 for one per CPU core. One QUIC connection's packets are all built by one quinn task, so more workers add hand-offs between threads but no speed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1024))]
    worker_threads: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => {
            ztgate::install_crypto_provider();
            match ConfigHandle::load(&file) {
                Ok(handle) => {
                    let g = handle.current();
                    println!(
                        "{}: OK ({} applications, {} device CAs, {} listeners)",
                        file.display(),
                        g.applications.len(),
                        g.trust.ca_names().len(),
                        g.listen.len() + g.listen_tls.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("{}: {} error(s)", file.display(), errors.0.len());
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve { config } => serve(config),
        Command::Admin(command) => ztgate::admin::client::run(command),
        Command::Connect {
            gateway,
            gateway_tls,
            transport,
            quic_timeout_ms,
            app,
            listen,
            stdio,
            cert,
            key,
            ca,
            allow_non_loopback,
            connect_timeout_secs,
            max_backoff_secs,
            keep_alive_secs,
            idle_timeout_secs,
            tuning,
        } => {
            if std::env::var_os("RUST_LOG").is_some() {
                ztgate::telemetry::init("warn", "text", &ztgate::telemetry::AuditSink::Off);
            }
            let options = ConnectOptions {
                gateway,
                gateway_tls,
                transport,
                quic_timeout: Duration::from_millis(quic_timeout_ms.max(1)),
                app,
                cert,
                key,
                ca,
                listen,
                stdio,
                allow_non_loopback,
                connect_timeout: Duration::from_secs(connect_timeout_secs.max(1)),
                max_backoff: Duration::from_secs(max_backoff_secs.max(1)),
                quic: ztgate::client::QuicOptions {
                    keep_alive: Duration::from_secs(keep_alive_secs.max(1)),
                    idle_timeout: Duration::from_secs(idle_timeout_secs.max(1)),
                    tuning: QuicTuning {
                        congestion_controller: tuning.congestion_controller,
                        gso: tuning.gso,
                        stream_receive_window: tuning.stream_receive_window,
                        receive_window: tuning.receive_window,
                        send_window: tuning.send_window,
                        ack_eliciting_threshold: tuning.ack_eliciting_threshold,
                    },
                    udp_buffers: UdpBuffers {
                        receive: tuning.udp_receive_buffer_bytes,
                        send: tuning.udp_send_buffer_bytes,
                    },
                },
                copy_buffer: tuning.copy_buffer_bytes as usize,
            };
            let runtime = match build_runtime(tuning.worker_threads as usize) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ztgate connect: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run_connect(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    eprintln!("ztgate connect: {message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs the gateway. The config, keys, policies and inherited sockets are
/// read on this one thread before the sandbox is applied, because the
/// sandbox then denies those files. The runtime and its threads start after.
fn serve(config: PathBuf) -> ExitCode {
    ztgate::install_crypto_provider();
    let handle = match ConfigHandle::load(&config) {
        Ok(h) => h,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "ztgate serve: {} error(s) in {}; not starting",
                errors.0.len(),
                config.display()
            );
            return ExitCode::from(2);
        }
    };
    let generation = handle.current();
    ztgate::telemetry::init(
        &generation.log_level,
        &generation.log_format,
        &generation.audit,
    );
    let listeners = match inherited_sockets().and_then(|s| open_listeners(&generation, s)) {
        Ok(listeners) => listeners,
        Err(e) => return start_failed(&e.to_string()),
    };
    // Read before the sandbox: the standard library reads the CPU quota
    // from /proc/self/cgroup and /sys/fs/cgroup, which the sandbox denies.
    let workers = match generation.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    if let Err(e) = apply_sandbox(&handle, &generation) {
        return start_failed(&e);
    }
    drop(generation);
    let runtime = match build_runtime(workers) {
        Ok(r) => r,
        Err(e) => return start_failed(&format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        let gateway = match Gateway::start_with(handle, listeners).await {
            Ok(g) => g,
            Err(e) => return start_failed(&e.to_string()),
        };
        for addr in gateway.quic_addrs() {
            println!("ztgate: listening quic {addr}");
        }
        for addr in gateway.tls_addrs() {
            println!("ztgate: listening tls {addr}");
        }
        tracing::info!(config = %config.display(), "gateway started");
        notify_systemd(&[sd_notify::NotifyState::Ready]);
        spawn_watchdog();
        let signals = wait_for_signals(&gateway).await;
        if let Err(e) = signals {
            tracing::error!(error = %e, "cannot install signal handlers");
        }
        tracing::info!("gateway stopping");
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        gateway.shutdown().await;
        tracing::info!("gateway stopped");
        ExitCode::SUCCESS
    })
}

fn start_failed(message: &str) -> ExitCode {
    tracing::error!(error = %message, "gateway failed to start");
    eprintln!("ztgate serve: {message}");
    ExitCode::FAILURE
}

/// Creates the state directory, so the sandbox can allow it, then applies
/// the sandbox and records its rules for the reload check.
fn apply_sandbox(
    handle: &ConfigHandle,
    generation: &ztgate::config::Generation,
) -> Result<(), String> {
    if let Some(dir) = &generation.state_dir {
        ztgate::identity::revocation::create_state_dir(dir)?;
    }
    let rules = sandbox::PathRules::derive(
        handle.path(),
        &generation.paths,
        generation.admin.socket_group.is_some(),
    );
    let outcome = sandbox::apply(generation.sandbox.landlock, rules)?;
    sandbox::log_outcome(&outcome);
    if let Some(rules) = outcome.rules() {
        handle.set_sandbox_rules(rules.clone());
    }
    Ok(())
}

async fn wait_for_signals(gateway: &Gateway) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; reloading the configuration");
                notify_systemd(&[sd_notify::NotifyState::Reloading]);
                let _ = gateway.reload().await;
                notify_systemd(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

/// Tells systemd about a state change; does nothing outside systemd.
fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog at half its interval, when the unit sets WatchdogSec.
fn spawn_watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let interval = Duration::from_micros(usec / 2);
    tracing::info!(interval = ?interval, "systemd watchdog enabled");
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            notify_systemd(&[sd_notify::NotifyState::Watchdog]);
        }
    });
}
