//! `ztgate connect`: local listeners or stdio in front of a tunnel, with
//! reconnects after transient ends.

use super::{client_tls_config, open_stream, Client, Ending};
use crate::forward::{pump, ResetCodes};
use crate::protocol::Code;
use rand::Rng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Options of `ztgate connect`.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub gateway: String,
    pub app: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub listen: Option<SocketAddr>,
    pub stdio: bool,
    pub allow_non_loopback: bool,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
    pub quic: super::QuicOptions,
}

fn say(message: &str) {
    eprintln!("ztgate connect: {message}");
}

async fn resolve_gateway(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut addrs = tokio::net::lookup_host(value)
        .await
        .map_err(|e| format!("cannot resolve --gateway {value:?}: {e}; write HOST:PORT"))?;
    addrs
        .next()
        .ok_or_else(|| format!("--gateway {value:?} resolved to no address"))
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
    let tls = client_tls_config(&options.cert, &options.key, &options.ca)?;
    let gateway = resolve_gateway(&options.gateway).await?;
    if options.quic.keep_alive >= options.quic.idle_timeout {
        return Err(format!(
            "--keep-alive-secs ({}) must be shorter than --idle-timeout-secs ({}), or an idle tunnel times out between keep-alives",
            options.quic.keep_alive.as_secs(),
            options.quic.idle_timeout.as_secs()
        ));
    }
    // One client, and so one rustls config and session cache, for the whole
    // run: every reconnect resumes the TLS session (1 RTT, no certificate
    // exchange); 0-RTT stays off.
    let client = Arc::new(Client::with_options(
        tls,
        gateway,
        &options.app,
        None,
        options.quic,
    )?);
    tokio::spawn(follow_network_changes(client.clone()));

    if options.stdio {
        return run_stdio(&client, options.connect_timeout).await;
    }
    let listen = options.listen.ok_or("--listen is required")?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let (current_tx, current_rx) = watch::channel::<Option<quinn::Connection>>(None);
    tokio::spawn(accept_local(listener, current_rx));

    let mut backoff = Duration::from_millis(250);
    let mut announced = false;
    loop {
        match client.connect(options.connect_timeout).await {
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
                current_tx.send_replace(Some(tunnel.connection.clone()));
                let ending = tunnel.ended().await;
                current_tx.send_replace(None);
                match ending {
                    Ending::Refused { message, .. } => return Err(message),
                    Ending::Transient(message) => {
                        say(&format!("tunnel ended: {message}; reconnecting"))
                    }
                }
            }
            Err(Ending::Refused { message, .. }) => return Err(message),
            Err(Ending::Transient(message)) => {
                say(&format!(
                    "cannot reach the gateway: {message}; retrying in {} ms",
                    backoff.as_millis()
                ));
            }
        }
        let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(options.max_backoff);
    }
}

/// Moves the QUIC endpoint to a fresh socket after every network change, so
/// open connections migrate to the new network instead of waiting for their
/// next packet to be lost.
async fn follow_network_changes(client: Arc<Client>) {
    let mut changes = super::netwatch::watch_network();
    while let Some(change) = changes.recv().await {
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
    }
}

async fn accept_local(listener: TcpListener, current: watch::Receiver<Option<quinn::Connection>>) {
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
        let mut current = current.clone();
        tokio::spawn(async move {
            // Wait a bounded time for a tunnel when one is being re-established.
            let wait = tokio::time::timeout(Duration::from_secs(10), async {
                current
                    .wait_for(|c| c.is_some())
                    .await
                    .ok()
                    .and_then(|c| c.clone())
            })
            .await;
            let connection = wait.ok().flatten();
            let Some(connection) = connection else {
                tracing::warn!(%peer, "no tunnel to the gateway; local connection dropped");
                return;
            };
            match open_stream(&connection).await {
                Ok((send, recv)) => {
                    let (end, stats) = pump(
                        send,
                        recv,
                        tcp,
                        ResetCodes {
                            tcp_reset: Code::UpstreamReset.into(),
                        },
                        64 * 1024,
                    )
                    .await;
                    tracing::debug!(%peer, ?end, to_gateway = stats.to_tcp, from_gateway = stats.to_stream, "local connection ended");
                }
                Err(e) => tracing::warn!(%peer, error = %e, "cannot open a stream"),
            }
        });
    }
}

async fn run_stdio(client: &Client, timeout: Duration) -> Result<(), String> {
    let tunnel = client
        .connect(timeout)
        .await
        .map_err(|e| e.message().to_string())?;
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
