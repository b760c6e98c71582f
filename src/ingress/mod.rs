//! Listeners: the QUIC and TLS-over-TCP ingresses, the shared state every
//! ingress uses, and the control stream writer.

mod control;
pub mod duplex;
mod listeners;
pub mod path;
pub mod quic;
mod rate;
pub mod read_buffer;
pub mod tls;
mod tls_config;
pub mod udp;

pub use control::ControlWriter;
pub use listeners::{inherited_sockets, open_listeners, InheritedSocket, Listeners};
pub use quic::{bind_quic, QuicIngress};
pub use rate::{HandshakeRateLimiter, RateLimit, SourceVerdict};
pub use tls::{bind_tls, TlsIngress};
pub use tls_config::server_tls_config;

use crate::config::ConfigHandle;
use crate::session::Registry;
use crate::telemetry::PerSourceLimiter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Counters the ingress keeps for tests and the admin view.
#[derive(Debug, Default)]
pub struct IngressStats {
    pub handshakes_started: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    /// Handshakes in progress on both ingresses.
    pub pending_handshakes: AtomicU64,
    /// Handshakes in progress on the QUIC ingress; the Retry threshold
    /// compares against this one.
    pub quic_pending_handshakes: AtomicU64,
    pub admitted: AtomicU64,
    /// Admitted connections whose TLS handshake resumed an earlier session.
    pub admitted_resumed: AtomicU64,
    pub refused: AtomicU64,
    pub refused_by_cap: AtomicU64,
    pub streams: AtomicU64,
    /// Validated client address changes of QUIC connections.
    pub path_changes: AtomicU64,
    /// QUIC Retry packets sent.
    pub retries_sent: AtomicU64,
    /// New connections rejected by the per-source handshake rate limit.
    pub handshakes_rate_limited: AtomicU64,
    /// Streams reset with stream-rate-limited.
    pub streams_rate_limited: AtomicU64,
    /// Streams or TLS tunnels that gave up waiting for an upstream dial slot.
    pub upstream_dials_busy: AtomicU64,
}

/// Counts one handshake as pending on `transport` until dropped, however
/// the handshake ends.
pub struct PendingHandshake {
    shared: Arc<Shared>,
    transport: crate::policy::Transport,
}

impl PendingHandshake {
    pub fn start(shared: &Arc<Shared>, transport: crate::policy::Transport) -> PendingHandshake {
        shared
            .stats
            .pending_handshakes
            .fetch_add(1, Ordering::Relaxed);
        if transport == crate::policy::Transport::Quic {
            shared
                .stats
                .quic_pending_handshakes
                .fetch_add(1, Ordering::Relaxed);
        }
        crate::telemetry::metrics::handshakes_pending(transport.as_str(), 1.0);
        PendingHandshake {
            shared: shared.clone(),
            transport,
        }
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let stats = &self.shared.stats;
        stats.pending_handshakes.fetch_sub(1, Ordering::Relaxed);
        if self.transport == crate::policy::Transport::Quic {
            stats
                .quic_pending_handshakes
                .fetch_sub(1, Ordering::Relaxed);
        }
        crate::telemetry::metrics::handshakes_pending(self.transport.as_str(), -1.0);
    }
}

/// State shared by every ingress and connection task.
pub struct Shared {
    pub config: Arc<ConfigHandle>,
    pub registry: Arc<Registry>,
    pub stats: IngressStats,
    pub shutdown: watch::Receiver<bool>,
    /// Session ticket keys of the QUIC ingress, shared across config
    /// generations, so a reload does not force every device through a full
    /// handshake.
    pub quic_tickets: Arc<dyn rustls::server::ProducesTickets>,
    /// The TLS-over-TCP ingress's server configs, with session ticket keys
    /// of their own, so that a session is resumed only on the transport it
    /// was made on.
    pub tls_configs: tls_config::TlsConfigCache,
    /// A client address that never changes, for the supervisor of a TLS
    /// tunnel: a TCP connection keeps its address. The sender stays here,
    /// so receivers never see the channel close.
    pub fixed_address: (
        watch::Sender<std::net::SocketAddr>,
        watch::Receiver<std::net::SocketAddr>,
    ),
    pub refusal_log: PerSourceLimiter,
    /// Rate limit of load-shedding log lines, keyed by what was shed: Retry
    /// packets by reason, upstream-busy resets by application name.
    pub shed_log: PerSourceLimiter<String>,
    /// The OCSP client and its cache, kept across reloads.
    pub ocsp: crate::identity::ocsp::OcspChecker,
    /// Posture attributes pushed through the admin API.
    pub posture: Arc<crate::policy::PostureStore>,
    /// CRLs and pushed revocations, kept across reloads.
    pub crl: Arc<crate::identity::revocation::RevocationStore>,
    /// Per-source token buckets for new handshakes on both ingresses.
    pub handshake_rate: HandshakeRateLimiter,
    /// Upstream dials in progress per application.
    pub dials: crate::forward::DialLimiter,
    /// One shared copy of each CA certificate that sessions keep.
    pub certificates: crate::session::CertInterner,
}

impl Shared {
    pub fn new(
        config: Arc<ConfigHandle>,
        shutdown: watch::Receiver<bool>,
        ocsp: crate::identity::ocsp::OcspChecker,
        crl: Arc<crate::identity::revocation::RevocationStore>,
    ) -> Result<Arc<Shared>, rustls::Error> {
        let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        Ok(Arc::new(Shared {
            ocsp,
            crl,
            posture: Arc::new(crate::policy::PostureStore::default()),
            config,
            registry: Registry::new(),
            stats: IngressStats::default(),
            shutdown,
            quic_tickets: rustls::crypto::ring::Ticketer::new()?,
            tls_configs: tls_config::TlsConfigCache::new(rustls::crypto::ring::Ticketer::new()?),
            fixed_address: watch::channel(unspecified),
            refusal_log: PerSourceLimiter::new(20, Duration::from_secs(10)),
            shed_log: PerSourceLimiter::new(5, Duration::from_secs(10)),
            handshake_rate: HandshakeRateLimiter::default(),
            dials: crate::forward::DialLimiter::default(),
            certificates: crate::session::CertInterner::default(),
        }))
    }
}

impl Shared {
    /// Builds the admission request of a new connection on either ingress.
    pub fn admission_request<'a>(
        &'a self,
        chain: &'a [rustls::pki_types::CertificateDer<'a>],
        server_name: Option<&'a str>,
        client: std::net::SocketAddr,
        transport: crate::policy::Transport,
    ) -> crate::admission::AdmissionRequest<'a> {
        crate::admission::AdmissionRequest {
            chain,
            server_name,
            client,
            path_changes: 0,
            previous_address: None,
            transport,
            now: std::time::SystemTime::now(),
            session_started: None,
            previous: None,
            ocsp: Some(&self.ocsp),
            posture: Some(&self.posture),
            crl: Some(&self.crl),
            allow_step_up: false,
        }
    }

    /// Builds the supervisor state of a newly admitted session.
    #[allow(clippy::too_many_arguments)]
    pub fn session_state(
        &self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        server_name: Option<String>,
        transport: crate::policy::Transport,
        client: std::net::SocketAddr,
        started: std::time::Instant,
        admitted: crate::admission::Admitted,
        application: Arc<arc_swap::ArcSwap<crate::config::Application>>,
        entry: &Arc<crate::session::SessionEntry>,
        step_up: Option<crate::session::StepUpControl>,
    ) -> crate::session::SessionState {
        crate::session::SessionState {
            chain: crate::session::SessionChain::new(chain, &self.certificates),
            server_name,
            transport,
            client,
            path_changes: 0,
            previous_address: None,
            started,
            admitted,
            application,
            policy_outage_since: None,
            ocsp: Some(self.ocsp.clone()),
            posture: Some(self.posture.clone()),
            crl: Some(self.crl.clone()),
            entry: entry.clone(),
            step_up,
        }
    }
}
