//! Certificate revocation lists (RFC 5280 section 5): decoding, the signature,
//! time and extension checks, and an index of the revoked serial numbers.
//!
//! The structure is decoded with the `der` crate's borrowing types, one entry
//! at a time, so that a CRL with a million entries costs one hash map slot per
//! entry and no heap allocation per entry. x509-parser 0.16 would collect every
//! entry into a `Vec` with a `BigUint` and an extension `Vec` each.
//!
//! Only complete CRLs are supported. A delta CRL, an indirect CRL, a CRL whose
//! issuingDistributionPoint limits it to some revocation reasons or to
//! attribute certificates, and a CRL with a critical extension that this
//! module does not process are rejected with a [`CrlError`] that names the
//! reason, so that such a CRL is never applied as if it were complete.

use super::device::{hex_lower, serial_hex};
use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier, OctetStringRef};
use der::{Decode, Reader, SliceReader, Tag, TagNumber, Tagged};
use ring::digest::{digest, SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use std::collections::HashMap;
use std::fmt;
use x509_cert::ext::pkix::crl::dp::IssuingDistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::time::Time;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

const OID_CRL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.20");
const OID_REASON_CODE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.21");
const OID_HOLD_INSTRUCTION_CODE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.23");
const OID_INVALIDITY_DATE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.24");
const OID_DELTA_CRL_INDICATOR: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.27");
const OID_ISSUING_DISTRIBUTION_POINT: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.28");
const OID_CERTIFICATE_ISSUER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.29");
const OID_ISSUER_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.18");
const OID_AUTHORITY_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");
const OID_FRESHEST_CRL: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.46");
const OID_AUTHORITY_INFO_ACCESS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.1");

/// Serial numbers up to this many content octets are stored inline in the
/// index. RFC 5280 section 4.1.2.2 caps conforming serials at 20 octets;
/// longer ones go to a separate, boxed map.
const INLINE_SERIAL_LEN: usize = 20;

/// A serial number stored inline: the length, then the content octets
/// zero-padded to [`INLINE_SERIAL_LEN`].
type InlineSerial = [u8; INLINE_SERIAL_LEN + 1];

/// Marks an absent reasonCode in [`RevokedEntry`].
const NO_REASON: u8 = u8::MAX;

/// A CRLReason (RFC 5280 section 5.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    RemoveFromCrl,
    PrivilegeWithdrawn,
    AaCompromise,
}

impl CrlReason {
    fn from_code(code: u8) -> Option<CrlReason> {
        Some(match code {
            0 => CrlReason::Unspecified,
            1 => CrlReason::KeyCompromise,
            2 => CrlReason::CaCompromise,
            3 => CrlReason::AffiliationChanged,
            4 => CrlReason::Superseded,
            5 => CrlReason::CessationOfOperation,
            6 => CrlReason::CertificateHold,
            8 => CrlReason::RemoveFromCrl,
            9 => CrlReason::PrivilegeWithdrawn,
            10 => CrlReason::AaCompromise,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            CrlReason::Unspecified => 0,
            CrlReason::KeyCompromise => 1,
            CrlReason::CaCompromise => 2,
            CrlReason::AffiliationChanged => 3,
            CrlReason::Superseded => 4,
            CrlReason::CessationOfOperation => 5,
            CrlReason::CertificateHold => 6,
            CrlReason::RemoveFromCrl => 8,
            CrlReason::PrivilegeWithdrawn => 9,
            CrlReason::AaCompromise => 10,
        }
    }

    /// The ASN.1 name from RFC 5280, for example "keyCompromise".
    pub fn name(self) -> &'static str {
        match self {
            CrlReason::Unspecified => "unspecified",
            CrlReason::KeyCompromise => "keyCompromise",
            CrlReason::CaCompromise => "cACompromise",
            CrlReason::AffiliationChanged => "affiliationChanged",
            CrlReason::Superseded => "superseded",
            CrlReason::CessationOfOperation => "cessationOfOperation",
            CrlReason::CertificateHold => "certificateHold",
            CrlReason::RemoveFromCrl => "removeFromCRL",
            CrlReason::PrivilegeWithdrawn => "privilegeWithdrawn",
            CrlReason::AaCompromise => "aACompromise",
        }
    }
}

impl fmt::Display for CrlReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One revoked certificate as stored in the index.
///
/// The fields are byte arrays so that the struct has an alignment of 1 and a
/// map slot takes 30 bytes instead of 40, which is 20 MiB less for a
/// million entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedEntry {
    revoked_at: [u8; 8],
    reason: u8,
}

impl RevokedEntry {
    fn new(revoked_at_unix: i64, reason: Option<CrlReason>) -> RevokedEntry {
        RevokedEntry {
            revoked_at: revoked_at_unix.to_le_bytes(),
            reason: reason.map_or(NO_REASON, CrlReason::code),
        }
    }

    /// The revocationDate in seconds since the Unix epoch.
    pub fn revoked_at_unix(&self) -> i64 {
        i64::from_le_bytes(self.revoked_at)
    }

    /// The reasonCode entry extension, when present.
    pub fn reason(&self) -> Option<CrlReason> {
        CrlReason::from_code(self.reason)
    }
}

/// The revoked serial numbers of one CRL.
///
/// Keys are the content octets of the DER INTEGER with redundant leading
/// 0x00 and 0xff octets removed, which is one encoding per value. The hex form
/// of a key is what [`DeviceIdentity::serial_hex`](super::DeviceIdentity)
/// holds, see [`serial_bytes_from_hex`].
#[derive(Debug, Default)]
pub struct RevokedSerials {
    inline: HashMap<InlineSerial, RevokedEntry>,
    long: HashMap<Box<[u8]>, RevokedEntry>,
}

impl RevokedSerials {
    fn with_capacity(capacity: usize) -> RevokedSerials {
        RevokedSerials {
            inline: HashMap::with_capacity(capacity),
            long: HashMap::new(),
        }
    }

    /// Inserts an entry. A serial listed twice keeps its first entry.
    fn insert(&mut self, serial: &[u8], entry: RevokedEntry) {
        let serial = canonical_integer(serial);
        match inline_serial(serial) {
            Some(key) => {
                self.inline.entry(key).or_insert(entry);
            }
            None => {
                self.long.entry(serial.into()).or_insert(entry);
            }
        }
    }

    /// Looks up a serial number given as the content octets of its DER
    /// INTEGER, as in a certificate.
    pub fn get(&self, serial: &[u8]) -> Option<RevokedEntry> {
        let serial = canonical_integer(serial);
        match inline_serial(serial) {
            Some(key) => self.inline.get(&key).copied(),
            None => self.long.get(serial).copied(),
        }
    }

    pub fn len(&self) -> usize {
        self.inline.len() + self.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the leading octets that a minimal two's complement encoding would
/// not have: 0x00 before an octet below 0x80, and 0xff before one from 0x80.
fn canonical_integer(mut bytes: &[u8]) -> &[u8] {
    while let [first, second, ..] = bytes {
        let redundant =
            (*first == 0x00 && *second & 0x80 == 0) || (*first == 0xff && *second & 0x80 != 0);
        if !redundant {
            break;
        }
        bytes = &bytes[1..];
    }
    bytes
}

fn inline_serial(canonical: &[u8]) -> Option<InlineSerial> {
    if canonical.len() > INLINE_SERIAL_LEN {
        return None;
    }
    let mut key = [0u8; INLINE_SERIAL_LEN + 1];
    // The length fits in a u8 because it is at most INLINE_SERIAL_LEN.
    key[0] = canonical.len() as u8;
    key[1..=canonical.len()].copy_from_slice(canonical);
    Some(key)
}

/// Converts a serial number in the `serial_hex` form ("1000", "00", "-05")
/// into the content octets of its minimal DER INTEGER.
///
/// Upper-case digits, leading zero digits and an odd number of digits are
/// accepted, so "0X1000" is rejected but "01000" and "ABC" are not.
///
/// # Errors
///
/// Returns a message when `hex` is empty or has a character that is not a
/// hex digit after the optional '-'.
pub fn serial_bytes_from_hex(hex: &str) -> Result<Vec<u8>, String> {
    let (negative, digits) = match hex.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, hex),
    };
    if digits.is_empty() {
        return Err(format!("serial number {hex:?} has no hex digits"));
    }
    if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "serial number {hex:?} contains {c:?}, but only hex digits and a leading '-' are allowed"
        ));
    }

    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_owned()
    };
    let mut magnitude = Vec::with_capacity(padded.len() / 2 + 1);
    for pair in padded.as_bytes().chunks(2) {
        let text = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
        let byte = u8::from_str_radix(text, 16).map_err(|e| e.to_string())?;
        magnitude.push(byte);
    }

    let start = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len());
    let magnitude = &magnitude[start..];
    if magnitude.is_empty() {
        return Ok(vec![0]);
    }
    let mut positive = Vec::with_capacity(magnitude.len() + 1);
    if magnitude[0] & 0x80 != 0 {
        positive.push(0);
    }
    positive.extend_from_slice(magnitude);
    if !negative {
        return Ok(positive);
    }

    let mut negated: Vec<u8> = positive.iter().map(|b| !b).collect();
    for byte in negated.iter_mut().rev() {
        let (sum, overflow) = byte.overflowing_add(1);
        *byte = sum;
        if !overflow {
            break;
        }
    }
    Ok(canonical_integer(&negated).to_vec())
}

/// Which certificates a CRL covers, from its issuingDistributionPoint.
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
    /// Where the CRL came from: a file path or a URL.
    pub origin: String,
    /// The issuer Name in x509-parser's RFC 4514-style form.
    pub issuer: String,
    /// SHA-256 of the issuer Name's DER, the same hash as
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
    /// The issuer hash as lower-case hex.
    pub fn issuer_sha256_hex(&self) -> String {
        hex_lower(&self.issuer_sha256)
    }

    /// The cRLNumber as lower-case hex, when present.
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

/// Compares two non-negative minimal two's complement integers.
fn compare_unsigned(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let a = canonical_integer(a);
    let b = canonical_integer(b);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Why a CRL was rejected.
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

/// Splits a CRL file into DER CRLs: every "X509 CRL" PEM block, or the whole
/// file when it is DER.
///
/// # Errors
///
/// Returns [`CrlErrorKind::NoCrlInFile`] for PEM text without a CRL block and
/// [`CrlErrorKind::Malformed`] for a PEM block that fails to decode.
pub fn split_crl_file(bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, CrlErrorKind> {
    if !looks_like_pem(&bytes) {
        return Ok(vec![bytes]);
    }
    let mut crls = Vec::new();
    for block in CertificateRevocationListDer::pem_slice_iter(&bytes) {
        let crl = block.map_err(|e| CrlErrorKind::Malformed(format!("PEM: {e}")))?;
        crls.push(crl.as_ref().to_vec());
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
    parse_crl_inner(der, checks)
        .map_err(|kind| CrlError {
            origin: origin.to_owned(),
            kind,
        })
        .map(|mut crl| {
            crl.origin = origin.to_owned();
            crl
        })
}

/// The parts of a CertificateList, borrowed from its DER.
struct CertificateListParts<'a> {
    tbs: &'a [u8],
    signature_algorithm: AnyRef<'a>,
    signature: BitStringRef<'a>,
}

/// The fields of a TBSCertList, with the entries and extensions left encoded.
struct TbsParts<'a> {
    version: Option<AnyRef<'a>>,
    signature: AnyRef<'a>,
    issuer: &'a [u8],
    this_update: Time,
    next_update: Option<Time>,
    revoked: Option<AnyRef<'a>>,
    extensions: Option<AnyRef<'a>>,
}

/// What the CRL-level extensions say.
struct CrlExtensions {
    crl_number: Option<Vec<u8>>,
    scope: CrlScope,
    distribution_points: Vec<String>,
}

fn parse_crl_inner(der: &[u8], checks: &CrlChecks<'_>) -> Result<Crl, CrlErrorKind> {
    let outer = decode_certificate_list(der)?;
    let tbs = decode_tbs(outer.tbs)?;
    if tbs.signature != outer.signature_algorithm {
        return Err(CrlErrorKind::AlgorithmMismatch);
    }
    let is_v2 = check_version(tbs.version)?;
    if !is_v2 && tbs.extensions.is_some() {
        return Err(CrlErrorKind::ExtensionsInV1);
    }

    verify_signature(&outer, tbs.issuer, checks.signers)?;
    let extensions = read_crl_extensions(tbs.extensions)?;

    let this_update = unix_time(&tbs.this_update);
    let next_update = tbs.next_update.as_ref().map(unix_time);
    check_times(this_update, next_update, checks)?;

    let revoked = index_entries(tbs.revoked)?;
    Ok(Crl {
        origin: String::new(),
        issuer: display_name(tbs.issuer),
        issuer_sha256: sha256(tbs.issuer),
        this_update,
        next_update,
        crl_number: extensions.crl_number,
        scope: extensions.scope,
        distribution_points: extensions.distribution_points,
        revoked,
    })
}

fn decode_certificate_list(der: &[u8]) -> Result<CertificateListParts<'_>, CrlErrorKind> {
    let mut reader = SliceReader::new(der).map_err(der_error)?;
    let parts = reader
        .sequence(|list| {
            Ok(CertificateListParts {
                tbs: list.tlv_bytes()?,
                signature_algorithm: list.decode()?,
                signature: list.decode()?,
            })
        })
        .map_err(der_error)?;
    let remaining = usize::try_from(reader.remaining_len()).unwrap_or(usize::MAX);
    if remaining > 0 {
        return Err(CrlErrorKind::TrailingData(remaining));
    }
    Ok(parts)
}

fn decode_tbs(tbs: &[u8]) -> Result<TbsParts<'_>, CrlErrorKind> {
    let mut reader = SliceReader::new(tbs).map_err(der_error)?;
    reader
        .sequence(|fields| {
            let version = if fields.peek_tag()? == Tag::Integer {
                Some(fields.decode()?)
            } else {
                None
            };
            let signature = fields.decode()?;
            let issuer = fields.tlv_bytes()?;
            let this_update = fields.decode()?;
            let next_update = if next_tag_is(fields, &[Tag::UtcTime, Tag::GeneralizedTime]) {
                Some(fields.decode()?)
            } else {
                None
            };
            let revoked = if next_tag_is(fields, &[Tag::Sequence]) {
                Some(fields.decode()?)
            } else {
                None
            };
            // crlExtensions [0] EXPLICIT Extensions OPTIONAL
            let extensions_tag = Tag::ContextSpecific {
                constructed: true,
                number: TagNumber::N0,
            };
            let extensions = if next_tag_is(fields, &[extensions_tag]) {
                let explicit: AnyRef<'_> = fields.decode()?;
                Some(AnyRef::from_der(explicit.value())?)
            } else {
                None
            };
            Ok(TbsParts {
                version,
                signature,
                issuer,
                this_update,
                next_update,
                revoked,
                extensions,
            })
        })
        .map_err(der_error)
}

fn next_tag_is<'a, R: Reader<'a>>(reader: &R, tags: &[Tag]) -> bool {
    if reader.is_finished() {
        return false;
    }
    reader.peek_tag().is_ok_and(|tag| tags.contains(&tag))
}

/// Returns whether the CRL is v2. The version field is absent in v1 CRLs
/// and holds 1 in v2 CRLs.
fn check_version(version: Option<AnyRef<'_>>) -> Result<bool, CrlErrorKind> {
    let Some(version) = version else {
        return Ok(false);
    };
    match version.value() {
        [1] => Ok(true),
        other => Err(CrlErrorKind::UnsupportedVersion(serial_hex(other))),
    }
}

fn verify_signature(
    outer: &CertificateListParts<'_>,
    issuer: &[u8],
    signers: &[CrlSigner],
) -> Result<(), CrlErrorKind> {
    let candidates: Vec<&CrlSigner> = signers
        .iter()
        .filter(|signer| signer.subject_der == issuer)
        .collect();
    let Some(first) = candidates.first() else {
        return Err(CrlErrorKind::UnknownIssuer {
            issuer: display_name(issuer),
        });
    };
    let signature = outer.signature.as_bytes().ok_or_else(|| {
        CrlErrorKind::Malformed("the signature BIT STRING has unused bits".to_owned())
    })?;
    let algorithm_id = outer.signature_algorithm.value();

    let mut saw_crl_signer = false;
    let mut saw_algorithm = false;
    for signer in &candidates {
        if !signer.may_sign_crls {
            continue;
        }
        saw_crl_signer = true;
        let (key_algorithm, key) = split_spki(&signer.spki_der)?;
        for algorithm in webpki::ALL_VERIFICATION_ALGS.iter().filter(|alg| {
            alg.signature_alg_id().as_ref() == algorithm_id
                && alg.public_key_alg_id().as_ref() == key_algorithm
        }) {
            saw_algorithm = true;
            if algorithm
                .verify_signature(key, outer.tbs, signature)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    let issuer = first.subject.clone();
    if !saw_crl_signer {
        return Err(CrlErrorKind::IssuerMayNotSignCrls { issuer });
    }
    if !saw_algorithm {
        return Err(CrlErrorKind::UnsupportedSignatureAlgorithm {
            algorithm: algorithm_name(algorithm_id),
            issuer,
        });
    }
    Err(CrlErrorKind::BadSignature { issuer })
}

/// Splits a SubjectPublicKeyInfo into the content of its AlgorithmIdentifier
/// and the subjectPublicKey octets.
fn split_spki(spki: &[u8]) -> Result<(&[u8], &[u8]), CrlErrorKind> {
    let mut reader = SliceReader::new(spki).map_err(der_error)?;
    reader
        .sequence(|fields| {
            let algorithm: AnyRef<'_> = fields.decode()?;
            let key: BitStringRef<'_> = fields.decode()?;
            let key = key.as_bytes().ok_or_else(|| Tag::BitString.value_error())?;
            Ok((algorithm.value(), key))
        })
        .map_err(|e| CrlErrorKind::Malformed(format!("configured CA public key: {e}")))
}

/// Names a signature algorithm by the OID inside its AlgorithmIdentifier.
fn algorithm_name(algorithm_id: &[u8]) -> String {
    let mut reader = match SliceReader::new(algorithm_id) {
        Ok(reader) => reader,
        Err(_) => return "<invalid AlgorithmIdentifier>".to_owned(),
    };
    match reader.decode::<ObjectIdentifier>() {
        Ok(oid) => oid.to_string(),
        Err(_) => "<invalid AlgorithmIdentifier>".to_owned(),
    }
}

/// One extension, borrowed from the DER.
struct ExtensionRef<'a> {
    oid: ObjectIdentifier,
    critical: bool,
    value: &'a [u8],
}

fn for_each_extension<'a>(
    extensions: AnyRef<'a>,
    mut visit: impl FnMut(ExtensionRef<'a>) -> Result<(), CrlErrorKind>,
) -> Result<(), CrlErrorKind> {
    if extensions.tag() != Tag::Sequence {
        return Err(CrlErrorKind::Malformed(format!(
            "expected a SEQUENCE of extensions, found {}",
            extensions.tag()
        )));
    }
    let mut reader = SliceReader::new(extensions.value()).map_err(der_error)?;
    while !reader.is_finished() {
        let extension = reader
            .sequence(|fields| {
                let oid: ObjectIdentifier = fields.decode()?;
                let critical = if fields.peek_tag()? == Tag::Boolean {
                    fields.decode::<bool>()?
                } else {
                    false
                };
                let value: OctetStringRef<'a> = fields.decode()?;
                Ok(ExtensionRef {
                    oid,
                    critical,
                    value: value.as_bytes(),
                })
            })
            .map_err(der_error)?;
        visit(extension)?;
    }
    Ok(())
}

fn read_crl_extensions(extensions: Option<AnyRef<'_>>) -> Result<CrlExtensions, CrlErrorKind> {
    let mut out = CrlExtensions {
        crl_number: None,
        scope: CrlScope::AllCertificates,
        distribution_points: Vec::new(),
    };
    let Some(extensions) = extensions else {
        return Ok(out);
    };
    for_each_extension(extensions, |extension| {
        match extension.oid {
            OID_DELTA_CRL_INDICATOR => return Err(CrlErrorKind::DeltaCrl),
            OID_CRL_NUMBER => {
                out.crl_number = Some(read_crl_number(extension.value)?);
            }
            OID_ISSUING_DISTRIBUTION_POINT => {
                let (scope, uris) = read_issuing_distribution_point(extension.value)?;
                out.scope = scope;
                out.distribution_points = uris;
            }
            // Understood, and nothing in them changes how the entries apply.
            OID_AUTHORITY_KEY_IDENTIFIER
            | OID_ISSUER_ALT_NAME
            | OID_FRESHEST_CRL
            | OID_AUTHORITY_INFO_ACCESS => {}
            oid if extension.critical => {
                return Err(CrlErrorKind::UnknownCriticalExtension {
                    oid: oid.to_string(),
                    serial_hex: None,
                })
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn read_crl_number(value: &[u8]) -> Result<Vec<u8>, CrlErrorKind> {
    let invalid = |detail: String| CrlErrorKind::InvalidExtension {
        name: "cRLNumber",
        serial_hex: None,
        detail,
    };
    let number = AnyRef::from_der(value).map_err(|e| invalid(e.to_string()))?;
    if number.tag() != Tag::Integer || number.value().is_empty() {
        return Err(invalid(format!(
            "expected an INTEGER, found {}",
            number.tag()
        )));
    }
    if number.value()[0] & 0x80 != 0 {
        return Err(invalid("the CRL number is negative".to_owned()));
    }
    Ok(canonical_integer(number.value()).to_vec())
}

/// Reads an issuingDistributionPoint and returns the scope and the fullName
/// URIs, or rejects the parts that are not supported.
fn read_issuing_distribution_point(value: &[u8]) -> Result<(CrlScope, Vec<String>), CrlErrorKind> {
    let idp =
        IssuingDistributionPoint::from_der(value).map_err(|e| CrlErrorKind::InvalidExtension {
            name: "issuingDistributionPoint",
            serial_hex: None,
            detail: e.to_string(),
        })?;
    if idp.indirect_crl {
        return Err(CrlErrorKind::IndirectCrl(
            "issuingDistributionPoint has indirectCRL set".to_owned(),
        ));
    }
    if idp.only_some_reasons.is_some() {
        return Err(CrlErrorKind::UnsupportedScope(
            "limits the CRL to some revocation reasons (onlySomeReasons)".to_owned(),
        ));
    }
    if idp.only_contains_attribute_certs {
        return Err(CrlErrorKind::UnsupportedScope(
            "limits the CRL to attribute certificates (onlyContainsAttributeCerts)".to_owned(),
        ));
    }
    let scope = match (idp.only_contains_user_certs, idp.only_contains_ca_certs) {
        (false, false) => CrlScope::AllCertificates,
        (true, false) => CrlScope::UserCertificates,
        (false, true) => CrlScope::CaCertificates,
        (true, true) => {
            return Err(CrlErrorKind::InvalidExtension {
                name: "issuingDistributionPoint",
                serial_hex: None,
                detail: "both onlyContainsUserCerts and onlyContainsCACerts are set".to_owned(),
            })
        }
    };

    let uris = match idp.distribution_point {
        None => Vec::new(),
        Some(DistributionPointName::NameRelativeToCRLIssuer(_)) => {
            return Err(CrlErrorKind::UnsupportedScope(
                "names its distribution point relative to the CRL issuer".to_owned(),
            ))
        }
        Some(DistributionPointName::FullName(names)) => {
            let uris: Vec<String> = names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::UniformResourceIdentifier(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect();
            if uris.is_empty() {
                return Err(CrlErrorKind::UnsupportedScope(
                    "names its distribution point without a URI".to_owned(),
                ));
            }
            uris
        }
    };
    Ok((scope, uris))
}

fn check_times(
    this_update: i64,
    next_update: Option<i64>,
    checks: &CrlChecks<'_>,
) -> Result<(), CrlErrorKind> {
    if this_update > checks.now_unix.saturating_add(checks.clock_skew_secs) {
        return Err(CrlErrorKind::ThisUpdateInFuture {
            this_update: crate::policy::rfc3339_utc(this_update),
            now: crate::policy::rfc3339_utc(checks.now_unix),
            skew_secs: checks.clock_skew_secs,
        });
    }
    if let Some(next_update) = next_update {
        if next_update < this_update {
            return Err(CrlErrorKind::NextUpdateBeforeThisUpdate {
                this_update: crate::policy::rfc3339_utc(this_update),
                next_update: crate::policy::rfc3339_utc(next_update),
            });
        }
    }
    Ok(())
}

/// Decodes every revokedCertificates entry into the index.
fn index_entries(revoked: Option<AnyRef<'_>>) -> Result<RevokedSerials, CrlErrorKind> {
    let Some(revoked) = revoked else {
        return Ok(RevokedSerials::default());
    };
    let entries = revoked.value();

    // Counting first sizes the map once: growing it would hold the old and the
    // new table at the same time, 1.5 times the final size.
    let count = count_elements(entries)?;
    let mut index = RevokedSerials::with_capacity(count);

    let mut reader = SliceReader::new(entries).map_err(der_error)?;
    while !reader.is_finished() {
        let entry: AnyRef<'_> = reader.decode().map_err(der_error)?;
        let (serial, revoked_at, extensions) = entry
            .sequence(|fields| {
                let serial: AnyRef<'_> = fields.decode()?;
                let date: Time = fields.decode()?;
                let extensions = if fields.is_finished() {
                    None
                } else {
                    Some(fields.decode::<AnyRef<'_>>()?)
                };
                Ok((serial, date, extensions))
            })
            .map_err(der_error)?;
        if serial.tag() != Tag::Integer || serial.value().is_empty() {
            return Err(CrlErrorKind::Malformed(format!(
                "expected an INTEGER serial number in a revoked entry, found {}",
                serial.tag()
            )));
        }
        let reason = match extensions {
            Some(extensions) => read_entry_extensions(extensions, serial.value())?,
            None => None,
        };
        index.insert(
            serial.value(),
            RevokedEntry::new(unix_time(&revoked_at), reason),
        );
    }
    Ok(index)
}

fn count_elements(bytes: &[u8]) -> Result<usize, CrlErrorKind> {
    let mut reader = SliceReader::new(bytes).map_err(der_error)?;
    let mut count = 0;
    while !reader.is_finished() {
        reader.tlv_bytes().map_err(der_error)?;
        count += 1;
    }
    Ok(count)
}

fn read_entry_extensions(
    extensions: AnyRef<'_>,
    serial: &[u8],
) -> Result<Option<CrlReason>, CrlErrorKind> {
    let mut reason = None;
    for_each_extension(extensions, |extension| {
        match extension.oid {
            OID_REASON_CODE => reason = Some(read_reason(extension.value, serial)?),
            OID_CERTIFICATE_ISSUER => {
                return Err(CrlErrorKind::IndirectCrl(format!(
                    "the entry for serial {} has a certificateIssuer extension",
                    serial_hex(serial)
                )))
            }
            OID_INVALIDITY_DATE | OID_HOLD_INSTRUCTION_CODE => {}
            oid if extension.critical => {
                return Err(CrlErrorKind::UnknownCriticalExtension {
                    oid: oid.to_string(),
                    serial_hex: Some(serial_hex(serial)),
                })
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(reason)
}

fn read_reason(value: &[u8], serial: &[u8]) -> Result<CrlReason, CrlErrorKind> {
    let invalid = |detail: String| CrlErrorKind::InvalidExtension {
        name: "reasonCode",
        serial_hex: Some(serial_hex(serial)),
        detail,
    };
    let reason = AnyRef::from_der(value).map_err(|e| invalid(e.to_string()))?;
    if reason.tag() != Tag::Enumerated {
        return Err(invalid(format!(
            "expected an ENUMERATED, found {}",
            reason.tag()
        )));
    }
    match reason.value() {
        [code] => CrlReason::from_code(*code)
            .ok_or_else(|| invalid(format!("{code} is not a defined CRLReason"))),
        other => Err(invalid(format!(
            "{} is not a defined CRLReason",
            serial_hex(other)
        ))),
    }
}

/// Converts an X.509 time to seconds since the Unix epoch. `Time` only
/// decodes dates from 1970 on, so the value is never negative.
fn unix_time(time: &Time) -> i64 {
    i64::try_from(time.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
}

fn der_error(error: der::Error) -> CrlErrorKind {
    match error.kind() {
        der::ErrorKind::Incomplete { .. } => CrlErrorKind::Truncated(error.to_string()),
        _ => CrlErrorKind::Malformed(error.to_string()),
    }
}

fn display_name(name_der: &[u8]) -> String {
    match X509Name::from_der(name_der) {
        Ok((_, name)) => name.to_string(),
        Err(_) => format!(
            "<unparseable name, SHA-256 {}>",
            hex_lower(&sha256(name_der))
        ),
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The fields of a certificate that revocation checks need, borrowed from
/// its DER.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CertFields<'a> {
    /// Content octets of the serialNumber INTEGER.
    pub serial: &'a [u8],
    /// The issuer Name, DER with its SEQUENCE header.
    pub issuer: &'a [u8],
    /// The subject Name, DER with its SEQUENCE header.
    pub subject: &'a [u8],
    /// The SubjectPublicKeyInfo, DER with its SEQUENCE header.
    pub spki: &'a [u8],
}

/// Reads the serial, issuer, subject and public key of a certificate
/// without decoding the rest, which is several times faster than a full
/// x509-parser parse.
pub(crate) fn read_cert_fields(der: &[u8]) -> Result<CertFields<'_>, String> {
    let mut reader = SliceReader::new(der).map_err(|e| e.to_string())?;
    let tbs = reader
        .sequence(|cert| {
            let tbs: AnyRef<'_> = cert.decode()?;
            let _signature_algorithm: AnyRef<'_> = cert.decode()?;
            let _signature: AnyRef<'_> = cert.decode()?;
            Ok(tbs)
        })
        .map_err(|e| format!("invalid certificate DER: {e}"))?;
    let fields = tbs
        .sequence(|fields| {
            if fields.peek_tag()?.is_context_specific() {
                let _version: AnyRef<'_> = fields.decode()?;
            }
            let serial: AnyRef<'_> = fields.decode()?;
            let _signature: AnyRef<'_> = fields.decode()?;
            let issuer = fields.tlv_bytes()?;
            let _validity: AnyRef<'_> = fields.decode()?;
            let subject = fields.tlv_bytes()?;
            let spki = fields.tlv_bytes()?;
            while !fields.is_finished() {
                let _optional: AnyRef<'_> = fields.decode()?;
            }
            Ok(CertFields {
                serial: serial.value(),
                issuer,
                subject,
                spki,
            })
        })
        .map_err(|e| format!("invalid tbsCertificate DER: {e}"))?;
    if fields.serial.is_empty() {
        return Err("invalid certificate: empty serial number".to_owned());
    }
    Ok(fields)
}

/// Returns the URIs of the certificate's cRLDistributionPoints whose
/// distributionPoint is a fullName and that have no cRLIssuer. Points with
/// a cRLIssuer lead to indirect CRLs, which are not supported.
///
/// # Errors
///
/// Returns a message when the certificate or the extension fails to parse.
pub fn distribution_point_uris(cert_der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| format!("invalid certificate: {e}"))?;
    let mut uris = Vec::new();
    for extension in cert.extensions() {
        let ParsedExtension::CRLDistributionPoints(points) = extension.parsed_extension() else {
            continue;
        };
        for point in points.iter() {
            if point.crl_issuer.is_some() {
                continue;
            }
            let Some(x509_parser::extensions::DistributionPointName::FullName(names)) =
                &point.distribution_point
            else {
                continue;
            };
            for name in names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name {
                    uris.push((*uri).to_owned());
                }
            }
        }
    }
    Ok(uris)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_pki::{now_unix, openssl_time, Pki};
    use der::Encode;
    use x509_cert::ext::Extension;

    fn signers(pki: &Pki, names: &[&str]) -> Vec<CrlSigner> {
        names
            .iter()
            .map(|name| CrlSigner::from_certificate(&pki.cert(name)).expect("CA certificate"))
            .collect()
    }

    fn checks(signers: &[CrlSigner]) -> CrlChecks<'_> {
        CrlChecks {
            signers,
            now_unix: now_unix(),
            clock_skew_secs: 300,
        }
    }

    fn parse_file(
        pki: &Pki,
        pem: &std::path::Path,
        signer_files: &[&str],
    ) -> Result<Crl, CrlError> {
        let der = pki.crl_der(pem);
        let signers = signers(pki, signer_files);
        parse_crl(&der, "test.crl", &checks(&signers))
    }

    #[test]
    fn serial_forms_match_serial_hex() {
        let cases: &[&[u8]] = &[
            &[0x00],
            &[0x01],
            &[0x00, 0x80],
            &[0x10, 0x00],
            &[0xff],
            &[0x80],
            &[0xff, 0x00],
            &[0x7f; 20],
        ];
        for &raw in cases {
            let hex = serial_hex(raw);

            let bytes = serial_bytes_from_hex(&hex).expect("hex from serial_hex");

            assert_eq!(bytes, canonical_integer(raw), "{hex}");
        }
    }

    #[test]
    fn serial_hex_lenient_forms_accepted() {
        assert_eq!(
            serial_bytes_from_hex("01000").expect("leading zero"),
            [0x10, 0x00]
        );
        assert_eq!(
            serial_bytes_from_hex("ABC").expect("odd length"),
            [0x0a, 0xbc]
        );
        assert_eq!(serial_bytes_from_hex("0000").expect("zero"), [0x00]);
        assert!(serial_bytes_from_hex("").is_err());
        assert!(serial_bytes_from_hex("-").is_err());
        assert!(serial_bytes_from_hex("0x10").is_err());
    }

    #[test]
    fn index_ignores_redundant_leading_octets() {
        let mut index = RevokedSerials::default();
        index.insert(&[0x00, 0x00, 0x10], RevokedEntry::new(5, None));
        let long = [0x42u8; 24];
        index.insert(&long, RevokedEntry::new(6, Some(CrlReason::Superseded)));

        assert_eq!(index.get(&[0x10]).map(|e| e.revoked_at_unix()), Some(5));
        assert!(index.get(&[0x11]).is_none());
        let long_entry = index.get(&long).expect("long serial indexed");
        assert_eq!(long_entry.reason(), Some(CrlReason::Superseded));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn index_slot_is_30_bytes() {
        assert_eq!(std::mem::size_of::<(InlineSerial, RevokedEntry)>(), 30);
    }

    #[test]
    fn openssl_crl_parsed_and_indexed() {
        let pki = Pki::new(None);
        pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
        pki.revoke("device_ca", "DEV-0003.pem", "superseded");
        let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "2"]);

        let crl = parse_file(&pki, &pem, &["device-ca.pem"]).expect("CRL accepted");

        assert_eq!(crl.origin, "test.crl");
        assert_eq!(crl.issuer, "O=ztgate Dev, CN=ztgate Dev Device CA");
        assert_eq!(crl.revoked.len(), 2);
        let revoked = crl.revoked.get(&[0x20, 0x01]).expect("DEV-0002 listed");
        assert_eq!(revoked.reason(), Some(CrlReason::KeyCompromise));
        assert!((now_unix() - revoked.revoked_at_unix()).abs() < 120);
        assert_eq!(
            crl.revoked.get(&[0x20, 0x02]).and_then(|e| e.reason()),
            Some(CrlReason::Superseded)
        );
        assert!(crl.revoked.get(&[0x20, 0x00]).is_none());
        assert_eq!(crl.crl_number_hex().as_deref(), Some("1000"));
        let next_update = crl.next_update.expect("nextUpdate");
        assert_eq!(next_update - crl.this_update, 7200);
        assert_eq!(crl.scope, CrlScope::AllCertificates);
        let identity =
            crate::identity::extract_identity(&pki.cert("DEV-0002.pem"), None).expect("identity");
        assert_eq!(crl.issuer_sha256_hex(), identity.issuer_raw_sha256);
    }

    #[test]
    fn crl_without_entries_accepted() {
        let pki = Pki::new(None);
        let pem = pki.gencrl("device_ca", "empty.crl.pem", &["-crlhours", "1"]);

        let crl = parse_file(&pki, &pem, &["device-ca.pem"]).expect("CRL accepted");

        assert!(crl.revoked.is_empty());
    }

    #[test]
    fn unknown_issuer_rejected() {
        let pki = Pki::new(None);
        let pem = pki.gencrl("other_ca", "other.crl.pem", &["-crlhours", "1"]);

        let error = parse_file(&pki, &pem, &["device-ca.pem", "root-ca.pem"])
            .expect_err("CRL of an unconfigured CA accepted");

        assert!(
            matches!(error.kind, CrlErrorKind::UnknownIssuer { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("ztgate Dev Unrelated CA"),
            "{error}"
        );
        assert!(error.to_string().contains("test.crl"), "{error}");
    }

    #[test]
    fn impostor_signature_rejected() {
        let pki = Pki::new(None);
        let options = pki.impostor_signing_options();
        let mut extra: Vec<&str> = options.iter().map(String::as_str).collect();
        extra.extend_from_slice(&["-crlhours", "1"]);
        let pem = pki.gencrl("device_ca", "impostor.crl.pem", &extra);

        let error = parse_file(&pki, &pem, &["device-ca.pem"]).expect_err("forged CRL accepted");

        assert!(
            matches!(error.kind, CrlErrorKind::BadSignature { .. }),
            "{error}"
        );
    }

    #[test]
    fn truncated_crl_rejected() {
        let pki = Pki::new(None);
        pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
        let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
        let der = pki.crl_der(&pem);
        let signers = signers(&pki, &["device-ca.pem"]);

        let error = parse_crl(&der[..der.len() / 2], "half.crl", &checks(&signers))
            .expect_err("truncated CRL accepted");

        assert!(matches!(error.kind, CrlErrorKind::Truncated(_)), "{error}");
    }

    #[test]
    fn trailing_data_rejected() {
        let pki = Pki::new(None);
        let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
        let mut der = pki.crl_der(&pem);
        der.extend_from_slice(&[0, 0, 0]);
        let signers = signers(&pki, &["device-ca.pem"]);

        let error =
            parse_crl(&der, "padded.crl", &checks(&signers)).expect_err("trailing data accepted");

        assert_eq!(error.kind, CrlErrorKind::TrailingData(3));
    }

    #[test]
    fn future_this_update_rejected() {
        let pki = Pki::new(None);
        let now = now_unix();
        let pem = pki.gencrl(
            "device_ca",
            "future.crl.pem",
            &[
                "-crl_lastupdate",
                &openssl_time(now + 3600),
                "-crl_nextupdate",
                &openssl_time(now + 7200),
            ],
        );

        let error = parse_file(&pki, &pem, &["device-ca.pem"]).expect_err("future CRL accepted");

        assert!(
            matches!(error.kind, CrlErrorKind::ThisUpdateInFuture { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("300s"), "{error}");
    }

    #[test]
    fn this_update_within_skew_accepted() {
        let pki = Pki::new(None);
        let now = now_unix();
        let pem = pki.gencrl(
            "device_ca",
            "soon.crl.pem",
            &[
                "-crl_lastupdate",
                &openssl_time(now + 120),
                "-crl_nextupdate",
                &openssl_time(now + 3600),
            ],
        );

        let crl = parse_file(&pki, &pem, &["device-ca.pem"]).expect("CRL within skew rejected");

        assert_eq!(crl.this_update, now + 120);
    }

    #[test]
    fn delta_crl_rejected() {
        let pki = Pki::new(None);
        // OpenSSL 3.0 cannot set deltaCRL by name in a config, so the
        // section writes deltaCRLIndicator (2.5.29.27) by OID.
        pki.add_config_section("[ delta_ext ]\n2.5.29.27 = critical, ASN1:INTEGER:4096\n");
        let pem = pki.gencrl(
            "device_ca",
            "delta.crl.pem",
            &["-crlhours", "1", "-crlexts", "delta_ext"],
        );

        let error = parse_file(&pki, &pem, &["device-ca.pem"]).expect_err("delta CRL accepted");

        assert_eq!(error.kind, CrlErrorKind::DeltaCrl);
        assert!(error.to_string().contains("delta CRL"), "{error}");
    }

    #[test]
    fn unknown_critical_crl_extension_rejected() {
        let pki = Pki::new(None);
        pki.add_config_section(
            "[ critical_ext ]\n1.3.6.1.4.1.55555.9.9 = critical, ASN1:UTF8String:must-understand\n",
        );
        let pem = pki.gencrl(
            "device_ca",
            "critical.crl.pem",
            &["-crlhours", "1", "-crlexts", "critical_ext"],
        );

        let error =
            parse_file(&pki, &pem, &["device-ca.pem"]).expect_err("unknown critical accepted");

        assert_eq!(
            error.kind,
            CrlErrorKind::UnknownCriticalExtension {
                oid: "1.3.6.1.4.1.55555.9.9".to_owned(),
                serial_hex: None
            }
        );
    }

    #[test]
    fn unknown_non_critical_crl_extension_ignored() {
        let pki = Pki::new(None);
        pki.add_config_section("[ note_ext ]\n1.3.6.1.4.1.55555.9.9 = ASN1:UTF8String:note\n");
        let pem = pki.gencrl(
            "device_ca",
            "note.crl.pem",
            &["-crlhours", "1", "-crlexts", "note_ext"],
        );

        let result = parse_file(&pki, &pem, &["device-ca.pem"]);

        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn issuing_distribution_point_scopes() {
        let pki = Pki::new(None);
        pki.add_config_section(
            "[ user_ext ]\nissuingDistributionPoint = critical, @idp_user\n\
             [ idp_user ]\nfullname = URI:http://127.0.0.1/device-ca.crl\nonlyuser = TRUE\n\
             [ ca_ext ]\nissuingDistributionPoint = critical, @idp_ca\n\
             [ idp_ca ]\nonlyCA = TRUE\n\
             [ reasons_ext ]\nissuingDistributionPoint = critical, @idp_reasons\n\
             [ idp_reasons ]\nonlysomereasons = keyCompromise\n\
             [ indirect_ext ]\nissuingDistributionPoint = critical, @idp_indirect\n\
             [ idp_indirect ]\nindirectCRL = TRUE\n\
             [ attribute_ext ]\nissuingDistributionPoint = critical, @idp_attribute\n\
             [ idp_attribute ]\nonlyAA = TRUE\n",
        );
        let gencrl = |section: &str| {
            let out = format!("{section}.crl.pem");
            let pem = pki.gencrl("device_ca", &out, &["-crlhours", "1", "-crlexts", section]);
            parse_file(&pki, &pem, &["device-ca.pem"])
        };

        let user = gencrl("user_ext").expect("user-only CRL");
        let ca = gencrl("ca_ext").expect("CA-only CRL");
        let reasons = gencrl("reasons_ext").expect_err("onlySomeReasons accepted");
        let indirect = gencrl("indirect_ext").expect_err("indirect CRL accepted");
        let attribute = gencrl("attribute_ext").expect_err("attribute-only CRL accepted");

        assert_eq!(user.scope, CrlScope::UserCertificates);
        assert_eq!(user.distribution_points, ["http://127.0.0.1/device-ca.crl"]);
        assert_eq!(ca.scope, CrlScope::CaCertificates);
        assert!(ca.distribution_points.is_empty());
        assert!(reasons.to_string().contains("onlySomeReasons"), "{reasons}");
        assert!(
            matches!(indirect.kind, CrlErrorKind::IndirectCrl(_)),
            "{indirect}"
        );
        assert!(
            attribute.to_string().contains("onlyContainsAttributeCerts"),
            "{attribute}"
        );
    }

    fn encoded_extensions(extensions: &[Extension]) -> Vec<u8> {
        extensions.to_vec().to_der().expect("extensions encode")
    }

    fn extension(oid: &str, critical: bool, value: &[u8]) -> Extension {
        Extension {
            extn_id: ObjectIdentifier::new_unwrap(oid),
            critical,
            extn_value: der::asn1::OctetString::new(value).expect("octet string"),
        }
    }

    #[test]
    fn entry_extensions_checked() {
        let reason = extension("2.5.29.21", false, &[0x0a, 0x01, 0x01]);
        let unknown_critical = extension("1.3.6.1.4.1.55555.9.8", true, &[0x05, 0x00]);
        let certificate_issuer = extension("2.5.29.29", true, &[0x30, 0x00]);
        let bad_reason = extension("2.5.29.21", false, &[0x0a, 0x01, 0x07]);
        let read = |extensions: &[Extension]| {
            let der = encoded_extensions(extensions);
            let any = AnyRef::from_der(&der).expect("extensions decode");
            read_entry_extensions(any, &[0x20, 0x01])
        };

        let parsed = read(std::slice::from_ref(&reason));
        let critical = read(&[reason, unknown_critical]);
        let indirect = read(&[certificate_issuer]);
        let invalid = read(&[bad_reason]);

        assert_eq!(parsed, Ok(Some(CrlReason::KeyCompromise)));
        assert_eq!(
            critical,
            Err(CrlErrorKind::UnknownCriticalExtension {
                oid: "1.3.6.1.4.1.55555.9.8".to_owned(),
                serial_hex: Some("2001".to_owned()),
            })
        );
        assert!(
            matches!(indirect, Err(CrlErrorKind::IndirectCrl(_))),
            "{indirect:?}"
        );
        let message = invalid.expect_err("reason 7 accepted").to_string();
        assert!(message.contains("serial 2001"), "{message}");
    }

    #[test]
    fn pem_file_split_into_crls() {
        let pki = Pki::new(None);
        let device = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
        let root = pki.gencrl("root_ca", "root-ca.crl.pem", &["-crlhours", "1"]);
        let mut both = std::fs::read(&root).expect("root CRL");
        both.extend(std::fs::read(&device).expect("device CRL"));
        let der = pki.crl_der(&device);

        let from_pem = split_crl_file(both).expect("PEM split");
        let from_der = split_crl_file(der.clone()).expect("DER kept");
        let not_crl =
            split_crl_file(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_vec());

        assert_eq!(from_pem.len(), 2);
        assert_eq!(from_pem[1], der);
        assert_eq!(from_der, vec![der]);
        assert_eq!(not_crl, Err(CrlErrorKind::NoCrlInFile));
    }

    #[test]
    fn cert_fields_match_x509_parser() {
        let pki = Pki::new(None);
        for name in ["DEV-0001.pem", "device-ca.pem", "root-ca.pem"] {
            let der = pki.cert(name);
            let (_, parsed) = X509Certificate::from_der(&der).expect("certificate");

            let fields = read_cert_fields(&der).expect("fields");

            assert_eq!(fields.serial, parsed.raw_serial(), "{name}");
            assert_eq!(fields.issuer, parsed.issuer().as_raw(), "{name}");
            assert_eq!(fields.subject, parsed.subject().as_raw(), "{name}");
            assert_eq!(fields.spki, parsed.public_key().raw, "{name}");
        }
    }

    #[test]
    fn distribution_point_uris_read() {
        let pki = Pki::new(Some("http://127.0.0.1:9/device-ca.crl"));

        let uris = distribution_point_uris(&pki.cert("DEV-0001.pem")).expect("certificate");
        let none = distribution_point_uris(&pki.cert("device-ca.pem")).expect("certificate");

        assert_eq!(uris, ["http://127.0.0.1:9/device-ca.crl"]);
        assert!(none.is_empty());
    }
}
