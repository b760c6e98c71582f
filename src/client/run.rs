//! `ztgate connect`: local listeners or stdio in front of a tunnel, with
//! reconnects after transient ends, over QUIC or, where UDP is blocked, TLS
//! over TCP.

use super::tls::TlsDialer;
use super::{client_tls_config, open_stream, Client, Ending};
use crate::forward::{pump, ResetCodes};
use crate::ingress::duplex::{copy_duplex, reset_on_close, DuplexEnd};
use crate::protocol::Code;
use rand::Rng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// The transport `ztgate connect` speaks to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportChoice {
    /// QUIC only.
    Quic,
    /// TLS over TCP only: one TLS connection per local connection.
    Tls,
    /// QUIC, falling back to TLS over TCP while QUIC does not respond.
    Auto,
}

/// Options of `ztgate connect`.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub gateway: String,
    /// The gateway's TLS-over-TCP address; `gateway` when absent.
    pub gateway_tls: Option<String>,
    pub app: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub listen: Option<SocketAddr>,
    pub stdio: bool,
    pub allow_non_loopback: bool,
    pub transport: TransportChoice,
    pub connect_timeout: Duration,
    /// How long `auto` waits for QUIC before it uses TLS over TCP.
    pub quic_timeout: Duration,
    pub max_backoff: Duration,
    pub quic: super::QuicOptions,
    /// Read size of each copy between a local TCP connection and the
    /// tunnel, and of the buffered reads of a TLS-over-TCP tunnel, in bytes.
    pub copy_buffer: usize,
}

/// The transport for new local connections.
#[derive(Clone)]
enum Route {
    Quic(quinn::Connection),
    Tls,
}

/// Closes the QUIC connection with `no-error` on SIGTERM or SIGINT and
/// exits, so that the gateway ends the session at once instead of at its
/// idle timeout.
async fn close_on_termination(client: Arc<Client>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot handle SIGTERM and SIGINT; on exit the gateway keeps the session until its idle timeout");
        return;
    };
    let name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    say(&format!("{name} received; closing the tunnel"));
    client
        .endpoint()
        .close(Code::NoError.into(), b"client exiting");
    // Bounded, so that an unreachable gateway cannot delay the exit.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.endpoint().wait_idle()).await;
    std::process::exit(0);
}

fn say(message: &str) {
    eprintln!("ztgate connect: {message}");
}

async fn resolve_gateway(flag: &str, value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut addrs = tokio::net::lookup_host(value)
        .await
        .map_err(|e| format!("cannot resolve {flag} {value:?}: {e}; write HOST:PORT"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{flag} {value:?} resolved to no address"))
}

/// Runs the client until a permanent refusal (returned as `Err`) or, in
/// stdio mode, until the stream ends.
pub async fn run_connect(options: ConnectOptions) -> Result<(), String> {
    crate::install_crypto_provider();
    if options.stdio == options.listen.is_some() {
        return Err("give exactly one of --listen ADDR or --stdio".into());
    }
    if let Some(listen) = options.listen {
        if !listen.ip().is_loopback() && !options.allow_non_loopback {
            return Err(format!(
                "--listen {listen} is not a loopback address; any host that reaches it would use this device's identity. Use 127.0.0.1 or [::1], or pass --allow-non-loopback"
            ));
        }
    }
    if options.quic.keep_alive >= options.quic.idle_timeout {
        return Err(format!(
            "--keep-alive-secs ({}) must be shorter than --idle-timeout-secs ({}), or an idle tunnel times out between keep-alives",
            options.quic.keep_alive.as_secs(),
            options.quic.idle_timeout.as_secs()
        ));
    }
    let tls = client_tls_config(&options.cert, &options.key, &options.ca)?;
    let dialer = match options.transport {
        TransportChoice::Quic => None,
        TransportChoice::Tls | TransportChoice::Auto => {
            let (flag, value) = match &options.gateway_tls {
                Some(value) => ("--gateway-tls", value.as_str()),
                None => ("--gateway", options.gateway.as_str()),
            };
            let addr = resolve_gateway(flag, value).await?;
            Some(Arc::new(TlsDialer::new(
                &tls,
                addr,
                &options.app,
                options.connect_timeout,
                options.copy_buffer,
            )?))
        }
    };
    let client = match options.transport {
        TransportChoice::Tls => None,
        TransportChoice::Quic | TransportChoice::Auto => {
            let gateway = resolve_gateway("--gateway", &options.gateway).await?;
            // One client, and so one rustls config and session cache, for
            // the whole run: every reconnect resumes the TLS session (1 RTT,
            // no certificate exchange); 0-RTT stays off.
            Some(Arc::new(Client::with_options(
                tls,
                gateway,
                &options.app,
                None,
                options.quic.clone(),
            )?))
        }
    };
    let network_changed = Arc::new(Notify::new());
    if let Some(client) = &client {
        // Subscribed here, not in the task: the SIGUSR1 handler must be in
        // place before the client reports that it is listening, or an
        // early SIGUSR1 would end the process (its default action).
        let changes = super::netwatch::watch_network();
        tokio::spawn(follow_network_changes(
            client.clone(),
            network_changed.clone(),
            changes,
        ));
        tokio::spawn(close_on_termination(client.clone()));
    }

    if options.stdio {
        return run_stdio(client.as_deref(), dialer.as_deref(), &options).await;
    }
    let listen = options.listen.ok_or("--listen is required")?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let (route_tx, route_rx) = watch::channel::<Option<Route>>(None);
    tokio::spawn(accept_local(
        listener,
        route_rx,
        dialer.clone(),
        options.copy_buffer,
    ));

    let Some(client) = client else {
        route_tx.send_replace(Some(Route::Tls));
        if let Some(dialer) = &dialer {
            say(&format!(
                "using TLS over TCP to {}: one TLS connection per local connection",
                dialer.gateway()
            ));
        }
        say(&format!("listening on {local}"));
        std::future::pending::<()>().await;
        return Ok(());
    };
    let auto = options.transport == TransportChoice::Auto;
    let mut backoff = Duration::from_millis(250);
    let mut announced = false;
    loop {
        let answer_within = auto.then_some(options.quic_timeout);
        match client
            .connect_within(answer_within, options.connect_timeout)
            .await
        {
            Ok(mut tunnel) => {
                backoff = Duration::from_millis(250);
                say(&format!(
                    "admitted to {} as {} (session {})",
                    tunnel.admitted.application,
                    tunnel.admitted.device_id,
                    tunnel.admitted.session_id
                ));
                if !announced {
                    say(&format!("listening on {local}"));
                    announced = true;
                }
                route_tx.send_replace(Some(Route::Quic(tunnel.connection.clone())));
                let ending = tunnel.ended().await;
                route_tx.send_replace(None);
                match ending {
                    Ending::Refused {
                        code: Some(Code::StepUpRequired),
                        message,
                    } => say(&format!(
                        "{message}; waiting for the step-up, then reconnecting"
                    )),
                    Ending::Refused { message, .. } => return Err(message),
                    Ending::Transient(message) => {
                        say(&format!("tunnel ended: {message}; reconnecting"))
                    }
                }
            }
            Err(Ending::Refused {
                code: Some(Code::StepUpRequired),
                message,
            }) => {
                // The user completes the step-up at the link; keep trying
                // without a restart, at most every few seconds.
                say(&format!("{message}; retrying until the step-up is done"));
                backoff = backoff.min(Duration::from_secs(5));
            }
            Err(Ending::Refused { message, .. }) => return Err(message),
            Err(Ending::Transient(message)) => match &dialer {
                Some(dialer) if auto => {
                    let on_tls = matches!(*route_tx.borrow(), Some(Route::Tls));
                    if on_tls {
                        say(&format!(
                            "QUIC still unavailable: {message}; trying QUIC again in {} ms",
                            backoff.as_millis()
                        ));
                    } else {
                        say(&format!(
                            "QUIC unavailable: {message}; using TLS over TCP to {}, trying QUIC again in {} ms",
                            dialer.gateway(),
                            backoff.as_millis()
                        ));
                        route_tx.send_replace(Some(Route::Tls));
                    }
                    if !announced {
                        say(&format!("listening on {local}"));
                        announced = true;
                    }
                }
                _ => say(&format!(
                    "cannot reach the gateway: {message}; retrying in {} ms",
                    backoff.as_millis()
                )),
            },
        }
        let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
        // A network change may bring UDP back: try QUIC at once.
        tokio::select! {
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
            _ = network_changed.notified() => {}
        }
        backoff = (backoff * 2).min(options.max_backoff);
    }
}

/// Moves the QUIC endpoint to a fresh socket when a network change moves
/// the route to the gateway to another local address, and on every SIGUSR1.
/// Open connections then migrate at once instead of waiting for their next
/// packet to be lost, and a pending reconnect wakes up. Events that leave the
/// route's source address as it was (an IPv6 address elsewhere coming up,
/// say) change nothing.
async fn follow_network_changes(
    client: Arc<Client>,
    changed: Arc<Notify>,
    mut changes: tokio::sync::mpsc::Receiver<super::netwatch::NetworkChange>,
) {
    let gateway = client.gateway();
    let mut source = route_source(gateway);
    while let Some(change) = changes.recv().await {
        let now = route_source(gateway);
        let forced = change.cause == "SIGUSR1";
        if !forced && (now == source || now.is_none()) {
            tracing::debug!(cause = %change.cause, source = ?now, "network changed; the route to the gateway keeps its source address");
            source = now.or(source);
            continue;
        }
        source = now;
        match client.rebind() {
            Ok(local) => say(&format!(
                "network changed ({}, {} events); moved to UDP {local}",
                change.cause, change.events
            )),
            Err(e) => say(&format!(
                "network changed ({}); cannot move to a new socket: {e}",
                change.cause
            )),
        }
        changed.notify_one();
    }
}

/// Returns the local address the kernel would send from to reach `gateway`,
/// or `None` without a route. Connecting a UDP socket sends no packet.
fn route_source(gateway: SocketAddr) -> Option<std::net::IpAddr> {
    let unspecified = match gateway {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = std::net::UdpSocket::bind(unspecified).ok()?;
    socket.connect(gateway).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

async fn accept_local(
    listener: TcpListener,
    route: watch::Receiver<Option<Route>>,
    dialer: Option<Arc<TlsDialer>>,
    copy_buffer: usize,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut route = route.clone();
        let dialer = dialer.clone();
        tokio::spawn(async move {
            // Wait a bounded time for a tunnel when one is being re-established.
            let wait = tokio::time::timeout(Duration::from_secs(10), async {
                route
                    .wait_for(|r| r.is_some())
                    .await
                    .ok()
                    .and_then(|r| r.clone())
            })
            .await;
            match (wait.ok().flatten(), dialer) {
                (Some(Route::Quic(connection)), _) => {
                    forward_quic(tcp, peer, &connection, copy_buffer).await
                }
                (Some(Route::Tls), Some(dialer)) => {
                    forward_tls(tcp, peer, &dialer, copy_buffer).await
                }
                _ => tracing::warn!(%peer, "no tunnel to the gateway; local connection dropped"),
            }
        });
    }
}

async fn forward_quic(
    tcp: TcpStream,
    peer: SocketAddr,
    connection: &quinn::Connection,
    copy_buffer: usize,
) {
    match open_stream(connection).await {
        Ok((send, recv)) => {
            let (end, stats) = pump(
                send,
                recv,
                tcp,
                ResetCodes {
                    tcp_reset: Code::UpstreamReset.into(),
                },
                copy_buffer,
            )
            .await;
            tracing::debug!(%peer, ?end, to_gateway = stats.to_tcp, from_gateway = stats.to_stream, "local connection ended");
        }
        Err(e) => tracing::warn!(%peer, error = %e, "cannot open a stream"),
    }
}

async fn forward_tls(mut tcp: TcpStream, peer: SocketAddr, dialer: &TlsDialer, copy_buffer: usize) {
    let mut tls = match dialer.dial().await {
        Ok(tls) => tls,
        Err(e) => {
            say(&format!("cannot open a TLS tunnel for {peer}: {e}"));
            reset_on_close(&tcp);
            return;
        }
    };
    let (end, stats) = copy_duplex(&mut tcp, &mut tls, copy_buffer).await;
    if let DuplexEnd::Aborted { .. } = &end {
        reset_on_close(&tcp);
        reset_on_close(tls.get_ref().0.get_ref());
    }
    tracing::debug!(%peer, ?end, to_gateway = stats.first_to_second, from_gateway = stats.second_to_first, "local connection ended");
}

async fn run_stdio(
    client: Option<&Client>,
    dialer: Option<&TlsDialer>,
    options: &ConnectOptions,
) -> Result<(), String> {
    if let Some(client) = client {
        let answer_within = match (options.transport, dialer) {
            (TransportChoice::Auto, Some(_)) => Some(options.quic_timeout),
            _ => None,
        };
        match client
            .connect_within(answer_within, options.connect_timeout)
            .await
        {
            Ok(tunnel) => return stdio_over_quic(tunnel).await,
            Err(Ending::Transient(message)) if dialer.is_some() => {
                say(&format!("QUIC unavailable: {message}; using TLS over TCP"));
            }
            Err(e) => return Err(e.message().to_string()),
        }
    }
    let dialer = dialer.ok_or("no transport to the gateway")?;
    let mut tls = dialer.dial().await?;
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    match copy_duplex(&mut stdio, &mut tls, options.copy_buffer)
        .await
        .0
    {
        DuplexEnd::Finished => Ok(()),
        DuplexEnd::Aborted { error, .. } => Err(format!("tunnel failed: {error}")),
    }
}

async fn stdio_over_quic(tunnel: super::Tunnel) -> Result<(), String> {
    let (mut send, mut recv) = tunnel
        .open_stream()
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    let upload = async {
        let mut stdin = tokio::io::stdin();
        let copied = tokio::io::copy(&mut stdin, &mut send).await;
        let _ = send.finish();
        copied.map(|_| ())
    };
    let download = async {
        let mut stdout = tokio::io::stdout();
        let copied = tokio::io::copy(&mut recv, &mut stdout).await;
        use tokio::io::AsyncWriteExt;
        let _ = stdout.flush().await;
        copied.map(|_| ())
    };
    let (up, down) = tokio::join!(upload, download);
    tunnel.connection.close(Code::NoError.into(), b"");
    up.and(down).map_err(|e| format!("stream failed: {e}"))
}
