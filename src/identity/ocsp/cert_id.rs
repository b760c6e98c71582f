//! The CertID (RFC 6960 section 4.1.1) of a certificate, and the responder
//! URL from its authorityInfoAccess extension.

use super::OcspError;
use der::asn1::{Null, ObjectIdentifier, OctetString};
use der::oid::db::rfc5912::{ID_SHA_1, ID_SHA_256};
use ring::digest::{digest, Algorithm, SHA1_FOR_LEGACY_USE_ONLY, SHA256};
use rustls_pki_types::CertificateDer;
use spki::AlgorithmIdentifierOwned;
use std::fmt;
use x509_cert::serial_number::SerialNumber;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_PKIX_ACCESS_DESCRIPTOR_OCSP, OID_PKIX_AUTHORITY_INFO_ACCESS};
use x509_parser::prelude::FromDer;

/// Hash algorithm of a CertID's issuerNameHash and issuerKeyHash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CertIdHash {
    /// SHA-1, which RFC 5019 responders are required to accept.
    #[default]
    Sha1,
    Sha256,
}

impl CertIdHash {
    fn algorithm(self) -> &'static Algorithm {
        match self {
            CertIdHash::Sha1 => &SHA1_FOR_LEGACY_USE_ONLY,
            CertIdHash::Sha256 => &SHA256,
        }
    }

    pub(super) fn oid(self) -> ObjectIdentifier {
        match self {
            CertIdHash::Sha1 => ID_SHA_1,
            CertIdHash::Sha256 => ID_SHA_256,
        }
    }

    fn name(self) -> &'static str {
        match self {
            CertIdHash::Sha1 => "sha1",
            CertIdHash::Sha256 => "sha256",
        }
    }
}

/// The identifier of one certificate in OCSP requests and responses: the
/// hashes of its issuer's name and public key, and its serial number.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CertId {
    pub hash: CertIdHash,
    /// Hash of the DER of the issuer's subject Name.
    pub issuer_name_hash: Vec<u8>,
    /// Hash of the issuer's subjectPublicKey BIT STRING value, without the
    /// unused-bits octet.
    pub issuer_key_hash: Vec<u8>,
    /// The serial number's big-endian magnitude without leading zero bytes.
    pub serial: Vec<u8>,
}

impl CertId {
    /// Computes the CertID of `leaf`, which `issuer` issued.
    ///
    /// # Errors
    ///
    /// Fails when either certificate does not parse, when the leaf's issuer
    /// name differs from the issuer's subject, or when the serial number is
    /// negative.
    pub fn new(
        leaf: &CertificateDer<'_>,
        issuer: &CertificateDer<'_>,
        hash: CertIdHash,
    ) -> Result<CertId, OcspError> {
        let leaf = parse(leaf, "device")?;
        let issuer = parse(issuer, "issuer")?;
        CertId::from_parsed(&leaf, &issuer, hash)
    }

    fn from_parsed(
        leaf: &X509Certificate<'_>,
        issuer: &X509Certificate<'_>,
        hash: CertIdHash,
    ) -> Result<CertId, OcspError> {
        if leaf.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(OcspError::InvalidCertificate {
                role: "issuer",
                detail: format!(
                    "its subject {:?} is not the issuer {:?} of the device certificate",
                    issuer.subject().to_string(),
                    leaf.issuer().to_string()
                ),
            });
        }
        let raw_serial = leaf.raw_serial();
        if raw_serial.first().is_some_and(|&byte| byte & 0x80 != 0) {
            return Err(OcspError::InvalidCertificate {
                role: "device",
                detail: "the serial number is negative, which OCSP requests cannot carry"
                    .to_owned(),
            });
        }
        let algorithm = hash.algorithm();
        Ok(CertId {
            hash,
            issuer_name_hash: digest(algorithm, issuer.subject().as_raw())
                .as_ref()
                .to_vec(),
            issuer_key_hash: digest(algorithm, &issuer.public_key().subject_public_key.data)
                .as_ref()
                .to_vec(),
            serial: strip_leading_zeros(raw_serial).to_vec(),
        })
    }

    /// Formats the serial number as lower-case hex, in the form of
    /// `DeviceIdentity::serial_hex` ("1000" for 0x1000, "00" for zero).
    pub fn serial_hex(&self) -> String {
        if self.serial.is_empty() {
            return "00".to_owned();
        }
        hex(&self.serial)
    }

    /// Converts to the CertID type that x509-ocsp encodes. The hash
    /// AlgorithmIdentifier carries NULL parameters, as OpenSSL sends it.
    pub(super) fn to_asn1(&self) -> Result<x509_ocsp::CertId, der::Error> {
        Ok(x509_ocsp::CertId {
            hash_algorithm: AlgorithmIdentifierOwned {
                oid: self.hash.oid(),
                parameters: Some(Null.into()),
            },
            issuer_name_hash: OctetString::new(self.issuer_name_hash.clone())?,
            issuer_key_hash: OctetString::new(self.issuer_key_hash.clone())?,
            serial_number: SerialNumber::new(&self.serial)?,
        })
    }

    /// Describes how `other` differs from this CertID, or returns `None`
    /// when it matches. A hash AlgorithmIdentifier matches with absent or
    /// NULL parameters.
    pub(super) fn mismatch(&self, other: &x509_ocsp::CertId) -> Option<String> {
        if other.hash_algorithm.oid != self.hash.oid() {
            return Some(format!(
                "hash algorithm {} instead of {}",
                other.hash_algorithm.oid,
                self.hash.name()
            ));
        }
        let null_parameters = other
            .hash_algorithm
            .parameters
            .as_ref()
            .map_or(true, |parameters| parameters.is_null());
        if !null_parameters {
            return Some("hash algorithm parameters are present and not NULL".to_owned());
        }
        if other.issuer_name_hash.as_bytes() != self.issuer_name_hash {
            return Some("issuerNameHash differs".to_owned());
        }
        if other.issuer_key_hash.as_bytes() != self.issuer_key_hash {
            return Some("issuerKeyHash differs".to_owned());
        }
        let other_serial = strip_leading_zeros(other.serial_number.as_bytes());
        if other_serial != self.serial.as_slice() {
            let other_hex = if other_serial.is_empty() {
                "00".to_owned()
            } else {
                hex(other_serial)
            };
            return Some(format!(
                "serial number {other_hex} instead of {}",
                self.serial_hex()
            ));
        }
        None
    }
}

impl fmt::Debug for CertId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertId({self})")
    }
}

impl fmt::Display for CertId {
    /// Formats as "sha1:ISSUER_KEY_HASH:SERIAL" in lower-case hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.hash.name(),
            hex(&self.issuer_key_hash),
            self.serial_hex()
        )
    }
}

/// The values that a lookup reads from the leaf and issuer certificates.
pub(super) struct CertInfo {
    pub cert_id: CertId,
    /// The first URI among the leaf's id-ad-ocsp access descriptions.
    pub aia_url: Option<String>,
    /// Lower-case hex SHA-256 of the leaf's issuer Name DER, as in
    /// `DeviceIdentity::issuer_raw_sha256`.
    pub issuer_raw_sha256: String,
}

impl CertInfo {
    pub fn new(
        leaf: &CertificateDer<'_>,
        issuer: &CertificateDer<'_>,
        hash: CertIdHash,
    ) -> Result<CertInfo, OcspError> {
        let leaf = parse(leaf, "device")?;
        let issuer = parse(issuer, "issuer")?;
        let cert_id = CertId::from_parsed(&leaf, &issuer, hash)?;
        Ok(CertInfo {
            cert_id,
            aia_url: ocsp_url(&leaf)?,
            issuer_raw_sha256: hex(digest(&SHA256, leaf.issuer().as_raw()).as_ref()),
        })
    }
}

fn parse<'a>(der: &'a [u8], role: &'static str) -> Result<X509Certificate<'a>, OcspError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|error| OcspError::InvalidCertificate {
            role,
            detail: format!("failed to parse {} bytes of DER: {error}", der.len()),
        })?;
    if !rest.is_empty() {
        return Err(OcspError::InvalidCertificate {
            role,
            detail: format!("{} bytes of trailing data after the DER", rest.len()),
        });
    }
    Ok(cert)
}

fn ocsp_url(leaf: &X509Certificate<'_>) -> Result<Option<String>, OcspError> {
    for extension in leaf.extensions() {
        if extension.oid != OID_PKIX_AUTHORITY_INFO_ACCESS {
            continue;
        }
        let ParsedExtension::AuthorityInfoAccess(access) = extension.parsed_extension() else {
            return Err(OcspError::InvalidCertificate {
                role: "device",
                detail: "the authorityInfoAccess extension does not parse".to_owned(),
            });
        };
        for description in &access.accessdescs {
            if description.access_method != OID_PKIX_ACCESS_DESCRIPTOR_OCSP {
                continue;
            }
            if let GeneralName::URI(uri) = description.access_location {
                return Ok(Some(uri.to_owned()));
            }
        }
    }
    Ok(None)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&byte| byte != 0)
        .unwrap_or(bytes.len());
    &bytes[start..]
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_leading_zeros_keeps_magnitude() {
        assert_eq!(strip_leading_zeros(&[0x00, 0x80, 0xab]), &[0x80, 0xab]);
        assert_eq!(strip_leading_zeros(&[0x10, 0x00]), &[0x10, 0x00]);
        assert!(strip_leading_zeros(&[0x00]).is_empty());
    }

    #[test]
    fn garbage_certificate_rejected() {
        let garbage = CertificateDer::from(b"not a certificate".to_vec());

        let error =
            CertId::new(&garbage, &garbage, CertIdHash::Sha1).expect_err("garbage was accepted");

        assert!(
            matches!(error, OcspError::InvalidCertificate { role: "device", .. }),
            "{error}"
        );
    }
}
