//! The QUIC ingress: one quinn endpoint per listen address, a task per
//! connection that runs the handshake under a deadline, admission, the
//! control stream and the session.

use super::control::ControlWriter;
use super::path::{self, PathSample, PathTracker};
use super::tls_config::server_tls_config;
use super::{PendingHandshake, Shared, SourceVerdict};
use crate::admission::{self, Refused};
use crate::config::Generation;
use crate::forward::{pump, DialError, DialSlot, PumpEnd, ResetCodes};
use crate::policy::Transport;
use crate::protocol::{self, Admitted as AdmittedMsg, Code, ControlMessage, Refusal};
use crate::session::{supervise, StreamGate};
use crate::telemetry::metrics;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

/// A bound QUIC listener.
pub struct QuicIngress {
    pub endpoint: quinn::Endpoint,
    pub local_addr: SocketAddr,
    /// Seals Retry tokens; the endpoint's own config and every
    /// per-connection config use this key, so tokens verify across them.
    token_key: Arc<dyn quinn::crypto::HandshakeTokenKey>,
}

fn transport_config(generation: &Generation) -> quinn::TransportConfig {
    let l = &generation.limits;
    let t = &generation.timeouts;
    let mut transport = quinn::TransportConfig::default();
    generation.quic.apply(&mut transport);
    transport
        .max_concurrent_bidi_streams(l.max_streams_per_connection.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(quinn::IdleTimeout::try_from(t.idle).ok())
        .keep_alive_interval(Some(t.keep_alive));
    transport
}

fn handshake_token_key() -> Arc<dyn quinn::crypto::HandshakeTokenKey> {
    let mut master = [0u8; 64];
    rand::Rng::fill(&mut rand::thread_rng(), &mut master[..]);
    Arc::new(ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&master))
}

/// Builds the per-connection quinn server config.
fn server_config(
    generation: &Generation,
    shared: &Shared,
    token_key: &Arc<dyn quinn::crypto::HandshakeTokenKey>,
) -> Result<
    (
        quinn::ServerConfig,
        Arc<std::sync::Mutex<crate::identity::HandshakeOutcome>>,
    ),
    String,
> {
    let (tls, outcome) =
        server_tls_config(generation, &[protocol::ALPN], shared.quic_tickets.clone())
            .map_err(|e| format!("TLS configuration failed: {e}"))?;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| format!("QUIC TLS configuration failed: {e}"))?;
    let mut config = quinn::ServerConfig::new(Arc::new(crypto), token_key.clone());
    config.transport_config(Arc::new(transport_config(generation)));
    config.migration(true);
    Ok((config, outcome))
}

/// Builds the endpoint settings: the stateless reset and connection ID signing keys
/// derived from `gateway.reset_key_file`, or quinn's random ones, and the
/// reset interval.
fn endpoint_config(generation: &Generation) -> quinn::EndpointConfig {
    let mut config = match &generation.reset_key {
        Some(key) => {
            let mut config = quinn::EndpointConfig::new(Arc::new(key.hmac_key()));
            let cid_key = key.connection_id_key();
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    config.min_reset_interval(generation.min_reset_interval);
    config
}

/// Makes one endpoint per UDP socket, which `open_listeners` opened for the
/// configured listen addresses. Must run inside a tokio runtime.
pub fn bind_quic(
    shared: &Arc<Shared>,
    sockets: Vec<std::net::UdpSocket>,
) -> std::io::Result<Vec<QuicIngress>> {
    let generation = shared.config.current();
    let token_key = handshake_token_key();
    let mut out = Vec::new();
    for socket in sockets {
        let (config, _) =
            server_config(&generation, shared, &token_key).map_err(std::io::Error::other)?;
        super::udp::log_udp_report(&socket, generation.udp_buffers, generation.quic.gso);
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&generation),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        info!(%local_addr, "QUIC listener started");
        out.push(QuicIngress {
            endpoint,
            local_addr,
            token_key: token_key.clone(),
        });
    }
    Ok(out)
}

impl QuicIngress {
    /// Accepts connections until shutdown.
    pub async fn run(self, shared: Arc<Shared>) {
        let token_key = self.token_key.clone();
        let mut shutdown = shared.shutdown.clone();
        loop {
            let incoming = tokio::select! {
                incoming = self.endpoint.accept() => incoming,
                _ = shutdown.changed() => {
                    // Refuse new connections at once while sessions drain.
                    self.endpoint.set_server_config(None);
                    break;
                }
            };
            let Some(incoming) = incoming else { break };
            accept_one(incoming, &shared, &token_key);
        }
        info!(local_addr = %self.local_addr, "QUIC listener stopped accepting");
    }
}

fn accept_one(
    incoming: quinn::Incoming,
    shared: &Arc<Shared>,
    token_key: &Arc<dyn quinn::crypto::HandshakeTokenKey>,
) {
    let remote = canonical(incoming.remote_address());
    let generation = shared.config.current();
    let limits = &generation.limits;
    let Some(source_guard) = shared.registry.try_acquire_source(
        remote.ip(),
        limits.max_connections_per_source,
        limits.max_connections,
    ) else {
        shared.stats.refused_by_cap.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = shared.refusal_log.check(remote.ip(), Instant::now()) {
            info!(source = %remote, suppressed, reason = "connection cap reached", "connection refused");
        }
        incoming.refuse();
        return;
    };
    let Some(incoming) = screen_incoming(incoming, remote, shared, limits) else {
        return;
    };
    let pending = PendingHandshake::start(shared, Transport::Quic);
    let (config, outcome) = match server_config(&generation, shared, token_key) {
        Ok(c) => c,
        Err(e) => {
            warn!(source = %remote, error = %e, "cannot build the connection's TLS configuration; connection ignored");
            incoming.ignore();
            return;
        }
    };
    let connecting = match incoming.accept_with(Arc::new(config)) {
        Ok(c) => c,
        Err(e) => {
            debug!(source = %remote, error = %e, "incoming connection failed before the handshake");
            return;
        }
    };
    let shared = shared.clone();
    let span = tracing::info_span!("conn", source = %remote, transport = "quic", sni = tracing::field::Empty, device = tracing::field::Empty, app = tracing::field::Empty, session = tracing::field::Empty);
    tokio::spawn(
        async move {
            let _source_guard = source_guard;
            handle_connection(connecting, outcome, remote, generation, shared, pending).await;
        }
        .instrument(span),
    );
}

/// Sends a Retry to an unvalidated client while too many QUIC handshakes
/// are pending, and applies the per-source handshake rate. Returns the
/// connection when its handshake may start; otherwise the client was sent
/// a Retry or the connection was refused.
fn screen_incoming(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    shared: &Shared,
    limits: &crate::config::Limits,
) -> Option<quinn::Incoming> {
    let unvalidated = !incoming.remote_address_validated() && incoming.may_retry();
    let pending = shared.stats.quic_pending_handshakes.load(Ordering::Relaxed);
    if unvalidated && pending >= limits.retry_pending_handshakes {
        return send_retry(incoming, remote, shared, "pending-handshakes");
    }
    let verdict = shared.handshake_rate.check(
        remote.ip(),
        limits.handshake_rate,
        limits.max_tracked_sources,
    );
    match verdict {
        SourceVerdict::Allowed => Some(incoming),
        // A spoofed source never receives the Retry, so the limit costs the
        // gateway one small packet per Initial.
        _ if unvalidated => send_retry(incoming, remote, shared, "source-rate"),
        // A validated address is a real peer; while the table of tracked
        // sources is full it is held only to the connection caps.
        SourceVerdict::Untracked if incoming.remote_address_validated() => Some(incoming),
        _ => {
            shared
                .stats
                .handshakes_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            metrics::handshake_rate_limited("quic");
            if let Some(suppressed) = shared.refusal_log.check(remote.ip(), Instant::now()) {
                info!(source = %remote, transport = "quic", suppressed, reason = "handshake rate limit", "connection refused");
            }
            incoming.refuse();
            None
        }
    }
}

/// Sends a Retry; `reason` labels the metric. Returns `None`, or the
/// connection when quinn would not send a Retry for it.
fn send_retry(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    shared: &Shared,
    reason: &'static str,
) -> Option<quinn::Incoming> {
    match incoming.retry() {
        Ok(()) => {
            shared.stats.retries_sent.fetch_add(1, Ordering::Relaxed);
            metrics::quic_retry(reason);
            // Keyed by reason, not by source: a spoofed flood has a new
            // source per packet.
            let key = format!("retry:{reason}");
            if let Some(suppressed) = shared.shed_log.check(key, Instant::now()) {
                info!(source = %remote, reason, suppressed, "Retry sent to validate the client address");
            }
            None
        }
        Err(e) => Some(e.into_incoming()),
    }
}

/// Removes IPv4-mapped IPv6 forms so logs and policy see one address form.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

async fn handle_connection(
    mut connecting: quinn::Connecting,
    outcome: Arc<std::sync::Mutex<crate::identity::HandshakeOutcome>>,
    remote: SocketAddr,
    generation: Arc<Generation>,
    shared: Arc<Shared>,
    pending: PendingHandshake,
) {
    let stats = &shared.stats;
    stats.handshakes_started.fetch_add(1, Ordering::Relaxed);
    let deadline = generation.timeouts.handshake;
    let handshake = async {
        let sni = connecting
            .handshake_data()
            .await
            .ok()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.server_name);
        if let Some(name) = &sni {
            tracing::Span::current().record("sni", name.as_str());
        }
        (sni, connecting.await)
    };
    // Boxed: the handshake's state is freed once it ends instead of taking
    // room in the connection task for the connection's whole life.
    let result = Box::pin(tokio::time::timeout(deadline, handshake)).await;
    drop(pending);
    let (sni, connection) = match result {
        Err(_) => {
            stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            metrics::handshake("timeout");
            if shared
                .refusal_log
                .check(remote.ip(), Instant::now())
                .is_some()
            {
                info!(reason = "handshake-timeout", deadline = ?deadline, "connection refused: the handshake did not complete in time");
            }
            return;
        }
        Ok((sni, Err(e))) => {
            stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            metrics::handshake("failed");
            log_handshake_failure(&shared, remote, sni.as_deref(), &outcome, &e);
            return;
        }
        Ok((sni, Ok(c))) => {
            metrics::handshake("ok");
            (sni, c)
        }
    };
    let verified_now = outcome.lock().map(|o| o.verified).unwrap_or(false);
    let chain: Vec<CertificateDer<'static>> = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    run_admitted(connection, chain, sni, remote, !verified_now, shared).await;
}

fn log_handshake_failure(
    shared: &Shared,
    remote: SocketAddr,
    sni: Option<&str>,
    outcome: &std::sync::Mutex<crate::identity::HandshakeOutcome>,
    error: &quinn::ConnectionError,
) {
    let Some(suppressed) = shared.refusal_log.check(remote.ip(), Instant::now()) else {
        return;
    };
    let rejected = outcome.lock().ok().and_then(|o| o.rejected.clone());
    match rejected {
        Some((leaf, err)) => info!(
            unverified_subject = %leaf.subject,
            unverified_serial = %leaf.serial_hex,
            unverified_issuer = %leaf.issuer,
            unverified_sha256 = %leaf.cert_sha256,
            app = sni.unwrap_or(""),
            reason = err.reason_label(),
            detail = %err,
            suppressed,
            "connection refused at the handshake"
        ),
        None => info!(
            app = sni.unwrap_or(""),
            reason = "handshake-failed",
            detail = %error,
            suppressed,
            "connection refused at the handshake"
        ),
    }
}

async fn run_admitted(
    connection: quinn::Connection,
    chain: Vec<CertificateDer<'static>>,
    sni: Option<String>,
    remote: SocketAddr,
    resumed: bool,
    shared: Arc<Shared>,
) {
    let stats = &shared.stats;
    let started = Instant::now();
    let mut control = match ControlWriter::open(&connection).await {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "connection ended before the control stream opened");
            return;
        }
    };
    let generation = shared.config.current();
    let request = shared.admission_request(&chain, sni.as_deref(), remote, Transport::Quic);
    let admitted = match Box::pin(admission::admit(&generation, &request)).await {
        Ok(a) => a,
        Err(refused) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            metrics::connection("refused", refused.code.name());
            log_refusal(&shared, remote, resumed, &refused);
            refuse(
                &connection,
                &mut control,
                ControlMessage::Refused(Refusal {
                    code: refused.code,
                    reason: refused.reason.clone(),
                    remediation: refused.remediation.clone(),
                }),
                refused.code,
                &refused.reason,
            )
            .await;
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("device", admitted.identity.device_id.as_str());
    span.record("app", admitted.application.name.as_str());

    let guard = match shared.registry.register(
        admitted.identity.clone(),
        admitted.ca_name.clone(),
        &admitted.application.name,
        Transport::Quic,
        remote,
        generation.limits.max_connections_per_device,
    ) {
        Ok(g) => g,
        Err(close) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            metrics::connection("refused", close.code.name());
            if shared
                .refusal_log
                .check(remote.ip(), Instant::now())
                .is_some()
            {
                info!(reason = close.code.name(), detail = %close.reason, "connection refused");
            }
            refuse(
                &connection,
                &mut control,
                ControlMessage::Refused(Refusal {
                    code: close.code,
                    reason: close.reason.clone(),
                    remediation: None,
                }),
                close.code,
                &close.reason,
            )
            .await;
            return;
        }
    };
    span.record("session", guard.entry.id);
    stats.admitted.fetch_add(1, Ordering::Relaxed);
    metrics::connection("admitted", "no-error");
    metrics::sessions_active(1.0);
    let _gauge = SessionGauge;
    if resumed {
        stats.admitted_resumed.fetch_add(1, Ordering::Relaxed);
    }
    let expires_in = admitted.deadline.as_ref().map(|d| {
        d.at.saturating_duration_since(Instant::now())
            .as_secs_f64()
            .ceil() as u64
    });
    let message = ControlMessage::Admitted(AdmittedMsg {
        session_id: guard.entry.id,
        application: admitted.application.name.clone(),
        device_id: admitted.identity.device_id.clone(),
        expires_in_secs: expires_in,
    });
    if let Err(e) = control.send(&message).await {
        debug!(error = %e, "connection ended before admitted was sent");
        return;
    }
    debug!(rule = admitted.decision.rule(), resumed, ca = %admitted.ca_name, "connection admitted");

    let application = Arc::new(arc_swap::ArcSwap::new(admitted.application.clone()));
    let (gate_tx, gate_rx) = watch::channel(StreamGate::Open);
    let (message_tx, mut message_rx) = tokio::sync::mpsc::unbounded_channel();
    let step_up = crate::session::StepUpControl {
        gate: gate_tx.clone(),
        messages: message_tx,
        since: None,
    };
    let mut state = shared.session_state(
        chain,
        sni,
        Transport::Quic,
        remote,
        started,
        admitted,
        application.clone(),
        &guard.entry,
        Some(step_up),
    );
    let mut shutdown = shared.shutdown.clone();
    let (address_tx, mut address_rx) = watch::channel(remote);
    // Pinned where they are built: `tokio::pin!` would move each into a
    // second slot of this task, and idle connections would pay for both.
    let mut streams = std::pin::pin!(accept_streams(
        connection.clone(),
        shared.clone(),
        guard.entry.clone(),
        application,
        gate_rx,
    ));
    let mut path = std::pin::pin!(track_path(&connection, &shared, &guard.entry, address_tx));
    let mut supervision = std::pin::pin!(supervise(
        &mut state,
        &shared.config,
        &mut shutdown,
        &mut address_rx,
    ));
    let ending = loop {
        tokio::select! {
            request = &mut supervision => break Some(request),
            close = &mut streams => break close,
            _ = &mut path => break None,
            Some(message) = message_rx.recv() => {
                if let Err(e) = control.send(&message).await {
                    debug!(error = %e, "cannot send a control message");
                }
            }
        }
    };
    // Held streams are reset with the step-up code (or stop waiting) now.
    gate_tx.send_replace(StreamGate::Closed);
    let entry = &guard.entry;
    let up = entry.bytes_to_upstream.load(Ordering::Relaxed);
    let down = entry.bytes_to_client.load(Ordering::Relaxed);
    match ending {
        Some(request) => {
            info!(code = request.code.name(), reason = %request.reason, bytes_to_upstream = up, bytes_to_client = down, duration_ms = started.elapsed().as_millis() as u64, "session closed by the gateway");
            metrics::session_closed(request.code.name());
            let message = ControlMessage::Closing(Refusal {
                code: request.code,
                reason: request.reason.clone(),
                remediation: request.remediation.clone(),
            });
            refuse(
                &connection,
                &mut control,
                message,
                request.code,
                &request.reason,
            )
            .await;
        }
        None => {
            let reason = connection
                .close_reason()
                .map(|r| r.to_string())
                .unwrap_or_default();
            info!(reason = %reason, bytes_to_upstream = up, bytes_to_client = down, duration_ms = started.elapsed().as_millis() as u64, "session ended");
        }
    }
}

/// Samples the connection's path until the connection ends, and publishes
/// each validated client address change: a log line, the registry entry, the
/// counter and `addresses`, which makes the supervisor evaluate the session
/// again. Unvalidated addresses go nowhere.
async fn track_path(
    connection: &quinn::Connection,
    shared: &Shared,
    entry: &crate::session::SessionEntry,
    addresses: watch::Sender<SocketAddr>,
) {
    let mut tracker = PathTracker::new(*addresses.borrow());
    let mut ticks = tokio::time::interval(path::POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let closed = connection.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut closed => return,
        }
        let old = tracker.validated();
        let Some(new) = tracker.observe(PathSample::read(connection)) else {
            continue;
        };
        info!(old = %old, new = %new, "client address changed (path validated)");
        *entry.client.lock().unwrap_or_else(|p| p.into_inner()) = new;
        entry.path_changes.fetch_add(1, Ordering::Relaxed);
        shared.stats.path_changes.fetch_add(1, Ordering::Relaxed);
        addresses.send_replace(new);
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

/// Sends a refusal or close message, waits briefly for it to be
/// acknowledged, then closes the connection with the code.
async fn refuse(
    connection: &quinn::Connection,
    control: &mut ControlWriter,
    message: ControlMessage,
    code: Code,
    reason: &str,
) {
    if control.send(&message).await.is_ok() {
        control.finish_and_flush(Duration::from_millis(500)).await;
    }
    let reason = reason.as_bytes();
    let reason = &reason[..reason.len().min(512)];
    connection.close(code.into(), reason);
}

/// Accepts bidirectional streams until the connection ends; each becomes
/// one TCP connection to the application's upstream. Streams over
/// `limits.streams_per_connection_per_sec` are reset with
/// stream-rate-limited. Returns a close request once the connection has had
/// `limits.max_rate_limited_streams_per_connection` streams reset that way.
async fn accept_streams(
    connection: quinn::Connection,
    shared: Arc<Shared>,
    entry: Arc<crate::session::SessionEntry>,
    application: Arc<arc_swap::ArcSwap<crate::config::Application>>,
    gate: watch::Receiver<StreamGate>,
) -> Option<crate::session::CloseRequest> {
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let limits = shared.config.current().limits.clone();
    let stream_rate = limits.stream_rate.map(|rate| rate.direct_limiter());
    let mut rate_limited = 0u64;
    loop {
        let (mut send, mut recv) = match connection.accept_bi().await {
            Ok(s) => s,
            Err(_) => return None,
        };
        if stream_rate.as_ref().is_some_and(|r| r.check().is_err()) {
            rate_limited += 1;
            if let Some(close) =
                reject_fast_stream(&mut send, &mut recv, &shared, &limits, rate_limited)
            {
                return Some(close);
            }
            continue;
        }
        shared.stats.streams.fetch_add(1, Ordering::Relaxed);
        let entry = entry.clone();
        let application = application.clone();
        let shared = shared.clone();
        let gate = gate.clone();
        let held = held.clone();
        tokio::spawn(
            async move {
                forward_stream(send, recv, &application, &entry, &shared, gate, &held).await;
            }
            .in_current_span(),
        );
    }
}

/// Resets a stream that came over the stream rate, the `count`th such stream
/// of its connection. Returns a close request when the connection has had
/// too many.
fn reject_fast_stream(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    shared: &Shared,
    limits: &crate::config::Limits,
    count: u64,
) -> Option<crate::session::CloseRequest> {
    let code = Code::StreamRateLimited;
    let _ = send.reset(code.into());
    let _ = recv.stop(code.into());
    shared
        .stats
        .streams_rate_limited
        .fetch_add(1, Ordering::Relaxed);
    metrics::stream_rate_limited();
    let max = limits.max_rate_limited_streams_per_connection;
    if max > 0 && count >= max {
        return Some(crate::session::CloseRequest::new(
            code,
            format!("{count} streams were opened faster than the stream rate limit allows"),
        ));
    }
    // Log the first reset of each power of two, so a flood costs a few lines.
    if count.is_power_of_two() {
        info!(
            stream = send.id().index(),
            rate_limited_streams = count,
            "stream reset: new streams exceed limits.streams_per_connection_per_sec"
        );
    }
    None
}

/// Most streams one session may hold while a step-up is pending. Each held
/// stream buffers at most `limits.stream_receive_window` bytes, because the
/// gateway reads nothing past its preamble until the stream is released.
const MAX_HELD_STREAMS: usize = 16;

/// Waits while a pending step-up holds back new streams. Returns the reset
/// code when the stream must be reset instead (too many held, or the session
/// ended).
async fn wait_for_gate(
    gate: &mut watch::Receiver<StreamGate>,
    held: &std::sync::atomic::AtomicUsize,
    stream_id: u64,
) -> Result<(), Code> {
    if *gate.borrow_and_update() == StreamGate::Open {
        return Ok(());
    }
    if held.fetch_add(1, Ordering::Relaxed) >= MAX_HELD_STREAMS {
        held.fetch_sub(1, Ordering::Relaxed);
        debug!(
            stream = stream_id,
            "too many held streams; stream rejected with stream-refused"
        );
        return Err(Code::StreamRefused);
    }
    debug!(
        stream = stream_id,
        "stream held until the step-up completes"
    );
    let outcome = gate.wait_for(|g| *g != StreamGate::Held).await.map(|g| *g);
    held.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Ok(StreamGate::Open) => Ok(()),
        _ => Err(Code::StepUpRequired),
    }
}

async fn forward_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    application: &arc_swap::ArcSwap<crate::config::Application>,
    entry: &crate::session::SessionEntry,
    shared: &Shared,
    mut gate: watch::Receiver<StreamGate>,
    held: &std::sync::atomic::AtomicUsize,
) {
    let stream_id = send.id().index();
    let mut preamble = [0u8; protocol::PREAMBLE_LEN];
    let read = tokio::time::timeout(Duration::from_secs(30), recv.read_exact(&mut preamble)).await;
    let valid = match read {
        Ok(Ok(())) => protocol::parse_preamble(preamble).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(format!("stream ended before its preamble: {e}")),
        Err(_) => Err("no preamble within 30 s".to_string()),
    };
    if let Err(reason) = valid {
        debug!(stream = stream_id, reason = %reason, "stream rejected");
        let _ = send.reset(Code::ProtocolViolation.into());
        let _ = recv.stop(Code::ProtocolViolation.into());
        return;
    }
    if let Err(code) = wait_for_gate(&mut gate, held, stream_id).await {
        let _ = send.reset(code.into());
        let _ = recv.stop(code.into());
        return;
    }
    let application = application.load_full();
    let application = &*application;
    entry.streams_active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveStream(&entry.streams_active);
    let started = Instant::now();
    metrics::stream_opened(&application.name);
    let limits = shared.config.current().limits.clone();
    let tcp = match dial_upstream(shared, application, &limits).await {
        Ok(tcp) => tcp,
        Err(code) => {
            let _ = send.reset(code.into());
            let _ = recv.stop(code.into());
            return;
        }
    };
    debug!(
        stream = stream_id,
        connect_ms = started.elapsed().as_millis() as u64,
        "upstream connected"
    );
    let (end, stats) = pump(
        send,
        recv,
        tcp,
        ResetCodes {
            tcp_reset: Code::UpstreamReset.into(),
        },
        limits.copy_buffer_bytes,
    )
    .await;
    metrics::stream_bytes(&application.name, stats.to_tcp, stats.to_stream);
    entry
        .bytes_to_upstream
        .fetch_add(stats.to_tcp, Ordering::Relaxed);
    entry
        .bytes_to_client
        .fetch_add(stats.to_stream, Ordering::Relaxed);
    match end {
        PumpEnd::Finished => debug!(
            stream = stream_id,
            to_upstream = stats.to_tcp,
            to_client = stats.to_stream,
            "stream finished"
        ),
        other => {
            debug!(stream = stream_id, end = ?other, to_upstream = stats.to_tcp, to_client = stats.to_stream, "stream ended abruptly")
        }
    }
}

/// Dials the application's upstream under its dial cap, logging and
/// counting a failure. Returns the reset code for the stream on failure.
pub(super) async fn dial_upstream(
    shared: &Shared,
    application: &crate::config::Application,
    limits: &crate::config::Limits,
) -> Result<tokio::net::TcpStream, Code> {
    let started = Instant::now();
    let name = application.name.as_str();
    let dialled = shared
        .dials
        .dial(
            name,
            &application.upstream,
            limits.max_upstream_dials_per_application,
            limits.upstream_dial_wait,
        )
        .await;
    match dialled {
        Ok((tcp, slot)) => {
            if slot == DialSlot::Waited {
                metrics::upstream_dial_queued(name, "waited");
            }
            metrics::upstream_connect(name, Ok(started.elapsed()));
            Ok(tcp)
        }
        Err(e @ DialError::Busy { .. }) => {
            shared
                .stats
                .upstream_dials_busy
                .fetch_add(1, Ordering::Relaxed);
            metrics::upstream_dial_queued(name, "rejected");
            if shared
                .shed_log
                .check(format!("upstream-busy:{name}"), Instant::now())
                .is_some()
            {
                warn!(upstream = %application.upstream.display(), error = %e, "upstream dial cap full; stream reset with upstream-busy");
            }
            Err(Code::UpstreamBusy)
        }
        Err(DialError::Unreachable(e)) => {
            metrics::upstream_connect(name, Err(()));
            warn!(upstream = %application.upstream.display(), error = %e, "upstream unreachable; stream reset");
            Err(Code::UpstreamUnreachable)
        }
    }
}

/// Lowers the live-session gauge when the session's task ends, however it ends.
struct SessionGauge;

impl Drop for SessionGauge {
    fn drop(&mut self) {
        metrics::sessions_active(-1.0);
    }
}

/// Counts a stream as active until dropped.
struct ActiveStream<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
