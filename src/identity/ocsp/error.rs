//! Errors of OCSP lookups.

use std::time::Duration;

/// A failed OCSP lookup. Every error after the responder URL is known names
/// that URL.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OcspError {
    #[error("invalid OCSP settings: {0}")]
    InvalidSettings(String),
    #[error("invalid {role} certificate for an OCSP request: {detail}")]
    InvalidCertificate { role: &'static str, detail: String },
    #[error(
        "the device certificate names no OCSP responder (no id-ad-ocsp URI in authorityInfoAccess) \
         and no responder URL is configured"
    )]
    NoResponder,
    #[error("unsupported OCSP responder URL {url:?}: {reason}")]
    UnsupportedUrl { url: String, reason: String },
    #[error("failed to encode the OCSP request for {url}: {detail}")]
    Encode { url: String, detail: String },
    #[error("OCSP request to {url} failed: {detail}")]
    Transport { url: String, detail: String },
    #[error("OCSP request to {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("OCSP responder {url} returned HTTP status {status}, expected 200")]
    HttpStatus { url: String, status: u16 },
    #[error("OCSP response from {url} is larger than the limit of {limit} bytes")]
    ResponseTooLarge { url: String, limit: usize },
    #[error("OCSP response from {url} is invalid: {detail}")]
    Malformed { url: String, detail: String },
    #[error("OCSP responder {url} returned malformedRequest: it could not parse the request")]
    MalformedRequest { url: String },
    #[error("OCSP responder {url} returned internalError")]
    InternalError { url: String },
    #[error("OCSP responder {url} returned tryLater: it cannot respond now, so retry later")]
    TryLater { url: String },
    #[error(
        "OCSP responder {url} returned sigRequired: it accepts only signed requests, \
         and ztgate sends unsigned ones"
    )]
    SigRequired { url: String },
    #[error("OCSP responder {url} returned unauthorized: it does not respond for this certificate's CA, or it rejects this client")]
    Unauthorized { url: String },
    #[error(
        "OCSP response from {url} has response type {oid}, but only id-pkix-ocsp-basic \
         (1.3.6.1.5.5.7.48.1.1) is supported"
    )]
    UnsupportedResponseType { url: String, oid: String },
    #[error(
        "OCSP response from {url} is not signed by the issuing CA or by a responder \
         certificate that the CA authorized: {detail}"
    )]
    UntrustedSigner { url: String, detail: String },
    #[error("OCSP response from {url} has an invalid signature: {detail}")]
    BadSignature { url: String, detail: String },
    #[error("OCSP response from {url} has no status for the requested certificate (CertID {cert_id}): {detail}")]
    CertIdMismatch {
        url: String,
        cert_id: String,
        detail: String,
    },
    #[error("OCSP response from {url} is not valid yet: thisUpdate {this_update} is more than {skew:?} ahead of now")]
    NotYetValid {
        url: String,
        this_update: String,
        skew: Duration,
    },
    #[error("OCSP response from {url} expired: its validity ended at {valid_until}")]
    Expired { url: String, valid_until: String },
    #[error("OCSP response from {url} carries a nonce that differs from the request's nonce")]
    NonceMismatch { url: String },
    #[error("OCSP response from {url} carries no nonce, but require_nonce is set")]
    NonceMissing { url: String },
    #[error("OCSP lookup failed: {0}")]
    Internal(String),
}

impl OcspError {
    /// Short stable name for logs and metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            OcspError::InvalidSettings(_) => "invalid_settings",
            OcspError::InvalidCertificate { .. } => "invalid_certificate",
            OcspError::NoResponder => "no_responder",
            OcspError::UnsupportedUrl { .. } => "unsupported_url",
            OcspError::Encode { .. } => "encode_error",
            OcspError::Transport { .. } => "transport_error",
            OcspError::Timeout { .. } => "timeout",
            OcspError::HttpStatus { .. } => "http_status",
            OcspError::ResponseTooLarge { .. } => "response_too_large",
            OcspError::Malformed { .. } => "malformed_response",
            OcspError::MalformedRequest { .. } => "malformed_request",
            OcspError::InternalError { .. } => "internal_error",
            OcspError::TryLater { .. } => "try_later",
            OcspError::SigRequired { .. } => "sig_required",
            OcspError::Unauthorized { .. } => "unauthorized",
            OcspError::UnsupportedResponseType { .. } => "unsupported_response_type",
            OcspError::UntrustedSigner { .. } => "untrusted_signer",
            OcspError::BadSignature { .. } => "bad_signature",
            OcspError::CertIdMismatch { .. } => "cert_id_mismatch",
            OcspError::NotYetValid { .. } => "not_yet_valid",
            OcspError::Expired { .. } => "expired",
            OcspError::NonceMismatch { .. } => "nonce_mismatch",
            OcspError::NonceMissing { .. } => "nonce_missing",
            OcspError::Internal(_) => "internal",
        }
    }

    /// Returns the responder URL that the error concerns, when one was chosen.
    pub fn responder_url(&self) -> Option<&str> {
        match self {
            OcspError::InvalidSettings(_)
            | OcspError::InvalidCertificate { .. }
            | OcspError::NoResponder
            | OcspError::Internal(_) => None,
            OcspError::UnsupportedUrl { url, .. }
            | OcspError::Encode { url, .. }
            | OcspError::Transport { url, .. }
            | OcspError::Timeout { url, .. }
            | OcspError::HttpStatus { url, .. }
            | OcspError::ResponseTooLarge { url, .. }
            | OcspError::Malformed { url, .. }
            | OcspError::MalformedRequest { url }
            | OcspError::InternalError { url }
            | OcspError::TryLater { url }
            | OcspError::SigRequired { url }
            | OcspError::Unauthorized { url }
            | OcspError::UnsupportedResponseType { url, .. }
            | OcspError::UntrustedSigner { url, .. }
            | OcspError::BadSignature { url, .. }
            | OcspError::CertIdMismatch { url, .. }
            | OcspError::NotYetValid { url, .. }
            | OcspError::Expired { url, .. }
            | OcspError::NonceMismatch { url }
            | OcspError::NonceMissing { url } => Some(url),
        }
    }
}
