//! DER decoding and the checks of a CertificateList (RFC 5280 section 5.1).

use super::index::canonical_integer;
use super::{
    sha256, Crl, CrlChecks, CrlErrorKind, CrlReason, CrlScope, CrlSigner, RevokedEntry,
    RevokedSerials,
};
use crate::identity::device::{hex_lower, serial_hex};
use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier, OctetStringRef};
use der::{Decode, Reader, SliceReader, Tag, TagNumber, Tagged};
use x509_cert::ext::pkix::crl::dp::IssuingDistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::time::Time;
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

/// The values read from the CRL-level extensions.
struct CrlExtensions {
    crl_number: Option<Vec<u8>>,
    scope: CrlScope,
    distribution_points: Vec<String>,
}

pub(super) fn parse_crl_inner(der: &[u8], checks: &CrlChecks<'_>) -> Result<Crl, CrlErrorKind> {
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
        issuer_der: tbs.issuer.to_vec(),
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
/// and is 1 in v2 CRLs.
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

/// Checks thisUpdate against `checks.now_unix` plus the clock skew, and
/// nextUpdate against thisUpdate.
pub(super) fn check_times(
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

    // Counting first sizes the map once, because growing it keeps the old and
    // the new table alive together, 1.5 times the final size.
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

pub(super) fn read_entry_extensions(
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
