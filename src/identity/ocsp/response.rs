//! OCSPResponse decoding and verification (RFC 6960 sections 3.2 and 4.2).

use super::{format_time, CertId, OcspError, OcspStatus};
use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier};
use der::oid::db::rfc5280::ID_KP_OCSP_SIGNING;
use der::oid::db::rfc6960::{ID_PKIX_OCSP_BASIC, ID_PKIX_OCSP_NONCE};
use der::{Decode, Encode, Sequence};
use ring::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use std::time::{Duration, SystemTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_cert::ext::Extension;
use x509_ocsp::{CertStatus, OcspResponse, OcspResponseStatus, ResponderId, ResponseData};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// Signature algorithms accepted on responses and delegated responder
/// certificates: ECDSA P-256/P-384 with SHA-256/384, RSA PKCS#1 v1.5 and
/// RSA-PSS with SHA-256/384/512 (2048 to 8192-bit keys), and Ed25519.
static SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// id-kp-OCSPSigning, in a static so that webpki can borrow its encoding.
static OCSP_SIGNING: ObjectIdentifier = ID_KP_OCSP_SIGNING;

/// BasicOCSPResponse with its parts kept as received, because the
/// signature covers the exact DER of tbsResponseData.
#[derive(Sequence)]
struct RawBasicResponse<'a> {
    tbs_response_data: AnyRef<'a>,
    signature_algorithm: AnyRef<'a>,
    signature: BitStringRef<'a>,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    certs: Option<Vec<AnyRef<'a>>>,
}

/// The request values that the response must match, and the limits it is
/// checked against.
pub struct Expected<'a> {
    pub url: &'a str,
    pub cert_id: &'a CertId,
    pub issuer: &'a CertificateDer<'static>,
    /// The nonce extension value that the request carried.
    pub nonce: Option<&'a [u8]>,
    pub require_nonce: bool,
    pub clock_skew: Duration,
    pub default_lifetime: Duration,
}

/// The verified status of the requested certificate.
#[derive(Debug, Clone)]
pub struct Verified {
    pub status: OcspStatus,
    pub this_update: SystemTime,
    pub valid_until: SystemTime,
}

/// Decodes `body` and verifies it against `expected` at time `now`.
pub fn verify(
    body: &[u8],
    expected: &Expected<'_>,
    now: SystemTime,
) -> Result<Verified, OcspError> {
    let url = expected.url;
    let malformed = |detail: String| OcspError::Malformed {
        url: url.to_owned(),
        detail,
    };
    let response = OcspResponse::from_der(body)
        .map_err(|error| malformed(format!("OCSPResponse does not decode: {error}")))?;
    check_response_status(response.response_status, url)?;
    let Some(bytes) = response.response_bytes else {
        return Err(malformed(
            "the response status is successful, but responseBytes is missing".to_owned(),
        ));
    };
    if bytes.response_type != ID_PKIX_OCSP_BASIC {
        return Err(OcspError::UnsupportedResponseType {
            url: url.to_owned(),
            oid: bytes.response_type.to_string(),
        });
    }

    let raw = RawBasicResponse::from_der(bytes.response.as_bytes())
        .map_err(|error| malformed(format!("BasicOCSPResponse does not decode: {error}")))?;
    let tbs_der = raw
        .tbs_response_data
        .to_der()
        .map_err(|error| malformed(format!("tbsResponseData does not encode: {error}")))?;
    let data = ResponseData::from_der(&tbs_der)
        .map_err(|error| malformed(format!("tbsResponseData does not decode: {error}")))?;
    let certs = match &raw.certs {
        Some(certs) => certs
            .iter()
            .map(|cert| cert.to_der())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| {
                malformed(format!(
                    "a certificate in the response does not encode: {error}"
                ))
            })?,
        None => Vec::new(),
    };

    let now_unix = unix_time(now);
    let signer = choose_signer(&data.responder_id, expected.issuer, &certs, now_unix, url)?;
    let Some(signature) = raw.signature.as_bytes() else {
        return Err(malformed(
            "the signature BIT STRING has unused bits".to_owned(),
        ));
    };
    verify_signature(
        &signer,
        raw.signature_algorithm.value(),
        &tbs_der,
        signature,
        url,
    )?;

    check_critical_extensions(data.response_extensions.as_deref(), url)?;
    check_nonce(&data, expected)?;

    let Some(single) = data
        .responses
        .iter()
        .find(|single| expected.cert_id.mismatch(&single.cert_id).is_none())
    else {
        let detail = match data.responses.first() {
            Some(single) => format!(
                "the response is for another certificate: {}",
                expected
                    .cert_id
                    .mismatch(&single.cert_id)
                    .unwrap_or_default()
            ),
            None => "the response lists no certificate".to_owned(),
        };
        return Err(OcspError::CertIdMismatch {
            url: url.to_owned(),
            cert_id: expected.cert_id.to_string(),
            detail,
        });
    };
    check_critical_extensions(single.single_extensions.as_deref(), url)?;

    let this_update = single.this_update.0.to_system_time();
    let next_update = single.next_update.map(|time| time.0.to_system_time());
    let valid_until = check_validity(
        url,
        this_update,
        next_update,
        expected.clock_skew,
        expected.default_lifetime,
        now,
    )?;

    let status = match single.cert_status {
        CertStatus::Good(_) => OcspStatus::Good {
            this_update,
            next_update: valid_until,
        },
        CertStatus::Revoked(info) => OcspStatus::Revoked {
            revocation_time: info.revocation_time.0.to_system_time(),
            reason: info.revocation_reason,
        },
        CertStatus::Unknown(_) => OcspStatus::Unknown,
    };
    Ok(Verified {
        status,
        this_update,
        valid_until,
    })
}

fn check_response_status(status: OcspResponseStatus, url: &str) -> Result<(), OcspError> {
    let url = url.to_owned();
    match status {
        OcspResponseStatus::Successful => Ok(()),
        OcspResponseStatus::MalformedRequest => Err(OcspError::MalformedRequest { url }),
        OcspResponseStatus::InternalError => Err(OcspError::InternalError { url }),
        OcspResponseStatus::TryLater => Err(OcspError::TryLater { url }),
        OcspResponseStatus::SigRequired => Err(OcspError::SigRequired { url }),
        OcspResponseStatus::Unauthorized => Err(OcspError::Unauthorized { url }),
    }
}

/// Returns the end of a response's validity: `next_update`, or `this_update`
/// plus `default_lifetime` when the response has no nextUpdate. Fails when
/// `now` is more than `clock_skew` before `this_update` or after that end.
pub(crate) fn check_validity(
    url: &str,
    this_update: SystemTime,
    next_update: Option<SystemTime>,
    clock_skew: Duration,
    default_lifetime: Duration,
    now: SystemTime,
) -> Result<SystemTime, OcspError> {
    let ahead = this_update.duration_since(now).unwrap_or(Duration::ZERO);
    if ahead > clock_skew {
        return Err(OcspError::NotYetValid {
            url: url.to_owned(),
            this_update: format_time(this_update),
            skew: clock_skew,
        });
    }
    let valid_until = match next_update {
        Some(next_update) => next_update,
        None => this_update
            .checked_add(default_lifetime)
            .ok_or_else(|| OcspError::Malformed {
                url: url.to_owned(),
                detail: "thisUpdate plus the default lifetime is out of range".to_owned(),
            })?,
    };
    let late = now.duration_since(valid_until).unwrap_or(Duration::ZERO);
    if late > clock_skew {
        return Err(OcspError::Expired {
            url: url.to_owned(),
            valid_until: format_time(valid_until),
        });
    }
    Ok(valid_until)
}

/// Rejects critical extensions other than the nonce, which RFC 6960
/// section 4.4 forbids ignoring.
fn check_critical_extensions(extensions: Option<&[Extension]>, url: &str) -> Result<(), OcspError> {
    let unsupported = extensions
        .unwrap_or_default()
        .iter()
        .find(|extension| extension.critical && extension.extn_id != ID_PKIX_OCSP_NONCE);
    match unsupported {
        Some(extension) => Err(OcspError::Malformed {
            url: url.to_owned(),
            detail: format!("unsupported critical extension {}", extension.extn_id),
        }),
        None => Ok(()),
    }
}

fn check_nonce(data: &ResponseData, expected: &Expected<'_>) -> Result<(), OcspError> {
    let url = expected.url.to_owned();
    let received = data.response_extensions.as_deref().and_then(|extensions| {
        extensions
            .iter()
            .find(|extension| extension.extn_id == ID_PKIX_OCSP_NONCE)
    });
    match (received, expected.nonce) {
        (Some(received), Some(sent)) if received.extn_value.as_bytes() != sent => {
            Err(OcspError::NonceMismatch { url })
        }
        (None, _) if expected.require_nonce => Err(OcspError::NonceMissing { url }),
        _ => Ok(()),
    }
}

/// Chooses the certificate whose key must have signed the response: the
/// issuing CA when the responder ID names it, otherwise a certificate from
/// the response that the responder ID names and that the CA authorized.
fn choose_signer(
    responder_id: &ResponderId,
    issuer: &CertificateDer<'static>,
    certs: &[Vec<u8>],
    now: UnixTime,
    url: &str,
) -> Result<CertificateDer<'static>, OcspError> {
    let untrusted = |detail: String| OcspError::UntrustedSigner {
        url: url.to_owned(),
        detail,
    };
    let responder_name =
        match responder_id {
            ResponderId::ByName(name) => Some(name.to_der().map_err(|error| {
                untrusted(format!("the responder name does not encode: {error}"))
            })?),
            ResponderId::ByKey(_) => None,
        };
    let names_responder = |cert: &X509Certificate<'_>| match responder_id {
        ResponderId::ByName(_) => responder_name.as_deref() == Some(cert.subject().as_raw()),
        ResponderId::ByKey(key_hash) => {
            let hash = digest(
                &SHA1_FOR_LEGACY_USE_ONLY,
                &cert.public_key().subject_public_key.data,
            );
            key_hash.as_bytes() == hash.as_ref()
        }
    };

    let (_, issuer_cert) = X509Certificate::from_der(issuer)
        .map_err(|error| untrusted(format!("the issuer certificate does not parse: {error}")))?;
    if names_responder(&issuer_cert) {
        return Ok(issuer.clone());
    }

    let mut rejected = Vec::new();
    for der in certs {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            continue;
        };
        if !names_responder(&cert) {
            continue;
        }
        match check_delegate(der, issuer, now) {
            Ok(()) => return Ok(CertificateDer::from(der.clone())),
            Err(reason) => rejected.push(format!(
                "responder certificate {:?}: {reason}",
                cert.subject().to_string()
            )),
        }
    }
    if rejected.is_empty() {
        return Err(untrusted(format!(
            "the responder ID ({}) names neither the issuing CA {:?} nor a certificate in the response",
            describe_responder_id(responder_id),
            issuer_cert.subject().to_string()
        )));
    }
    Err(untrusted(rejected.join("; ")))
}

fn describe_responder_id(responder_id: &ResponderId) -> String {
    match responder_id {
        ResponderId::ByName(name) => format!("name {name}"),
        ResponderId::ByKey(key_hash) => {
            format!("key hash {}", super::cert_id::hex(key_hash.as_bytes()))
        }
    }
}

/// Checks that `delegate` was issued and signed by `issuer`, is valid at
/// `now` and has the id-kp-OCSPSigning extended key usage.
fn check_delegate(
    delegate: &[u8],
    issuer: &CertificateDer<'static>,
    now: UnixTime,
) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(issuer)
        .map_err(|error| format!("the issuing CA certificate is unusable: {error}"))?;
    let delegate = CertificateDer::from(delegate);
    let end_entity = EndEntityCert::try_from(&delegate)
        .map_err(|error| format!("the certificate does not parse: {error}"))?;
    end_entity
        .verify_for_usage(
            SIGNATURE_ALGORITHMS,
            &[anchor],
            &[],
            now,
            KeyUsage::required(OCSP_SIGNING.as_bytes()),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|error| match error {
            webpki::Error::UnknownIssuer => {
                "it was not issued by the issuing CA of the device certificate".to_owned()
            }
            webpki::Error::RequiredEkuNotFoundContext(_) => {
                "it does not have the id-kp-OCSPSigning extended key usage".to_owned()
            }
            webpki::Error::CaUsedAsEndEntity => {
                "it is a CA certificate (basicConstraints cA is true), and only the issuing CA itself may sign as a CA".to_owned()
            }
            webpki::Error::CertExpired { .. } => "it has expired".to_owned(),
            webpki::Error::CertNotValidYet { .. } => "it is not valid yet".to_owned(),
            webpki::Error::InvalidSignatureForPublicKey => {
                "its signature does not verify with the issuing CA's key".to_owned()
            }
            other => format!("it is not a valid responder certificate: {other}"),
        })
}

/// Verifies `signature` over `message` with the public key of `signer`.
/// `algorithm_id` is the content of the signatureAlgorithm SEQUENCE.
fn verify_signature(
    signer: &CertificateDer<'static>,
    algorithm_id: &[u8],
    message: &[u8],
    signature: &[u8],
    url: &str,
) -> Result<(), OcspError> {
    let bad_signature = |detail: String| OcspError::BadSignature {
        url: url.to_owned(),
        detail,
    };
    let end_entity = EndEntityCert::try_from(signer).map_err(|error| {
        bad_signature(format!("the signer certificate does not parse: {error}"))
    })?;
    let mut candidates = SIGNATURE_ALGORITHMS
        .iter()
        .filter(|algorithm| algorithm.signature_alg_id().as_ref() == algorithm_id)
        .peekable();
    if candidates.peek().is_none() {
        return Err(bad_signature(format!(
            "unsupported signature algorithm {}",
            describe_algorithm(algorithm_id)
        )));
    }
    let mut last_error = None;
    for algorithm in candidates {
        match end_entity.verify_signature(*algorithm, message, signature) {
            Ok(()) => return Ok(()),
            Err(error) => last_error = Some(error),
        }
    }
    let detail = match last_error {
        Some(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => format!(
            "signature algorithm {} does not fit the signer's key type",
            describe_algorithm(algorithm_id)
        ),
        _ => "the signature does not verify with the signer's public key".to_owned(),
    };
    Err(bad_signature(detail))
}

/// Names the OID at the start of an AlgorithmIdentifier's content.
fn describe_algorithm(algorithm_id: &[u8]) -> String {
    der::SliceReader::new(algorithm_id)
        .and_then(|mut reader| ObjectIdentifier::decode(&mut reader))
        .map_or_else(|_| "<undecodable>".to_owned(), |oid| oid.to_string())
}

fn unix_time(time: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(
        time.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ocsp::CertIdHash;

    fn expected<'a>(cert_id: &'a CertId, issuer: &'a CertificateDer<'static>) -> Expected<'a> {
        Expected {
            url: "http://127.0.0.1:1/",
            cert_id,
            issuer,
            nonce: None,
            require_nonce: false,
            clock_skew: Duration::from_secs(60),
            default_lifetime: Duration::from_secs(600),
        }
    }

    fn sample_cert_id() -> CertId {
        CertId {
            hash: CertIdHash::Sha1,
            issuer_name_hash: vec![1; 20],
            issuer_key_hash: vec![2; 20],
            serial: vec![0x20, 0x00],
        }
    }

    fn error_for(body: &[u8]) -> OcspError {
        let cert_id = sample_cert_id();
        let issuer = CertificateDer::from(Vec::new());
        verify(body, &expected(&cert_id, &issuer), SystemTime::now())
            .expect_err("the response was accepted")
    }

    #[test]
    fn response_statuses_map_to_distinct_errors() {
        let cases = [
            (OcspResponse::malformed_request(), "malformed_request"),
            (OcspResponse::internal_error(), "internal_error"),
            (OcspResponse::try_later(), "try_later"),
            (OcspResponse::sig_required(), "sig_required"),
            (OcspResponse::unauthorized(), "unauthorized"),
        ];
        for (response, label) in cases {
            let body = response.to_der().expect("encoding failed");

            let error = error_for(&body);

            assert_eq!(error.label(), label, "{error}");
            assert_eq!(error.responder_url(), Some("http://127.0.0.1:1/"));
        }
    }

    #[test]
    fn try_later_is_three_bytes_of_status() {
        let body = OcspResponse::try_later().to_der().expect("encoding failed");

        assert_eq!(body, [0x30, 0x03, 0x0a, 0x01, 0x03]);
    }

    #[test]
    fn garbage_is_malformed() {
        let error = error_for(b"\x00\x01garbage");

        assert!(matches!(error, OcspError::Malformed { .. }), "{error}");
    }

    #[test]
    fn successful_without_bytes_is_malformed() {
        let response = OcspResponse {
            response_status: OcspResponseStatus::Successful,
            response_bytes: None,
        };
        let body = response.to_der().expect("encoding failed");

        let error = error_for(&body);

        assert!(matches!(error, OcspError::Malformed { .. }), "{error}");
        assert!(
            error.to_string().contains("responseBytes is missing"),
            "{error}"
        );
    }

    #[test]
    fn describe_algorithm_names_oid() {
        let id = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2")
            .to_der()
            .expect("encoding failed");

        assert_eq!(describe_algorithm(&id), "1.2.840.10045.4.3.2");
        assert_eq!(describe_algorithm(&[]), "<undecodable>");
    }

    /// Converts seconds since the Unix epoch to a `SystemTime`.
    fn at(unix_secs: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs.unsigned_abs())
    }

    /// Picks `now` a few seconds around one edge of the validity window
    /// widened by `skew`, or anywhere in a wide range.
    fn pick_now(edge: u8, delta: i64, anywhere: i64, start: i64, end: i64, skew: i64) -> i64 {
        match edge {
            0 => start - skew + delta,
            1 => end + skew + delta,
            _ => anywhere,
        }
    }

    proptest::proptest! {
        /// A response is accepted exactly while `now` lies within
        /// [thisUpdate - skew, validUntil + skew], and validUntil is its
        /// nextUpdate or else thisUpdate plus the default lifetime.
        #[test]
        fn validity_window_widened_by_skew_only(
            this_update in 1_800_000_000i64..1_800_100_000,
            next_after in proptest::option::of(0i64..200_000),
            default_lifetime in 0i64..200_000,
            skew in 0i64..=900,
            edge in 0u8..3,
            delta in -3i64..=3,
            anywhere in 1_799_900_000i64..1_800_400_000,
        ) {
            let end = this_update + next_after.unwrap_or(default_lifetime);
            let now = pick_now(edge, delta, anywhere, this_update, end, skew);

            let result = check_validity(
                "http://127.0.0.1:1/",
                at(this_update),
                next_after.map(|after| at(this_update + after)),
                Duration::from_secs(skew.unsigned_abs()),
                Duration::from_secs(default_lifetime.unsigned_abs()),
                at(now),
            );

            let too_early = now + skew < this_update;
            let too_late = now > end + skew;
            match result {
                Ok(valid_until) => {
                    proptest::prop_assert!(!too_early && !too_late, "accepted at {now}");
                    proptest::prop_assert_eq!(valid_until, at(end));
                }
                Err(OcspError::NotYetValid { .. }) => {
                    proptest::prop_assert!(too_early, "not yet valid at {now}");
                }
                Err(OcspError::Expired { .. }) => {
                    proptest::prop_assert!(!too_early, "expired before thisUpdate at {now}");
                    proptest::prop_assert!(too_late, "expired at {now}");
                }
                Err(other) => proptest::prop_assert!(false, "unexpected error {other}"),
            }
        }
    }
}
