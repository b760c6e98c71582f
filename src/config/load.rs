//! Reading and validating a config file into a [`Generation`].

use super::generation::{Application, Generation, Limits, ResetKey, Timeouts};
use super::schema::{RawAccess, RawConfig};
use crate::forward::Upstream;
use crate::identity::{DeviceCa, TrustStore};
use crate::policy::{
    AccessRules, BuiltinPolicy, CachedPolicy, OpaPolicy, OpaSettings, PolicyClient, RegoPolicy,
    ShadowPolicy,
};
use crate::tuning::CongestionController;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Largest `gateway.worker_threads`. It is far above the core count of any
/// machine ztgate targets, so it only catches typing errors.
const MAX_WORKER_THREADS: usize = 1024;

/// Largest `limits.ack_eliciting_threshold`. A sender's congestion window
/// grows only as ACKs arrive, so much larger values stall it.
const MAX_ACK_ELICITING_THRESHOLD: u32 = 64;

/// One problem in a config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted key path, for example `application[1].upstream`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

struct Collector {
    file: PathBuf,
    errors: Vec<ConfigError>,
}

impl Collector {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Loads, validates and builds a generation from `path`. `id` numbers the
/// generation. Errors list every problem found, each with the file and key.
pub fn load_generation(path: &Path, id: u64) -> Result<Generation, ConfigErrors> {
    load_generation_within(path, id, None)
}

/// Loads a generation like [`load_generation`]. When `sandbox` contains the
/// rules in force, it first rejects every path the config names outside
/// them, so a reload fails with the key and the fix, not a permission error.
pub fn load_generation_within(
    path: &Path,
    id: u64,
    sandbox: Option<&crate::sandbox::PathRules>,
) -> Result<Generation, ConfigErrors> {
    let mut c = Collector {
        file: path.to_path_buf(),
        errors: Vec::new(),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            c.push("", format!("cannot read the config file: {e}"));
            return Err(ConfigErrors(c.errors));
        }
    };
    let raw = match parse(&text, &mut c) {
        Some(raw) => raw,
        None => return Err(ConfigErrors(c.errors)),
    };
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let paths = super::paths::config_paths(&raw, &base);
    if let Some(rules) = sandbox {
        for (key, message) in rules.violations(&paths) {
            c.push(key, message);
        }
        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
    }
    let built = build(raw, &base, id, path, paths, &mut c);
    match built {
        Some(generation) if c.errors.is_empty() => Ok(generation),
        _ => Err(ConfigErrors(c.errors)),
    }
}

fn parse(text: &str, c: &mut Collector) -> Option<RawConfig> {
    let table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            c.push("", format!("invalid TOML: {}", e.to_string().trim_end()));
            return None;
        }
    };
    let mut unknown = Vec::new();
    let raw: Result<RawConfig, _> = serde_ignored::deserialize(toml::Value::Table(table), |path| {
        unknown.push(format_path(&path));
    });
    for key in unknown {
        c.push(
            key,
            "unknown key; remove it or correct its spelling (docs/configuration.md lists every key)",
        );
    }
    match raw {
        Ok(raw) => Some(raw),
        Err(e) => {
            c.push(
                "",
                format!("{e}; see docs/configuration.md for the expected type"),
            );
            None
        }
    }
}

fn format_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", format_path(parent)),
        P::Map { parent, key } => {
            let head = format_path(parent);
            if head.is_empty() {
                key.to_string()
            } else {
                format!("{head}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            format_path(parent)
        }
    }
}

pub(super) fn resolve(base: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn read_certs(c: &mut Collector, key: &str, path: &Path) -> Vec<CertificateDer<'static>> {
    let iter = match CertificateDer::pem_file_iter(path) {
        Ok(iter) => iter,
        Err(e) => {
            c.push(key, format!("cannot read {}: {e}", path.display()));
            return Vec::new();
        }
    };
    let mut certs = Vec::new();
    for cert in iter {
        match cert {
            Ok(cert) => certs.push(cert),
            Err(e) => {
                c.push(key, format!("invalid PEM in {}: {e}", path.display()));
                return Vec::new();
            }
        }
    }
    if certs.is_empty() {
        c.push(
            key,
            format!(
                "{} contains no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        );
    }
    certs
}

fn read_key(c: &mut Collector, key: &str, path: &Path) -> Option<PrivateKeyDer<'static>> {
    if let Err(e) = super::secret_file::check_secret_file(path) {
        c.push(key, e);
        return None;
    }
    match PrivateKeyDer::from_pem_file(path) {
        Ok(k) => Some(k),
        Err(e) => {
            c.push(
                key,
                format!("no usable private key in {}: {e}", path.display()),
            );
            None
        }
    }
}

/// Shortest reset key file accepted, in bytes.
const MIN_RESET_KEY_BYTES: usize = 32;

fn read_reset_key(c: &mut Collector, path: &Path) -> Option<ResetKey> {
    const KEY: &str = "gateway.reset_key_file";
    if let Err(e) = super::secret_file::check_secret_file(path) {
        c.push(KEY, e);
        return None;
    }
    let contents = match std::fs::read(path) {
        Ok(contents) => contents,
        Err(e) => {
            c.push(KEY, format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    if contents.len() < MIN_RESET_KEY_BYTES {
        c.push(
            KEY,
            format!(
                "{} holds {} bytes; it needs at least {MIN_RESET_KEY_BYTES} random bytes, such as from `head -c 32 /dev/urandom > {}`",
                path.display(),
                contents.len(),
                path.display()
            ),
        );
        return None;
    }
    Some(ResetKey::derive(&contents))
}

fn parse_listen(c: &mut Collector, key: &str, value: &str) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            c.push(
                key,
                format!("invalid listen address {value:?}; write IP:PORT, with IPv6 in brackets such as [::1]:4433"),
            );
            None
        }
    }
}

fn is_dotted_oid(value: &str) -> bool {
    der::asn1::ObjectIdentifier::new(value).is_ok()
}

fn build(
    raw: RawConfig,
    base: &Path,
    id: u64,
    source: &Path,
    paths: Vec<crate::sandbox::ConfigPath>,
    c: &mut Collector,
) -> Option<Generation> {
    // Listeners.
    let mut listen = Vec::new();
    if raw.gateway.listen.is_empty() && raw.gateway.listen_tls.is_empty() {
        c.push(
            "gateway.listen",
            "no listen address; add at least one, such as \"0.0.0.0:4433\", or a TLS-over-TCP address to gateway.listen_tls",
        );
    }
    for (i, l) in raw.gateway.listen.iter().enumerate() {
        if let Some(addr) = parse_listen(c, &format!("gateway.listen[{i}]"), l) {
            listen.push(addr);
        }
    }
    let mut listen_tls = Vec::new();
    for (i, l) in raw.gateway.listen_tls.iter().enumerate() {
        if let Some(addr) = parse_listen(c, &format!("gateway.listen_tls[{i}]"), l) {
            listen_tls.push(addr);
        }
    }

    // Gateway certificate and key.
    let cert_path = resolve(base, &raw.gateway.certificate);
    let server_chain = read_certs(c, "gateway.certificate", &cert_path);
    let key_path = resolve(base, &raw.gateway.private_key);
    let server_key = read_key(c, "gateway.private_key", &key_path);
    let certified = match (server_chain.is_empty(), server_key) {
        (false, Some(key)) => {
            match rustls::crypto::ring::default_provider()
                .key_provider
                .load_private_key(key)
            {
                Ok(signing) => {
                    let ck = rustls::sign::CertifiedKey::new(server_chain.clone(), signing);
                    match ck.keys_match() {
                        Ok(()) => Some(Arc::new(ck)),
                        Err(e) => {
                            c.push(
                                "gateway.private_key",
                                format!(
                                    "the key does not match the certificate in {}: {e}",
                                    cert_path.display()
                                ),
                            );
                            None
                        }
                    }
                }
                Err(e) => {
                    c.push(
                        "gateway.private_key",
                        format!("unsupported private key in {}: {e}", key_path.display()),
                    );
                    None
                }
            }
        }
        _ => None,
    };

    let reset_key = raw
        .gateway
        .reset_key_file
        .as_ref()
        .and_then(|file| read_reset_key(c, &resolve(base, file)));

    // Timeouts and limits.
    let g = &raw.gateway;
    for (key, value) in [
        ("gateway.handshake_timeout_ms", g.handshake_timeout_ms),
        ("gateway.idle_timeout_secs", g.idle_timeout_secs),
        ("gateway.admission_timeout_ms", g.admission_timeout_ms),
    ] {
        if value == 0 {
            c.push(key, "must be greater than 0");
        }
    }
    if g.keep_alive_secs >= g.idle_timeout_secs {
        c.push(
            "gateway.keep_alive_secs",
            format!(
                "must be shorter than gateway.idle_timeout_secs ({}) or the connection idles out between keep-alives",
                g.idle_timeout_secs
            ),
        );
    }
    let l = &raw.limits;
    for (key, value) in [
        (
            "limits.max_streams_per_connection",
            u64::from(l.max_streams_per_connection),
        ),
        ("limits.max_connections", u64::from(l.max_connections)),
        (
            "limits.max_connections_per_source",
            u64::from(l.max_connections_per_source),
        ),
        (
            "limits.max_connections_per_device",
            u64::from(l.max_connections_per_device),
        ),
        (
            "limits.upstream_connect_timeout_ms",
            l.upstream_connect_timeout_ms,
        ),
        ("limits.copy_buffer_bytes", l.copy_buffer_bytes as u64),
        (
            "limits.max_tracked_sources",
            u64::from(l.max_tracked_sources),
        ),
        (
            "limits.max_upstream_dials_per_application",
            u64::from(l.max_upstream_dials_per_application),
        ),
    ] {
        if value == 0 {
            c.push(key, "must be greater than 0");
        }
    }
    const MAX_WINDOW: u64 = (1 << 62) - 1;
    for (key, value) in [
        ("limits.stream_receive_window", l.stream_receive_window),
        (
            "limits.connection_receive_window",
            l.connection_receive_window,
        ),
        ("limits.send_window", l.send_window),
    ] {
        if !(1024..=MAX_WINDOW).contains(&value) {
            c.push(
                key,
                format!("{value} is out of range; use a byte count from 1024 to 2^62-1"),
            );
        }
    }
    for (rate_key, rate, burst_key, burst) in [
        (
            "limits.handshakes_per_source_per_sec",
            l.handshakes_per_source_per_sec,
            "limits.handshake_burst_per_source",
            l.handshake_burst_per_source,
        ),
        (
            "limits.streams_per_connection_per_sec",
            l.streams_per_connection_per_sec,
            "limits.stream_burst_per_connection",
            l.stream_burst_per_connection,
        ),
    ] {
        if rate > 0 && burst == 0 {
            c.push(
                burst_key,
                format!("must be at least 1 while {rate_key} is {rate}; set it to {rate} or more, or set {rate_key} = 0 to turn the limit off"),
            );
        }
    }
    if l.stream_receive_window > l.connection_receive_window {
        c.push(
            "limits.stream_receive_window",
            "must not exceed limits.connection_receive_window",
        );
    }
    let congestion_controller = match CongestionController::parse(&g.congestion_controller) {
        Ok(controller) => controller,
        Err(message) => {
            c.push("gateway.congestion_controller", message);
            CongestionController::default()
        }
    };
    if g.worker_threads > MAX_WORKER_THREADS {
        c.push(
            "gateway.worker_threads",
            format!(
                "{} is out of range; use 0 (one per CPU core) or a count from 1 to {MAX_WORKER_THREADS}",
                g.worker_threads
            ),
        );
    }
    if let Some(threshold) = l.ack_eliciting_threshold {
        if threshold > MAX_ACK_ELICITING_THRESHOLD {
            c.push(
                "limits.ack_eliciting_threshold",
                format!(
                    "{threshold} is out of range; use a packet count from 0 to {MAX_ACK_ELICITING_THRESHOLD}, or leave it unset to keep the ACK_FREQUENCY extension off"
                ),
            );
        }
    }

    // Identity.
    let hardware_bound_oid = raw.identity.hardware_bound_oid.clone();
    if let Some(oid) = &hardware_bound_oid {
        if !is_dotted_oid(oid) {
            c.push(
                "identity.hardware_bound_oid",
                format!("{oid:?} is not a dotted OID such as \"1.3.6.1.4.1.55555.1.1\""),
            );
        }
    }

    // Device CAs.
    let mut cas = Vec::new();
    let mut ca_names = HashSet::new();
    if raw.device_cas.is_empty() {
        c.push(
            "device_ca",
            "no device CA configured; add a [[device_ca]] table with name and certificates",
        );
    }
    for (i, ca) in raw.device_cas.iter().enumerate() {
        if ca.name.is_empty() {
            c.push(format!("device_ca[{i}].name"), "must not be empty");
        }
        if !ca_names.insert(ca.name.clone()) {
            c.push(
                format!("device_ca[{i}].name"),
                format!("duplicate device CA name {:?}", ca.name),
            );
        }
        if ca.certificates.is_empty() {
            c.push(
                format!("device_ca[{i}].certificates"),
                "list at least one PEM file",
            );
        }
        let mut anchors = Vec::new();
        for (j, f) in ca.certificates.iter().enumerate() {
            anchors.extend(read_certs(
                c,
                &format!("device_ca[{i}].certificates[{j}]"),
                &resolve(base, f),
            ));
        }
        let mut intermediates = Vec::new();
        for (j, f) in ca.intermediates.iter().enumerate() {
            intermediates.extend(read_certs(
                c,
                &format!("device_ca[{i}].intermediates[{j}]"),
                &resolve(base, f),
            ));
        }
        cas.push(DeviceCa {
            name: ca.name.clone(),
            anchors,
            intermediates,
        });
    }
    let trust = if cas.iter().all(|ca| !ca.anchors.is_empty()) && !cas.is_empty() {
        match TrustStore::new(&cas) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                c.push("device_ca", e);
                None
            }
        }
    } else {
        None
    };

    // Policy settings.
    let decision_lifetime = raw
        .policy
        .decision_lifetime_secs
        .unwrap_or_else(super::schema::defaults::decision_lifetime_secs);
    if decision_lifetime == 0 {
        c.push("policy.decision_lifetime_secs", "must be greater than 0");
    }

    // Log settings.
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        c.push(
            "log.level",
            format!("invalid level {:?}; use error, warn, info, debug, trace or a filter such as \"ztgate=debug\"", raw.log.level),
        );
    }
    if raw.log.format != "text" && raw.log.format != "json" {
        c.push(
            "log.format",
            format!(
                "{:?} is not a log format; use \"text\" or \"json\"",
                raw.log.format
            ),
        );
    }

    // Applications.
    let builtin_used = EngineSpec::enforced(&raw.policy).engine == "builtin"
        || raw
            .policy
            .shadow
            .as_ref()
            .is_some_and(|s| s.engine == "builtin");
    let mut applications = HashMap::new();
    let mut names = HashSet::new();
    let mut rules = HashMap::new();
    let connect_timeout = Duration::from_millis(l.upstream_connect_timeout_ms);
    for (i, app) in raw.applications.iter().enumerate() {
        let key = |field: &str| format!("application[{i}].{field}");
        if app.name.is_empty() {
            c.push(key("name"), "must not be empty");
        }
        if !names.insert(app.name.clone()) {
            c.push(
                key("name"),
                format!("duplicate application name {:?}", app.name),
            );
        }
        let server_name = app.server_name.trim_end_matches('.').to_ascii_lowercase();
        match ServerName::try_from(server_name.as_str()) {
            Ok(ServerName::DnsName(_)) => {
                if let Some(ck) = &certified {
                    if !certificate_covers(&ck.cert[0], &server_name) {
                        c.push(
                            key("server_name"),
                            format!(
                                "{server_name:?} is not covered by the gateway certificate {}; add it (or a wildcard such as *.apps.example.com) to the certificate's subjectAltName",
                                cert_path.display()
                            ),
                        );
                    }
                }
            }
            _ => c.push(
                key("server_name"),
                format!(
                    "{:?} is not a DNS name; clients select applications by TLS server name",
                    app.server_name
                ),
            ),
        }
        if applications.contains_key(&server_name) {
            c.push(
                key("server_name"),
                format!("{server_name:?} is used by another application"),
            );
        }
        let upstream = match Upstream::parse(&app.upstream, connect_timeout) {
            Ok(u) => Some(Arc::new(u)),
            Err(e) => {
                c.push(key("upstream"), e);
                None
            }
        };
        if builtin_used {
            check_access(c, i, &app.access, &ca_names);
        }
        let tls_alpn = check_tls_alpn(c, i, &app.tls_alpn);
        if let Some(upstream) = upstream {
            let admit_on_policy_failure = match app.on_policy_failure.as_deref() {
                None | Some("refuse") => false,
                Some("admit") => true,
                Some(other) => {
                    c.push(
                        key("on_policy_failure"),
                        format!("{other:?} is not \"refuse\" or \"admit\""),
                    );
                    false
                }
            };
            let ocsp = app_ocsp_mode(c, i, app);
            let application = Arc::new(Application {
                name: app.name.clone(),
                server_name: server_name.clone(),
                upstream,
                labels: app.labels.clone(),
                admit_on_policy_failure,
                ocsp,
                tls_alpn,
            });
            rules.insert(app.name.clone(), AccessRules::from_raw(&app.access));
            applications.insert(server_name, application);
        }
    }
    if raw.applications.is_empty() {
        c.push(
            "application",
            "no application configured; add an [[application]] table",
        );
    }

    if !c.errors.is_empty() {
        return None;
    }
    let lifetime = Duration::from_secs(decision_lifetime);
    let enforced = build_engine(
        c,
        base,
        &EngineSpec::enforced(&raw.policy),
        &rules,
        lifetime,
    )?;
    let engine: Arc<dyn crate::policy::PolicyClient> = match &raw.policy.shadow {
        Some(shadow) => {
            let candidate = build_engine(c, base, &EngineSpec::shadow(shadow), &rules, lifetime)?;
            Arc::new(ShadowPolicy::new(enforced, candidate))
        }
        None => enforced,
    };
    let cache_size = raw
        .policy
        .cache_size
        .unwrap_or_else(super::schema::defaults::cache_size);
    let policy = Arc::new(CachedPolicy::new(engine, cache_size));
    Some(Generation {
        id,
        source: source.to_path_buf(),
        listen,
        listen_tls,
        certified_key: certified?,
        trust: trust?,
        applications,
        policy,
        hardware_bound_oid,
        udp_buffers: crate::ingress::udp::UdpBuffers {
            receive: g.udp_receive_buffer_bytes,
            send: g.udp_send_buffer_bytes,
        },
        quic: crate::tuning::QuicTuning {
            congestion_controller,
            gso: g.gso,
            stream_receive_window: l.stream_receive_window,
            receive_window: l.connection_receive_window,
            send_window: l.send_window,
            ack_eliciting_threshold: l.ack_eliciting_threshold,
        },
        worker_threads: g.worker_threads,
        reset_key,
        min_reset_interval: Duration::from_millis(g.min_reset_interval_ms),
        timeouts: Timeouts {
            handshake: Duration::from_millis(g.handshake_timeout_ms),
            idle: Duration::from_secs(g.idle_timeout_secs),
            keep_alive: Duration::from_secs(g.keep_alive_secs),
            admission: Duration::from_millis(g.admission_timeout_ms),
            drain: Duration::from_secs(g.drain_secs),
            max_session: (raw.policy.max_session_secs > 0)
                .then(|| Duration::from_secs(raw.policy.max_session_secs)),
            policy_failure_grace: Duration::from_secs(
                raw.policy
                    .failure_grace_secs
                    .unwrap_or_else(super::schema::defaults::failure_grace_secs),
            ),
        },
        limits: Limits {
            max_streams_per_connection: l.max_streams_per_connection,
            max_connections: l.max_connections,
            max_connections_per_source: l.max_connections_per_source,
            max_connections_per_device: l.max_connections_per_device,
            copy_buffer_bytes: l.copy_buffer_bytes,
            retry_pending_handshakes: u64::from(l.retry_pending_handshakes),
            handshake_rate: crate::ingress::RateLimit::new(
                l.handshakes_per_source_per_sec,
                l.handshake_burst_per_source,
            ),
            max_tracked_sources: l.max_tracked_sources as usize,
            stream_rate: crate::ingress::RateLimit::new(
                l.streams_per_connection_per_sec,
                l.stream_burst_per_connection,
            ),
            max_rate_limited_streams_per_connection: u64::from(
                l.max_rate_limited_streams_per_connection,
            ),
            max_upstream_dials_per_application: l.max_upstream_dials_per_application,
            upstream_dial_wait: Duration::from_millis(l.upstream_dial_wait_ms),
        },
        log_level: raw.log.level.clone(),
        log_format: raw.log.format.clone(),
        ocsp: ocsp_settings(c, &raw.ocsp)?,
        ocsp_refresh_margin: Duration::from_secs(raw.ocsp.refresh_margin_secs.unwrap_or(60)),
        admin: admin_settings(c, base, &raw.admin)?,
        metrics_listen: match raw.metrics.listen.as_deref() {
            None => None,
            Some(value) => match value.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    c.push(
                        "metrics.listen",
                        format!("{value:?} is not an IP:PORT such as \"127.0.0.1:9190\""),
                    );
                    return None;
                }
            },
        },
        state_dir: raw.gateway.state_dir.as_deref().map(|d| resolve(base, d)),
        watched_files: {
            let mut files = vec![source.to_path_buf()];
            let engines = std::iter::once((&raw.policy.rego_files, &raw.policy.data_file)).chain(
                raw.policy
                    .shadow
                    .iter()
                    .map(|s| (&s.rego_files, &s.data_file)),
            );
            for (rego_files, data_file) in engines {
                files.extend(rego_files.iter().map(|f| resolve(base, f)));
                files.extend(data_file.iter().map(|f| resolve(base, f)));
            }
            files
        },
        revocation: revocation_configs(c, base, &raw.device_cas, &cas)?,
        sandbox: sandbox_settings(c, base, &raw.sandbox)?,
        paths,
        audit: match raw.log.audit.as_str() {
            "stderr" => crate::telemetry::AuditSink::Stderr,
            "off" => crate::telemetry::AuditSink::Off,
            path => crate::telemetry::AuditSink::File(resolve(base, path)),
        },
    })
}

fn certificate_covers(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// Validates an application's TLS-over-TCP ALPN list and returns it as bytes.
fn check_tls_alpn(c: &mut Collector, i: usize, protocols: &[String]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (j, protocol) in protocols.iter().enumerate() {
        let key = format!("application[{i}].tls_alpn[{j}]");
        if protocol.as_bytes() == crate::protocol::ALPN {
            c.push(
                key,
                "ztgate/1 is the QUIC ingress protocol and is not spoken over TLS over TCP; list the application's own protocols, such as \"http/1.1\"",
            );
        } else if protocol.is_empty() || protocol.len() > 255 {
            c.push(key, "an ALPN protocol name must be 1 to 255 bytes long");
        } else if out.iter().any(|p: &Vec<u8>| p == protocol.as_bytes()) {
            c.push(key, format!("{protocol:?} is listed twice"));
        } else {
            out.push(protocol.as_bytes().to_vec());
        }
    }
    out
}

fn check_access(c: &mut Collector, i: usize, access: &RawAccess, ca_names: &HashSet<String>) {
    let key = |field: &str| format!("application[{i}].access.{field}");
    if access.device_cas.is_empty() {
        c.push(
            key("device_cas"),
            "list the device CAs whose devices may reach this application",
        );
    }
    for (j, name) in access.device_cas.iter().enumerate() {
        if !ca_names.contains(name) {
            c.push(
                format!("application[{i}].access.device_cas[{j}]"),
                format!("no [[device_ca]] is named {name:?}"),
            );
        }
    }
    for (j, prefix) in access.spiffe_prefixes.iter().enumerate() {
        if let Err(e) = crate::identity::device::validate_spiffe_id(prefix) {
            c.push(
                format!("application[{i}].access.spiffe_prefixes[{j}]"),
                format!("{prefix:?} is not a valid SPIFFE ID prefix: {e}"),
            );
        }
    }
    for (j, pid) in access.permanent_identifiers.iter().enumerate() {
        if !is_dotted_oid(&pid.assigner) {
            c.push(
                format!("application[{i}].access.permanent_identifiers[{j}].assigner"),
                format!("{:?} is not a dotted OID", pid.assigner),
            );
        }
    }
    let has_identifiers =
        !access.spiffe_prefixes.is_empty() || !access.permanent_identifiers.is_empty();
    if !has_identifiers && !access.allow_any_device {
        c.push(
            format!("application[{i}].access"),
            "no device can match: list spiffe_prefixes or permanent_identifiers, or set allow_any_device = true",
        );
    }
    if has_identifiers && access.allow_any_device {
        c.push(
            format!("application[{i}].access.allow_any_device"),
            "cannot be combined with spiffe_prefixes or permanent_identifiers; choose one",
        );
    }
}

/// One engine's settings, from `[policy]` or `[policy.shadow]`.
struct EngineSpec<'a> {
    prefix: &'static str,
    engine: String,
    rego_files: &'a [String],
    data_file: Option<&'a str>,
    rule: Option<&'a str>,
    opa_url: Option<&'a str>,
    opa_path: Option<&'a str>,
    opa_timeout_ms: Option<u64>,
    opa_retries: Option<u32>,
    opa_retry_backoff_ms: Option<u64>,
    opa_circuit_failures: Option<u32>,
    opa_circuit_open_secs: Option<u64>,
}

macro_rules! engine_spec {
    ($prefix:expr, $engine:expr, $raw:expr) => {
        EngineSpec {
            prefix: $prefix,
            engine: $engine,
            rego_files: &$raw.rego_files,
            data_file: $raw.data_file.as_deref(),
            rule: $raw.rule.as_deref(),
            opa_url: $raw.opa_url.as_deref(),
            opa_path: $raw.opa_path.as_deref(),
            opa_timeout_ms: $raw.opa_timeout_ms,
            opa_retries: $raw.opa_retries,
            opa_retry_backoff_ms: $raw.opa_retry_backoff_ms,
            opa_circuit_failures: $raw.opa_circuit_failures,
            opa_circuit_open_secs: $raw.opa_circuit_open_secs,
        }
    };
}

impl<'a> EngineSpec<'a> {
    fn enforced(raw: &'a super::schema::RawPolicy) -> EngineSpec<'a> {
        let engine = raw.engine.clone().unwrap_or_else(|| {
            if raw.rego_files.is_empty() {
                "builtin".into()
            } else {
                "rego".into()
            }
        });
        engine_spec!("policy", engine, raw)
    }

    fn shadow(raw: &'a super::schema::RawShadow) -> EngineSpec<'a> {
        engine_spec!("policy.shadow", raw.engine.clone(), raw)
    }
}

fn build_engine(
    c: &mut Collector,
    base: &Path,
    spec: &EngineSpec<'_>,
    rules: &HashMap<String, AccessRules>,
    lifetime: Duration,
) -> Option<Arc<dyn PolicyClient>> {
    let key = |field: &str| format!("{}.{field}", spec.prefix);
    let rego_only = !spec.rego_files.is_empty() || spec.data_file.is_some();
    let opa_only = spec.opa_url.is_some() || spec.opa_path.is_some();
    match spec.engine.as_str() {
        "builtin" => {
            if rego_only || opa_only {
                c.push(
                    key("engine"),
                    "the builtin engine takes no rego_* or opa_* keys; set engine = \"rego\" or \"opa\", or remove them",
                );
                return None;
            }
            Some(Arc::new(BuiltinPolicy::new(rules.clone(), lifetime)))
        }
        "rego" => {
            if spec.rego_files.is_empty() {
                c.push(
                    key("rego_files"),
                    "list at least one .rego file for the rego engine",
                );
                return None;
            }
            let files: Vec<PathBuf> = spec.rego_files.iter().map(|f| resolve(base, f)).collect();
            let data = spec.data_file.map(|f| resolve(base, f));
            let rule = spec
                .rule
                .map(str::to_string)
                .unwrap_or_else(super::schema::defaults::rule);
            match RegoPolicy::load(&files, data.as_deref(), &rule, lifetime) {
                Ok(policy) => Some(Arc::new(policy)),
                Err(e) => {
                    c.push(key("rego_files"), e);
                    None
                }
            }
        }
        "opa" => {
            let Some(url) = spec.opa_url else {
                c.push(
                    key("opa_url"),
                    "the opa engine needs opa_url, such as \"http://127.0.0.1:8181\"",
                );
                return None;
            };
            let settings = OpaSettings {
                url: url.to_string(),
                path: spec
                    .opa_path
                    .map(str::to_string)
                    .unwrap_or_else(super::schema::defaults::opa_path),
                timeout: Duration::from_millis(spec.opa_timeout_ms.unwrap_or(500).max(1)),
                retries: spec.opa_retries.unwrap_or(1),
                retry_backoff: Duration::from_millis(spec.opa_retry_backoff_ms.unwrap_or(50)),
                circuit_failures: spec.opa_circuit_failures.unwrap_or(5).max(1),
                circuit_open: Duration::from_secs(spec.opa_circuit_open_secs.unwrap_or(10)),
                default_lifetime: lifetime,
            };
            match OpaPolicy::new(settings) {
                Ok(policy) => Some(Arc::new(policy)),
                Err(e) => {
                    c.push(key("opa_url"), e);
                    None
                }
            }
        }
        other => {
            c.push(
                key("engine"),
                format!("unknown engine {other:?}; use \"builtin\", \"rego\" or \"opa\""),
            );
            None
        }
    }
}

fn app_ocsp_mode(
    c: &mut Collector,
    i: usize,
    app: &super::schema::RawApplication,
) -> crate::identity::ocsp::OcspMode {
    use crate::identity::ocsp::{OcspMode, SoftFailWithoutAnswer};
    let key = |field: &str| format!("application[{i}].{field}");
    let without_answer = match app.ocsp_without_answer.as_deref() {
        None | Some("admit") => SoftFailWithoutAnswer::Admit,
        Some("refuse") => SoftFailWithoutAnswer::Refuse,
        Some(other) => {
            c.push(
                key("ocsp_without_answer"),
                format!("{other:?} is not \"admit\" or \"refuse\""),
            );
            SoftFailWithoutAnswer::Admit
        }
    };
    match app.ocsp.as_deref() {
        None | Some("off") => OcspMode::Off,
        Some("hard-fail") => OcspMode::HardFail,
        Some("soft-fail") => OcspMode::SoftFail {
            max_staleness: Duration::from_secs(app.ocsp_max_staleness_secs.unwrap_or(24 * 3600)),
            without_answer,
        },
        Some(other) => {
            c.push(
                key("ocsp"),
                format!(
                    "{other:?} is not an OCSP mode; use \"off\", \"soft-fail\" or \"hard-fail\""
                ),
            );
            OcspMode::Off
        }
    }
}

fn ocsp_settings(
    c: &mut Collector,
    raw: &super::schema::RawOcsp,
) -> Option<crate::identity::ocsp::OcspSettings> {
    use crate::identity::ocsp::{CertIdHash, OcspSettings};
    let mut settings = OcspSettings::default();
    if let Some(url) = &raw.responder_url {
        if !url.starts_with("http://") {
            c.push(
                "ocsp.responder_url",
                format!("{url:?} must be an http:// URL"),
            );
            return None;
        }
        settings.responder_url = Some(url.clone());
    }
    match raw.cert_id_hash.as_deref() {
        None | Some("sha1") => settings.cert_id_hash = CertIdHash::Sha1,
        Some("sha256") => settings.cert_id_hash = CertIdHash::Sha256,
        Some(other) => {
            c.push(
                "ocsp.cert_id_hash",
                format!("{other:?} is not \"sha1\" or \"sha256\""),
            );
            return None;
        }
    }
    if let Some(v) = raw.use_get {
        settings.use_get = v;
    }
    if let Some(v) = raw.send_nonce {
        settings.send_nonce = v;
    }
    if let Some(v) = raw.require_nonce {
        settings.require_nonce = v;
    }
    if settings.require_nonce && !settings.send_nonce {
        c.push("ocsp.require_nonce", "needs send_nonce = true");
        return None;
    }
    if let Some(v) = raw.timeout_ms {
        settings.timeout = Duration::from_millis(v.max(1));
    }
    if let Some(v) = raw.max_response_bytes {
        settings.max_response_bytes = v;
    }
    if let Some(v) = raw.clock_skew_secs {
        settings.clock_skew = Duration::from_secs(v);
    }
    if let Some(v) = raw.default_lifetime_secs {
        settings.default_lifetime = Duration::from_secs(v.max(1));
    }
    if let Some(v) = raw.cache_size {
        settings.cache_capacity = v.max(1);
    }
    Some(settings)
}

fn admin_settings(
    c: &mut Collector,
    base: &Path,
    raw: &super::schema::RawAdmin,
) -> Option<crate::admin::AdminSettings> {
    let mut settings = crate::admin::AdminSettings {
        socket_path: raw.socket_path.as_deref().map(|p| resolve(base, p)),
        socket_group: raw.socket_group.clone(),
        token_file: raw.token_file.as_deref().map(|p| resolve(base, p)),
        ..Default::default()
    };
    if let Some(file) = &settings.token_file {
        if let Err(e) = super::secret_file::check_secret_file(file) {
            c.push("admin.token_file", e);
            return None;
        }
    }
    if let Some(addr) = &raw.tcp_address {
        match addr.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => settings.tcp_address = Some(a),
            _ => {
                c.push(
                    "admin.tcp_address",
                    format!("{addr:?} must be a loopback IP:PORT such as \"127.0.0.1:9180\"; the admin API never listens on other addresses"),
                );
                return None;
            }
        }
        if settings.token_file.is_none() {
            c.push(
                "admin.token_file",
                "required with admin.tcp_address: a file holding the bearer token, mode 0600",
            );
            return None;
        }
    }
    Some(settings)
}

fn sandbox_settings(
    c: &mut Collector,
    base: &Path,
    raw: &super::schema::RawSandbox,
) -> Option<crate::sandbox::SandboxSettings> {
    use crate::sandbox::LandlockMode;
    let errors_before = c.errors.len();
    let landlock = match raw.landlock.as_deref() {
        None => LandlockMode::Auto,
        Some(value) => LandlockMode::parse(value).unwrap_or_else(|| {
            c.push(
                "sandbox.landlock",
                format!("{value:?} is not \"auto\", \"required\" or \"off\""),
            );
            LandlockMode::Auto
        }),
    };
    let mut lists = [
        ("extra_read_paths", &raw.extra_read_paths, Vec::new()),
        ("extra_write_paths", &raw.extra_write_paths, Vec::new()),
    ];
    for (field, values, out) in &mut lists {
        for (j, value) in values.iter().enumerate() {
            let path = resolve(base, value);
            if !path.exists() {
                c.push(
                    format!("sandbox.{field}[{j}]"),
                    format!(
                        "{} does not exist; create it or remove it from the list, because the sandbox can only allow paths that exist when the gateway starts",
                        path.display()
                    ),
                );
            }
            out.push(path);
        }
    }
    let [(_, _, extra_read_paths), (_, _, extra_write_paths)] = lists;
    (c.errors.len() == errors_before).then_some(crate::sandbox::SandboxSettings {
        landlock,
        extra_read_paths,
        extra_write_paths,
    })
}

fn revocation_configs(
    c: &mut Collector,
    base: &Path,
    raw: &[super::schema::RawDeviceCa],
    cas: &[DeviceCa],
) -> Option<Vec<crate::identity::revocation::CaRevocationConfig>> {
    use crate::identity::revocation::{
        CaRevocationConfig, Depth, NoCrlPolicy, RevocationSettings, StalePolicy,
    };
    let mut out = Vec::new();
    let errors_before = c.errors.len();
    for (i, (raw, ca)) in raw.iter().zip(cas).enumerate() {
        let key = |field: &str| format!("device_ca[{i}].{field}");
        let mut settings = RevocationSettings::default();
        let has_sources = !raw.crl_files.is_empty() || !raw.crl_urls.is_empty();
        settings.depth = match raw.revocation_depth.as_deref() {
            None | Some("end-entity") => Depth::EndEntity,
            Some("chain") => Depth::Chain,
            Some(other) => {
                c.push(
                    key("revocation_depth"),
                    format!("{other:?} is not \"end-entity\" or \"chain\""),
                );
                Depth::EndEntity
            }
        };
        settings.on_stale = match raw.on_stale.as_deref() {
            None | Some("refuse") => StalePolicy::Refuse,
            Some("admit") => StalePolicy::Admit,
            Some(other) => {
                c.push(
                    key("on_stale"),
                    format!("{other:?} is not \"refuse\" or \"admit\""),
                );
                StalePolicy::Refuse
            }
        };
        settings.without_crl = match raw.without_crl.as_deref() {
            None if has_sources => NoCrlPolicy::Refuse,
            None => NoCrlPolicy::Admit,
            Some("refuse") => NoCrlPolicy::Refuse,
            Some("admit") => NoCrlPolicy::Admit,
            Some(other) => {
                c.push(
                    key("without_crl"),
                    format!("{other:?} is not \"refuse\" or \"admit\""),
                );
                NoCrlPolicy::Refuse
            }
        };
        if let Some(v) = raw.stale_grace_secs {
            settings.stale_grace = Duration::from_secs(v);
        }
        if let Some(v) = raw.stale_closes_sessions {
            settings.stale_closes_sessions = v;
        }
        if let Some(v) = raw.crl_refresh_interval_secs {
            settings.refresh_interval = Duration::from_secs(v.max(1));
        }
        if let Some(v) = raw.crl_fetch_timeout_ms {
            settings.fetch_timeout = Duration::from_millis(v.max(1));
        }
        if let Some(v) = raw.max_crl_bytes {
            settings.max_crl_bytes = v;
        }
        if let Some(v) = raw.clock_skew_secs {
            settings.clock_skew = Duration::from_secs(v);
        }
        if let Some(v) = raw.learn_distribution_points {
            settings.learn_distribution_points = v;
        }
        for (j, url) in raw.crl_urls.iter().enumerate() {
            if let Err(e) = crate::identity::http_fetch::check_url(url) {
                c.push(format!("device_ca[{i}].crl_urls[{j}]"), e.to_string());
            }
        }
        out.push(CaRevocationConfig {
            name: ca.name.clone(),
            anchors: ca.anchors.clone(),
            intermediates: ca.intermediates.clone(),
            crl_files: raw.crl_files.iter().map(|f| resolve(base, f)).collect(),
            crl_urls: raw.crl_urls.clone(),
            settings,
        });
    }
    (c.errors.len() == errors_before).then_some(out)
}
