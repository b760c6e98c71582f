//! The certificate zoo: device certificates at the edges of the profile, made
//! by scripts/zoo-pki.sh with the openssl command line, each connected through
//! a real gateway on loopback and checked against its expected outcome.
//!
//! docs/configuration.md ("Certificate profile") gives the reasons for the
//! outcomes that are product decisions.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use ztgate::client::Ending;
use ztgate::identity::extract_identity;
use ztgate::protocol::Code;

const TRUST_DOMAIN: &str = "zoo.example.test";
const ASSIGNER: &str = "1.3.6.1.4.1.55555.2";
const HARDWARE_BOUND_OID: &str = "1.3.6.1.4.1.55555.1.1";

/// Admits every device of the gateway's device CAs.
const ZOO: &str = "zoo.apps.example.test";
/// Admits the permanentIdentifier ZOO-SN-0001 assigned by `ASSIGNER`.
const ZOO_PID: &str = "zoo-pid.apps.example.test";
/// Admits hardware-bound devices only.
const ZOO_HW: &str = "zoo-hw.apps.example.test";

/// Builds the zoo once per test binary and returns its directory.
fn zoo() -> &'static Path {
    static ZOO_DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    ZOO_DIR
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/zoo-pki.sh");
            let out = std::process::Command::new("bash")
                .arg(&script)
                .arg(dir.path())
                .output()
                .expect("run zoo-pki.sh");
            assert!(
                out.status.success(),
                "zoo-pki.sh failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .path()
}

fn zoo_file(name: &str) -> PathBuf {
    zoo().join(name)
}

fn leaf_der(fixture: &str) -> Vec<u8> {
    let path = zoo_file(&format!("{fixture}.pem"));
    let pem = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let cert = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
        .unwrap_or_else(|e| panic!("no certificate in {}: {e}", path.display()));
    let cert: rustls::pki_types::CertificateDer<'static> = cert;
    cert.to_vec()
}

fn cert_sha256(fixture: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &leaf_der(fixture));
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Formats one `[[device_ca]]` table.
fn device_ca(name: &str, anchors: &[&str], intermediates: &[&str]) -> String {
    let list = |files: &[&str]| {
        files
            .iter()
            .map(|f| format!("\"{}\"", zoo_file(f).display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[device_ca]]\nname = \"{name}\"\ncertificates = [{}]\nintermediates = [{}]\n",
        list(anchors),
        list(intermediates)
    )
}

/// Returns the three zoo applications, open to the devices of `ca_names`.
fn zoo_apps(upstream: std::net::SocketAddr, ca_names: &[&str]) -> Vec<App> {
    let cas = ca_names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        App {
            name: "zoo",
            server_name: ZOO.to_string(),
            upstream: upstream.to_string(),
            access: format!("device_cas = [{cas}]\nallow_any_device = true"),
            extra: String::new(),
        },
        App {
            name: "zoo-pid",
            server_name: ZOO_PID.to_string(),
            upstream: upstream.to_string(),
            access: format!(
                "device_cas = [{cas}]\npermanent_identifiers = [{{ assigner = \"{ASSIGNER}\", value = \"ZOO-SN-0001\" }}]"
            ),
            extra: String::new(),
        },
        App {
            name: "zoo-hw",
            server_name: ZOO_HW.to_string(),
            upstream: upstream.to_string(),
            access: format!(
                "device_cas = [{cas}]\nallow_any_device = true\nrequire_hardware_bound = true"
            ),
            extra: String::new(),
        },
    ]
}

/// Which gateway configuration a case connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// Anchors: the zoo root, the chain root and cross root B; no intermediates.
    Roots,
    /// Anchors: the chain root with both chain intermediates configured, and
    /// cross root B with the intermediate it certified configured.
    ConfiguredIntermediates,
    /// Anchor: cross root A only.
    CrossRootA,
}

async fn start_gateway(trust: Trust) -> TestGateway {
    let upstream = echo_server("127.0.0.1:0").await;
    let (cas, names) = match trust {
        Trust::Roots => (
            [
                device_ca("zoo", &["CA-root.pem"], &[]),
                device_ca("chain", &["CA-chain-root.pem"], &[]),
                device_ca("cross-b", &["CA-cross-b.pem"], &[]),
            ]
            .concat(),
            vec!["zoo", "chain", "cross-b"],
        ),
        Trust::ConfiguredIntermediates => (
            [
                device_ca(
                    "chain",
                    &["CA-chain-root.pem"],
                    &["CA-chain-intermediates.pem"],
                ),
                device_ca("cross-b", &["CA-cross-b.pem"], &["CA-cross-int-by-b.pem"]),
            ]
            .concat(),
            vec!["chain", "cross-b"],
        ),
        Trust::CrossRootA => (
            device_ca("cross-a", &["CA-cross-a.pem"], &[]),
            vec!["cross-a"],
        ),
    };
    TestGateway::start_with_cas("127.0.0.1:0", &zoo_apps(upstream, &names), &cas, "").await
}

/// The device identifier expected in the `admitted` message.
#[derive(Debug, Clone, Copy)]
enum DeviceId {
    /// spiffe://zoo.example.test/device/FIXTURE
    Spiffe,
    /// The certificate's SHA-256, when the leaf has neither a SPIFFE ID nor a
    /// permanentIdentifier.
    CertHash,
    Exact(&'static str),
}

#[derive(Debug, Clone, Copy)]
enum Expected {
    Admitted(DeviceId),
    /// Refused in the handshake with this TLS alert.
    Alert(&'static str),
    /// Refused after the handshake with this ztgate code.
    Refused(Code),
}

struct Case {
    /// The fixture's files: FIXTURE-chain.pem and FIXTURE.key.
    fixture: &'static str,
    trust: Trust,
    server_name: &'static str,
    expected: Expected,
}

const fn case(fixture: &'static str, expected: Expected) -> Case {
    Case {
        fixture,
        trust: Trust::Roots,
        server_name: ZOO,
        expected,
    }
}

const fn case_at(
    fixture: &'static str,
    trust: Trust,
    server_name: &'static str,
    expected: Expected,
) -> Case {
    Case {
        fixture,
        trust,
        server_name,
        expected,
    }
}

const ADMITTED: Expected = Expected::Admitted(DeviceId::Spiffe);

/// Returns the fixture that owns the leaf certificate of a chain fixture.
fn leaf_fixture(fixture: &str) -> &str {
    if fixture.starts_with("chain-") {
        "chain-leaf"
    } else if fixture.starts_with("cross-") {
        "cross-leaf"
    } else {
        fixture
    }
}

fn describe_expected(fixture: &str, expected: Expected) -> String {
    match expected {
        Expected::Admitted(DeviceId::Spiffe) => format!(
            "admitted as spiffe://{TRUST_DOMAIN}/device/{}",
            leaf_fixture(fixture)
        ),
        Expected::Admitted(DeviceId::CertHash) => {
            format!("admitted as cert:{}", cert_sha256(leaf_fixture(fixture)))
        }
        Expected::Admitted(DeviceId::Exact(id)) => format!("admitted as {id}"),
        Expected::Alert(alert) => format!("TLS alert {alert}"),
        Expected::Refused(code) => format!("refused with {}", code.name()),
    }
}

/// Extracts the alert name from the parentheses that end the client's
/// handshake message.
fn alert_name(message: &str) -> Option<&str> {
    let start = message.rfind('(')? + 1;
    let end = start + message[start..].find(')')?;
    Some(&message[start..end])
}

async fn actual_outcome(gateway: &TestGateway, case: &Case) -> String {
    let chain = zoo_file(&format!("{}-chain.pem", case.fixture));
    let key = zoo_file(&format!("{}.key", case.fixture));
    let client = chain_client(gateway.addr(), &chain, &key, case.server_name);
    match client.connect(Duration::from_secs(10)).await {
        Ok(tunnel) => format!("admitted as {}", tunnel.admitted.device_id),
        Err(Ending::Refused {
            code: Some(code), ..
        }) => format!("refused with {}", code.name()),
        Err(Ending::Refused {
            code: None,
            message,
        }) if message.contains("during the TLS handshake") => match alert_name(&message) {
            Some(alert) => format!("TLS alert {alert}"),
            None => format!("TLS handshake failure: {message}"),
        },
        Err(other) => format!("{other:?}"),
    }
}

/// Connects every case through a gateway of its trust configuration, prints
/// the table of fixture, expected and actual outcome, and fails on the first
/// mismatch with the whole table.
async fn check_cases(cases: &[Case]) {
    let mut gateways: Vec<(Trust, TestGateway)> = Vec::new();
    let mut table = String::new();
    let mut mismatches = 0;
    for case in cases {
        if !gateways.iter().any(|(trust, _)| *trust == case.trust) {
            gateways.push((case.trust, start_gateway(case.trust).await));
        }
        let gateway = gateways
            .iter()
            .find(|(trust, _)| *trust == case.trust)
            .map(|(_, g)| g)
            .expect("gateway started above");
        let expected = describe_expected(case.fixture, case.expected);
        let actual = actual_outcome(gateway, case).await;
        let mark = if expected == actual {
            "ok"
        } else {
            mismatches += 1;
            "MISMATCH"
        };
        table.push_str(&format!(
            "{mark:8} {} at {:?} {}: expected {expected}; actual {actual}\n",
            case.fixture, case.trust, case.server_name
        ));
    }
    eprintln!("{table}");
    assert_eq!(mismatches, 0, "zoo outcomes differ:\n{table}");
}

#[tokio::test]
async fn serial_numbers_at_profile_edges() {
    check_cases(&[
        case("serial-1-byte", ADMITTED),
        case("serial-20-bytes", ADMITTED),
        case("serial-high-bit", ADMITTED),
        case("serial-21-bytes", ADMITTED),
        case("serial-zero", ADMITTED),
    ])
    .await;

    let serial = |fixture: &str| {
        extract_identity(&leaf_der(fixture), None)
            .unwrap_or_else(|e| panic!("{fixture}: {e}"))
            .serial_hex
    };
    assert_eq!(serial("serial-1-byte"), "01");
    assert_eq!(
        serial("serial-20-bytes"),
        "7f0102030405060708090a0b0c0d0e0f10111213"
    );
    assert_eq!(
        serial("serial-high-bit"),
        "80a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2"
    );
    assert_eq!(
        serial("serial-21-bytes"),
        "80a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3"
    );
    assert_eq!(serial("serial-zero"), "00");
}

#[tokio::test]
async fn subject_alt_name_forms() {
    use Expected::*;
    check_cases(&[
        case("san-many-uris", ADMITTED),
        case("san-dns-uri-email", ADMITTED),
        case("san-every-form", ADMITTED),
        case("san-email-only", Admitted(DeviceId::CertHash)),
        case("san-none", Admitted(DeviceId::CertHash)),
        case(
            "san-permanent-no-assigner",
            Admitted(DeviceId::Exact("permanent::ZOO-SN-0001")),
        ),
        case_at(
            "san-permanent-no-assigner",
            Trust::Roots,
            ZOO_PID,
            Refused(Code::PolicyDenied),
        ),
        case_at(
            "san-permanent-with-assigner",
            Trust::Roots,
            ZOO_PID,
            Admitted(DeviceId::Exact("permanent:1.3.6.1.4.1.55555.2:ZOO-SN-0001")),
        ),
        case("san-two-spiffe", Refused(Code::InvalidIdentity)),
    ])
    .await;

    let identity = extract_identity(&leaf_der("san-every-form"), None)
        .expect("san-every-form identity was rejected");
    assert_eq!(
        identity.san_uris,
        vec![format!("spiffe://{TRUST_DOMAIN}/device/san-every-form")]
    );
    assert_eq!(identity.permanent_identifiers.len(), 1);
    assert_eq!(identity.hardware_modules.len(), 1);
    let identity = extract_identity(&leaf_der("san-many-uris"), None)
        .expect("san-many-uris identity was rejected");
    assert_eq!(identity.san_uris.len(), 4);
}

#[tokio::test]
async fn unknown_extensions() {
    use Expected::*;
    check_cases(&[
        case("ext-unknown-noncritical", ADMITTED),
        case("ext-unknown-critical", Alert("bad_certificate")),
        case_at("ext-hardware-bound", Trust::Roots, ZOO_HW, ADMITTED),
        case_at(
            "ext-unknown-noncritical",
            Trust::Roots,
            ZOO_HW,
            Refused(Code::PolicyDenied),
        ),
        case("ext-hardware-bound-critical", Alert("bad_certificate")),
        case("ext-ca-critical-unknown", Alert("bad_certificate")),
        case("ext-pathlen-exceeded", Alert("access_denied")),
    ])
    .await;

    let identity = extract_identity(&leaf_der("ext-hardware-bound"), Some(HARDWARE_BOUND_OID))
        .expect("ext-hardware-bound identity was rejected");
    assert!(identity.hardware_bound);
}

#[tokio::test]
async fn name_string_encodings() {
    use Expected::*;
    check_cases(&[
        case("name-utf8", ADMITTED),
        case("name-printable", ADMITTED),
        case("name-bmp", ADMITTED),
        case("name-t61", Refused(Code::InvalidIdentity)),
        case("name-multi-valued", ADMITTED),
        case("issuer-printable", ADMITTED),
        case("issuer-bmp", ADMITTED),
        case("issuer-reencoded", Alert("unknown_ca")),
    ])
    .await;

    let common_name = |fixture: &str| {
        extract_identity(&leaf_der(fixture), None)
            .unwrap_or_else(|e| panic!("{fixture}: {e}"))
            .common_name
    };
    assert_eq!(common_name("name-utf8").as_deref(), Some("Gerät 7 ✓"));
    assert_eq!(
        common_name("name-printable").as_deref(),
        Some("Zoo Device 7")
    );
    assert_eq!(common_name("name-bmp").as_deref(), Some("Gerät 7 Ω"));
    assert_eq!(
        common_name("name-multi-valued").as_deref(),
        Some("name-multi-valued")
    );
}

#[tokio::test]
async fn key_types_and_signature_algorithms() {
    use Expected::*;
    check_cases(&[
        case("key-p384", ADMITTED),
        case("key-ed25519", ADMITTED),
        case("key-rsa2048", ADMITTED),
        case("key-rsapss", Alert("decrypt_error")),
        case("ca-p384", ADMITTED),
        case("ca-p384-key-p384", ADMITTED),
        case("ca-ed25519", ADMITTED),
        case("ca-ed25519-key-ed25519", ADMITTED),
        case("ca-rsa2048", ADMITTED),
        case("ca-rsa-pss-sig", ADMITTED),
        case("ca-rsa-pss-sig-key-rsa2048", ADMITTED),
        case("ca-rsa-pss-key", Alert("decrypt_error")),
        case("ca-p521", Alert("decrypt_error")),
        case("ca-rsa-sha1", Alert("decrypt_error")),
    ])
    .await;
}

#[tokio::test]
async fn issuing_ca_name_constraints() {
    use Expected::*;
    check_cases(&[
        case("nc-dns-inside", ADMITTED),
        case("nc-dns-outside", Alert("access_denied")),
        // rustls-webpki 0.103 does not implement URI name constraints and
        // rejects every leaf with a URI SAN under such a CA, inside or not.
        case("nc-uri-inside", Alert("access_denied")),
        case("nc-uri-outside", Alert("access_denied")),
        case_at(
            "nc-uri-no-uri",
            Trust::Roots,
            ZOO_PID,
            Admitted(DeviceId::Exact("permanent:1.3.6.1.4.1.55555.2:ZOO-SN-0001")),
        ),
    ])
    .await;
}

#[tokio::test]
async fn client_chains_and_configured_intermediates() {
    use Expected::*;
    use Trust::*;
    check_cases(&[
        case("chain-full", ADMITTED),
        case("chain-reversed", ADMITTED),
        case("chain-with-root", ADMITTED),
        case("chain-unrelated-first", ADMITTED),
        case("chain-partial", Alert("unknown_ca")),
        case("chain-leaf-only", Alert("unknown_ca")),
        // The entry that is not a certificate is never needed for the path.
        case("chain-garbage", ADMITTED),
        case_at("chain-full", ConfiguredIntermediates, ZOO, ADMITTED),
        case_at("chain-partial", ConfiguredIntermediates, ZOO, ADMITTED),
        case_at("chain-leaf-only", ConfiguredIntermediates, ZOO, ADMITTED),
    ])
    .await;
}

#[tokio::test]
async fn cross_signed_paths() {
    use Expected::*;
    use Trust::*;
    check_cases(&[
        case_at("cross-via-a", CrossRootA, ZOO, ADMITTED),
        case_at("cross-via-a", Roots, ZOO, Alert("unknown_ca")),
        case_at("cross-via-both", Roots, ZOO, ADMITTED),
        case_at("cross-via-root-a", Roots, ZOO, ADMITTED),
        case_at("cross-via-a", ConfiguredIntermediates, ZOO, ADMITTED),
        case_at("cross-via-both", CrossRootA, ZOO, ADMITTED),
    ])
    .await;
}
