//! CRL decoding tests with CRLs made by `openssl ca` at test time.

use super::decode::{check_times, read_entry_extensions};
use super::index::{canonical_integer, InlineSerial};
use super::*;
use crate::identity::test_pki::{now_unix, openssl_time, Pki};
use der::asn1::{AnyRef, ObjectIdentifier};
use der::Decode;
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

fn parse_file(pki: &Pki, pem: &std::path::Path, signer_files: &[&str]) -> Result<Crl, CrlError> {
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

    let error = parse_file(&pki, &pem, &["device-ca.pem"]).expect_err("unknown critical accepted");

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

proptest::proptest! {
    /// A CRL is accepted exactly when its thisUpdate is at most the clock
    /// skew ahead of now and its nextUpdate, if any, is not before its
    /// thisUpdate. A past nextUpdate is accepted and left to the staleness
    /// rules.
    #[test]
    fn crl_times_checked_with_skew(
        this_update in 1_800_000_000i64..1_800_100_000,
        next_after in proptest::option::of(-100i64..200_000),
        skew in 0i64..900,
        exact in proptest::bool::ANY,
        delta in -3i64..=3,
        anywhere in 1_799_900_000i64..1_800_500_000,
    ) {
        let now = if exact { this_update - skew + delta } else { anywhere };
        let checks = CrlChecks {
            signers: &[],
            now_unix: now,
            clock_skew_secs: skew,
        };

        let result = check_times(this_update, next_after.map(|after| this_update + after), &checks);

        let in_future = this_update > now + skew;
        let inverted = next_after.is_some_and(|after| after < 0);
        match result {
            Ok(()) => {
                proptest::prop_assert!(!in_future, "thisUpdate {this_update} accepted at {now} with skew {skew}");
                proptest::prop_assert!(!inverted, "nextUpdate before thisUpdate accepted");
            }
            Err(CrlErrorKind::ThisUpdateInFuture { .. }) => {
                proptest::prop_assert!(in_future, "thisUpdate {this_update} rejected at {now} with skew {skew}");
            }
            Err(CrlErrorKind::NextUpdateBeforeThisUpdate { .. }) => {
                proptest::prop_assert!(!in_future);
                proptest::prop_assert!(inverted, "ordered times rejected");
            }
            Err(other) => proptest::prop_assert!(false, "unexpected error {other}"),
        }
    }
}
