//! Certificate revocation lists (RFC 5280 section 5): decoding, the signature,
//! time and extension checks, and an index of the revoked serial numbers.
//!
//! The structure is decoded with the `der` crate's borrowing types, one entry
//! at a time, so that a CRL with a million entries costs one hash map slot per
//! entry and no heap allocation per entry. x509-parser 0.16 would collect every
//! entry into a `Vec` with a `BigUint` and an extension `Vec` each.
//!
//! Only complete CRLs are supported, so a CRL that is not one is rejected
//! with a [`CrlError`] that names the reason, and never applied as if it
//! were complete. That covers delta CRLs, indirect CRLs, and CRLs whose
//! issuingDistributionPoint limits them to some revocation reasons or to
//! attribute certificates. A critical extension that this module does not
//! process also rejects the CRL.

mod cert;
mod decode;
mod index;
#[cfg(test)]
mod tests;

pub use cert::distribution_point_uris;
pub(crate) use cert::{read_cert_fields, CertFields};
pub use index::{serial_bytes_from_hex, CrlReason, RevokedEntry, RevokedSerials};

use super::device::{hex_lower, serial_hex};
use index::compare_unsigned;
use ring::digest::{digest, SHA256};
use rustls::pki_types::pem::{PemObject, SectionKind};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// The certificates a CRL covers, from its issuingDistributionPoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlScope {
    /// Every certificate of the issuer (no IDP, or an IDP without a limit).
    AllCertificates,
    /// onlyContainsUserCerts: end-entity certificates only.
    UserCertificates,
    /// onlyContainsCACerts: CA certificates only.
    CaCertificates,
}

impl CrlScope {
    /// Returns whether a CRL of this scope covers a certificate that is a CA
    /// certificate (`is_ca`) or an end-entity certificate.
    pub fn covers(self, is_ca: bool) -> bool {
        match self {
            CrlScope::AllCertificates => true,
            CrlScope::UserCertificates => !is_ca,
            CrlScope::CaCertificates => is_ca,
        }
    }
}

/// A CA certificate whose key may sign CRLs, as configured.
#[derive(Debug, Clone)]
pub struct CrlSigner {
    /// The subject Name, DER with its SEQUENCE header.
    subject_der: Vec<u8>,
    /// The SubjectPublicKeyInfo, DER with its SEQUENCE header.
    spki_der: Vec<u8>,
    /// False when the keyUsage extension is present without cRLSign.
    may_sign_crls: bool,
    subject: String,
}

impl CrlSigner {
    /// Reads the subject, public key and keyUsage of a configured CA certificate.
    ///
    /// # Errors
    ///
    /// Returns a message when the certificate fails to parse.
    pub fn from_certificate(der: &[u8]) -> Result<CrlSigner, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("invalid CA certificate: {e}"))?;
        let may_sign_crls = match cert.key_usage() {
            Ok(Some(usage)) => usage.value.crl_sign(),
            Ok(None) => true,
            Err(e) => return Err(format!("invalid keyUsage in CA certificate: {e}")),
        };
        Ok(CrlSigner {
            subject_der: cert.subject().as_raw().to_vec(),
            spki_der: cert.public_key().raw.to_vec(),
            may_sign_crls,
            subject: cert.subject().to_string(),
        })
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }
}

/// A verified, indexed CRL.
#[derive(Debug)]
pub struct Crl {
    /// The CRL's source: a file path or a URL.
    pub origin: String,
    /// The issuer Name in x509-parser's RFC 4514-style form.
    pub issuer: String,
    /// The issuer Name, DER with its SEQUENCE header.
    pub issuer_der: Vec<u8>,
    /// SHA-256 of `issuer_der`, the same hash as
    /// `DeviceIdentity::issuer_raw_sha256`.
    pub issuer_sha256: [u8; 32],
    pub this_update: i64,
    pub next_update: Option<i64>,
    /// The cRLNumber as minimal two's complement octets.
    pub crl_number: Option<Vec<u8>>,
    pub scope: CrlScope,
    /// The fullName URIs of the issuingDistributionPoint. When not empty, the
    /// CRL covers only certificates whose cRLDistributionPoints name one of them.
    pub distribution_points: Vec<String>,
    pub revoked: RevokedSerials,
}

impl Crl {
    /// Returns the issuer hash as lower-case hex.
    pub fn issuer_sha256_hex(&self) -> String {
        hex_lower(&self.issuer_sha256)
    }

    /// Returns the cRLNumber as lower-case hex, when present.
    pub fn crl_number_hex(&self) -> Option<String> {
        self.crl_number.as_deref().map(serial_hex)
    }

    /// Returns whether this CRL was issued after `other`, by cRLNumber when
    /// both have one and by thisUpdate otherwise.
    pub fn is_newer_than(&self, other: &Crl) -> bool {
        match (&self.crl_number, &other.crl_number) {
            (Some(mine), Some(theirs)) => {
                compare_unsigned(mine, theirs) == std::cmp::Ordering::Greater
            }
            _ => self.this_update > other.this_update,
        }
    }

    /// Returns whether this CRL is the same issue as `other`: same issuer,
    /// cRLNumber and thisUpdate.
    pub fn is_same_issue(&self, other: &Crl) -> bool {
        self.issuer_sha256 == other.issuer_sha256
            && self.crl_number == other.crl_number
            && self.this_update == other.this_update
    }
}

/// The reason a CRL was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlErrorKind {
    #[error("invalid DER: {0}")]
    Malformed(String),
    #[error("the DER is truncated: {0}")]
    Truncated(String),
    #[error("{0} bytes of trailing data after the CRL")]
    TrailingData(usize),
    #[error("expected a DER CRL, but the data is PEM text; HTTP sources must serve DER")]
    PemNotAllowed,
    #[error("no PEM block labelled \"X509 CRL\" was found, and the data is not DER either")]
    NoCrlInFile,
    #[error("failed to read: {0}")]
    Io(String),
    #[error("unsupported CRL version {0}; only v1 and v2 are defined")]
    UnsupportedVersion(String),
    #[error("a v1 CRL must not have extensions")]
    ExtensionsInV1,
    #[error("signatureAlgorithm differs from the signature field inside tbsCertList")]
    AlgorithmMismatch,
    #[error("issuer {issuer} is not the subject of any configured certificate of this CA")]
    UnknownIssuer { issuer: String },
    #[error("the keyUsage of the configured certificate {issuer} does not include cRLSign")]
    IssuerMayNotSignCrls { issuer: String },
    #[error("signature algorithm {algorithm} with the key of {issuer} is not supported")]
    UnsupportedSignatureAlgorithm { algorithm: String, issuer: String },
    #[error(
        "the signature does not verify with the key of any configured certificate named {issuer}"
    )]
    BadSignature { issuer: String },
    #[error(
        "thisUpdate {this_update} is more than the allowed clock skew of {skew_secs}s after the \
         current time {now}"
    )]
    ThisUpdateInFuture {
        this_update: String,
        now: String,
        skew_secs: i64,
    },
    #[error("nextUpdate {next_update} is before thisUpdate {this_update}")]
    NextUpdateBeforeThisUpdate {
        this_update: String,
        next_update: String,
    },
    #[error(
        "it is a delta CRL (deltaCRLIndicator extension), but only complete CRLs are supported"
    )]
    DeltaCrl,
    #[error(
        "it is an indirect CRL ({0}), but only CRLs issued by the certificate issuer are supported"
    )]
    IndirectCrl(String),
    #[error("its issuingDistributionPoint {0}, which is not supported")]
    UnsupportedScope(String),
    #[error("unknown critical extension {oid}{}", entry_suffix(.serial_hex))]
    UnknownCriticalExtension {
        oid: String,
        serial_hex: Option<String>,
    },
    #[error("invalid {name} extension{}: {detail}", entry_suffix(.serial_hex))]
    InvalidExtension {
        name: &'static str,
        serial_hex: Option<String>,
        detail: String,
    },
}

fn entry_suffix(serial_hex: &Option<String>) -> String {
    match serial_hex {
        Some(serial) => format!(" in the entry for serial {serial}"),
        None => String::new(),
    }
}

/// A rejected CRL: where it came from and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CRL from {origin} rejected: {kind}")]
pub struct CrlError {
    pub origin: String,
    pub kind: CrlErrorKind,
}

/// What a CRL is checked against.
#[derive(Debug, Clone, Copy)]
pub struct CrlChecks<'a> {
    /// The configured certificates whose keys may have signed the CRL.
    pub signers: &'a [CrlSigner],
    pub now_unix: i64,
    /// How far thisUpdate may be ahead of `now_unix`, in seconds.
    pub clock_skew_secs: i64,
}

/// Splits CRL file contents into DER CRLs: every "X509 CRL" PEM block, or
/// the whole input when it is DER.
///
/// # Errors
///
/// Returns [`CrlErrorKind::NoCrlInFile`] for PEM text without a CRL block and
/// [`CrlErrorKind::Malformed`] for a PEM block that fails to decode.
pub fn split_crl_file(bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, CrlErrorKind> {
    if !looks_like_pem(&bytes) {
        return Ok(vec![bytes]);
    }
    collect_pem_crls(<(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes))
}

/// Reads a CRL file, PEM or DER, into DER CRLs.
///
/// PEM is decoded while reading, so the text is never held whole: a PEM
/// file costs its base64 body once plus the DER, not the text on top.
///
/// # Errors
///
/// Returns [`CrlErrorKind::Io`] when reading fails, and the errors of
/// [`split_crl_file`].
pub fn read_crl_file(file: std::fs::File) -> Result<Vec<Vec<u8>>, CrlErrorKind> {
    let capacity = file
        .metadata()
        .ok()
        .and_then(|metadata| usize::try_from(metadata.len()).ok())
        .unwrap_or(0);
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let head = reader
        .fill_buf()
        .map_err(|e| CrlErrorKind::Io(e.to_string()))?;
    if looks_like_pem(head) {
        return collect_pem_crls(<(SectionKind, Vec<u8>)>::pem_reader_iter(reader));
    }
    let mut der = Vec::with_capacity(capacity);
    reader
        .read_to_end(&mut der)
        .map_err(|e| CrlErrorKind::Io(e.to_string()))?;
    Ok(vec![der])
}

fn collect_pem_crls<E: fmt::Display>(
    sections: impl Iterator<Item = Result<(SectionKind, Vec<u8>), E>>,
) -> Result<Vec<Vec<u8>>, CrlErrorKind> {
    let mut crls = Vec::new();
    for section in sections {
        let (kind, der) = section.map_err(|e| CrlErrorKind::Malformed(format!("PEM: {e}")))?;
        if kind == SectionKind::Crl {
            crls.push(der);
        }
    }
    if crls.is_empty() {
        return Err(CrlErrorKind::NoCrlInFile);
    }
    Ok(crls)
}

/// Returns whether the data starts like PEM text (after optional whitespace),
/// which a DER CRL, starting with the SEQUENCE tag 0x30, never does.
pub fn looks_like_pem(bytes: &[u8]) -> bool {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    start.is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"))
}

/// Decodes and checks a DER CRL and indexes its entries.
///
/// The checks, in order: the DER structure; the issuer is the subject of one
/// of `checks.signers`, whose keyUsage allows cRLSign and whose key verifies
/// the signature; the CRL-level extensions are supported; thisUpdate is at
/// most the clock skew after now and not after nextUpdate; every entry
/// extension is supported. A CRL past its nextUpdate is accepted, because
/// whether stale data may be used is the caller's decision.
///
/// # Errors
///
/// Returns a [`CrlError`] naming `origin` and the first check that failed.
pub fn parse_crl(der: &[u8], origin: &str, checks: &CrlChecks<'_>) -> Result<Crl, CrlError> {
    decode::parse_crl_inner(der, checks)
        .map_err(|kind| CrlError {
            origin: origin.to_owned(),
            kind,
        })
        .map(|mut crl| {
            crl.origin = origin.to_owned();
            crl
        })
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}
