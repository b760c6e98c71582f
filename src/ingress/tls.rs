//! The TLS-over-TCP ingress, for networks that block UDP: one TCP listener
//! per `gateway.listen_tls` address, and a task per connection that runs the
//! TLS handshake under a deadline, admission and the session.
//!
//! One TCP connection carries one tunnel, with no preamble and no control
//! stream: after admission the decrypted bytes go to the application's
//! upstream as they are. The ClientHello's server name selects the
//! application, and with it the ALPN protocols offered (`tls_alpn`).
//! Refusals during the handshake are TLS alerts. After the handshake, TLS
//! has no way to carry a reason, so refusals and closes are a close_notify
//! and an info log line. An upstream that is unreachable or resets ends the
//! tunnel with a TCP reset instead, so the client sees an abort.

use super::duplex::{copy_duplex, reset_on_close, DuplexEnd};
use super::quic::canonical;
use super::read_buffer::ReleasingReader;
use super::{PendingHandshake, Shared, SourceVerdict};
use crate::admission::{self, Refused};
use crate::config::Generation;
use crate::identity::HandshakeOutcome;
use crate::identity::HANDSHAKE_OUTCOME;
use crate::policy::Transport;
use crate::session::{supervise, SourceGuard};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn, Instrument};

/// How long a close_notify may take to be written before the connection is dropped.
const CLOSE_NOTIFY_LIMIT: Duration = Duration::from_secs(1);

/// A bound TLS-over-TCP listener.
pub struct TlsIngress {
    listener: TcpListener,
    pub local_addr: SocketAddr,
}

/// Makes one TLS listener per TCP socket, which `open_listeners` opened for
/// the configured `listen_tls` addresses. Must run inside a tokio runtime.
pub fn bind_tls(sockets: Vec<std::net::TcpListener>) -> std::io::Result<Vec<TlsIngress>> {
    let mut out = Vec::new();
    for socket in sockets {
        let listener = TcpListener::from_std(socket)?;
        let local_addr = listener.local_addr()?;
        info!(%local_addr, "TLS listener started");
        out.push(TlsIngress {
            listener,
            local_addr,
        });
    }
    Ok(out)
}

impl TlsIngress {
    /// Accepts connections until shutdown.
    pub async fn run(self, shared: Arc<Shared>) {
        let mut shutdown = shared.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.changed() => break,
            };
            match accepted {
                Ok((tcp, peer)) => accept_one(tcp, canonical(peer), &shared),
                Err(e) => {
                    // Usually out of file descriptors: pause instead of spinning.
                    warn!(local_addr = %self.local_addr, error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        info!(local_addr = %self.local_addr, "TLS listener stopped accepting");
    }
}

fn accept_one(tcp: TcpStream, remote: SocketAddr, shared: &Arc<Shared>) {
    let generation = shared.config.current();
    let limits = &generation.limits;
    let Some(source_guard) = shared.registry.try_acquire_source(
        remote.ip(),
        limits.max_connections_per_source,
        limits.max_connections,
    ) else {
        shared.stats.refused_by_cap.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = shared.refusal_log.check(remote.ip(), Instant::now()) {
            info!(source = %remote, transport = "tls", suppressed, reason = "connection cap reached", "connection refused");
        }
        reset_on_close(&tcp);
        return;
    };
    // TCP's own handshake has validated the address, so a source the full
    // table cannot track is held only to the connection caps.
    let verdict = shared.handshake_rate.check(
        remote.ip(),
        limits.handshake_rate,
        limits.max_tracked_sources,
    );
    if verdict == SourceVerdict::Limited {
        shared
            .stats
            .handshakes_rate_limited
            .fetch_add(1, Ordering::Relaxed);
        crate::telemetry::metrics::handshake_rate_limited("tls");
        if let Some(suppressed) = shared.refusal_log.check(remote.ip(), Instant::now()) {
            info!(source = %remote, transport = "tls", suppressed, reason = "handshake rate limit", "connection refused");
        }
        reset_on_close(&tcp);
        return;
    }
    let pending = PendingHandshake::start(shared, Transport::Tls);
    let _ = tcp.set_nodelay(true);
    let shared = shared.clone();
    let span = tracing::info_span!("conn", source = %remote, transport = "tls", sni = tracing::field::Empty, device = tracing::field::Empty, app = tracing::field::Empty, session = tracing::field::Empty);
    tokio::spawn(
        async move {
            handle_connection(tcp, remote, source_guard, generation, shared, pending).await;
        }
        .instrument(span),
    );
}

/// A failed handshake with what is known for its log line.
struct HandshakeFailure {
    sni: Option<String>,
    outcome: Option<Arc<Mutex<HandshakeOutcome>>>,
    error: std::io::Error,
}

/// A server TLS-over-TCP tunnel. rustls reads at most 4 KiB per call
/// (`read_tls` in rustls 0.23), so the TCP side is read through a buffer
/// that takes one large read per system call instead, and is freed while
/// the tunnel is idle.
type TlsTunnel = TlsStream<ReleasingReader<TcpStream>>;

struct Handshake {
    /// Boxed, so that moving it into the tunnel's task moves a pointer,
    /// and each state of the task stores 8 bytes instead of the stream.
    stream: Box<TlsTunnel>,
    sni: Option<String>,
    outcome: Arc<Mutex<HandshakeOutcome>>,
}

async fn handshake(
    tcp: TcpStream,
    generation: &Generation,
    shared: &Shared,
) -> Result<Handshake, HandshakeFailure> {
    let tcp = ReleasingReader::new(tcp, generation.limits.copy_buffer_bytes);
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|error| HandshakeFailure {
            sni: None,
            outcome: None,
            error,
        })?;
    let sni = start.client_hello().server_name().map(str::to_owned);
    if let Some(name) = &sni {
        tracing::Span::current().record("sni", name.as_str());
    }
    let alpn: Vec<&[u8]> = sni
        .as_deref()
        .and_then(|name| generation.application(name))
        .map(|app| app.tls_alpn.iter().map(Vec::as_slice).collect())
        .unwrap_or_default();
    let config = shared
        .tls_configs
        .get(generation, &alpn)
        .map_err(|e| HandshakeFailure {
            sni: sni.clone(),
            outcome: None,
            error: std::io::Error::other(format!("TLS configuration failed: {e}")),
        })?;
    // The shared verifier records its result in this handshake's slot.
    let outcome = Arc::new(Mutex::new(HandshakeOutcome::default()));
    let accepted = HANDSHAKE_OUTCOME
        .scope(outcome.clone(), start.into_stream(config))
        .await;
    match accepted {
        Ok(stream) => Ok(Handshake {
            stream: Box::new(stream),
            sni,
            outcome,
        }),
        Err(error) => Err(HandshakeFailure {
            sni,
            outcome: Some(outcome),
            error,
        }),
    }
}

async fn handle_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    _source_guard: SourceGuard,
    generation: Arc<Generation>,
    shared: Arc<Shared>,
    pending: PendingHandshake,
) {
    let stats = &shared.stats;
    stats.handshakes_started.fetch_add(1, Ordering::Relaxed);
    let deadline = generation.timeouts.handshake;
    // Boxed: the handshake's state is freed once it ends instead of taking
    // room in the tunnel task for the tunnel's whole life.
    let result = Box::pin(tokio::time::timeout(
        deadline,
        handshake(tcp, &generation, &shared),
    ))
    .await;
    drop(pending);
    let handshake = match result {
        Err(_) => {
            stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            if shared
                .refusal_log
                .check(remote.ip(), Instant::now())
                .is_some()
            {
                info!(reason = "handshake-timeout", deadline = ?deadline, "connection refused: the handshake did not complete in time");
            }
            return;
        }
        Ok(Err(failure)) => {
            stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            log_handshake_failure(&shared, remote, &failure);
            return;
        }
        Ok(Ok(handshake)) => handshake,
    };
    let verified_now = handshake
        .outcome
        .lock()
        .map(|o| o.verified)
        .unwrap_or(false);
    let chain: Vec<CertificateDer<'static>> = handshake
        .stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    run_admitted(
        handshake.stream,
        chain,
        handshake.sni,
        remote,
        !verified_now,
        shared,
    )
    .await;
}

fn log_handshake_failure(shared: &Shared, remote: SocketAddr, failure: &HandshakeFailure) {
    let Some(suppressed) = shared.refusal_log.check(remote.ip(), Instant::now()) else {
        return;
    };
    let rejected = failure
        .outcome
        .as_ref()
        .and_then(|o| o.lock().ok().and_then(|o| o.rejected.clone()));
    let app = failure.sni.as_deref().unwrap_or("");
    match rejected {
        Some((leaf, err)) => info!(
            unverified_subject = %leaf.subject,
            unverified_serial = %leaf.serial_hex,
            unverified_issuer = %leaf.issuer,
            unverified_sha256 = %leaf.cert_sha256,
            app,
            reason = err.reason_label(),
            detail = %err,
            suppressed,
            "connection refused at the handshake"
        ),
        None => info!(
            app,
            reason = "handshake-failed",
            detail = %failure.error,
            suppressed,
            "connection refused at the handshake"
        ),
    }
}

/// An admitted tunnel with its upstream connection, ready to copy.
struct OpenTunnel {
    stream: Box<TlsTunnel>,
    upstream: TcpStream,
    state: crate::session::SessionState,
    guard: crate::session::SessionGuard,
    /// `limits.copy_buffer_bytes` of the generation that admitted it.
    copy_buffer: usize,
}

async fn run_admitted(
    stream: Box<TlsTunnel>,
    chain: Vec<CertificateDer<'static>>,
    sni: Option<String>,
    remote: SocketAddr,
    resumed: bool,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    // Boxed: admission, registration and the dial end before the copy
    // starts, so their state is freed instead of taking room in the task
    // for the tunnel's whole life.
    let Some(tunnel) = Box::pin(open_tunnel(
        stream, chain, sni, remote, resumed, &shared, started,
    ))
    .await
    else {
        return;
    };
    run_tunnel(tunnel, &shared, started).await;
}

/// Admits the connection, registers the session and dials the upstream.
/// Returns `None` when the connection was refused or the dial failed,
/// after closing the connection accordingly.
async fn open_tunnel(
    mut stream: Box<TlsTunnel>,
    chain: Vec<CertificateDer<'static>>,
    sni: Option<String>,
    remote: SocketAddr,
    resumed: bool,
    shared: &Shared,
    started: Instant,
) -> Option<Box<OpenTunnel>> {
    let stats = &shared.stats;
    let generation = shared.config.current();
    let request = shared.admission_request(&chain, sni.as_deref(), remote, Transport::Tls);
    let admitted = match admission::admit(&generation, &request).await {
        Ok(a) => a,
        Err(refused) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            log_refusal(shared, remote, resumed, &refused);
            close_notify(&mut stream).await;
            return None;
        }
    };
    let span = tracing::Span::current();
    span.record("device", admitted.identity.device_id.as_str());
    span.record("app", admitted.application.name.as_str());
    let guard = match shared.registry.register(
        admitted.identity.clone(),
        admitted.ca_name.clone(),
        &admitted.application.name,
        Transport::Tls,
        remote,
        generation.limits.max_connections_per_device,
    ) {
        Ok(g) => g,
        Err(close) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            if shared
                .refusal_log
                .check(remote.ip(), Instant::now())
                .is_some()
            {
                info!(device = %admitted.identity.device_id, app = %admitted.application.name, reason = close.code.name(), detail = %close.reason, "connection refused after the handshake");
            }
            close_notify(&mut stream).await;
            return None;
        }
    };
    span.record("session", guard.entry.id);
    stats.admitted.fetch_add(1, Ordering::Relaxed);
    if resumed {
        stats.admitted_resumed.fetch_add(1, Ordering::Relaxed);
    }
    stats.streams.fetch_add(1, Ordering::Relaxed);
    debug!(rule = admitted.decision.rule(), resumed, ca = %admitted.ca_name, "connection admitted");

    let application = admitted.application.clone();
    let upstream = match super::quic::dial_upstream(shared, &application, &generation.limits).await
    {
        Ok(tcp) => tcp,
        Err(code) => {
            debug!(
                code = code.name(),
                "no upstream connection; connection reset"
            );
            reset_on_close(stream.get_ref().0.get_ref());
            return None;
        }
    };
    // One TCP connection is one tunnel, already dialled: a step-up closes
    // the session.
    let state = shared.session_state(
        chain,
        sni,
        Transport::Tls,
        remote,
        started,
        admitted,
        Arc::new(arc_swap::ArcSwap::new(application)),
        &guard.entry,
        None,
    );
    Some(Box::new(OpenTunnel {
        stream,
        upstream,
        state,
        guard,
        copy_buffer: generation.limits.copy_buffer_bytes,
    }))
}

/// Copies the tunnel's bytes until either side ends or the supervisor
/// closes the session, and logs the end. The tunnel stays boxed and is
/// used in place, so the task keeps no second copy of it.
async fn run_tunnel(mut tunnel: Box<OpenTunnel>, shared: &Shared, started: Instant) {
    let OpenTunnel {
        stream,
        upstream,
        state,
        guard,
        copy_buffer,
    } = &mut *tunnel;
    let copy_buffer = *copy_buffer;
    let mut shutdown = shared.shutdown.clone();
    // A TCP connection keeps its address, so no path change ever arrives.
    let mut addresses = shared.fixed_address.1.clone();
    let outcome = {
        // The connection is the session's one tunnel: a drain waits for it.
        guard.entry.streams_active.fetch_add(1, Ordering::Relaxed);
        let mut copy = std::pin::pin!(copy_duplex(&mut **stream, upstream, copy_buffer));
        tokio::select! {
            request = supervise(state, &shared.config, &mut shutdown, &mut addresses) => Err(request),
            copied = &mut copy => Ok(copied),
        }
    };
    let entry = &guard.entry;
    let duration_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Err(request) => {
            let up = entry.bytes_to_upstream.load(Ordering::Relaxed);
            let down = entry.bytes_to_client.load(Ordering::Relaxed);
            info!(code = request.code.name(), reason = %request.reason, bytes_to_upstream = up, bytes_to_client = down, duration_ms, "session closed by the gateway");
            reset_on_close(upstream);
            close_notify(stream).await;
        }
        Ok((end, copied)) => {
            entry
                .bytes_to_upstream
                .fetch_add(copied.first_to_second, Ordering::Relaxed);
            entry
                .bytes_to_client
                .fetch_add(copied.second_to_first, Ordering::Relaxed);
            let (up, down) = (copied.first_to_second, copied.second_to_first);
            match end {
                DuplexEnd::Finished => {
                    info!(
                        bytes_to_upstream = up,
                        bytes_to_client = down,
                        duration_ms,
                        "session ended"
                    )
                }
                DuplexEnd::Aborted { side, error } => {
                    let by = match side {
                        super::duplex::Side::First => "client",
                        super::duplex::Side::Second => "upstream",
                    };
                    info!(aborted_by = by, error = %error, bytes_to_upstream = up, bytes_to_client = down, duration_ms, "session ended abruptly; both connections reset");
                    reset_on_close(upstream);
                    reset_on_close(stream.get_ref().0.get_ref());
                }
            }
        }
    }
}

fn log_refusal(shared: &Shared, remote: SocketAddr, resumed: bool, refused: &Refused) {
    if let Some(suppressed) = shared.refusal_log.check(remote.ip(), Instant::now()) {
        info!(
            device = refused.device.as_deref().unwrap_or(""),
            app = refused.application.as_deref().unwrap_or(""),
            reason = refused.code.name(),
            detail = %refused.reason,
            rule = refused.rule.as_deref().unwrap_or(""),
            resumed,
            suppressed,
            "connection refused after the handshake"
        );
    }
}

/// Sends close_notify and shuts down the TCP write side, within a bound.
async fn close_notify(stream: &mut TlsTunnel) {
    if tokio::time::timeout(CLOSE_NOTIFY_LIMIT, stream.shutdown())
        .await
        .is_err()
    {
        debug!("close_notify not written in time; dropping the connection");
    }
}
