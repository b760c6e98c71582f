//! The seam between the admin API and the gateway: the `AdminBackend` trait
//! and the JSON types that cross it and the wire.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

/// The future that `AdminBackend::reload` returns: the new generation id, or
/// every error that kept the new configuration from loading.
pub type ReloadFuture<'a> = Pin<Box<dyn Future<Output = Result<u64, Vec<String>>> + Send + 'a>>;

/// The gateway operations that the admin API calls.
///
/// The server calls `sessions`, `close_session` and `readiness` on a runtime
/// worker, so they must not block. It calls `push_revocation` and
/// `push_posture` on tokio's blocking pool, so they may write to disk. The
/// `caller` argument names the authenticated client for the backend's own
/// records, for example "uid=0 gid=0 pid=812" or "token from 127.0.0.1:51234".
pub trait AdminBackend: Send + Sync + 'static {
    /// Lists every live session.
    fn sessions(&self) -> Vec<SessionView>;

    /// Asks session `id` to close with the administratively-closed code.
    /// Returns false when no live session has that id.
    fn close_session(&self, id: u64) -> bool;

    /// Records a revocation and closes the live sessions it covers. The
    /// hex fields of `push` are already validated and in lower case.
    fn push_revocation(&self, push: RevocationPush, caller: &str) -> Result<PushOutcome, String>;

    /// Records posture attributes for a device and re-evaluates its live
    /// sessions. Returns how many sessions were re-evaluated.
    fn push_posture(
        &self,
        device_id: String,
        attributes: serde_json::Map<String, serde_json::Value>,
        caller: &str,
    ) -> Result<usize, String>;

    /// Reloads the configuration through the gateway's one reload entry point.
    fn reload(&self) -> ReloadFuture<'_>;

    /// Reports whether the gateway should receive traffic, with the state of
    /// each revocation source.
    fn readiness(&self) -> Readiness;
}

/// One live session as `GET /v1/sessions` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: u64,
    /// The device identifier read from the certificate.
    pub device: String,
    /// The application's configured name.
    pub application: String,
    /// The validated client address.
    pub client: SocketAddr,
    /// "quic" or "tls".
    pub transport: String,
    pub age_secs: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
}

/// The body of `GET /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// The body of `GET /v1/ready`, sent with status 200 when `ready` is true
/// and 503 otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub revocation_sources: Vec<RevocationSourceStatus>,
}

/// The state of one revocation source (a CRL distribution point, an OCSP
/// responder or the operator pushes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationSourceStatus {
    pub name: String,
    /// Seconds since the source last loaded successfully, or `None` if it never has.
    pub age_secs: Option<u64>,
    pub stale: bool,
    /// The last load error, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The certificate a revocation names, with lower-case hex fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationTarget {
    /// SHA-256 of the issuer name's DER, and the serial number as the
    /// registry stores it: the magnitude without leading zero bytes, prefixed
    /// with '-' when negative.
    IssuerSerial {
        issuer_sha256: String,
        serial_hex: String,
    },
    /// SHA-256 of the certificate's DER.
    CertSha256(String),
    /// SHA-256 of the certificate's SubjectPublicKeyInfo DER.
    SpkiSha256(String),
}

/// A validated revocation from `POST /v1/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationPush {
    pub target: RevocationTarget,
    pub reason: Option<String>,
    /// Unix seconds after which the push may be forgotten, normally the
    /// certificate's notAfter.
    pub not_after: Option<u64>,
}

/// The body of `POST /v1/revocations` as a client sends it: exactly one of
/// `issuer_sha256` with `serial_hex`, `cert_sha256` or `spki_sha256`.
/// Hex fields may be upper case and may contain ':' separators.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spki_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// The result of a revocation push, the body of a successful
/// `POST /v1/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushOutcome {
    /// Live sessions asked to close because of the push.
    pub closed_sessions: usize,
}

/// The body of `POST /v1/posture`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostureRequest {
    pub device_id: String,
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// The body of a successful `POST /v1/posture`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureOutcome {
    pub reevaluated_sessions: usize,
}

/// The body of a successful `POST /v1/reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The id of the generation now in force.
    pub generation: u64,
}

/// The body of a successful `DELETE /v1/sessions/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseOutcome {
    pub id: u64,
    pub closed: bool,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// The request field that is invalid, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every error, when there are several (a rejected reload).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}
