//! OCSPRequest encoding (RFC 6960 section 4.1) with an optional nonce
//! (RFC 8954).

use super::CertId;
use der::asn1::OctetString;
use der::oid::db::rfc6960::ID_PKIX_OCSP_NONCE;
use der::Encode;
use ring::rand::{SecureRandom, SystemRandom};
use x509_cert::ext::Extension;
use x509_ocsp::{OcspRequest, Request, TbsRequest};

/// Nonce length in bytes: RFC 8954 allows 1 to 32 and recommends 32.
const NONCE_LEN: usize = 32;

/// An encoded request and the nonce extension value it carries.
pub(super) struct EncodedRequest {
    pub der: Vec<u8>,
    /// The extnValue of the nonce extension: the DER of an OCTET STRING
    /// that contains the random bytes. A response must echo exactly this.
    pub nonce: Option<Vec<u8>>,
}

/// Encodes an unsigned request for one certificate.
pub(super) fn encode(cert_id: &CertId, with_nonce: bool) -> Result<EncodedRequest, String> {
    let nonce = if with_nonce {
        let mut random = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| "the system random number generator failed".to_owned())?;
        let value = OctetString::new(random.to_vec())
            .and_then(|octets| octets.to_der())
            .map_err(|error| error.to_string())?;
        Some(value)
    } else {
        None
    };
    let request_extensions = match &nonce {
        Some(value) => Some(vec![Extension {
            extn_id: ID_PKIX_OCSP_NONCE,
            critical: false,
            extn_value: OctetString::new(value.clone()).map_err(|error| error.to_string())?,
        }]),
        None => None,
    };
    let request = OcspRequest {
        tbs_request: TbsRequest {
            version: Default::default(),
            requestor_name: None,
            request_list: vec![Request {
                req_cert: cert_id.to_asn1().map_err(|error| error.to_string())?,
                single_request_extensions: None,
            }],
            request_extensions,
        },
        optional_signature: None,
    };
    let der = request.to_der().map_err(|error| error.to_string())?;
    Ok(EncodedRequest { der, nonce })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ocsp::CertIdHash;
    use der::Decode;

    fn sample_cert_id() -> CertId {
        CertId {
            hash: CertIdHash::Sha1,
            issuer_name_hash: vec![0x11; 20],
            issuer_key_hash: vec![0x22; 20],
            serial: vec![0x80, 0x01],
        }
    }

    #[test]
    fn request_round_trips() {
        let encoded = encode(&sample_cert_id(), true).expect("encoding failed");

        let decoded = OcspRequest::from_der(&encoded.der).expect("request does not decode");

        let cert_id = &decoded.tbs_request.request_list[0].req_cert;
        assert_eq!(sample_cert_id().mismatch(cert_id), None);
        let nonce = decoded
            .tbs_request
            .request_extensions
            .expect("no extensions");
        assert_eq!(nonce[0].extn_id, ID_PKIX_OCSP_NONCE);
        assert_eq!(Some(nonce[0].extn_value.as_bytes().to_vec()), encoded.nonce);
        assert_eq!(encoded.nonce.as_ref().map(Vec::len), Some(NONCE_LEN + 2));
    }

    #[test]
    fn request_without_nonce_has_no_extensions() {
        let encoded = encode(&sample_cert_id(), false).expect("encoding failed");

        let decoded = OcspRequest::from_der(&encoded.der).expect("request does not decode");

        assert!(decoded.tbs_request.request_extensions.is_none());
        assert!(encoded.nonce.is_none());
    }

    #[test]
    fn nonces_differ_between_requests() {
        let first = encode(&sample_cert_id(), true).expect("encoding failed");
        let second = encode(&sample_cert_id(), true).expect("encoding failed");

        assert_ne!(first.nonce, second.nonce);
    }
}
