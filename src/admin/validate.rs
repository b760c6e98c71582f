//! Input checks for the mutating endpoints. Each failure names the request
//! field and describes a valid value.

use super::api::{PostureRequest, RevocationPush, RevocationRequest, RevocationTarget};
use super::routes::ApiError;

/// Hex digits in a SHA-256 digest.
const SHA256_HEX_LEN: usize = 64;

/// Maximum serial number length in hex digits, because RFC 5280 section
/// 4.1.2.2 caps serials at 20 octets.
const MAX_SERIAL_HEX_LEN: usize = 40;

/// Maximum revocation reason length, in characters.
const MAX_REASON_CHARS: usize = 512;

/// Maximum device identifier length, in characters.
const MAX_DEVICE_ID_CHARS: usize = 1024;

/// Checks a revocation request and turns it into a push with lower-case hex
/// fields. `now_unix` is the current time in Unix seconds.
pub(super) fn revocation(
    request: RevocationRequest,
    now_unix: u64,
) -> Result<RevocationPush, ApiError> {
    let RevocationRequest {
        issuer_sha256,
        serial_hex,
        cert_sha256,
        spki_sha256,
        reason,
        not_after,
    } = request;

    let target = match (issuer_sha256, serial_hex, cert_sha256, spki_sha256) {
        (None, None, None, None) => {
            return Err(ApiError::bad_request(
                None,
                "the request names no certificate; send either issuer_sha256 with \
                 serial_hex, or cert_sha256, or spki_sha256",
            ))
        }
        (Some(issuer), Some(serial), None, None) => RevocationTarget::IssuerSerial {
            issuer_sha256: sha256_hex("issuer_sha256", &issuer)?,
            serial_hex: serial_number_hex(&serial)?,
        },
        (Some(_), None, None, None) => {
            return Err(ApiError::bad_request(
                Some("serial_hex"),
                "serial_hex is missing; a revocation by issuer_sha256 also needs the \
                 certificate's serial number in hex",
            ))
        }
        (None, Some(_), None, None) => {
            return Err(ApiError::bad_request(
                Some("issuer_sha256"),
                "issuer_sha256 is missing; a revocation by serial_hex also needs the SHA-256 \
                 of the issuer name's DER",
            ))
        }
        (None, None, Some(cert), None) => {
            RevocationTarget::CertSha256(sha256_hex("cert_sha256", &cert)?)
        }
        (None, None, None, Some(spki)) => {
            RevocationTarget::SpkiSha256(sha256_hex("spki_sha256", &spki)?)
        }
        _ => {
            return Err(ApiError::bad_request(
                None,
                "the request names the certificate more than one way; send only one of \
                 issuer_sha256 with serial_hex, cert_sha256 or spki_sha256",
            ))
        }
    };

    if let Some(reason) = &reason {
        text("reason", reason, MAX_REASON_CHARS)?;
    }
    if let Some(not_after) = not_after {
        if not_after <= now_unix {
            return Err(ApiError::bad_request(
                Some("not_after"),
                format!(
                    "not_after ({not_after}) is not in the future (now is {now_unix}); send \
                     the certificate's notAfter in Unix seconds, or leave not_after out"
                ),
            ));
        }
    }
    Ok(RevocationPush {
        target,
        reason,
        not_after,
    })
}

/// Checks a posture push.
pub(super) fn posture(request: &PostureRequest) -> Result<(), ApiError> {
    if request.device_id.trim().is_empty() {
        return Err(ApiError::bad_request(
            Some("device_id"),
            "device_id is empty; send the device identifier that GET /v1/sessions lists",
        ));
    }
    text("device_id", &request.device_id, MAX_DEVICE_ID_CHARS)
}

/// Normalizes a SHA-256 digest to 64 lower-case hex digits. Accepts upper
/// case and ':' separators, as `openssl x509 -fingerprint -sha256` prints.
pub(super) fn sha256_hex(field: &'static str, value: &str) -> Result<String, ApiError> {
    let digits: String = value.chars().filter(|&c| c != ':').collect();
    if let Some(bad) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            Some(field),
            format!(
                "{field} contains {bad:?}, which is not a hex digit; send the SHA-256 digest \
                 as 64 hex characters"
            ),
        ));
    }
    if digits.len() != SHA256_HEX_LEN {
        return Err(ApiError::bad_request(
            Some(field),
            format!(
                "{field} has {} hex digits but a SHA-256 digest has {SHA256_HEX_LEN}",
                digits.len()
            ),
        ));
    }
    Ok(digits.to_ascii_lowercase())
}

/// Normalizes a serial number to the form the session registry indexes:
/// lower-case hex of the magnitude without leading zero bytes ("00" for
/// zero), prefixed with '-' when negative. Accepts upper case and ':'
/// separators.
pub(super) fn serial_number_hex(value: &str) -> Result<String, ApiError> {
    const FIELD: &str = "serial_hex";
    let (negative, magnitude) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let digits: String = magnitude.chars().filter(|&c| c != ':').collect();
    if digits.is_empty() {
        return Err(ApiError::bad_request(
            Some(FIELD),
            "serial_hex is empty; send the certificate's serial number in hex, the digits \
             after \"serial=\" in `openssl x509 -noout -serial`",
        ));
    }
    if let Some(bad) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            Some(FIELD),
            format!("serial_hex contains {bad:?}, which is not a hex digit"),
        ));
    }
    if digits.len() > MAX_SERIAL_HEX_LEN {
        return Err(ApiError::bad_request(
            Some(FIELD),
            format!(
                "serial_hex has {} hex digits but a certificate serial number has at most \
                 {MAX_SERIAL_HEX_LEN} (20 octets)",
                digits.len()
            ),
        ));
    }
    let significant = digits.trim_start_matches('0').to_ascii_lowercase();
    let mut normalized = String::with_capacity(significant.len() + 2);
    if negative && !significant.is_empty() {
        normalized.push('-');
    }
    if significant.is_empty() {
        normalized.push_str("00");
    } else {
        if significant.len() % 2 == 1 {
            normalized.push('0');
        }
        normalized.push_str(&significant);
    }
    Ok(normalized)
}

/// Rejects text that is too long or contains control characters.
fn text(field: &'static str, value: &str, max_chars: usize) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(ApiError::bad_request(
            Some(field),
            format!("{field} has {chars} characters; the maximum is {max_chars}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            Some(field),
            format!("{field} contains control characters; send printable text"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn field_of(result: Result<impl std::fmt::Debug, ApiError>) -> Option<&'static str> {
        result.expect_err("expected a validation error").field
    }

    #[test]
    fn sha256_normalized() {
        let colons: String = DIGEST
            .to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(sha256_hex("cert_sha256", &colons).expect("valid"), DIGEST);
    }

    #[test]
    fn sha256_wrong_length_names_field() {
        let error = sha256_hex("spki_sha256", "abcd").expect_err("too short");
        assert_eq!(error.field, Some("spki_sha256"));
        assert!(error.message.contains("64"), "{}", error.message);
    }

    #[test]
    fn sha256_non_hex_names_field() {
        let value = DIGEST.replace('9', "g");
        let error = sha256_hex("cert_sha256", &value).expect_err("not hex");
        assert_eq!(error.field, Some("cert_sha256"));
        assert!(error.message.contains("'g'"), "{}", error.message);
    }

    #[test]
    fn serial_normalized_like_registry() {
        let cases = [
            ("1000", "1000"),
            ("0A", "0a"),
            ("a", "0a"),
            ("00:00:10:AB", "10ab"),
            ("0", "00"),
            ("-0", "00"),
            ("-7f", "-7f"),
            ("-07f", "-7f"),
        ];
        for (input, expected) in cases {
            assert_eq!(serial_number_hex(input).expect(input), expected, "{input}");
        }
    }

    #[test]
    fn serial_limits() {
        assert_eq!(field_of(serial_number_hex("")), Some("serial_hex"));
        assert_eq!(field_of(serial_number_hex("-")), Some("serial_hex"));
        assert_eq!(field_of(serial_number_hex("12zz")), Some("serial_hex"));
        let forty = "f".repeat(40);
        assert!(serial_number_hex(&forty).is_ok());
        let forty_one = "f".repeat(41);
        assert_eq!(field_of(serial_number_hex(&forty_one)), Some("serial_hex"));
    }

    #[test]
    fn revocation_forms() {
        let issuer = RevocationRequest {
            issuer_sha256: Some(DIGEST.to_uppercase()),
            serial_hex: Some("0010".into()),
            reason: Some("key compromise".into()),
            ..Default::default()
        };
        let push = revocation(issuer, 100).expect("valid");
        assert_eq!(
            push.target,
            RevocationTarget::IssuerSerial {
                issuer_sha256: DIGEST.into(),
                serial_hex: "10".into()
            }
        );
        assert_eq!(push.reason.as_deref(), Some("key compromise"));

        let only_issuer = RevocationRequest {
            issuer_sha256: Some(DIGEST.into()),
            ..Default::default()
        };
        assert_eq!(field_of(revocation(only_issuer, 100)), Some("serial_hex"));

        let only_serial = RevocationRequest {
            serial_hex: Some("10".into()),
            ..Default::default()
        };
        assert_eq!(
            field_of(revocation(only_serial, 100)),
            Some("issuer_sha256")
        );

        let two_forms = RevocationRequest {
            cert_sha256: Some(DIGEST.into()),
            spki_sha256: Some(DIGEST.into()),
            ..Default::default()
        };
        let error = revocation(two_forms, 100).expect_err("two forms");
        assert!(error.message.contains("only one"), "{}", error.message);

        let none = RevocationRequest::default();
        let error = revocation(none, 100).expect_err("no form");
        assert!(
            error.message.contains("names no certificate"),
            "{}",
            error.message
        );
    }

    #[test]
    fn revocation_not_after_in_past() {
        let request = RevocationRequest {
            spki_sha256: Some(DIGEST.into()),
            not_after: Some(50),
            ..Default::default()
        };
        assert_eq!(field_of(revocation(request, 100)), Some("not_after"));
    }

    #[test]
    fn revocation_reason_checked() {
        let request = RevocationRequest {
            cert_sha256: Some(DIGEST.into()),
            reason: Some("line\nbreak".into()),
            ..Default::default()
        };
        assert_eq!(field_of(revocation(request, 100)), Some("reason"));
    }

    #[test]
    fn posture_device_id_checked() {
        let empty = PostureRequest {
            device_id: " ".into(),
            attributes: Default::default(),
        };
        assert_eq!(field_of(posture(&empty)), Some("device_id"));
        let valid = PostureRequest {
            device_id: "spiffe://example.test/device/1".into(),
            attributes: Default::default(),
        };
        assert!(posture(&valid).is_ok());
    }
}
