//! One immutable, validated config generation and the handle that swaps it.

use super::load::{load_generation, load_generation_within, ConfigErrors};
use crate::forward::Upstream;
use crate::identity::TrustStore;
use crate::policy::PolicyClient;
use crate::sandbox::PathRules;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// An application reachable through the gateway.
#[derive(Debug)]
pub struct Application {
    pub name: String,
    /// The lower-cased TLS server name that selects this application.
    pub server_name: String,
    pub upstream: Arc<Upstream>,
    pub labels: BTreeMap<String, String>,
    /// Admit new connections when the policy engine fails, instead of refusing.
    pub admit_on_policy_failure: bool,
    pub ocsp: crate::identity::ocsp::OcspMode,
    /// ALPN protocols offered on the TLS-over-TCP ingress, in preference order; empty for none.
    pub tls_alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub handshake: Duration,
    pub idle: Duration,
    pub keep_alive: Duration,
    pub admission: Duration,
    pub drain: Duration,
    pub max_session: Option<Duration>,
    /// How long a live session keeps an expired allow while the engine fails.
    pub policy_failure_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_streams_per_connection: u32,
    pub max_connections: u32,
    pub max_connections_per_source: u32,
    pub max_connections_per_device: u32,
    pub copy_buffer_bytes: usize,

    // Load shedding.
    /// Pending QUIC handshakes from which unvalidated clients get a Retry.
    pub retry_pending_handshakes: u64,
    /// New handshakes per source address; `None` for no limit.
    pub handshake_rate: Option<crate::ingress::RateLimit>,
    pub max_tracked_sources: usize,
    /// New streams per QUIC connection; `None` for no limit.
    pub stream_rate: Option<crate::ingress::RateLimit>,
    /// Rate-limited streams after which the connection is closed; 0 never closes.
    pub max_rate_limited_streams_per_connection: u64,
    pub max_upstream_dials_per_application: u32,
    pub upstream_dial_wait: Duration,
}

/// A 32-byte secret from which every node that shares the reset key file
/// derives the same stateless reset tokens. Debug output hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct ResetKey(pub [u8; 32]);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    /// Derives the key as HMAC-SHA256, keyed with a fixed label, of the
    /// file's contents, so the file's bytes are used only for this purpose.
    pub fn derive(contents: &[u8]) -> ResetKey {
        let label = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"ztgate stateless reset key v1");
        let tag = ring::hmac::sign(&label, contents);
        let mut key = [0u8; 32];
        key.copy_from_slice(tag.as_ref());
        ResetKey(key)
    }

    /// Returns the HMAC key quinn signs reset tokens with.
    pub fn hmac_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0)
    }

    /// Derives the key that signs connection IDs. An endpoint sends a stateless reset
    /// only for a connection ID that carries its signature, so a restarted
    /// gateway must sign with the key its predecessor used.
    pub fn connection_id_key(&self) -> u64 {
        let tag = ring::hmac::sign(&self.hmac_key(), b"connection id signing key");
        let mut key = [0u8; 8];
        key.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_le_bytes(key)
    }
}

/// A validated configuration with everything built from it.
pub struct Generation {
    /// Increases by one with every successful load.
    pub id: u64,
    pub source: PathBuf,
    pub listen: Vec<SocketAddr>,
    /// TLS-over-TCP listen addresses.
    pub listen_tls: Vec<SocketAddr>,
    pub certified_key: Arc<rustls::sign::CertifiedKey>,
    pub trust: Arc<TrustStore>,
    /// Applications by lower-cased server name.
    pub applications: HashMap<String, Arc<Application>>,
    pub policy: Arc<dyn PolicyClient>,
    pub hardware_bound_oid: Option<String>,
    pub udp_buffers: crate::ingress::udp::UdpBuffers,
    /// QUIC transport settings from `[gateway]` and `[limits]`: congestion
    /// controller, GSO, flow-control windows and acknowledgement frequency.
    pub quic: crate::tuning::QuicTuning,
    /// Tokio worker threads (`gateway.worker_threads`, 0 for one per core).
    /// Read when the process starts; a reload does not change it.
    pub worker_threads: usize,
    /// Stateless reset key, derived from `gateway.reset_key_file`; `None`
    /// when the file is not configured.
    pub reset_key: Option<ResetKey>,
    /// Shortest interval between two stateless resets an endpoint sends.
    pub min_reset_interval: Duration,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log_level: String,
    pub log_format: String,
    pub audit: crate::telemetry::AuditSink,
    pub ocsp: crate::identity::ocsp::OcspSettings,
    /// How long before a cached OCSP answer expires it is asked again.
    pub ocsp_refresh_margin: Duration,
    pub admin: crate::admin::AdminSettings,
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    /// Files whose change triggers a reload: the config file and the policy files.
    pub watched_files: Vec<PathBuf>,
    /// Revocation sources and rules of each device CA.
    pub revocation: Vec<crate::identity::revocation::CaRevocationConfig>,
    pub sandbox: crate::sandbox::SandboxSettings,
    /// Every file system path the config names, with its key and access.
    pub paths: Vec<crate::sandbox::ConfigPath>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("listen", &self.listen)
            .field("listen_tls", &self.listen_tls)
            .field(
                "applications",
                &self.applications.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Generation {
    /// Finds the application selected by a TLS server name.
    pub fn application(&self, server_name: &str) -> Option<&Arc<Application>> {
        if server_name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.applications.get(&server_name.to_ascii_lowercase())
        } else {
            self.applications.get(server_name)
        }
    }
}

/// The current generation, swapped atomically on reload, with a watch
/// channel that tells live sessions a new generation is in force.
pub struct ConfigHandle {
    path: PathBuf,
    current: ArcSwap<Generation>,
    next_id: AtomicU64,
    changed: watch::Sender<u64>,
    reload_lock: tokio::sync::Mutex<()>,
    /// The sandbox rules in force, once `ztgate serve` has applied them.
    sandbox: OnceLock<Arc<PathRules>>,
}

impl ConfigHandle {
    /// Loads the first generation from `path`.
    pub fn load(path: &Path) -> Result<Arc<ConfigHandle>, ConfigErrors> {
        let generation = load_generation(path, 1)?;
        let (changed, _) = watch::channel(1);
        Ok(Arc::new(ConfigHandle {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(generation),
            next_id: AtomicU64::new(2),
            changed,
            reload_lock: tokio::sync::Mutex::new(()),
            sandbox: OnceLock::new(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the sandbox rules in force, against which every reload checks
    /// the paths its config names. Only the first call has an effect.
    pub fn set_sandbox_rules(&self, rules: PathRules) {
        let _ = self.sandbox.set(Arc::new(rules));
    }

    /// The generation in force now.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// A receiver that sees the id of each new generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The one reload entry point: re-reads the file, and on success swaps the
    /// new generation in and notifies live sessions. On error the current
    /// generation keeps serving. File reading runs on the blocking pool.
    pub async fn reload(&self) -> Result<Arc<Generation>, ConfigErrors> {
        let _serial = self.reload_lock.lock().await;
        let id = self.next_id.load(Ordering::Relaxed);
        let path = self.path.clone();
        let sandbox = self.sandbox.get().cloned();
        let loaded = tokio::task::spawn_blocking(move || {
            load_generation_within(&path, id, sandbox.as_deref())
        })
        .await
        .map_err(|e| {
            ConfigErrors(vec![super::ConfigError {
                file: self.path.clone(),
                key: String::new(),
                message: format!("reload task failed: {e}"),
            }])
        })?;
        match loaded {
            Ok(generation) => {
                self.next_id.store(id + 1, Ordering::Relaxed);
                let old = self.current();
                if old.listen != generation.listen || old.listen_tls != generation.listen_tls {
                    tracing::warn!(
                        old = ?old.listen,
                        new = ?generation.listen,
                        old_tls = ?old.listen_tls,
                        new_tls = ?generation.listen_tls,
                        "gateway.listen or gateway.listen_tls changed; listen addresses take effect only after a restart"
                    );
                }
                if old.reset_key != generation.reset_key
                    || old.min_reset_interval != generation.min_reset_interval
                {
                    tracing::warn!(
                        "gateway.reset_key_file or gateway.min_reset_interval_ms changed; stateless reset settings take effect only after a restart"
                    );
                }
                if old.udp_buffers != generation.udp_buffers {
                    tracing::warn!(
                        "gateway.udp_receive_buffer_bytes or gateway.udp_send_buffer_bytes changed; UDP buffer sizes take effect only after a restart"
                    );
                }
                if old.sandbox != generation.sandbox {
                    tracing::warn!(
                        "the [sandbox] table changed; the sandbox settings take effect only after a restart"
                    );
                }
                if old.log_level != generation.log_level {
                    crate::telemetry::set_level(&generation.log_level);
                }
                if old.log_format != generation.log_format {
                    tracing::warn!(
                        "log.format changed; the log format takes effect only after a restart"
                    );
                }
                let generation = Arc::new(generation);
                self.current.store(generation.clone());
                self.changed.send_replace(generation.id);
                tracing::info!(generation = generation.id, file = %self.path.display(), "configuration reloaded");
                Ok(generation)
            }
            Err(errors) => {
                tracing::error!(file = %self.path.display(), errors = %errors, "configuration reload rejected; the previous configuration stays in force");
                Err(errors)
            }
        }
    }
}
