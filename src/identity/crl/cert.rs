//! The few certificate fields that revocation checks read.

use der::asn1::AnyRef;
use der::{Reader, SliceReader};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

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
