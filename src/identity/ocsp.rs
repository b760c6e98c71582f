//! OCSP (RFC 6960) status checks for device certificates.
//!
//! [`OcspChecker`] builds a request for a leaf certificate and its issuer,
//! sends it to the responder named in the leaf's authorityInfoAccess
//! extension (or a configured URL) over plain HTTP, verifies the signed
//! response and caches the status until its nextUpdate. [`decide`] turns a result into
//! an admit or reject decision for the configured [`OcspMode`].
//!
//! The responder must sign with the issuing CA's key, or with a delegated
//! responder certificate that the response carries, that the same CA issued
//! and that has the id-kp-OCSPSigning extended key usage (RFC 6960 section
//! 4.2.2.2). The revocation status of a delegated responder certificate is
//! not checked.

mod cert_id;
mod checker;
mod decision;
mod error;
mod http;
mod request;
mod response;

use std::time::{Duration, SystemTime};

pub use cert_id::{CertId, CertIdHash};
pub use checker::{OcspChecker, Revocation};
pub use decision::{decide, OcspDecision, OcspMode, SoftFailWithoutAnswer};
pub use error::OcspError;
// Public for the fuzz targets in fuzz/, which check a response without HTTP.
pub use response::{
    verify as verify_response, Expected as ExpectedResponse, Verified as VerifiedResponse,
};
pub use x509_cert::ext::pkix::CrlReason;

/// The certificate status that a verified OCSP response reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcspStatus {
    /// The responder vouches that the certificate is not revoked.
    /// `next_update` is the response's nextUpdate, or thisUpdate plus the
    /// configured default lifetime when the response has none.
    Good {
        this_update: SystemTime,
        next_update: SystemTime,
    },
    /// The certificate is revoked, temporarily or permanently.
    Revoked {
        revocation_time: SystemTime,
        reason: Option<CrlReason>,
    },
    /// The responder does not know the certificate.
    Unknown,
}

impl OcspStatus {
    /// Short stable name for logs and metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            OcspStatus::Good { .. } => "good",
            OcspStatus::Revoked { .. } => "revoked",
            OcspStatus::Unknown => "unknown",
        }
    }
}

/// The verified OCSP status of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub status: OcspStatus,
    /// True when the status came from the cache without a request.
    pub from_cache: bool,
    /// When the response was fetched, as the `now` of the lookup that sent
    /// the request.
    pub fetched_at: SystemTime,
    /// The response's thisUpdate.
    pub this_update: SystemTime,
    /// End of the status's validity: nextUpdate, or thisUpdate plus the
    /// configured default lifetime when the response has no nextUpdate.
    pub valid_until: SystemTime,
    /// The URL of the responder that sent the response.
    pub responder_url: String,
}

/// Returns the RFC 5280 CRLReason name, such as "keyCompromise".
pub fn crl_reason_name(reason: CrlReason) -> &'static str {
    match reason {
        CrlReason::Unspecified => "unspecified",
        CrlReason::KeyCompromise => "keyCompromise",
        CrlReason::CaCompromise => "cACompromise",
        CrlReason::AffiliationChanged => "affiliationChanged",
        CrlReason::Superseded => "superseded",
        CrlReason::CessationOfOperation => "cessationOfOperation",
        CrlReason::CertificateHold => "certificateHold",
        CrlReason::RemoveFromCRL => "removeFromCRL",
        CrlReason::PrivilegeWithdrawn => "privilegeWithdrawn",
        CrlReason::AaCompromise => "aACompromise",
    }
}

/// OCSP client settings. [`OcspSettings::default`] gives the defaults
/// listed on each field.
#[derive(Debug, Clone)]
pub struct OcspSettings {
    /// Responder URL used for every certificate in place of the one in its
    /// authorityInfoAccess extension. Default: none, so the AIA URL is used.
    pub responder_url: Option<String>,
    /// Hash algorithm of the CertID. Default: SHA-1, which every responder
    /// accepts.
    pub cert_id_hash: CertIdHash,
    /// Send a GET request (RFC 6960 appendix A.1) when the URL-encoded
    /// request is shorter than 255 bytes, and POST otherwise. Default: false,
    /// so every request is a POST.
    pub use_get: bool,
    /// Send a random 32-byte nonce (RFC 8954) in every request. A response
    /// that carries a nonce must then echo it. Default: true.
    pub send_nonce: bool,
    /// Reject responses without a nonce. Needs `send_nonce`. Default: false,
    /// because responders that serve pre-signed responses send none.
    pub require_nonce: bool,
    /// Limit on one exchange with a responder: connect, send and read the
    /// whole response. Default: 5 s.
    pub timeout: Duration,
    /// Maximum response body size in bytes. Default: 64 KiB.
    pub max_response_bytes: usize,
    /// Tolerated clock difference when checking thisUpdate and nextUpdate.
    /// Default: 5 minutes.
    pub clock_skew: Duration,
    /// Lifetime of a response without nextUpdate, counted from thisUpdate.
    /// Default: 10 minutes.
    pub default_lifetime: Duration,
    /// Maximum number of certificates in the cache. When it is full, the
    /// entry stored longest ago is evicted. Default: 10 000.
    pub cache_capacity: usize,
    /// After a failed lookup, the error is returned for this long without a
    /// new request, so that a failing responder is not asked once per
    /// connection. Zero turns it off. Default: 5 s.
    pub failure_backoff: Duration,
    /// Maximum number of concurrent requests in
    /// [`OcspChecker::refresh_expiring`]. Default: 4.
    pub refresh_concurrency: usize,
}

impl Default for OcspSettings {
    fn default() -> Self {
        OcspSettings {
            responder_url: None,
            cert_id_hash: CertIdHash::Sha1,
            use_get: false,
            send_nonce: true,
            require_nonce: false,
            timeout: Duration::from_secs(5),
            max_response_bytes: 64 * 1024,
            clock_skew: Duration::from_secs(5 * 60),
            default_lifetime: Duration::from_secs(10 * 60),
            cache_capacity: 10_000,
            failure_backoff: Duration::from_secs(5),
            refresh_concurrency: 4,
        }
    }
}

impl OcspSettings {
    /// Checks the settings for values that cannot work.
    ///
    /// # Errors
    ///
    /// Returns [`OcspError::InvalidSettings`] naming the setting.
    pub fn validate(&self) -> Result<(), OcspError> {
        let invalid = |message: &str| Err(OcspError::InvalidSettings(message.to_owned()));
        if self.timeout.is_zero() {
            return invalid("timeout must be greater than zero");
        }
        if self.max_response_bytes == 0 {
            return invalid("max_response_bytes must be greater than zero");
        }
        if self.cache_capacity == 0 {
            return invalid("cache_capacity must be at least 1");
        }
        if self.refresh_concurrency == 0 {
            return invalid("refresh_concurrency must be at least 1");
        }
        if self.require_nonce && !self.send_nonce {
            return invalid("require_nonce needs send_nonce, because a response can only echo a nonce that the request carried");
        }
        if let Some(url) = &self.responder_url {
            http::validate_url(url)?;
        }
        Ok(())
    }
}

/// Formats a time as RFC 3339 UTC for messages. Times before 1970 are
/// clamped to the epoch.
fn format_time(time: SystemTime) -> String {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |duration| duration.as_secs());
    crate::policy::rfc3339_utc(i64::try_from(seconds).unwrap_or(i64::MAX))
}
