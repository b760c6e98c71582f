//! The TOML schema. Every field has a default where a safe one exists; the
//! meaning, unit and default of each key is listed in docs/configuration.md.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    pub gateway: RawGateway,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub ocsp: RawOcsp,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub sandbox: RawSandbox,
    #[serde(default, rename = "device_ca")]
    pub device_cas: Vec<RawDeviceCa>,
    #[serde(default, rename = "application")]
    pub applications: Vec<RawApplication>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawGateway {
    /// QUIC listen addresses, `host:port`; IPv6 in brackets.
    #[serde(default)]
    pub listen: Vec<String>,
    /// TLS-over-TCP listen addresses, for networks that block UDP.
    #[serde(default)]
    pub listen_tls: Vec<String>,
    /// PEM file with the gateway's certificate chain, leaf first.
    pub certificate: String,
    /// PEM file with the gateway's private key; must not be readable by group or others.
    pub private_key: String,
    #[serde(default = "defaults::handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    #[serde(default = "defaults::idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    #[serde(default = "defaults::keep_alive_secs")]
    pub keep_alive_secs: u64,
    #[serde(default = "defaults::admission_timeout_ms")]
    pub admission_timeout_ms: u64,
    #[serde(default = "defaults::drain_secs")]
    pub drain_secs: u64,
    #[serde(default = "defaults::udp_buffer")]
    pub udp_receive_buffer_bytes: usize,
    #[serde(default = "defaults::udp_buffer")]
    pub udp_send_buffer_bytes: usize,
    /// Directory for state that must survive a restart (pushed revocations).
    #[serde(default)]
    pub state_dir: Option<String>,
    /// Secret file from which the stateless reset key is derived; must not be
    /// readable by group or others. Without it each start uses a random key.
    #[serde(default)]
    pub reset_key_file: Option<String>,
    #[serde(default = "defaults::min_reset_interval_ms")]
    pub min_reset_interval_ms: u64,
    /// QUIC congestion controller: "cubic", "newreno" or "bbr".
    #[serde(default = "defaults::congestion_controller")]
    pub congestion_controller: String,
    /// Generic segmentation offload on the QUIC sockets.
    #[serde(default = "defaults::gso")]
    pub gso: bool,
    /// Tokio worker threads; 0 for one per CPU core. Read at start only.
    #[serde(default)]
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawLimits {
    #[serde(default = "defaults::max_streams")]
    pub max_streams_per_connection: u32,
    #[serde(default = "defaults::stream_window")]
    pub stream_receive_window: u64,
    #[serde(default = "defaults::connection_window")]
    pub connection_receive_window: u64,
    #[serde(default = "defaults::send_window")]
    pub send_window: u64,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    #[serde(default = "defaults::max_per_source")]
    pub max_connections_per_source: u32,
    #[serde(default = "defaults::max_per_device")]
    pub max_connections_per_device: u32,
    #[serde(default = "defaults::upstream_connect_timeout_ms")]
    pub upstream_connect_timeout_ms: u64,
    #[serde(default = "defaults::copy_buffer")]
    pub copy_buffer_bytes: usize,
    /// Ack-eliciting packets a peer may receive before it must acknowledge,
    /// requested with the QUIC ACK_FREQUENCY extension; unset leaves it off.
    #[serde(default)]
    pub ack_eliciting_threshold: Option<u32>,

    // Load shedding: QUIC Retry, handshake and stream rates, upstream dials.
    /// Pending QUIC handshakes from which unvalidated clients get a Retry;
    /// 0 sends a Retry to every unvalidated client.
    #[serde(default = "defaults::retry_pending_handshakes")]
    pub retry_pending_handshakes: u32,
    /// New handshakes per second per source address; 0 turns the limit off.
    #[serde(default = "defaults::handshakes_per_source_per_sec")]
    pub handshakes_per_source_per_sec: u32,
    #[serde(default = "defaults::handshake_burst_per_source")]
    pub handshake_burst_per_source: u32,
    /// Source addresses the handshake rate limit tracks at most.
    #[serde(default = "defaults::max_tracked_sources")]
    pub max_tracked_sources: u32,
    /// New streams per second per QUIC connection; 0 turns the limit off.
    #[serde(default = "defaults::streams_per_connection_per_sec")]
    pub streams_per_connection_per_sec: u32,
    #[serde(default = "defaults::stream_burst_per_connection")]
    pub stream_burst_per_connection: u32,
    /// Rate-limited streams after which the connection is closed; 0 never closes.
    #[serde(default = "defaults::max_rate_limited_streams_per_connection")]
    pub max_rate_limited_streams_per_connection: u32,
    #[serde(default = "defaults::max_upstream_dials_per_application")]
    pub max_upstream_dials_per_application: u32,
    /// How long a stream waits for a free upstream dial slot.
    #[serde(default = "defaults::upstream_dial_wait_ms")]
    pub upstream_dial_wait_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_streams_per_connection: defaults::max_streams(),
            stream_receive_window: defaults::stream_window(),
            connection_receive_window: defaults::connection_window(),
            send_window: defaults::send_window(),
            max_connections: defaults::max_connections(),
            max_connections_per_source: defaults::max_per_source(),
            max_connections_per_device: defaults::max_per_device(),
            upstream_connect_timeout_ms: defaults::upstream_connect_timeout_ms(),
            copy_buffer_bytes: defaults::copy_buffer(),
            ack_eliciting_threshold: None,
            retry_pending_handshakes: defaults::retry_pending_handshakes(),
            handshakes_per_source_per_sec: defaults::handshakes_per_source_per_sec(),
            handshake_burst_per_source: defaults::handshake_burst_per_source(),
            max_tracked_sources: defaults::max_tracked_sources(),
            streams_per_connection_per_sec: defaults::streams_per_connection_per_sec(),
            stream_burst_per_connection: defaults::stream_burst_per_connection(),
            max_rate_limited_streams_per_connection:
                defaults::max_rate_limited_streams_per_connection(),
            max_upstream_dials_per_application: defaults::max_upstream_dials_per_application(),
            upstream_dial_wait_ms: defaults::upstream_dial_wait_ms(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawIdentity {
    /// OID of a non-critical extension whose presence marks a hardware-bound key.
    pub hardware_bound_oid: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawPolicy {
    /// "builtin", "rego" or "opa"; without it, "rego" when `rego_files` is
    /// set and "builtin" otherwise.
    #[serde(default)]
    pub engine: Option<String>,
    /// Lifetime of an allow decision that sets no `lifetime_secs` of its own.
    #[serde(default)]
    pub decision_lifetime_secs: Option<u64>,
    /// Maximum session length in seconds, whatever the decisions; 0 for no limit.
    #[serde(default)]
    pub max_session_secs: u64,
    /// Decisions kept in the cache; 0 turns the cache off.
    #[serde(default)]
    pub cache_size: Option<usize>,
    /// How long a live session keeps an expired allow while the engine fails.
    #[serde(default)]
    pub failure_grace_secs: Option<u64>,
    #[serde(default)]
    pub rego_files: Vec<String>,
    #[serde(default)]
    pub data_file: Option<String>,
    /// The rule whose value is the decision document.
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub opa_url: Option<String>,
    /// Data path under `/v1/data/`.
    #[serde(default)]
    pub opa_path: Option<String>,
    #[serde(default)]
    pub opa_timeout_ms: Option<u64>,
    #[serde(default)]
    pub opa_retries: Option<u32>,
    #[serde(default)]
    pub opa_retry_backoff_ms: Option<u64>,
    #[serde(default)]
    pub opa_circuit_failures: Option<u32>,
    #[serde(default)]
    pub opa_circuit_open_secs: Option<u64>,
    /// A candidate policy evaluated beside the enforced one, never enforced.
    #[serde(default)]
    pub shadow: Option<RawShadow>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawShadow {
    pub engine: String,
    #[serde(default)]
    pub rego_files: Vec<String>,
    #[serde(default)]
    pub data_file: Option<String>,
    /// The rule whose value is the decision document.
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub opa_url: Option<String>,
    /// Data path under `/v1/data/`.
    #[serde(default)]
    pub opa_path: Option<String>,
    #[serde(default)]
    pub opa_timeout_ms: Option<u64>,
    #[serde(default)]
    pub opa_retries: Option<u32>,
    #[serde(default)]
    pub opa_retry_backoff_ms: Option<u64>,
    #[serde(default)]
    pub opa_circuit_failures: Option<u32>,
    #[serde(default)]
    pub opa_circuit_open_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawLog {
    #[serde(default = "defaults::log_level")]
    pub level: String,
    #[serde(default = "defaults::log_format")]
    pub format: String,
    /// Audit log destination: "stderr", "off" or a file path.
    #[serde(default = "defaults::audit")]
    pub audit: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: defaults::log_level(),
            format: defaults::log_format(),
            audit: defaults::audit(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawDeviceCa {
    pub name: String,
    /// PEM files whose certificates are trust anchors for device certificates.
    pub certificates: Vec<String>,
    /// PEM files with intermediates the gateway adds to what clients send.
    #[serde(default)]
    pub intermediates: Vec<String>,
    /// CRL files (PEM or DER) of this CA.
    #[serde(default)]
    pub crl_files: Vec<String>,
    /// CRL URLs (http:// only) of this CA.
    #[serde(default)]
    pub crl_urls: Vec<String>,
    /// Also fetch the CRL distribution points named in verified device certificates.
    #[serde(default)]
    pub learn_distribution_points: Option<bool>,
    /// "end-entity" (the default) or "chain".
    #[serde(default)]
    pub revocation_depth: Option<String>,
    /// "refuse" (the default) or "admit" new connections when the CRL is
    /// past nextUpdate beyond `stale_grace_secs`.
    #[serde(default)]
    pub on_stale: Option<String>,
    #[serde(default)]
    pub stale_grace_secs: Option<u64>,
    /// Close live sessions too when the CRL goes stale (with on_stale = "refuse").
    #[serde(default)]
    pub stale_closes_sessions: Option<bool>,
    /// "admit" or "refuse" devices while no CRL of the CA is loaded. The
    /// default is "refuse" when the CA has CRL sources and "admit" when it has none.
    #[serde(default)]
    pub without_crl: Option<String>,
    #[serde(default)]
    pub crl_refresh_interval_secs: Option<u64>,
    #[serde(default)]
    pub crl_fetch_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_crl_bytes: Option<u64>,
    #[serde(default)]
    pub clock_skew_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawApplication {
    pub name: String,
    /// TLS server name (SNI) that selects this application.
    pub server_name: String,
    /// The one upstream, `host:port`.
    pub upstream: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// ALPN protocols offered on the TLS-over-TCP ingress for this application.
    #[serde(default)]
    pub tls_alpn: Vec<String>,
    #[serde(default)]
    pub access: RawAccess,
    /// "refuse" (the default) or "admit" new connections when the policy
    /// engine fails.
    #[serde(default)]
    pub on_policy_failure: Option<String>,
    /// OCSP checking of this application's devices: "off" (the default),
    /// "soft-fail" or "hard-fail".
    #[serde(default)]
    pub ocsp: Option<String>,
    /// Soft-fail: maximum age of a cached good OCSP response that still admits.
    #[serde(default)]
    pub ocsp_max_staleness_secs: Option<u64>,
    /// Soft-fail: "admit" (the default) or "refuse" when no response was ever cached.
    #[serde(default)]
    pub ocsp_without_answer: Option<String>,
}

/// Settings of the OCSP client, shared by every application.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawOcsp {
    /// Responder to ask instead of the certificate's AIA URL.
    pub responder_url: Option<String>,
    /// "sha1" (the default) or "sha256".
    pub cert_id_hash: Option<String>,
    pub use_get: Option<bool>,
    pub send_nonce: Option<bool>,
    pub require_nonce: Option<bool>,
    pub timeout_ms: Option<u64>,
    pub max_response_bytes: Option<usize>,
    pub clock_skew_secs: Option<u64>,
    pub default_lifetime_secs: Option<u64>,
    pub cache_size: Option<usize>,
    /// Seconds before a cached response expires at which live sessions query again.
    pub refresh_margin_secs: Option<u64>,
}

/// The Prometheus metrics listener.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawMetrics {
    /// Address to serve `GET /metrics` on, such as "127.0.0.1:9190".
    pub listen: Option<String>,
}

/// The gateway's own Landlock sandbox.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawSandbox {
    /// "auto" (the default), "required" or "off".
    pub landlock: Option<String>,
    /// Files or directory trees the gateway may read besides those the config names.
    #[serde(default)]
    pub extra_read_paths: Vec<String>,
    /// Files or directory trees the gateway may read and write.
    #[serde(default)]
    pub extra_write_paths: Vec<String>,
}

/// The local admin API.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAdmin {
    pub socket_path: Option<String>,
    pub socket_group: Option<String>,
    pub tcp_address: Option<String>,
    pub token_file: Option<String>,
}

/// Rules of the built-in policy engine for one application.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAccess {
    /// Names of device CAs whose devices may be considered at all.
    #[serde(default)]
    pub device_cas: Vec<String>,
    /// SPIFFE ID prefixes, matched by whole path segments.
    #[serde(default)]
    pub spiffe_prefixes: Vec<String>,
    #[serde(default)]
    pub permanent_identifiers: Vec<RawPermanentId>,
    #[serde(default)]
    pub require_hardware_bound: bool,
    /// Admit every device of `device_cas` without matching an identifier.
    #[serde(default)]
    pub allow_any_device: bool,
    #[serde(default)]
    pub remediation_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawPermanentId {
    pub assigner: String,
    pub value: String,
}

pub mod defaults {
    pub fn handshake_timeout_ms() -> u64 {
        10_000
    }
    pub fn idle_timeout_secs() -> u64 {
        60
    }
    pub fn keep_alive_secs() -> u64 {
        15
    }
    /// quinn's own default (`EndpointConfig::min_reset_interval`).
    pub fn min_reset_interval_ms() -> u64 {
        20
    }
    pub fn congestion_controller() -> String {
        "cubic".to_string()
    }
    pub fn gso() -> bool {
        true
    }
    pub fn admission_timeout_ms() -> u64 {
        5_000
    }
    pub fn drain_secs() -> u64 {
        10
    }
    pub fn udp_buffer() -> usize {
        4 * 1024 * 1024
    }
    pub fn max_streams() -> u32 {
        100
    }
    pub fn stream_window() -> u64 {
        2 * 1024 * 1024
    }
    pub fn connection_window() -> u64 {
        16 * 1024 * 1024
    }
    pub fn send_window() -> u64 {
        16 * 1024 * 1024
    }
    pub fn max_connections() -> u32 {
        20_000
    }
    pub fn max_per_source() -> u32 {
        64
    }
    pub fn max_per_device() -> u32 {
        16
    }
    pub fn upstream_connect_timeout_ms() -> u64 {
        5_000
    }
    pub fn copy_buffer() -> usize {
        64 * 1024
    }

    // Load shedding.
    pub fn retry_pending_handshakes() -> u32 {
        256
    }
    pub fn handshakes_per_source_per_sec() -> u32 {
        20
    }
    pub fn handshake_burst_per_source() -> u32 {
        100
    }
    pub fn max_tracked_sources() -> u32 {
        65_536
    }
    pub fn streams_per_connection_per_sec() -> u32 {
        100
    }
    pub fn stream_burst_per_connection() -> u32 {
        200
    }
    pub fn max_rate_limited_streams_per_connection() -> u32 {
        1_000
    }
    pub fn max_upstream_dials_per_application() -> u32 {
        256
    }
    pub fn upstream_dial_wait_ms() -> u64 {
        1_000
    }
    pub fn decision_lifetime_secs() -> u64 {
        300
    }
    pub fn cache_size() -> usize {
        10_000
    }
    pub fn failure_grace_secs() -> u64 {
        60
    }
    pub fn rule() -> String {
        "data.ztgate.decision".to_string()
    }
    pub fn opa_path() -> String {
        "ztgate/decision".to_string()
    }
    pub fn log_level() -> String {
        "info".to_string()
    }
    pub fn audit() -> String {
        "stderr".to_string()
    }
    pub fn log_format() -> String {
        "text".to_string()
    }
}
