//! Device identity read from a DER leaf certificate.
//!
//! The chain verifier decides whether a certificate is trusted; this module
//! only reads the names and fingerprints that policy and logs key on. It runs
//! on every connection, so it parses the certificate once and hashes the
//! certificate, its SubjectPublicKeyInfo and its issuer Name once each.

use der::asn1::{ContextSpecific, ObjectIdentifier, OctetStringRef, Utf8StringRef};
use der::{Decode, DecodeValue, ErrorKind, FixedTag, Header, Reader, Tag, TagNumber};
use ring::digest::{digest, SHA256};
use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME;
use x509_parser::prelude::FromDer;

/// id-on-permanentIdentifier (RFC 4043).
const PERMANENT_IDENTIFIER_OID: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.8.3");

/// id-on-hardwareModuleName (RFC 4108).
const HARDWARE_MODULE_NAME_OID: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.8.4");

/// Maximum SPIFFE ID length in bytes (SPIFFE ID specification, section 2.3).
const SPIFFE_ID_MAX_LEN: usize = 2048;

/// Maximum trust domain length in bytes, the RFC 3986 host limit that the
/// SPIFFE ID specification (section 2.3) applies.
const TRUST_DOMAIN_MAX_LEN: usize = 255;

const SPIFFE_PREFIX: &str = "spiffe://";

/// Placeholder for summary fields that could not be read.
const UNPARSEABLE: &str = "<unparseable>";

/// An RFC 4043 permanentIdentifier from the subjectAltName extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PermanentIdentifier {
    /// The identifierValue. RFC 4043 says that when it is absent, the value is
    /// the subject's single serialNumber attribute; this field stays `None`.
    pub value: Option<String>,
    /// The assigner as a dotted OID. When it is absent, RFC 4043 makes the
    /// issuing CA the assigner, so the value is unique only within that CA.
    pub assigner: Option<String>,
}

/// An RFC 4108 hardwareModuleName from the subjectAltName extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HardwareModuleName {
    /// The hwType as a dotted OID.
    pub hw_type: String,
    /// The hwSerialNum octets as lower-case hex.
    pub serial_hex: String,
}

/// The identity of a device as read from its leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceIdentity {
    /// Subject name in x509-parser's RFC 4514-style form, with RDNs in DER order.
    pub subject: String,
    /// The first commonName attribute of the subject.
    pub common_name: Option<String>,
    /// Serial number as lower-case hex of its big-endian magnitude without
    /// leading zero bytes ("1000" for 0x1000, "00" for zero). A negative serial
    /// from a non-conforming CA gets a leading '-' ("-05" for -5).
    pub serial_hex: String,
    /// Issuer name in the same form as `subject`.
    pub issuer: String,
    /// Every URI in the subjectAltName extension, in certificate order.
    pub san_uris: Vec<String>,
    /// The certificate's single SPIFFE ID, validated.
    pub spiffe_id: Option<String>,
    /// Every permanentIdentifier in the subjectAltName extension, in order.
    pub permanent_identifiers: Vec<PermanentIdentifier>,
    /// Every hardwareModuleName in the subjectAltName extension, in order.
    pub hardware_modules: Vec<HardwareModuleName>,
    /// Whether the configured hardware-bound OID is present exactly once as a
    /// non-critical extension.
    pub hardware_bound: bool,
    /// Lower-case hex SHA-256 of the whole certificate DER.
    pub cert_sha256: String,
    /// Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: String,
    /// Lower-case hex SHA-256 of the issuer Name's DER, which together with
    /// `serial_hex` identifies the certificate.
    pub issuer_raw_sha256: String,
    /// Start of the validity period in seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// End of the validity period in seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Primary identifier: the SPIFFE ID if there is one, else
    /// "permanent:<assigner>:<value>" of the first permanentIdentifier that has
    /// a value (assigner empty when absent), else "cert:<cert_sha256>".
    pub device_id: String,
}

/// Failure to read a device identity from a certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid certificate: failed to parse {len} bytes of DER: {detail}")]
    Certificate { len: usize, detail: String },
    #[error("invalid certificate: {0} bytes of trailing data after the certificate DER")]
    TrailingData(usize),
    #[error("invalid commonName in subject: {0}")]
    CommonName(String),
    #[error("invalid subjectAltName extension: {0}")]
    SubjectAltName(String),
    #[error("invalid permanentIdentifier in subjectAltName: {0}")]
    PermanentIdentifier(String),
    #[error("invalid hardwareModuleName in subjectAltName: {0}")]
    HardwareModuleName(String),
    #[error("invalid SPIFFE ID {uri:?} in subjectAltName: {reason}")]
    SpiffeId { uri: String, reason: String },
    #[error(
        "invalid subjectAltName: found more than one SPIFFE ID ({first:?} and {second:?}), \
         but an X.509-SVID carries exactly one"
    )]
    MultipleSpiffeIds { first: String, second: String },
    #[error("invalid hardware-bound extension OID {oid:?} in configuration: {reason}")]
    HardwareBoundOid { oid: String, reason: String },
}

/// A best-effort summary of an unverified certificate for logs.
#[derive(Debug, Clone, Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub serial_hex: String,
    pub issuer: String,
    pub cert_sha256: String,
}

/// Reads the device identity from a DER leaf certificate.
///
/// `hardware_bound_oid` is the dotted OID of the extension that marks a key as
/// hardware-bound. A critical mark sets `hardware_bound` to false without an
/// error, because the chain verifier rejects unknown critical extensions.
///
/// # Errors
///
/// Returns an error if the certificate or its subjectAltName extension fails
/// to parse, or if a permanentIdentifier or hardwareModuleName is malformed.
/// It also fails on an invalid spiffe:// URI, on more than one spiffe:// URI,
/// on a commonName that is not a string, and on an invalid `hardware_bound_oid`.
pub fn extract_identity(
    leaf_der: &[u8],
    hardware_bound_oid: Option<&str>,
) -> Result<DeviceIdentity, IdentityError> {
    let hardware_bound_oid = hardware_bound_oid
        .map(parse_hardware_bound_oid)
        .transpose()?;

    let cert = parse_certificate(leaf_der)?;
    let common_name = read_common_name(&cert)?;
    let names = read_subject_alt_names(&cert)?;
    let hardware_bound = hardware_bound_oid
        .is_some_and(|oid| has_single_non_critical_extension(cert.extensions(), &oid));

    let cert_sha256 = sha256_hex(leaf_der);
    let device_id = choose_device_id(
        names.spiffe_id.as_deref(),
        &names.permanent_identifiers,
        &cert_sha256,
    );

    Ok(DeviceIdentity {
        subject: cert.subject().to_string(),
        common_name,
        serial_hex: serial_hex(cert.raw_serial()),
        issuer: cert.issuer().to_string(),
        san_uris: names.uris,
        spiffe_id: names.spiffe_id,
        permanent_identifiers: names.permanent_identifiers,
        hardware_modules: names.hardware_modules,
        hardware_bound,
        cert_sha256,
        spki_sha256: sha256_hex(cert.public_key().raw),
        issuer_raw_sha256: sha256_hex(cert.issuer().as_raw()),
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
        device_id,
    })
}

/// Summarizes an unverified certificate for logs without failing.
///
/// Subject, serial and issuer fall back to "<unparseable>" when the DER does
/// not parse. `cert_sha256` is always the hash of `der` as given, so even an
/// unparseable certificate can be matched across log lines.
pub fn summarize_certificate(der: &[u8]) -> CertSummary {
    let cert_sha256 = sha256_hex(der);
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => CertSummary {
            subject: cert.subject().to_string(),
            serial_hex: serial_hex(cert.raw_serial()),
            issuer: cert.issuer().to_string(),
            cert_sha256,
        },
        Err(_) => CertSummary {
            subject: UNPARSEABLE.to_owned(),
            serial_hex: UNPARSEABLE.to_owned(),
            issuer: UNPARSEABLE.to_owned(),
            cert_sha256,
        },
    }
}

/// Validates a SPIFFE ID by the SPIFFE ID rules.
///
/// The ID must start with "spiffe://" and a non-empty trust domain of at most
/// 255 bytes made of a-z, 0-9, '.', '-' and '_'. It must have no userinfo,
/// port, query or fragment. Each path segment must be non-empty, made of
/// A-Z, a-z, 0-9, '.', '-' and '_', and not "." or "..", and the path must not
/// end with '/'. The whole ID must be at most 2048 bytes. A trust-domain-only
/// ID such as "spiffe://example.org" is valid here; `extract_identity`
/// additionally requires a path, as X.509-SVID leaf certificates must have one.
///
/// # Errors
///
/// Returns a message naming the rule that `uri` breaks.
pub fn validate_spiffe_id(uri: &str) -> Result<(), String> {
    if uri.len() > SPIFFE_ID_MAX_LEN {
        return Err(format!(
            "SPIFFE ID is {} bytes long, over the maximum of {SPIFFE_ID_MAX_LEN} bytes",
            uri.len()
        ));
    }

    let Some(rest) = uri.strip_prefix(SPIFFE_PREFIX) else {
        if has_spiffe_scheme(uri) && !uri.starts_with("spiffe:") {
            return Err("scheme must be lower-case \"spiffe\"".to_owned());
        }
        return Err("SPIFFE ID must start with \"spiffe://\" and a trust domain".to_owned());
    };
    if rest.contains('?') {
        return Err("SPIFFE ID must not contain a query ('?')".to_owned());
    }
    if rest.contains('#') {
        return Err("SPIFFE ID must not contain a fragment ('#')".to_owned());
    }

    let (trust_domain, path) = match rest.find('/') {
        Some(index) => rest.split_at(index),
        None => (rest, ""),
    };
    validate_trust_domain(trust_domain)?;
    validate_path(path)
}

fn validate_trust_domain(trust_domain: &str) -> Result<(), String> {
    if trust_domain.is_empty() {
        return Err("trust domain must not be empty".to_owned());
    }
    if trust_domain.contains('@') {
        return Err("SPIFFE ID must not contain userinfo ('@') before the trust domain".to_owned());
    }
    if trust_domain.contains(':') {
        return Err("SPIFFE ID must not contain a port (':') after the trust domain".to_owned());
    }
    if trust_domain.len() > TRUST_DOMAIN_MAX_LEN {
        return Err(format!(
            "trust domain is {} bytes long, over the maximum of {TRUST_DOMAIN_MAX_LEN} bytes",
            trust_domain.len()
        ));
    }

    for c in trust_domain.chars() {
        if c.is_ascii_uppercase() {
            return Err(format!(
                "trust domain must be lower-case, but contains {c:?}"
            ));
        }
        let allowed = c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
        if !allowed {
            return Err(format!(
                "trust domain contains {c:?}, but only a-z, 0-9, '.', '-' and '_' are allowed"
            ));
        }
    }
    Ok(())
}

/// Validates a SPIFFE ID path, which is empty or starts with '/'.
fn validate_path(path: &str) -> Result<(), String> {
    let Some(segments) = path.strip_prefix('/') else {
        return Ok(());
    };
    if path.ends_with('/') {
        return Err("path must not end with '/'".to_owned());
    }

    for segment in segments.split('/') {
        if segment.is_empty() {
            return Err("path must not contain an empty segment (\"//\")".to_owned());
        }
        if segment == "." || segment == ".." {
            return Err(format!("path must not contain a {segment:?} segment"));
        }
        let invalid = segment
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
        if let Some(c) = invalid {
            return Err(format!(
                "path segment {segment:?} contains {c:?}, but only A-Z, a-z, 0-9, '.', '-' \
                 and '_' are allowed"
            ));
        }
    }
    Ok(())
}

/// Returns whether `uri` has the spiffe scheme in any letter case, so that
/// "SPIFFE://..." is validated and rejected instead of passing as another URI.
fn has_spiffe_scheme(uri: &str) -> bool {
    const SCHEME: &str = "spiffe:";
    uri.get(..SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
}

fn parse_hardware_bound_oid(oid: &str) -> Result<ObjectIdentifier, IdentityError> {
    ObjectIdentifier::new(oid).map_err(|error| IdentityError::HardwareBoundOid {
        oid: oid.to_owned(),
        reason: error.to_string(),
    })
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|error| {
        let detail = match error {
            x509_parser::nom::Err::Incomplete(_) => "the DER is truncated".to_owned(),
            x509_parser::nom::Err::Error(error) | x509_parser::nom::Err::Failure(error) => {
                error.to_string()
            }
        };
        IdentityError::Certificate {
            len: der.len(),
            detail,
        }
    })?;
    if !rest.is_empty() {
        return Err(IdentityError::TrailingData(rest.len()));
    }
    Ok(cert)
}

/// Reads the first commonName of the subject.
///
/// x509-parser 0.16 reads only the string types whose content is ASCII or
/// UTF-8, so the BMPString (UTF-16) and UniversalString (UTF-32) forms that
/// RFC 5280 allows in a DirectoryString are decoded here. A TeletexString stays
/// an error, because its T.61 character set has no reliable mapping to Unicode.
fn read_common_name(cert: &X509Certificate<'_>) -> Result<Option<String>, IdentityError> {
    use x509_parser::der_parser::asn1_rs::{BmpString, Tag as Asn1Tag, UniversalString};

    let Some(attribute) = cert.subject().iter_common_name().next() else {
        return Ok(None);
    };
    let value = attribute.attr_value();
    let common_name = match value.tag() {
        Asn1Tag::BmpString => BmpString::try_from(value)
            .map(|s| s.string())
            .map_err(|error| error.to_string()),
        Asn1Tag::UniversalString => UniversalString::try_from(value)
            .map(|s| s.string())
            .map_err(|error| error.to_string()),
        _ => attribute
            .as_str()
            .map(str::to_owned)
            .map_err(|error| error.to_string()),
    };
    common_name.map(Some).map_err(IdentityError::CommonName)
}

/// Identity-relevant names from the subjectAltName extension.
#[derive(Default)]
struct SubjectAltNames {
    uris: Vec<String>,
    spiffe_id: Option<String>,
    permanent_identifiers: Vec<PermanentIdentifier>,
    hardware_modules: Vec<HardwareModuleName>,
}

impl SubjectAltNames {
    fn add_uri(&mut self, uri: &str) -> Result<(), IdentityError> {
        if has_spiffe_scheme(uri) {
            if let Some(first) = &self.spiffe_id {
                return Err(IdentityError::MultipleSpiffeIds {
                    first: first.clone(),
                    second: uri.to_owned(),
                });
            }
            validate_leaf_spiffe_id(uri).map_err(|reason| IdentityError::SpiffeId {
                uri: uri.to_owned(),
                reason,
            })?;
            self.spiffe_id = Some(uri.to_owned());
        }
        self.uris.push(uri.to_owned());
        Ok(())
    }
}

/// Validates a SPIFFE ID and applies the X.509-SVID leaf rule that the ID must
/// have a path (X.509-SVID specification, section 3.1).
fn validate_leaf_spiffe_id(uri: &str) -> Result<(), String> {
    validate_spiffe_id(uri)?;
    let has_path = uri
        .strip_prefix(SPIFFE_PREFIX)
        .is_some_and(|rest| rest.contains('/'));
    if !has_path {
        return Err(
            "a leaf certificate's SPIFFE ID must have a path after the trust domain".to_owned(),
        );
    }
    Ok(())
}

fn read_subject_alt_names(cert: &X509Certificate<'_>) -> Result<SubjectAltNames, IdentityError> {
    let mut names = SubjectAltNames::default();
    let extension = match cert.get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME) {
        Ok(Some(extension)) => extension,
        Ok(None) => return Ok(names),
        Err(_) => {
            return Err(IdentityError::SubjectAltName(
                "the extension appears more than once".to_owned(),
            ))
        }
    };
    let san = match extension.parsed_extension() {
        ParsedExtension::SubjectAlternativeName(san) => san,
        ParsedExtension::ParseError { error } => {
            return Err(IdentityError::SubjectAltName(format!(
                "failed to parse DER: {error}"
            )))
        }
        _ => {
            return Err(IdentityError::SubjectAltName(
                "the extension did not parse as GeneralNames".to_owned(),
            ))
        }
    };

    for name in &san.general_names {
        match name {
            GeneralName::URI(uri) => names.add_uri(uri)?,
            GeneralName::OtherName(type_id, value) => {
                let type_id = type_id.as_bytes();
                if type_id == PERMANENT_IDENTIFIER_OID.as_bytes() {
                    let identifier = decode_permanent_identifier(value).map_err(|error| {
                        IdentityError::PermanentIdentifier(describe_der_error(&error))
                    })?;
                    names.permanent_identifiers.push(identifier);
                } else if type_id == HARDWARE_MODULE_NAME_OID.as_bytes() {
                    let module = decode_hardware_module_name(value).map_err(|error| {
                        IdentityError::HardwareModuleName(describe_der_error(&error))
                    })?;
                    names.hardware_modules.push(module);
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

/// PermanentIdentifier ::= SEQUENCE {
///     identifierValue UTF8String OPTIONAL,
///     assigner OBJECT IDENTIFIER OPTIONAL }
struct PermanentIdentifierAsn1<'a> {
    identifier_value: Option<Utf8StringRef<'a>>,
    assigner: Option<ObjectIdentifier>,
}

impl<'a> DecodeValue<'a> for PermanentIdentifierAsn1<'a> {
    fn decode_value<R: Reader<'a>>(reader: &mut R, header: Header) -> der::Result<Self> {
        reader.read_nested(header.length, |reader| {
            Ok(Self {
                identifier_value: reader.decode()?,
                assigner: reader.decode()?,
            })
        })
    }
}

impl FixedTag for PermanentIdentifierAsn1<'_> {
    const TAG: Tag = Tag::Sequence;
}

/// HardwareModuleName ::= SEQUENCE {
///     hwType OBJECT IDENTIFIER,
///     hwSerialNum OCTET STRING }
struct HardwareModuleNameAsn1<'a> {
    hw_type: ObjectIdentifier,
    hw_serial_num: OctetStringRef<'a>,
}

impl<'a> DecodeValue<'a> for HardwareModuleNameAsn1<'a> {
    fn decode_value<R: Reader<'a>>(reader: &mut R, header: Header) -> der::Result<Self> {
        reader.read_nested(header.length, |reader| {
            Ok(Self {
                hw_type: reader.decode()?,
                hw_serial_num: reader.decode()?,
            })
        })
    }
}

impl FixedTag for HardwareModuleNameAsn1<'_> {
    const TAG: Tag = Tag::Sequence;
}

fn decode_permanent_identifier(value: &[u8]) -> der::Result<PermanentIdentifier> {
    let decoded: PermanentIdentifierAsn1<'_> = decode_other_name_value(value)?;
    Ok(PermanentIdentifier {
        value: decoded
            .identifier_value
            .map(|value| value.as_str().to_owned()),
        assigner: decoded.assigner.map(|oid| oid.to_string()),
    })
}

fn decode_hardware_module_name(value: &[u8]) -> der::Result<HardwareModuleName> {
    let decoded: HardwareModuleNameAsn1<'_> = decode_other_name_value(value)?;
    Ok(HardwareModuleName {
        hw_type: decoded.hw_type.to_string(),
        serial_hex: hex_lower(decoded.hw_serial_num.as_bytes()),
    })
}

/// Decodes the value of an otherName, `[0] EXPLICIT ANY DEFINED BY type-id`.
///
/// x509-parser 0.16 hands over the otherName content after the type-id OID,
/// which is the whole `[0]` element (tag, length and inner value). Bytes after
/// that element are rejected as trailing data.
fn decode_other_name_value<'a, T: Decode<'a>>(value: &'a [u8]) -> der::Result<T> {
    let wrapper = ContextSpecific::<T>::from_der(value)?;
    if wrapper.tag_number != TagNumber::N0 {
        return Err(ErrorKind::TagUnexpected {
            expected: Some(Tag::ContextSpecific {
                constructed: true,
                number: TagNumber::N0,
            }),
            actual: Tag::ContextSpecific {
                constructed: true,
                number: wrapper.tag_number,
            },
        }
        .into());
    }
    Ok(wrapper.value)
}

/// Describes a DER error, phrasing a tag mismatch as "expected X, found Y".
fn describe_der_error(error: &der::Error) -> String {
    match error.kind() {
        ErrorKind::TagUnexpected {
            expected: Some(expected),
            actual,
        } => format!("expected {expected}, found {actual}"),
        _ => error.to_string(),
    }
}

/// Returns whether exactly one extension has `oid` and it is non-critical. A
/// duplicated mark counts as absent, because RFC 5280 forbids duplicates.
fn has_single_non_critical_extension(
    extensions: &[X509Extension<'_>],
    oid: &ObjectIdentifier,
) -> bool {
    let mut matching = extensions
        .iter()
        .filter(|extension| extension.oid.as_bytes() == oid.as_bytes());
    match (matching.next(), matching.next()) {
        (Some(extension), None) => !extension.critical,
        _ => false,
    }
}

fn choose_device_id(
    spiffe_id: Option<&str>,
    permanent_identifiers: &[PermanentIdentifier],
    cert_sha256: &str,
) -> String {
    if let Some(spiffe_id) = spiffe_id {
        return spiffe_id.to_owned();
    }
    let permanent = permanent_identifiers.iter().find_map(|identifier| {
        let value = identifier.value.as_deref()?;
        Some((identifier.assigner.as_deref().unwrap_or(""), value))
    });
    match permanent {
        // A dotted OID has no ':', so the first ':' after the prefix ends the assigner.
        Some((assigner, value)) => format!("permanent:{assigner}:{value}"),
        None => format!("cert:{cert_sha256}"),
    }
}

/// Formats the content octets of a DER INTEGER serial number.
///
/// RFC 5280 section 4.1.2.2 requires positive serials, but says that users
/// should handle the negative and zero serials of non-conforming CAs
/// gracefully. A negative serial is written as '-' and the hex of its magnitude.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let negative = raw.first().is_some_and(|&byte| byte & 0x80 != 0);
    if negative {
        let magnitude = twos_complement_negate(raw);
        let mut out = String::with_capacity(1 + magnitude.len() * 2);
        out.push('-');
        push_hex(&mut out, strip_leading_zeros(&magnitude));
        return out;
    }

    let magnitude = strip_leading_zeros(raw);
    if magnitude.is_empty() {
        return "00".to_owned();
    }
    hex_lower(magnitude)
}

fn twos_complement_negate(bytes: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = bytes.iter().map(|byte| !byte).collect();
    for byte in out.iter_mut().rev() {
        let (sum, overflow) = byte.overflowing_add(1);
        *byte = sum;
        if !overflow {
            break;
        }
    }
    out
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&byte| byte != 0)
        .unwrap_or(bytes.len());
    &bytes[start..]
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex_lower(digest(&SHA256, bytes).as_ref())
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;
    use std::time::{SystemTime, UNIX_EPOCH};

    const HARDWARE_BOUND_OID: &str = "1.3.6.1.4.1.55555.1.1";
    const ASSIGNER_OID: &str = "1.3.6.1.4.1.55555.2";
    const HW_TYPE_OID: &str = "1.3.6.1.4.1.55555.3";
    const SPIFFE_ID: &str = "spiffe://example.org/device/d-1";

    /// openssl req configuration shared by every fixture. Each test appends
    /// its extension lines after the `[device_ext]` header.
    const BASE_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
x509_extensions = device_ext

[dn]
O = Example Devices
CN = device-1

[permanent_id]
value = UTF8:SN-0001
assigner = OID:1.3.6.1.4.1.55555.2

[permanent_id_value_only]
value = UTF8:SN-0002

[hardware_module]
type = OID:1.3.6.1.4.1.55555.3
serial = FORMAT:HEX,OCT:0a0b0c

[device_ext]
basicConstraints = critical,CA:FALSE
";

    /// A self-signed certificate made by the openssl command line.
    struct Fixture {
        dir: tempfile::TempDir,
        der: Vec<u8>,
    }

    fn run_openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("failed to run openssl; is the openssl command line installed?");
        assert!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// Issues a one-day P-256 certificate with the given serial (as
    /// `-set_serial` takes it) and extension lines.
    fn issue(serial: &str, extensions: &str) -> Fixture {
        let dir = tempfile::TempDir::new().expect("failed to create a temporary directory");
        let config = format!("{BASE_CONFIG}{extensions}");
        std::fs::write(dir.path().join("openssl.cnf"), config).expect("failed to write config");
        run_openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-config",
                "openssl.cnf",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "key.pem",
                "-days",
                "1",
                "-set_serial",
                serial,
                "-outform",
                "DER",
                "-out",
                "cert.der",
            ],
        );
        let der = std::fs::read(dir.path().join("cert.der")).expect("failed to read cert.der");
        Fixture { dir, der }
    }

    /// Returns the SHA-256 that `openssl dgst` computes for a file.
    fn openssl_sha256(fixture: &Fixture, file: &str) -> String {
        let output = run_openssl(fixture.dir.path(), &["dgst", "-sha256", "-r", file]);
        let text = String::from_utf8(output).expect("openssl dgst printed non-UTF-8");
        text.split_whitespace()
            .next()
            .expect("openssl dgst printed nothing")
            .to_owned()
    }

    /// Returns the TBSCertificate child at `index` (0 is the version, 3 the
    /// issuer) as located by `openssl asn1parse`.
    fn tbs_element(fixture: &Fixture, index: usize) -> Vec<u8> {
        let output = run_openssl(
            fixture.dir.path(),
            &["asn1parse", "-inform", "DER", "-in", "cert.der"],
        );
        let text = String::from_utf8(output).expect("openssl asn1parse printed non-UTF-8");
        let line = text
            .lines()
            .filter(|line| line.contains(":d=2 "))
            .nth(index)
            .expect("asn1parse output has too few TBSCertificate children");
        let number_after = |key: &str| -> usize {
            let start = line.find(key).expect("asn1parse line lacks a field") + key.len();
            line[start..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|digits| digits.parse().ok())
                .expect("asn1parse field is not a number")
        };
        let offset: usize = line
            .split(':')
            .next()
            .and_then(|offset| offset.trim().parse().ok())
            .expect("asn1parse line lacks an offset");
        let end = offset + number_after("hl=") + number_after(" l=");
        fixture.der[offset..end].to_vec()
    }

    fn unix_now() -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("system clock is before 1970");
        i64::try_from(now.as_secs()).expect("system clock is out of range")
    }

    fn full_device_extensions(mark: &str) -> String {
        format!(
            "subjectAltName = @alt_names
{mark}

[alt_names]
URI.1 = {SPIFFE_ID}
otherName.1 = 1.3.6.1.5.5.7.8.3;SEQUENCE:permanent_id
otherName.2 = 1.3.6.1.5.5.7.8.4;SEQUENCE:hardware_module
DNS.1 = device-1.example.org
"
        )
    }

    fn san_extensions(alt_names: &str) -> String {
        format!("subjectAltName = @alt_names\n\n[alt_names]\n{alt_names}\n")
    }

    #[test]
    fn full_device_cert_fields() {
        let mark = format!("{HARDWARE_BOUND_OID} = ASN1:NULL");
        let fixture = issue("0x1000", &full_device_extensions(&mark));
        run_openssl(
            fixture.dir.path(),
            &[
                "pkey", "-in", "key.pem", "-pubout", "-outform", "DER", "-out", "spki.der",
            ],
        );
        let issuer_der = tbs_element(&fixture, 3);

        let identity = extract_identity(&fixture.der, Some(HARDWARE_BOUND_OID))
            .expect("full device certificate was rejected");

        assert_eq!(identity.subject, "O=Example Devices, CN=device-1");
        assert_eq!(identity.common_name.as_deref(), Some("device-1"));
        assert_eq!(identity.serial_hex, "1000");
        assert_eq!(identity.issuer, "O=Example Devices, CN=device-1");
        assert_eq!(identity.san_uris, vec![SPIFFE_ID.to_owned()]);
        assert_eq!(identity.spiffe_id.as_deref(), Some(SPIFFE_ID));
        assert_eq!(
            identity.permanent_identifiers,
            vec![PermanentIdentifier {
                value: Some("SN-0001".to_owned()),
                assigner: Some(ASSIGNER_OID.to_owned()),
            }]
        );
        assert_eq!(
            identity.hardware_modules,
            vec![HardwareModuleName {
                hw_type: HW_TYPE_OID.to_owned(),
                serial_hex: "0a0b0c".to_owned(),
            }]
        );
        assert!(identity.hardware_bound);
        assert_eq!(identity.cert_sha256, openssl_sha256(&fixture, "cert.der"));
        assert_eq!(identity.spki_sha256, openssl_sha256(&fixture, "spki.der"));
        assert_eq!(identity.issuer_raw_sha256, sha256_hex(&issuer_der));
        assert_eq!(identity.not_after_unix - identity.not_before_unix, 86_400);
        assert!(
            (identity.not_before_unix - unix_now()).abs() < 3_600,
            "not_before {} is not close to now",
            identity.not_before_unix
        );
        assert_eq!(identity.device_id, SPIFFE_ID);

        let json = serde_json::to_value(&identity).expect("identity failed to serialize");
        assert_eq!(json["device_id"], SPIFFE_ID);
    }

    #[test]
    fn hardware_bound_mark_critical() {
        let mark = format!("{HARDWARE_BOUND_OID} = critical,ASN1:NULL");
        let fixture = issue("0x1001", &full_device_extensions(&mark));

        let identity = extract_identity(&fixture.der, Some(HARDWARE_BOUND_OID))
            .expect("certificate with a critical mark was rejected");

        assert!(!identity.hardware_bound);
    }

    #[test]
    fn hardware_bound_mark_absent() {
        let fixture = issue("0x1002", &full_device_extensions(""));

        let with_oid = extract_identity(&fixture.der, Some(HARDWARE_BOUND_OID))
            .expect("certificate without a mark was rejected");
        let without_oid =
            extract_identity(&fixture.der, None).expect("certificate without a mark was rejected");

        assert!(!with_oid.hardware_bound);
        assert!(!without_oid.hardware_bound);
    }

    #[test]
    fn hardware_bound_mark_without_configured_oid() {
        let mark = format!("{HARDWARE_BOUND_OID} = ASN1:NULL");
        let fixture = issue("0x1003", &full_device_extensions(&mark));

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert!(!identity.hardware_bound);
    }

    #[test]
    fn hardware_bound_mark_duplicated() {
        // openssl merges repeated extension lines, so the second mark is added
        // under a sibling OID of the same encoded length and renamed in the DER.
        let marks = format!("{HARDWARE_BOUND_OID} = ASN1:NULL\n1.3.6.1.4.1.55555.1.2 = ASN1:NULL");
        let fixture = issue("0x1014", &full_device_extensions(&marks));
        let sibling_oid = b"\x06\x0a\x2b\x06\x01\x04\x01\x83\xb2\x03\x01\x02";
        let mut der = fixture.der.clone();
        let position = der
            .windows(sibling_oid.len())
            .position(|window| window == sibling_oid)
            .expect("sibling mark OID not found in the DER");
        der[position + sibling_oid.len() - 1] = 0x01;

        let identity = extract_identity(&der, Some(HARDWARE_BOUND_OID))
            .expect("certificate with a duplicated mark was rejected");

        assert!(!identity.hardware_bound);
    }

    #[test]
    fn hardware_bound_oid_invalid() {
        let fixture = issue("0x1004", &full_device_extensions(""));

        let error = extract_identity(&fixture.der, Some("not-an-oid"))
            .expect_err("an invalid configured OID was accepted");

        assert!(
            matches!(error, IdentityError::HardwareBoundOid { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("not-an-oid"), "{error}");
    }

    #[test]
    fn two_spiffe_uris_rejected() {
        let alt_names =
            "URI.1 = spiffe://example.org/device/a\nURI.2 = spiffe://example.org/device/b";
        let fixture = issue("0x1005", &san_extensions(alt_names));

        let error = extract_identity(&fixture.der, None).expect_err("two SPIFFE IDs were accepted");

        assert!(
            matches!(error, IdentityError::MultipleSpiffeIds { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("more than one SPIFFE ID"),
            "{error}"
        );
    }

    fn rejection(uri: &str) -> String {
        match validate_spiffe_id(uri) {
            Ok(()) => panic!("{uri:?} was accepted as a SPIFFE ID"),
            Err(message) => message,
        }
    }

    #[test]
    fn spiffe_validation_rejects_rule_breaks() {
        let long_path = "a".repeat(SPIFFE_ID_MAX_LEN);
        let long_trust_domain = "a".repeat(TRUST_DOMAIN_MAX_LEN + 1);

        assert!(rejection("spiffe://Example.org/device").contains("lower-case"));
        assert!(rejection("spiffe://example.org/device?x=1").contains("query"));
        assert!(rejection("spiffe://example.org/device#top").contains("fragment"));
        assert!(rejection("spiffe://example.org/a/../b").contains("\"..\""));
        assert!(rejection("spiffe://example.org/a/./b").contains("\".\""));
        assert!(rejection("spiffe://example.org/device/").contains("end with '/'"));
        assert!(rejection("spiffe://example.org/").contains("end with '/'"));
        assert!(rejection("spiffe://example.org/a//b").contains("empty segment"));
        assert!(rejection("spiffe://example.org:8443/device").contains("port"));
        assert!(rejection("spiffe://user@example.org/device").contains("userinfo"));
        assert!(rejection("spiffe:///device").contains("trust domain must not be empty"));
        assert!(rejection("spiffe://exa$mple.org/device").contains("'$'"));
        assert!(rejection("spiffe://example.org/dev%20ice").contains("'%'"));
        assert!(rejection("SPIFFE://example.org/device").contains("lower-case \"spiffe\""));
        assert!(rejection("https://example.org/device").contains("spiffe://"));
        assert!(rejection(&format!("spiffe://example.org/{long_path}")).contains("2048"));
        assert!(rejection(&format!("spiffe://{long_trust_domain}/device")).contains("255"));
    }

    #[test]
    fn spiffe_validation_accepts_valid_ids() {
        let max_path = "a".repeat(SPIFFE_ID_MAX_LEN - "spiffe://example.org/".len());

        assert_eq!(validate_spiffe_id(SPIFFE_ID), Ok(()));
        assert_eq!(validate_spiffe_id("spiffe://example.org"), Ok(()));
        assert_eq!(validate_spiffe_id("spiffe://a_b.c-9/A.b_c-9/x..y"), Ok(()));
        assert_eq!(
            validate_spiffe_id(&format!("spiffe://example.org/{max_path}")),
            Ok(())
        );
    }

    #[test]
    fn invalid_spiffe_uri_in_cert_rejected() {
        let fixture = issue(
            "0x1006",
            &san_extensions("URI.1 = spiffe://Example.org/device"),
        );

        let error =
            extract_identity(&fixture.der, None).expect_err("invalid SPIFFE ID was accepted");

        assert!(matches!(error, IdentityError::SpiffeId { .. }), "{error}");
        assert!(error.to_string().contains("lower-case"), "{error}");
    }

    #[test]
    fn spiffe_id_without_path_rejected() {
        let fixture = issue("0x1007", &san_extensions("URI.1 = spiffe://example.org"));

        let error = extract_identity(&fixture.der, None)
            .expect_err("a leaf SPIFFE ID without a path was accepted");

        assert!(matches!(error, IdentityError::SpiffeId { .. }), "{error}");
        assert!(error.to_string().contains("must have a path"), "{error}");
    }

    #[test]
    fn malformed_subject_alt_name_rejected() {
        // A UTF8String "a" where GeneralNames, a SEQUENCE, belongs.
        let fixture = issue("0x1012", "subjectAltName = DER:0c0161\n");

        let error = extract_identity(&fixture.der, None)
            .expect_err("malformed subjectAltName was accepted");

        assert!(matches!(error, IdentityError::SubjectAltName(_)), "{error}");
    }

    #[test]
    fn duplicate_subject_alt_name_rejected() {
        // openssl merges repeated subjectAltName lines, so the second copy is
        // added under the unassigned OID 2.5.29.99 and renamed to 2.5.29.17 in
        // the DER. Both OIDs encode to 3 bytes, so no length changes.
        let extensions =
            format!("subjectAltName = URI:{SPIFFE_ID}\n2.5.29.99 = DER:3005820378797a\n");
        let fixture = issue("0x1013", &extensions);
        let placeholder_oid = [0x06, 0x03, 0x55, 0x1d, 0x63];
        let mut der = fixture.der.clone();
        let position = der
            .windows(placeholder_oid.len())
            .position(|window| window == placeholder_oid)
            .expect("placeholder extension OID not found in the DER");
        der[position + 4] = 0x11;

        let error =
            extract_identity(&der, None).expect_err("duplicate subjectAltName was accepted");

        assert!(matches!(error, IdentityError::SubjectAltName(_)), "{error}");
        assert!(error.to_string().contains("more than once"), "{error}");
    }

    #[test]
    fn malformed_permanent_identifier_rejected() {
        let alt_names = "otherName.1 = 1.3.6.1.5.5.7.8.3;UTF8:not-a-sequence";
        let fixture = issue("0x1008", &san_extensions(alt_names));

        let error = extract_identity(&fixture.der, None)
            .expect_err("malformed permanentIdentifier was accepted");

        assert!(
            matches!(error, IdentityError::PermanentIdentifier(_)),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "invalid permanentIdentifier in subjectAltName: expected SEQUENCE, found UTF8String"
        );
    }

    #[test]
    fn malformed_hardware_module_name_rejected() {
        let alt_names = "otherName.1 = 1.3.6.1.5.5.7.8.4;SEQUENCE:permanent_id";
        let fixture = issue("0x1009", &san_extensions(alt_names));

        let error = extract_identity(&fixture.der, None)
            .expect_err("malformed hardwareModuleName was accepted");

        assert!(
            matches!(error, IdentityError::HardwareModuleName(_)),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("expected OBJECT IDENTIFIER, found UTF8String"),
            "{error}"
        );
    }

    #[test]
    fn permanent_identifier_value_only() {
        let alt_names = "otherName.1 = 1.3.6.1.5.5.7.8.3;SEQUENCE:permanent_id_value_only";
        let fixture = issue("0x100a", &san_extensions(alt_names));

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert_eq!(
            identity.permanent_identifiers,
            vec![PermanentIdentifier {
                value: Some("SN-0002".to_owned()),
                assigner: None,
            }]
        );
        assert_eq!(identity.spiffe_id, None);
        assert_eq!(identity.device_id, "permanent::SN-0002");
    }

    #[test]
    fn permanent_identifier_device_id_with_assigner() {
        let alt_names = "otherName.1 = 1.3.6.1.5.5.7.8.3;SEQUENCE:permanent_id";
        let fixture = issue("0x100b", &san_extensions(alt_names));

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert_eq!(
            identity.device_id,
            format!("permanent:{ASSIGNER_OID}:SN-0001")
        );
    }

    #[test]
    fn unknown_other_name_ignored() {
        let alt_names = "otherName.1 = 1.3.6.1.4.1.311.20.2.3;UTF8:device@example.org";
        let fixture = issue("0x100c", &san_extensions(alt_names));

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert!(identity.permanent_identifiers.is_empty());
        assert!(identity.hardware_modules.is_empty());
    }

    #[test]
    fn non_spiffe_uri_kept() {
        // The openssl config treats '#' as a comment, so the URI has no fragment.
        let alt_names = format!("URI.1 = https://Example.org/enroll?device=1\nURI.2 = {SPIFFE_ID}");
        let fixture = issue("0x100d", &san_extensions(&alt_names));

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert_eq!(
            identity.san_uris,
            vec![
                "https://Example.org/enroll?device=1".to_owned(),
                SPIFFE_ID.to_owned()
            ]
        );
        assert_eq!(identity.spiffe_id.as_deref(), Some(SPIFFE_ID));
    }

    #[test]
    fn device_id_falls_back_to_cert_hash() {
        let fixture = issue("0x100e", &san_extensions("DNS.1 = device-1.example.org"));

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert!(identity.san_uris.is_empty());
        assert_eq!(identity.device_id, format!("cert:{}", identity.cert_sha256));
    }

    #[test]
    fn no_subject_alt_name() {
        let fixture = issue("0x100f", "");

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert!(identity.san_uris.is_empty());
        assert_eq!(identity.spiffe_id, None);
        assert_eq!(identity.device_id, format!("cert:{}", identity.cert_sha256));
    }

    #[test]
    fn serial_high_bit_padding_stripped() {
        let fixture = issue("0x80ab", "");

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert_eq!(identity.serial_hex, "80ab");
    }

    #[test]
    fn serial_negative_has_sign() {
        let fixture = issue("-0x05", "");

        let identity = extract_identity(&fixture.der, None).expect("certificate was rejected");

        assert_eq!(identity.serial_hex, "-05");
    }

    #[test]
    fn serial_hex_edge_values() {
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[0x01]), "01");
        assert_eq!(serial_hex(&[0x00, 0x80]), "80");
        assert_eq!(serial_hex(&[0x10, 0x00]), "1000");
        assert_eq!(serial_hex(&[0xff]), "-01");
        assert_eq!(serial_hex(&[0x80]), "-80");
        assert_eq!(serial_hex(&[0xff, 0x00]), "-0100");
    }

    #[test]
    fn garbage_bytes_rejected() {
        let error = extract_identity(b"definitely not a certificate", None)
            .expect_err("garbage was accepted");

        assert!(
            matches!(error, IdentityError::Certificate { .. }),
            "{error}"
        );
    }

    #[test]
    fn empty_input_rejected() {
        let error = extract_identity(&[], None).expect_err("empty input was accepted");

        assert!(
            matches!(error, IdentityError::Certificate { .. }),
            "{error}"
        );
    }

    #[test]
    fn trailing_data_rejected() {
        let fixture = issue("0x1010", "");
        let mut der = fixture.der.clone();
        der.extend_from_slice(&[0x00, 0x00]);

        let error = extract_identity(&der, None).expect_err("trailing data was accepted");

        assert!(matches!(error, IdentityError::TrailingData(2)), "{error}");
    }

    #[test]
    fn summarize_garbage_is_unparseable() {
        let garbage = b"\x30\x82\xff\xff garbage";

        let summary = summarize_certificate(garbage);

        assert_eq!(summary.subject, UNPARSEABLE);
        assert_eq!(summary.serial_hex, UNPARSEABLE);
        assert_eq!(summary.issuer, UNPARSEABLE);
        assert_eq!(summary.cert_sha256, sha256_hex(garbage));
    }

    #[test]
    fn summarize_empty_is_unparseable() {
        let summary = summarize_certificate(&[]);

        assert_eq!(summary.subject, UNPARSEABLE);
        assert_eq!(summary.serial_hex, UNPARSEABLE);
        assert_eq!(summary.issuer, UNPARSEABLE);
    }

    #[test]
    fn summarize_valid_cert() {
        let fixture = issue("0x1011", "");

        let summary = summarize_certificate(&fixture.der);

        assert_eq!(summary.subject, "O=Example Devices, CN=device-1");
        assert_eq!(summary.serial_hex, "1011");
        assert_eq!(summary.issuer, "O=Example Devices, CN=device-1");
        assert_eq!(summary.cert_sha256, openssl_sha256(&fixture, "cert.der"));
    }

    /// x509-parser 0.16 hands over the whole `[0] EXPLICIT` element of an
    /// otherName, so the decoder must require that wrapper.
    #[test]
    fn other_name_value_requires_explicit_tag() {
        let inner = b"\x30\x09\x0c\x07SN-0001";
        let mut wrapped = vec![0xa0, 0x0b];
        wrapped.extend_from_slice(inner);
        let mut wrong_tag = wrapped.clone();
        wrong_tag[0] = 0xa1;
        let mut trailing = wrapped.clone();
        trailing.push(0x00);

        let decoded = decode_permanent_identifier(&wrapped).expect("wrapped value was rejected");

        assert_eq!(decoded.value.as_deref(), Some("SN-0001"));
        assert_eq!(decoded.assigner, None);
        assert!(decode_permanent_identifier(inner).is_err());
        assert!(decode_permanent_identifier(&wrong_tag).is_err());
        assert!(decode_permanent_identifier(&trailing).is_err());
    }
}
