//! Wire formats shared by the gateway and the client: the ALPN, the control
//! stream's framed messages, the stream preamble and the close and reset codes.
//!
//! `docs/protocol.md` describes the same formats for implementers of other
//! clients; keep the two in step.

use serde::{Deserialize, Serialize};
use std::fmt;

/// ALPN protocol identifier spoken on the QUIC ingress.
pub const ALPN: &[u8] = b"ztgate/1";

/// Version byte that opens the control stream and every stream preamble.
pub const PROTOCOL_VERSION: u8 = 1;

/// Length of the stream preamble: a version byte and a flags byte.
pub const PREAMBLE_LEN: usize = 2;

/// Largest control message payload accepted, in bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 16 * 1024;

/// The stream preamble a client writes first on every bidirectional stream.
pub const fn preamble() -> [u8; PREAMBLE_LEN] {
    [PROTOCOL_VERSION, 0]
}

/// Checks a received preamble. Flags are reserved and must be zero.
pub fn parse_preamble(bytes: [u8; PREAMBLE_LEN]) -> Result<(), WireError> {
    if bytes[0] != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(bytes[0]));
    }
    if bytes[1] != 0 {
        return Err(WireError::UnknownFlags(bytes[1]));
    }
    Ok(())
}

/// Application error codes carried by QUIC CONNECTION_CLOSE, RESET_STREAM and
/// STOP_SENDING frames, and by refusal and close messages on the control stream.
///
/// Handshake failures never use these: they end as TLS alerts, which QUIC
/// reports as CRYPTO_ERROR (0x100 + alert).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u32)]
pub enum Code {
    /// Normal close by either side.
    NoError = 0x00,
    /// The gateway failed in a way that is not the device's fault.
    InternalError = 0x01,
    /// The peer broke this protocol (bad preamble, unexpected stream or message).
    ProtocolViolation = 0x02,
    /// The TLS server name selects no configured application.
    UnknownApplication = 0x10,
    /// The policy engine denied access.
    PolicyDenied = 0x11,
    /// The policy engine asks for a step-up that did not happen in time.
    StepUpRequired = 0x12,
    /// The device certificate has been revoked.
    CertificateRevoked = 0x13,
    /// The session reached its deadline (decision, certificate or maximum length).
    SessionExpired = 0x14,
    /// The gateway is shutting down or draining.
    GoingAway = 0x15,
    /// Identity fields of the certificate could not be read.
    InvalidIdentity = 0x16,
    /// The certificate chain no longer verifies against the configured device CAs.
    CertificateUntrusted = 0x17,
    /// A connection cap (per source, per device or global) was reached.
    ConnectionLimit = 0x18,
    /// An operator closed the session.
    AdministrativelyClosed = 0x19,
    /// Policy could not be evaluated (engine failure) and the application fails closed.
    PolicyUnavailable = 0x1a,
    /// The certificate's revocation status could not be established and the
    /// configuration requires it (OCSP hard-fail, stale CRL).
    RevocationUnknown = 0x1b,
    /// The upstream could not be reached (resolution, refusal or timeout).
    UpstreamUnreachable = 0x20,
    /// The upstream reset its TCP connection.
    UpstreamReset = 0x21,
    /// The stream was refused because a per-session limit was reached.
    StreamRefused = 0x22,
    /// The connection opened new streams faster than
    /// `limits.streams_per_connection_per_sec` allows.
    StreamRateLimited = 0x23,
    /// The application's cap on concurrent upstream dials was full for
    /// `limits.upstream_dial_wait_ms`.
    UpstreamBusy = 0x24,
}

impl Code {
    /// Every code, in numeric order.
    pub const ALL: [Code; 20] = [
        Code::NoError,
        Code::InternalError,
        Code::ProtocolViolation,
        Code::UnknownApplication,
        Code::PolicyDenied,
        Code::StepUpRequired,
        Code::CertificateRevoked,
        Code::SessionExpired,
        Code::GoingAway,
        Code::InvalidIdentity,
        Code::CertificateUntrusted,
        Code::ConnectionLimit,
        Code::AdministrativelyClosed,
        Code::PolicyUnavailable,
        Code::RevocationUnknown,
        Code::UpstreamUnreachable,
        Code::UpstreamReset,
        Code::StreamRefused,
        Code::StreamRateLimited,
        Code::UpstreamBusy,
    ];

    pub fn value(self) -> u32 {
        self as u32
    }

    pub fn from_value(value: u64) -> Option<Code> {
        Code::ALL
            .into_iter()
            .find(|c| u64::from(c.value()) == value)
    }

    /// Short stable name, as used in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Code::NoError => "no-error",
            Code::InternalError => "internal-error",
            Code::ProtocolViolation => "protocol-violation",
            Code::UnknownApplication => "unknown-application",
            Code::PolicyDenied => "policy-denied",
            Code::StepUpRequired => "step-up-required",
            Code::CertificateRevoked => "certificate-revoked",
            Code::SessionExpired => "session-expired",
            Code::GoingAway => "going-away",
            Code::InvalidIdentity => "invalid-identity",
            Code::CertificateUntrusted => "certificate-untrusted",
            Code::ConnectionLimit => "connection-limit",
            Code::AdministrativelyClosed => "administratively-closed",
            Code::PolicyUnavailable => "policy-unavailable",
            Code::RevocationUnknown => "revocation-unknown",
            Code::UpstreamUnreachable => "upstream-unreachable",
            Code::UpstreamReset => "upstream-reset",
            Code::StreamRefused => "stream-refused",
            Code::StreamRateLimited => "stream-rate-limited",
            Code::UpstreamBusy => "upstream-busy",
        }
    }

    /// A plain sentence for people, used by the client.
    pub fn sentence(self) -> &'static str {
        match self {
            Code::NoError => "The connection was closed normally.",
            Code::InternalError => "The gateway hit an internal error; try again later.",
            Code::ProtocolViolation => {
                "The gateway and this client disagree on the protocol; update the client."
            }
            Code::UnknownApplication => {
                "The gateway has no application with this name; check the --app value."
            }
            Code::PolicyDenied => "Access policy does not allow this device to reach the application.",
            Code::StepUpRequired => "Additional verification was required and not completed in time.",
            Code::CertificateRevoked => "This device's certificate has been revoked.",
            Code::SessionExpired => "The session reached its time limit; reconnect to continue.",
            Code::GoingAway => "The gateway is shutting down; reconnect shortly.",
            Code::InvalidIdentity => {
                "The device certificate's identity fields could not be read; ask for a new certificate."
            }
            Code::CertificateUntrusted => {
                "The gateway no longer trusts the CA that issued this device's certificate."
            }
            Code::ConnectionLimit => "Too many connections from this device or address; close some and retry.",
            Code::AdministrativelyClosed => "An administrator closed this session.",
            Code::PolicyUnavailable => "The access policy could not be evaluated; try again later.",
            Code::RevocationUnknown => {
                "The revocation status of this device's certificate could not be confirmed; try again later."
            }
            Code::UpstreamUnreachable => "The application's server could not be reached.",
            Code::UpstreamReset => "The application's server reset the connection.",
            Code::StreamRefused => "The gateway refused a new stream because a limit was reached.",
            Code::StreamRateLimited => {
                "This client opened streams faster than the gateway allows; open fewer at once."
            }
            Code::UpstreamBusy => "The application's server is busy with other connections; retry shortly.",
        }
    }

    /// Whether a client should reconnect after a connection closed with this code.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Code::GoingAway
                | Code::SessionExpired
                | Code::InternalError
                | Code::PolicyUnavailable
                | Code::RevocationUnknown
                | Code::ConnectionLimit
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.name(), self.value())
    }
}

impl From<Code> for quinn::VarInt {
    fn from(code: Code) -> Self {
        quinn::VarInt::from_u32(code.value())
    }
}

/// Describes a TLS alert number in plain words, for handshake failures.
pub fn tls_alert_sentence(alert: u8) -> String {
    let text = match alert {
        40 => "the TLS handshake failed (handshake_failure)",
        42 => "the gateway rejected the device certificate (bad_certificate)",
        43 => "the device certificate is not valid for client authentication: its extended key usage must include clientAuth (unsupported_certificate)",
        44 => "the device certificate has been revoked (certificate_revoked)",
        45 => "the device certificate has expired or is not yet valid (certificate_expired)",
        46 => "the device certificate was rejected (certificate_unknown)",
        48 => "the device certificate was not issued by a CA the gateway trusts (unknown_ca)",
        49 => "the gateway denied access during the handshake (access_denied)",
        51 => "a handshake signature did not verify (decrypt_error)",
        70 => "the TLS protocol version is not supported; TLS 1.3 is required (protocol_version)",
        80 => "the gateway hit an internal TLS error (internal_error)",
        109 => "the gateway requires a TLS extension the client did not send (missing_extension)",
        112 => "the gateway does not recognise the requested server name (unrecognized_name)",
        116 => "the gateway requires a device certificate and none was sent (certificate_required)",
        120 => "the gateway does not speak the requested application protocol (no_application_protocol)",
        _ => return format!("the TLS handshake failed with alert {alert}"),
    };
    text.to_string()
}

/// Kinds of control message. The numeric value is the frame's type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    Admitted = 1,
    Refused = 2,
    StepUp = 3,
    GoingAway = 4,
    Closing = 5,
}

/// Body of an `admitted` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admitted {
    pub session_id: u64,
    pub application: String,
    pub device_id: String,
    /// Seconds until the session's current deadline, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// Body of `refused` and `closing` messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: Code,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<String>,
}

/// Body of a `step-up` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepUp {
    pub challenge: String,
    pub grace_secs: u64,
    pub reason: String,
}

/// Body of a `going-away` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoingAway {
    /// Seconds the gateway keeps serving open streams before it closes them.
    pub drain_secs: u64,
    pub reason: String,
}

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    Admitted(Admitted),
    Refused(Refusal),
    StepUp(StepUp),
    GoingAway(GoingAway),
    Closing(Refusal),
}

/// Errors of the wire formats.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("unsupported protocol version {0}; this build speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion(u8),
    #[error("unknown preamble flags 0x{0:02x}; flags must be zero in version {PROTOCOL_VERSION}")]
    UnknownFlags(u8),
    #[error("unknown control message type {0}")]
    UnknownType(u8),
    #[error("control message of {0} bytes exceeds the maximum of {MAX_CONTROL_PAYLOAD}")]
    TooLarge(usize),
    #[error("invalid control message body: {0}")]
    InvalidBody(#[from] serde_json::Error),
}

impl ControlMessage {
    fn kind(&self) -> MessageType {
        match self {
            ControlMessage::Admitted(_) => MessageType::Admitted,
            ControlMessage::Refused(_) => MessageType::Refused,
            ControlMessage::StepUp(_) => MessageType::StepUp,
            ControlMessage::GoingAway(_) => MessageType::GoingAway,
            ControlMessage::Closing(_) => MessageType::Closing,
        }
    }

    /// Encodes one frame: the type byte, a big-endian u16 length, the JSON body.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let body = match self {
            ControlMessage::Admitted(m) => serde_json::to_vec(m)?,
            ControlMessage::Refused(m) | ControlMessage::Closing(m) => serde_json::to_vec(m)?,
            ControlMessage::StepUp(m) => serde_json::to_vec(m)?,
            ControlMessage::GoingAway(m) => serde_json::to_vec(m)?,
        };
        if body.len() > MAX_CONTROL_PAYLOAD {
            return Err(WireError::TooLarge(body.len()));
        }
        let mut frame = Vec::with_capacity(3 + body.len());
        frame.push(self.kind() as u8);
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        Ok(frame)
    }

    /// Decodes a frame body of the given type.
    pub fn decode(kind: u8, body: &[u8]) -> Result<ControlMessage, WireError> {
        if body.len() > MAX_CONTROL_PAYLOAD {
            return Err(WireError::TooLarge(body.len()));
        }
        Ok(match kind {
            1 => ControlMessage::Admitted(serde_json::from_slice(body)?),
            2 => ControlMessage::Refused(serde_json::from_slice(body)?),
            3 => ControlMessage::StepUp(serde_json::from_slice(body)?),
            4 => ControlMessage::GoingAway(serde_json::from_slice(body)?),
            5 => ControlMessage::Closing(serde_json::from_slice(body)?),
            other => return Err(WireError::UnknownType(other)),
        })
    }
}

/// Reads control messages from any async byte stream.
pub struct ControlReader<R> {
    inner: R,
    version_checked: bool,
}

impl<R: tokio::io::AsyncRead + Unpin> ControlReader<R> {
    pub fn new(inner: R) -> Self {
        ControlReader {
            inner,
            version_checked: false,
        }
    }

    /// Reads the next message; `Ok(None)` when the stream ended cleanly between messages.
    pub async fn next(&mut self) -> std::io::Result<Option<ControlMessage>> {
        use tokio::io::AsyncReadExt;
        if !self.version_checked {
            let mut version = [0u8; 1];
            if !read_exact_or_eof(&mut self.inner, &mut version).await? {
                return Ok(None);
            }
            if version[0] != PROTOCOL_VERSION {
                return Err(invalid_data(WireError::UnsupportedVersion(version[0])));
            }
            self.version_checked = true;
        }
        let mut header = [0u8; 3];
        if !read_exact_or_eof(&mut self.inner, &mut header).await? {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
        if len > MAX_CONTROL_PAYLOAD {
            return Err(invalid_data(WireError::TooLarge(len)));
        }
        let mut body = vec![0u8; len];
        self.inner.read_exact(&mut body).await?;
        ControlMessage::decode(header[0], &body)
            .map(Some)
            .map_err(invalid_data)
    }
}

fn invalid_data(err: WireError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, err)
}

/// Fills `buf`, or returns `Ok(false)` if the stream ends before the first byte.
async fn read_exact_or_eof<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn control_messages_round_trip() {
        let messages = vec![
            ControlMessage::Admitted(Admitted {
                session_id: 7,
                application: "wiki".into(),
                device_id: "spiffe://example.test/device/DEV-0001".into(),
                expires_in_secs: Some(300),
            }),
            ControlMessage::Refused(Refusal {
                code: Code::PolicyDenied,
                reason: "device not in group".into(),
                remediation: Some("https://help.example.test".into()),
            }),
            ControlMessage::GoingAway(GoingAway {
                drain_secs: 30,
                reason: "restart".into(),
            }),
        ];
        let mut wire = vec![PROTOCOL_VERSION];
        for m in &messages {
            wire.extend(m.encode().expect("encode"));
        }
        let mut reader = ControlReader::new(&wire[..]);
        for expected in &messages {
            let got = reader.next().await.expect("read").expect("message");
            assert_eq!(&got, expected);
        }
        assert!(reader.next().await.expect("clean end").is_none());
    }

    #[tokio::test]
    async fn control_reader_rejects_bad_input() {
        let wrong_version = [9u8, 1, 0, 2, b'{', b'}'];
        let err = ControlReader::new(&wrong_version[..]).next().await;
        assert!(err.is_err(), "version 9 must be rejected");

        let unknown_type = [PROTOCOL_VERSION, 99, 0, 2, b'{', b'}'];
        let err = ControlReader::new(&unknown_type[..]).next().await;
        assert!(err.is_err(), "type 99 must be rejected");

        let truncated = [PROTOCOL_VERSION, 1, 0, 50, b'{'];
        let err = ControlReader::new(&truncated[..]).next().await;
        assert!(err.is_err(), "truncated body must be rejected");

        let bad_json = [PROTOCOL_VERSION, 2, 0, 3, b'{', b'x', b'}'];
        let err = ControlReader::new(&bad_json[..]).next().await;
        assert!(err.is_err(), "invalid JSON must be rejected");
    }

    #[test]
    fn preamble_checks_version_and_flags() {
        assert!(parse_preamble(preamble()).is_ok());
        assert!(matches!(
            parse_preamble([2, 0]),
            Err(WireError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            parse_preamble([1, 1]),
            Err(WireError::UnknownFlags(1))
        ));
    }

    #[test]
    fn codes_are_unique_and_round_trip() {
        for code in Code::ALL {
            assert_eq!(Code::from_value(u64::from(code.value())), Some(code));
        }
        let mut values: Vec<u32> = Code::ALL.iter().map(|c| c.value()).collect();
        values.dedup();
        assert_eq!(values.len(), Code::ALL.len());
    }
}
