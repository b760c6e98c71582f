//! The registry of live sessions, indexed so that a revocation, an operator
//! or a config change can find every session it concerns.

use super::supervisor::CloseRequest;
use crate::identity::DeviceIdentity;
use crate::policy::Transport;
use crate::protocol::Code;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the registry keeps of one session.
#[derive(Debug)]
pub struct SessionEntry {
    pub id: u64,
    pub identity: Arc<DeviceIdentity>,
    pub ca_name: Arc<str>,
    pub application: String,
    pub transport: Transport,
    pub started: Instant,
    /// The validated client address, updated when the path changes.
    pub client: Mutex<SocketAddr>,
    /// Validated client address changes (QUIC connection migrations).
    pub path_changes: AtomicU64,
    /// Policy evaluations so far: the admission and every re-evaluation.
    pub evaluations: AtomicU64,
    /// Streams (tunnels) of the session being forwarded now.
    pub streams_active: AtomicU64,
    /// The client address the latest policy evaluation was given.
    pub evaluated_client: Mutex<SocketAddr>,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Wakes the session's supervisor to evaluate the session again now.
    pub reevaluate: tokio::sync::Notify,
    /// The first close request. A mutex and a notify, not a watch
    /// channel: the channel's shared state takes about 400 bytes per
    /// session, and the session's supervisor is the only reader.
    close: Mutex<Option<CloseRequest>>,
    close_requested: tokio::sync::Notify,
}

impl SessionEntry {
    /// Asks the session to close; the first request wins.
    pub fn request_close(&self, request: CloseRequest) {
        let mut slot = self.close.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(request);
            drop(slot);
            // Stores a permit when the supervisor is not waiting yet, so
            // the request is seen by its next wait.
            self.close_requested.notify_one();
        }
    }

    /// Returns the close request, if one was made.
    pub fn close_request(&self) -> Option<CloseRequest> {
        self.close.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for a close request. Only one task may wait at a time: the
    /// session's supervisor.
    pub async fn closed(&self) -> CloseRequest {
        loop {
            if let Some(request) = self.close_request() {
                return request;
            }
            self.close_requested.notified().await;
        }
    }
}

/// Which sessions an operation concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// SHA-256 of the issuer name's DER and the serial in lower-case hex.
    IssuerSerial {
        issuer_sha256: String,
        serial_hex: String,
    },
    CertSha256(String),
    SpkiSha256(String),
    Device(String),
    Application(String),
    Session(u64),
}

#[derive(Default)]
struct Indexes {
    sessions: HashMap<u64, Arc<SessionEntry>>,
    by_issuer_serial: HashMap<(String, String), HashSet<u64>>,
    by_cert: HashMap<String, HashSet<u64>>,
    by_spki: HashMap<String, HashSet<u64>>,
    by_device: HashMap<String, HashSet<u64>>,
    by_application: HashMap<String, HashSet<u64>>,
}

fn index_insert<K: Hash + Eq>(map: &mut HashMap<K, HashSet<u64>>, key: K, id: u64) {
    map.entry(key).or_default().insert(id);
}

fn index_remove<K: Hash + Eq>(map: &mut HashMap<K, HashSet<u64>>, key: &K, id: u64) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// Live sessions and connection counts per source address.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    indexes: Mutex<Indexes>,
    sources: Mutex<HashMap<IpAddr, u32>>,
    connections: AtomicU64,
}

/// Keeps a source address counted until dropped.
pub struct SourceGuard {
    registry: Arc<Registry>,
    ip: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut sources = self
            .registry
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = sources.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                sources.remove(&self.ip);
            }
        }
        self.registry.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a session registered until dropped.
pub struct SessionGuard {
    registry: Arc<Registry>,
    pub entry: Arc<SessionEntry>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.remove(&self.entry);
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry {
            next_id: AtomicU64::new(1),
            ..Default::default()
        })
    }

    /// Counts a new connection from `ip`, or returns `None` when the per-source
    /// or global cap is reached.
    pub fn try_acquire_source(
        self: &Arc<Self>,
        ip: IpAddr,
        per_source: u32,
        global: u32,
    ) -> Option<SourceGuard> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if self.connections.load(Ordering::Relaxed) >= u64::from(global) {
            return None;
        }
        let count = sources.entry(ip).or_insert(0);
        if *count >= per_source {
            return None;
        }
        *count += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
        Some(SourceGuard {
            registry: self.clone(),
            ip,
        })
    }

    /// Open connections, admitted or still in their handshake.
    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Registers an admitted session unless the device already has
    /// `per_device` sessions.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        self: &Arc<Self>,
        identity: Arc<DeviceIdentity>,
        ca_name: Arc<str>,
        application: &str,
        transport: Transport,
        client: SocketAddr,
        per_device: u32,
    ) -> Result<SessionGuard, CloseRequest> {
        let mut idx = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        let live = idx
            .by_device
            .get(&identity.device_id)
            .map_or(0, |s| s.len());
        if live >= per_device as usize {
            return Err(CloseRequest::new(
                Code::ConnectionLimit,
                format!(
                    "device {} already has {live} sessions, the configured maximum",
                    identity.device_id
                ),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(SessionEntry {
            id,
            identity: identity.clone(),
            ca_name,
            application: application.to_string(),
            transport,
            started: Instant::now(),
            client: Mutex::new(client),
            path_changes: AtomicU64::new(0),
            evaluations: AtomicU64::new(1),
            streams_active: AtomicU64::new(0),
            evaluated_client: Mutex::new(client),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            reevaluate: tokio::sync::Notify::new(),
            close: Mutex::new(None),
            close_requested: tokio::sync::Notify::new(),
        });
        idx.sessions.insert(id, entry.clone());
        index_insert(
            &mut idx.by_issuer_serial,
            (
                identity.issuer_raw_sha256.clone(),
                identity.serial_hex.clone(),
            ),
            id,
        );
        index_insert(&mut idx.by_cert, identity.cert_sha256.clone(), id);
        index_insert(&mut idx.by_spki, identity.spki_sha256.clone(), id);
        index_insert(&mut idx.by_device, identity.device_id.clone(), id);
        index_insert(&mut idx.by_application, application.to_string(), id);
        Ok(SessionGuard {
            registry: self.clone(),
            entry,
        })
    }

    fn remove(&self, entry: &SessionEntry) {
        let mut idx = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        let id = entry.id;
        let identity = &entry.identity;
        idx.sessions.remove(&id);
        index_remove(
            &mut idx.by_issuer_serial,
            &(
                identity.issuer_raw_sha256.clone(),
                identity.serial_hex.clone(),
            ),
            id,
        );
        index_remove(&mut idx.by_cert, &identity.cert_sha256, id);
        index_remove(&mut idx.by_spki, &identity.spki_sha256, id);
        index_remove(&mut idx.by_device, &identity.device_id, id);
        index_remove(&mut idx.by_application, &entry.application, id);
    }

    /// Returns whether a live session uses the certificate with this issuer (SHA-256
    /// of its raw Name, in hex) and serial number (hex).
    pub fn has_certificate(&self, issuer_sha256: &str, serial_hex: &str) -> bool {
        let idx = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        idx.by_issuer_serial
            .get(&(issuer_sha256.to_owned(), serial_hex.to_owned()))
            .is_some_and(|ids| !ids.is_empty())
    }

    /// The sessions a selector matches.
    pub fn find(&self, selector: &Selector) -> Vec<Arc<SessionEntry>> {
        let idx = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<u64> = match selector {
            Selector::Session(id) => vec![*id],
            Selector::IssuerSerial {
                issuer_sha256,
                serial_hex,
            } => idx
                .by_issuer_serial
                .get(&(issuer_sha256.clone(), serial_hex.clone()))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Selector::CertSha256(h) => idx
                .by_cert
                .get(h)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Selector::SpkiSha256(h) => idx
                .by_spki
                .get(h)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Selector::Device(d) => idx
                .by_device
                .get(d)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Selector::Application(a) => idx
                .by_application
                .get(a)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
        };
        ids.iter()
            .filter_map(|id| idx.sessions.get(id).cloned())
            .collect()
    }

    /// Asks every matching session to close; returns how many were asked.
    pub fn close_matching(&self, selector: &Selector, request: CloseRequest) -> usize {
        let sessions = self.find(selector);
        for s in &sessions {
            s.request_close(request.clone());
        }
        sessions.len()
    }

    /// Every live session.
    pub fn all(&self) -> Vec<Arc<SessionEntry>> {
        let idx = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        idx.sessions.values().cloned().collect()
    }

    pub fn session_count(&self) -> usize {
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sessions
            .len()
    }
}
