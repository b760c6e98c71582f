//! The running gateway: binds the listeners of a config, runs them with the
//! background tasks (OCSP refresh, the admin API), and offers reload and
//! shutdown. `ztgate serve` and the tests both use it.

use crate::admin::{
    AdminBackend, AdminHandle, PushOutcome, Readiness, ReloadFuture, RevocationPush,
    RevocationSourceStatus, RevocationTarget, SessionView,
};
use crate::config::{ConfigErrors, ConfigHandle, Generation};
use crate::identity::ocsp::OcspChecker;
use crate::identity::revocation::{PushTarget, PushedRevocation, RevocationStore, StoreOptions};
use crate::ingress::{bind_quic, bind_tls, open_listeners, Listeners, Shared};
use crate::protocol::Code;
use crate::session::{CloseRequest, Selector};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A started gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    quic_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    admin: Option<AdminHandle>,
    metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Error returned when the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Gateway {
    /// Loads the config, binds every listener and starts. Must run inside a
    /// tokio runtime.
    pub async fn start(config_path: &Path) -> Result<Gateway, StartError> {
        crate::install_crypto_provider();
        let path = config_path.to_path_buf();
        let config = tokio::task::spawn_blocking(move || ConfigHandle::load(&path))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let listeners = open_listeners(&config.current(), Vec::new())?;
        Gateway::start_with(config, listeners).await
    }

    /// Starts with a loaded config and the sockets `open_listeners` opened
    /// for it. Must run inside a tokio runtime.
    pub async fn start_with(
        config: Arc<ConfigHandle>,
        listeners: Listeners,
    ) -> Result<Gateway, StartError> {
        crate::install_crypto_provider();
        let generation = config.current();
        let ocsp = OcspChecker::new(generation.ocsp.clone())
            .map_err(|e| std::io::Error::other(format!("cannot start the OCSP client: {e}")))?;
        let crl = RevocationStore::new(
            generation.revocation.clone(),
            StoreOptions {
                state_dir: generation.state_dir.clone(),
                ..StoreOptions::default()
            },
        )
        .map_err(|e| std::io::Error::other(format!("cannot start the revocation store: {e}")))?;
        // Load CRLs before the first connection; failures are logged and
        // follow each CA's without_crl setting.
        for report in crl.refresh_now(None).await {
            if let Err(e) = &report.result {
                tracing::warn!(ca = %report.ca, source = %report.source, error = %e, "CRL not loaded at start");
            }
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Shared::new(config, shutdown_rx.clone(), ocsp, crl.clone()).map_err(|e| {
            std::io::Error::other(format!("cannot create the TLS session ticket keys: {e}"))
        })?;
        let tls_listeners = bind_tls(listeners.tcp)?;
        let listeners = bind_quic(&shared, listeners.udp)?;
        let quic_addrs = listeners.iter().map(|l| l.local_addr).collect();
        let tls_addrs = tls_listeners.iter().map(|l| l.local_addr).collect();
        let mut tasks = JoinSet::new();
        for listener in listeners {
            tasks.spawn(listener.run(shared.clone()));
        }
        for listener in tls_listeners {
            tasks.spawn(listener.run(shared.clone()));
        }
        tasks.spawn(close_on_ocsp_revocation(shared.clone()));
        tasks.spawn(crl.clone().run_refresh(shutdown_rx.clone()));
        tasks.spawn(follow_revocation_config(shared.clone()));
        tasks.spawn(reload_on_file_change(shared.clone()));
        tasks.spawn(refresh_ocsp(shared.clone()));
        let admin_settings = generation.admin.clone();
        let admin = if admin_settings.socket_path.is_some() || admin_settings.tcp_address.is_some()
        {
            let backend = Arc::new(GatewayBackend {
                shared: shared.clone(),
            });
            Some(crate::admin::serve(admin_settings, backend, shutdown_rx).await?)
        } else {
            None
        };
        let metrics_addr = match generation.metrics_listen {
            Some(addr) => {
                Some(crate::telemetry::metrics::serve(addr, shared.shutdown.clone()).await?)
            }
            None => None,
        };
        Ok(Gateway {
            shared,
            quic_addrs,
            tls_addrs,
            admin,
            metrics_addr,

            shutdown,
            tasks,
        })
    }

    /// Returns the bound QUIC addresses, in config order (port 0 resolved).
    pub fn quic_addrs(&self) -> &[SocketAddr] {
        &self.quic_addrs
    }

    /// Returns the bound metrics listener address, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Returns the admin API's listeners, when configured.
    pub fn admin(&self) -> Option<&AdminHandle> {
        self.admin.as_ref()
    }

    /// Returns the bound TLS-over-TCP addresses, in config order (port 0 resolved).
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The config's one reload entry point.
    pub async fn reload(&self) -> Result<Arc<Generation>, ConfigErrors> {
        self.shared.config.reload().await
    }

    /// Stops accepting, drains every session and closes it with going-away,
    /// and waits for the listeners and sessions to stop.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        if let Some(admin) = self.admin.take() {
            admin.wait().await;
        }
        // Sessions drain their streams for up to drain_secs, then send their
        // close messages.
        let deadline = tokio::time::Instant::now()
            + self.shared.config.current().timeouts.drain
            + Duration::from_secs(2);
        while self.shared.registry.session_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Closes the sessions of every certificate that an OCSP response reports revoked.
async fn close_on_ocsp_revocation(shared: Arc<Shared>) {
    let mut revocations = shared.ocsp.subscribe();
    let mut shutdown = shared.shutdown.clone();
    loop {
        let revocation = tokio::select! {
            r = revocations.recv() => r,
            _ = shutdown.changed() => return,
        };
        match revocation {
            Ok(r) => {
                let closed = shared.registry.close_matching(
                    &Selector::IssuerSerial {
                        issuer_sha256: r.issuer_raw_sha256.clone(),
                        serial_hex: r.serial_hex.clone(),
                    },
                    CloseRequest::new(
                        Code::CertificateRevoked,
                        format!(
                            "the certificate was revoked (OCSP responder {})",
                            r.responder_url
                        ),
                    ),
                );
                tracing::info!(serial = %r.serial_hex, responder = %r.responder_url, closed, "OCSP reports a certificate revoked");
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "OCSP revocation events were missed; their sessions close at their next re-evaluation");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Reloads when the config file or a policy file changes (modification time
/// or size), checked every second. A rejected file leaves the current
/// generation in force, as any reload does.
async fn reload_on_file_change(shared: Arc<Shared>) {
    fn stamp(files: &[std::path::PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
        files
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .and_then(|m| m.modified().ok().map(|t| (t, m.len())))
            })
            .collect()
    }
    let mut shutdown = shared.shutdown.clone();
    let mut files = shared.config.current().watched_files.clone();
    let mut last = stamp(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        let now = stamp(&files);
        if now == last {
            continue;
        }
        last = now;
        tracing::info!("configuration or policy files changed; reloading");
        if let Ok(generation) = shared.config.reload().await {
            files = generation.watched_files.clone();
            last = stamp(&files);
        }
    }
}

/// Hands each new config generation's revocation sources to the store.
async fn follow_revocation_config(shared: Arc<Shared>) {
    let mut generations = shared.config.subscribe();
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            changed = generations.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let generation = shared.config.current();
        if let Err(e) = shared.crl.reconfigure(generation.revocation.clone()) {
            tracing::error!(error = %e, "revocation sources of the new configuration rejected; the previous sources stay");
            continue;
        }
        for report in shared.crl.refresh_now(None).await {
            if let Err(e) = &report.result {
                tracing::warn!(ca = %report.ca, source = %report.source, error = %e, "CRL not loaded after reload");
            }
        }
    }
}

/// Queries OCSP again for cached responses of live sessions before they expire.
async fn refresh_ocsp(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let margin = shared.config.current().ocsp_refresh_margin;
        let pause = (margin / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
        if shared.ocsp.cache_len() > 0 {
            let registry = &shared.registry;
            shared
                .ocsp
                .refresh_expiring(SystemTime::now(), margin, |issuer, serial| {
                    registry.has_certificate(issuer, serial)
                })
                .await;
        }
    }
}

/// The admin API's view of the gateway.
struct GatewayBackend {
    shared: Arc<Shared>,
}

impl AdminBackend for GatewayBackend {
    fn sessions(&self) -> Vec<SessionView> {
        self.shared
            .registry
            .all()
            .into_iter()
            .map(|s| SessionView {
                id: s.id,
                device: s.identity.device_id.clone(),
                application: s.application.clone(),
                client: *s.client.lock().unwrap_or_else(|p| p.into_inner()),
                transport: s.transport.as_str().to_string(),
                age_secs: s.started.elapsed().as_secs(),
                bytes_to_upstream: s
                    .bytes_to_upstream
                    .load(std::sync::atomic::Ordering::Relaxed),
                bytes_to_client: s.bytes_to_client.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect()
    }

    fn close_session(&self, id: u64) -> bool {
        self.shared.registry.close_matching(
            &Selector::Session(id),
            CloseRequest::new(Code::AdministrativelyClosed, "closed by an operator"),
        ) > 0
    }

    fn push_revocation(&self, push: RevocationPush, caller: &str) -> Result<PushOutcome, String> {
        let selector = match &push.target {
            RevocationTarget::IssuerSerial {
                issuer_sha256,
                serial_hex,
            } => Selector::IssuerSerial {
                issuer_sha256: issuer_sha256.clone(),
                serial_hex: serial_hex.clone(),
            },
            RevocationTarget::CertSha256(h) => Selector::CertSha256(h.clone()),
            RevocationTarget::SpkiSha256(h) => Selector::SpkiSha256(h.clone()),
        };
        let reason = push
            .reason
            .clone()
            .unwrap_or_else(|| "revoked by an operator".into());
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        // Without the certificate's notAfter, keep the push for 398 days,
        // longer than the maximum validity of most certificate profiles.
        let not_after = push
            .not_after
            .map(|t| t as i64)
            .unwrap_or(now + 398 * 86_400);
        let target = match &push.target {
            RevocationTarget::IssuerSerial {
                issuer_sha256,
                serial_hex,
            } => PushTarget::IssuerSerial {
                issuer_sha256: issuer_sha256.clone(),
                serial_hex: serial_hex.clone(),
            },
            RevocationTarget::CertSha256(h) => PushTarget::CertSha256 { sha256: h.clone() },
            RevocationTarget::SpkiSha256(h) => PushTarget::SpkiSha256 { sha256: h.clone() },
        };
        self.shared.crl.push(PushedRevocation {
            target,
            not_after_unix: not_after,
            reason: Some(reason.clone()),
            pushed_at_unix: now,
        })?;
        let closed = self.shared.registry.close_matching(
            &selector,
            CloseRequest::new(
                Code::CertificateRevoked,
                format!("the certificate was revoked: {reason}"),
            ),
        );
        tracing::info!(caller, target = ?push.target, closed, "revocation pushed");
        Ok(PushOutcome {
            closed_sessions: closed,
        })
    }

    fn push_posture(
        &self,
        device_id: String,
        attributes: serde_json::Map<String, serde_json::Value>,
        caller: &str,
    ) -> Result<usize, String> {
        self.shared.posture.set(&device_id, attributes);
        let sessions = self
            .shared
            .registry
            .find(&Selector::Device(device_id.clone()));
        for session in &sessions {
            session.reevaluate.notify_one();
        }
        tracing::info!(caller, device = %device_id, sessions = sessions.len(), "posture pushed; re-evaluating the device's sessions");
        Ok(sessions.len())
    }

    fn reload(&self) -> ReloadFuture<'_> {
        Box::pin(async move {
            self.shared
                .config
                .reload()
                .await
                .map(|g| g.id)
                .map_err(|errors| errors.0.iter().map(|e| e.to_string()).collect())
        })
    }

    fn readiness(&self) -> Readiness {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let sources: Vec<RevocationSourceStatus> = self
            .shared
            .crl
            .source_ages(now)
            .into_iter()
            .map(|s| RevocationSourceStatus {
                name: format!("{}: {}", s.ca, s.source),
                age_secs: s.loaded_at.map(|t| now.saturating_sub(t).max(0) as u64),
                stale: s.stale,
                last_error: s.last_error,
            })
            .collect();
        Readiness {
            ready: sources.iter().all(|s| !s.stale),
            revocation_sources: sources,
        }
    }
}
