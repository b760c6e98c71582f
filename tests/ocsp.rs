//! OCSP client tests against a real `openssl ocsp` responder, served on
//! loopback by scripts/ocsp-responder.py, with the PKI of
//! scripts/dev-pki.sh. Needs python3 and the openssl command line.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztgate::identity::ocsp::{
    decide, CertIdHash, Checked, CrlReason, OcspChecker, OcspDecision, OcspError, OcspMode,
    OcspSettings, OcspStatus, SoftFailWithoutAnswer,
};

const DEVICE_CA: &str = "device-ca";

// ---------------------------------------------------------------------------
// Responder process

/// A running scripts/ocsp-responder.py, killed on drop.
struct Responder {
    child: Child,
    /// Held open so that the responder, started with --exit-on-eof, exits
    /// when the test process dies without dropping it.
    _stdin: ChildStdin,
    port: u16,
}

/// Request counters from the responder's /-/stats endpoint.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    requests: u64,
    get: u64,
    post: u64,
    connections: u64,
}

impl Responder {
    /// Starts the responder on a free port with `args`, and waits for its
    /// "listening" line.
    fn start(args: &[String], log: &Path) -> Responder {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ocsp-responder.py");
        let log_file = std::fs::File::create(log).expect("create responder log");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", "0", "--exit-on-eof", "--max-seconds", "300"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("start scripts/ocsp-responder.py");
        let stdin = child.stdin.take().expect("responder stdin");
        let stdout = child.stdout.take().expect("responder stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the responder's listening line");
        let port = line
            .trim()
            .strip_prefix("listening 127.0.0.1:")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line from the responder: {line:?}; log: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        Responder {
            child,
            _stdin: stdin,
            port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    async fn stats(&self) -> Stats {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to the responder");
        stream
            .write_all(b"GET /-/stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("send the stats request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read the stats response");
        let body = response.split("\r\n\r\n").nth(1).expect("stats body");
        let json: serde_json::Value = serde_json::from_str(body).expect("stats JSON");
        let count = |name: &str| json[name].as_u64().expect("stats counter");
        Stats {
            requests: count("requests"),
            get: count("get"),
            post: count("post"),
            connections: count("connections"),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// PKI

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Runs scripts/dev-pki.sh into `dir` with `ocsp_url` in the device
/// certificates' authorityInfoAccess.
fn make_pki(dir: &Path, ocsp_url: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dev-pki.sh");
    let output = Command::new("bash")
        .arg(script)
        .arg(dir)
        .env("OCSP_URL", ocsp_url)
        .output()
        .expect("run scripts/dev-pki.sh");
    assert!(
        output.status.success(),
        "dev-pki.sh failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Revokes a device in the device CA database with reason keyCompromise.
fn revoke(pki: &Path, device: &str) {
    let config = pki.join("ca/ca.cnf");
    let cert = pki.join(format!("{device}.pem"));
    openssl(&[
        "ca",
        "-config",
        path_str(&config),
        "-name",
        "device_ca",
        "-revoke",
        path_str(&cert),
        "-crl_reason",
        "keyCompromise",
    ]);
}

/// Issues a responder certificate NAME.pem with key NAME.key, signed by
/// `ca` (a PKI file name without .pem). `key_type` is p256, p384, rsa or
/// ed25519. With `ocsp_signing` the certificate has the critical
/// id-kp-OCSPSigning extended key usage, otherwise clientAuth.
fn issue_responder_cert(pki: &Path, name: &str, ca: &str, key_type: &str, ocsp_signing: bool) {
    let key = pki.join(format!("{name}.key"));
    let csr = pki.join(format!("{name}.csr"));
    let cert = pki.join(format!("{name}.pem"));
    let extensions = pki.join(format!("{name}.ext"));
    let key_args: &[&str] = match key_type {
        "p256" => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "p384" => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "ed25519" => &["-algorithm", "ED25519"],
        other => panic!("unknown key type {other}"),
    };
    let mut genpkey = vec!["genpkey"];
    genpkey.extend_from_slice(key_args);
    genpkey.extend_from_slice(&["-out", path_str(&key)]);
    openssl(&genpkey);

    let usage = if ocsp_signing {
        "critical, OCSPSigning"
    } else {
        "clientAuth"
    };
    std::fs::write(
        &extensions,
        format!(
            "basicConstraints = critical, CA:false\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = {usage}\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid:always\n"
        ),
    )
    .expect("write the extension file");
    openssl(&[
        "req",
        "-new",
        "-key",
        path_str(&key),
        "-subj",
        &format!("/O=ztgate Dev/CN={name}"),
        "-out",
        path_str(&csr),
    ]);
    let ca_cert = pki.join(format!("{ca}.pem"));
    let ca_key = pki.join(format!("{ca}.key"));
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr),
        "-CA",
        path_str(&ca_cert),
        "-CAkey",
        path_str(&ca_key),
        "-set_serial",
        "0x7001",
        "-days",
        "30",
        "-extfile",
        path_str(&extensions),
        "-out",
        path_str(&cert),
    ]);
}

/// Saves the device CA's response about `device` to `out` without a
/// network: `openssl ocsp` writes a request, then responds to it offline.
fn save_response(pki: &Path, device: &str, with_nonce: bool, out: &Path) {
    let request = out.with_extension("req");
    let issuer = pki.join("device-ca.pem");
    let cert = pki.join(format!("{device}.pem"));
    let mut args = vec![
        "ocsp",
        "-issuer",
        path_str(&issuer),
        "-cert",
        path_str(&cert),
        "-reqout",
        path_str(&request),
    ];
    if !with_nonce {
        args.push("-no_nonce");
    }
    openssl(&args);
    let index = pki.join("ca/device-ca/index.txt");
    let key = pki.join("device-ca.key");
    openssl(&[
        "ocsp",
        "-index",
        path_str(&index),
        "-CA",
        path_str(&issuer),
        "-rsigner",
        path_str(&issuer),
        "-rkey",
        path_str(&key),
        "-nmin",
        "60",
        "-reqin",
        path_str(&request),
        "-respout",
        path_str(out),
    ]);
}

/// Returns the arguments that make the responder serve the device CA of `pki`,
/// signed by `signer` (a PKI file name without .pem or .key).
fn responder_args(pki: &Path, signer: &str) -> Vec<String> {
    let file = |name: String| path_str(&pki.join(name)).to_owned();
    vec![
        "--index".to_owned(),
        file("ca/device-ca/index.txt".to_owned()),
        "--ca".to_owned(),
        file(format!("{DEVICE_CA}.pem")),
        "--rsigner".to_owned(),
        file(format!("{signer}.pem")),
        "--rkey".to_owned(),
        file(format!("{signer}.key")),
    ]
}

/// The PKI shared by the tests that do not change it: made once per test
/// binary, with DEV-0002 revoked and extra responder certificates and saved
/// responses. Its certificates name `responder` in their AIA.
struct SharedPki {
    dir: tempfile::TempDir,
    responder: Responder,
}

fn shared() -> &'static SharedPki {
    static SHARED: OnceLock<SharedPki> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = dir.path().join("pki");
        let responder = Responder::start(
            &responder_args(&pki, DEVICE_CA),
            &dir.path().join("shared-responder.log"),
        );
        make_pki(&pki, &responder.url());
        revoke(&pki, "DEV-0002");

        issue_responder_cert(&pki, "delegate", "device-ca", "p256", true);
        issue_responder_cert(&pki, "foreign-delegate", "other-ca", "p256", true);
        issue_responder_cert(&pki, "no-eku-delegate", "device-ca", "p256", false);
        issue_responder_cert(&pki, "delegate-p384", "device-ca", "p384", true);
        issue_responder_cert(&pki, "delegate-rsa", "device-ca", "rsa", true);
        issue_responder_cert(&pki, "delegate-ed25519", "device-ca", "ed25519", true);

        let responses = dir.path().join("responses");
        std::fs::create_dir(&responses).expect("create the responses dir");
        save_response(&pki, "DEV-0002", false, &responses.join("dev-0002.der"));
        save_response(
            &pki,
            "DEV-0001",
            true,
            &responses.join("dev-0001-nonce.der"),
        );
        save_response(&pki, "DEV-0001", false, &responses.join("dev-0001.der"));
        SharedPki { dir, responder }
    })
}

impl SharedPki {
    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn cert(&self, name: &str) -> CertificateDer<'static> {
        load_cert(&self.pki(), name)
    }

    fn response(&self, name: &str) -> String {
        path_str(&self.dir.path().join("responses").join(name)).to_owned()
    }

    /// Starts a responder of its own that signs with `signer`, plus `extra`
    /// arguments.
    fn responder(&self, signer: &str, extra: &[&str]) -> (tempfile::TempDir, Responder) {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let mut args = responder_args(&self.pki(), signer);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let responder = Responder::start(&args, &log_dir.path().join("responder.log"));
        (log_dir, responder)
    }

    /// Starts a responder with a fixed test mode, such as garbage.
    fn mode_responder(&self, extra: &[&str]) -> (tempfile::TempDir, Responder) {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let args: Vec<String> = extra.iter().map(|arg| (*arg).to_owned()).collect();
        let responder = Responder::start(&args, &log_dir.path().join("responder.log"));
        (log_dir, responder)
    }
}

fn load_cert(pki: &Path, name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(pki.join(format!("{name}.pem")))
        .unwrap_or_else(|error| panic!("load {name}.pem: {error}"))
}

// ---------------------------------------------------------------------------
// Checker helpers

fn settings(responder_url: Option<String>) -> OcspSettings {
    OcspSettings {
        responder_url,
        timeout: Duration::from_secs(3),
        failure_backoff: Duration::ZERO,
        ..OcspSettings::default()
    }
}

fn checker(settings: OcspSettings) -> OcspChecker {
    OcspChecker::new(settings).expect("valid settings")
}

async fn status_of(
    checker: &OcspChecker,
    pki: &SharedPki,
    device: &str,
) -> Result<Checked, OcspError> {
    let leaf = pki.cert(device);
    let issuer = pki.cert(DEVICE_CA);
    checker.status(&leaf, &issuer, SystemTime::now()).await
}

fn expect_good(result: &Result<Checked, OcspError>) -> &Checked {
    let checked = result.as_ref().expect("lookup failed");
    assert!(
        matches!(checked.status, OcspStatus::Good { .. }),
        "expected good, got {:?}",
        checked.status
    );
    checked
}

/// Returns a loopback URL that refuses connections while the socket is held.
///
/// The port stays bound without listening, so no other test can take it.
fn closed_url() -> (String, socket2::Socket) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    let port = socket
        .local_addr()
        .expect("local address")
        .as_socket()
        .expect("inet address")
        .port();
    (format!("http://127.0.0.1:{port}/"), socket)
}

const SOFT_FAIL_HOUR: OcspMode = OcspMode::SoftFail {
    max_staleness: Duration::from_secs(3600),
    without_answer: SoftFailWithoutAnswer::Admit,
};

// ---------------------------------------------------------------------------
// Statuses

#[tokio::test]
async fn good_device_is_good() {
    let pki = shared();
    let checker = checker(settings(None));

    let result = status_of(&checker, pki, "DEV-0001").await;

    let checked = expect_good(&result);
    assert!(!checked.from_cache);
    assert_eq!(checked.responder_url, pki.responder.url());
    let OcspStatus::Good {
        this_update,
        next_update,
    } = checked.status
    else {
        unreachable!("checked above");
    };
    // The responder runs openssl ocsp with -nmin 5.
    assert_eq!(
        next_update.duration_since(this_update).ok(),
        Some(Duration::from_secs(300))
    );
    assert_eq!(checked.valid_until, next_update);
    let decision = decide(&OcspMode::HardFail, &result, None, SystemTime::now());
    assert!(decision.is_admit(), "{decision:?}");
}

#[tokio::test]
async fn revoked_device_is_revoked() {
    let pki = shared();
    let checker = checker(settings(None));

    let result = status_of(&checker, pki, "DEV-0002").await;

    let checked = result.as_ref().expect("lookup failed");
    let OcspStatus::Revoked {
        revocation_time,
        reason,
    } = checked.status
    else {
        panic!("expected revoked, got {:?}", checked.status);
    };
    assert_eq!(reason, Some(CrlReason::KeyCompromise));
    assert!(revocation_time <= SystemTime::now());
    for mode in [OcspMode::Off, SOFT_FAIL_HOUR, OcspMode::HardFail] {
        let decision = decide(&mode, &result, None, SystemTime::now());
        let OcspDecision::Refuse { reason } = decision else {
            panic!("{mode:?} admitted a revoked certificate");
        };
        assert!(reason.contains("revoked"), "{reason}");
        assert!(reason.contains("keyCompromise"), "{reason}");
    }
}

#[tokio::test]
async fn certificate_missing_from_index_is_unknown() {
    let pki = shared();
    // The delegate certificate was issued with `openssl x509 -req`, so the
    // device CA database does not list it. It has no AIA either.
    let checker = checker(settings(Some(pki.responder.url())));

    let result = status_of(&checker, pki, "delegate").await;

    let checked = result.as_ref().expect("lookup failed");
    assert_eq!(checked.status, OcspStatus::Unknown);
    let hard = decide(&OcspMode::HardFail, &result, None, SystemTime::now());
    assert!(!hard.is_admit(), "{hard:?}");
    let soft = decide(&SOFT_FAIL_HOUR, &result, None, SystemTime::now());
    assert!(soft.is_admit(), "{soft:?}");
}

#[tokio::test]
async fn sha256_cert_id_accepted() {
    let pki = shared();
    let checker = checker(OcspSettings {
        cert_id_hash: CertIdHash::Sha256,
        ..settings(None)
    });

    let result = status_of(&checker, pki, "DEV-0001").await;

    expect_good(&result);
}

#[tokio::test]
async fn get_request_accepted() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &[]);
    let checker = checker(OcspSettings {
        use_get: true,
        ..settings(Some(responder.url()))
    });

    let result = status_of(&checker, pki, "DEV-0001").await;

    expect_good(&result);
    let stats = responder.stats().await;
    assert_eq!(stats.get, 1, "{stats:?}");
    assert_eq!(stats.post, 0, "{stats:?}");
}

#[tokio::test]
async fn post_is_the_default() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &[]);
    let checker = checker(settings(Some(responder.url())));

    let result = status_of(&checker, pki, "DEV-0001").await;

    expect_good(&result);
    let stats = responder.stats().await;
    assert_eq!(stats.post, 1, "{stats:?}");
    assert_eq!(stats.get, 0, "{stats:?}");
}

#[tokio::test]
async fn missing_next_update_gets_default_lifetime() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &["--no-next-update"]);
    let checker = checker(OcspSettings {
        default_lifetime: Duration::from_secs(120),
        ..settings(Some(responder.url()))
    });

    let result = status_of(&checker, pki, "DEV-0001").await;

    let checked = expect_good(&result);
    assert_eq!(
        checked.valid_until.duration_since(checked.this_update).ok(),
        Some(Duration::from_secs(120))
    );
}

// ---------------------------------------------------------------------------
// Signer checks

#[tokio::test]
async fn unrelated_signer_rejected() {
    let pki = shared();
    let (_logs, responder) = pki.responder("other-ca", &[]);
    let checker = checker(settings(Some(responder.url())));

    let result = status_of(&checker, pki, "DEV-0001").await;

    let error = result.expect_err("a response signed by the unrelated CA was accepted");
    assert!(
        matches!(error, OcspError::UntrustedSigner { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(&responder.url()), "{error}");
}

#[tokio::test]
async fn delegated_responder_accepted() {
    let pki = shared();
    let (_logs, responder) = pki.responder("delegate", &[]);
    let checker = checker(settings(Some(responder.url())));

    let good = status_of(&checker, pki, "DEV-0001").await;
    let revoked = status_of(&checker, pki, "DEV-0002").await;

    expect_good(&good);
    let checked = revoked.expect("lookup failed");
    assert!(
        matches!(checked.status, OcspStatus::Revoked { .. }),
        "{:?}",
        checked.status
    );
}

#[tokio::test]
async fn delegated_responder_from_other_ca_rejected() {
    let pki = shared();
    let (_logs, responder) = pki.responder("foreign-delegate", &[]);
    let checker = checker(settings(Some(responder.url())));

    let result = status_of(&checker, pki, "DEV-0001").await;

    let error = result.expect_err("a delegate of the unrelated CA was accepted");
    assert!(
        matches!(error, OcspError::UntrustedSigner { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("not issued by the issuing CA"),
        "{error}"
    );
}

#[tokio::test]
async fn delegated_responder_without_eku_rejected() {
    let pki = shared();
    let (_logs, responder) = pki.responder("no-eku-delegate", &[]);
    let checker = checker(settings(Some(responder.url())));

    let result = status_of(&checker, pki, "DEV-0001").await;

    let error = result.expect_err("a delegate without id-kp-OCSPSigning was accepted");
    assert!(
        matches!(error, OcspError::UntrustedSigner { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("id-kp-OCSPSigning"), "{error}");
}

#[tokio::test]
async fn signature_algorithms_verified() {
    let pki = shared();
    let cases: &[(&str, &[&str])] = &[
        ("delegate-p384", &["--rmd", "sha384"]),
        ("delegate-rsa", &[]),
        (
            "delegate-rsa",
            &[
                "--rsigopt",
                "rsa_padding_mode:pss",
                "--rsigopt",
                "rsa_pss_saltlen:digest",
            ],
        ),
        ("delegate-ed25519", &[]),
    ];
    for (signer, extra) in cases {
        let (_logs, responder) = pki.responder(signer, extra);
        let checker = checker(settings(Some(responder.url())));

        let result = status_of(&checker, pki, "DEV-0001").await;

        assert!(
            matches!(
                result,
                Ok(Checked {
                    status: OcspStatus::Good { .. },
                    ..
                })
            ),
            "signer {signer} {extra:?}: {result:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Response matching

#[tokio::test]
async fn response_for_other_cert_rejected() {
    let pki = shared();
    let replay = pki.response("dev-0002.der");
    let (_logs, responder) = pki.mode_responder(&["--mode", "replay", "--replay-file", &replay]);
    let checker = checker(settings(Some(responder.url())));

    let result = status_of(&checker, pki, "DEV-0001").await;

    let error = result.expect_err("the response for DEV-0002 was accepted for DEV-0001");
    assert!(matches!(error, OcspError::CertIdMismatch { .. }), "{error}");
    assert!(error.to_string().contains("serial number"), "{error}");
}

#[tokio::test]
async fn echoed_nonce_accepted() {
    let pki = shared();
    let checker = checker(OcspSettings {
        send_nonce: true,
        require_nonce: true,
        ..settings(None)
    });

    let result = status_of(&checker, pki, "DEV-0001").await;

    expect_good(&result);
}

#[tokio::test]
async fn other_nonce_rejected() {
    let pki = shared();
    let replay = pki.response("dev-0001-nonce.der");
    let (_logs, responder) = pki.mode_responder(&["--mode", "replay", "--replay-file", &replay]);
    let checker = checker(settings(Some(responder.url())));

    let result = status_of(&checker, pki, "DEV-0001").await;

    let error = result.expect_err("a response with another nonce was accepted");
    assert!(matches!(error, OcspError::NonceMismatch { .. }), "{error}");
}

#[tokio::test]
async fn missing_nonce_rejected_when_required() {
    let pki = shared();
    let replay = pki.response("dev-0001.der");
    let (_logs, responder) = pki.mode_responder(&["--mode", "replay", "--replay-file", &replay]);
    let required = checker(OcspSettings {
        require_nonce: true,
        ..settings(Some(responder.url()))
    });
    let optional = checker(settings(Some(responder.url())));

    let rejected = status_of(&required, pki, "DEV-0001").await;
    let accepted = status_of(&optional, pki, "DEV-0001").await;

    let error = rejected.expect_err("a response without a nonce was accepted");
    assert!(matches!(error, OcspError::NonceMissing { .. }), "{error}");
    expect_good(&accepted);
}

#[tokio::test]
async fn expired_and_early_responses_rejected() {
    let pki = shared();
    let checker = checker(settings(None));
    let leaf = pki.cert("DEV-0001");
    let issuer = pki.cert(DEVICE_CA);
    let day = Duration::from_secs(86_400);

    let late = checker
        .status(&leaf, &issuer, SystemTime::now() + day)
        .await;
    let early = checker
        .status(&leaf, &issuer, SystemTime::now() - day)
        .await;

    let late = late.expect_err("an expired response was accepted");
    assert!(matches!(late, OcspError::Expired { .. }), "{late}");
    let early = early.expect_err("a response from the future was accepted");
    assert!(matches!(early, OcspError::NotYetValid { .. }), "{early}");
}

// ---------------------------------------------------------------------------
// Failures

#[tokio::test]
async fn failure_replies_give_distinct_errors() {
    let pki = shared();
    let cases = [
        ("garbage", "malformed_response"),
        ("try-later", "try_later"),
        ("unauthorized", "unauthorized"),
        ("http-error", "http_status"),
    ];
    for (mode, label) in cases {
        let (_logs, responder) = pki.mode_responder(&["--mode", mode]);
        let checker = checker(settings(Some(responder.url())));

        let result = status_of(&checker, pki, "DEV-0001").await;

        let error = result.expect_err("a failure reply was accepted");
        assert_eq!(error.label(), label, "mode {mode}: {error}");
        assert!(error.to_string().contains(&responder.url()), "{error}");
    }
}

#[tokio::test]
async fn hanging_responder_times_out() {
    let pki = shared();
    let (_logs, responder) = pki.mode_responder(&["--mode", "hang", "--hang-seconds", "20"]);
    let timeout = Duration::from_millis(500);
    let checker = checker(OcspSettings {
        timeout,
        ..settings(Some(responder.url()))
    });
    let started = Instant::now();

    let result = status_of(&checker, pki, "DEV-0001").await;

    let elapsed = started.elapsed();
    let error = result.expect_err("a hanging responder produced a status");
    assert!(matches!(error, OcspError::Timeout { .. }), "{error}");
    assert!(elapsed >= timeout, "returned after {elapsed:?}");
    // Far below the responder's 20 s hang.
    assert!(
        elapsed < timeout + Duration::from_secs(5),
        "returned after {elapsed:?}"
    );
}

#[tokio::test]
async fn oversized_response_rejected() {
    let pki = shared();
    let checker = checker(OcspSettings {
        max_response_bytes: 64,
        ..settings(None)
    });

    let result = status_of(&checker, pki, "DEV-0001").await;

    let error = result.expect_err("an oversized response was accepted");
    assert!(
        matches!(error, OcspError::ResponseTooLarge { limit: 64, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn certificate_without_aia_needs_configured_url() {
    let pki = shared();
    let checker = checker(settings(None));

    let result = status_of(&checker, pki, "delegate").await;

    let error = result.expect_err("a lookup without a responder URL succeeded");
    assert!(matches!(error, OcspError::NoResponder), "{error}");
}

#[tokio::test]
async fn responder_down_hard_and_soft_fail() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &[]);
    let checker = checker(settings(Some(responder.url())));
    let leaf = pki.cert("DEV-0001");
    let issuer = pki.cert(DEVICE_CA);
    let fetched = checker.status(&leaf, &issuer, SystemTime::now()).await;
    expect_good(&fetched);
    drop(responder);
    // Ten minutes later the 5-minute response has expired, so the checker
    // must ask the responder, which is gone.
    let later = SystemTime::now() + Duration::from_secs(600);

    let result = checker.status(&leaf, &issuer, later).await;

    let error = result
        .as_ref()
        .expect_err("a stopped responder produced a status");
    assert!(matches!(error, OcspError::Transport { .. }), "{error}");
    let last = checker.cached(&leaf, &issuer);
    assert!(last.as_ref().is_some_and(|last| last.from_cache));

    let hard = decide(&OcspMode::HardFail, &result, last.as_ref(), later);
    assert!(!hard.is_admit(), "{hard:?}");
    let within = decide(&SOFT_FAIL_HOUR, &result, last.as_ref(), later);
    assert!(within.is_admit(), "{within:?}");
    let strict = OcspMode::SoftFail {
        max_staleness: Duration::from_secs(300),
        without_answer: SoftFailWithoutAnswer::Admit,
    };
    let stale = decide(&strict, &result, last.as_ref(), later);
    assert!(!stale.is_admit(), "{stale:?}");
}

#[tokio::test]
async fn responder_down_without_answer() {
    let pki = shared();
    let (url, _closed) = closed_url();
    let checker = checker(settings(Some(url)));
    let leaf = pki.cert("DEV-0001");
    let issuer = pki.cert(DEVICE_CA);

    let result = checker.status(&leaf, &issuer, SystemTime::now()).await;

    let error = result
        .as_ref()
        .expect_err("a closed port produced a status");
    assert!(matches!(error, OcspError::Transport { .. }), "{error}");
    assert!(checker.cached(&leaf, &issuer).is_none());
    let admit = decide(&SOFT_FAIL_HOUR, &result, None, SystemTime::now());
    assert!(admit.is_admit(), "{admit:?}");
    let reject_mode = OcspMode::SoftFail {
        max_staleness: Duration::from_secs(3600),
        without_answer: SoftFailWithoutAnswer::Refuse,
    };
    let reject = decide(&reject_mode, &result, None, SystemTime::now());
    assert!(!reject.is_admit(), "{reject:?}");
}

#[tokio::test]
async fn failure_backoff_skips_requests() {
    let pki = shared();
    let (_logs, responder) = pki.mode_responder(&["--mode", "try-later"]);
    let checker = checker(OcspSettings {
        failure_backoff: Duration::from_secs(60),
        ..settings(Some(responder.url()))
    });

    let first = status_of(&checker, pki, "DEV-0001").await;
    let second = status_of(&checker, pki, "DEV-0001").await;

    assert!(
        matches!(first, Err(OcspError::TryLater { .. })),
        "{first:?}"
    );
    assert!(
        matches!(second, Err(OcspError::TryLater { .. })),
        "{second:?}"
    );
    assert_eq!(responder.stats().await.requests, 1);
}

// ---------------------------------------------------------------------------
// Cache and concurrency

#[tokio::test]
async fn second_lookup_served_from_cache() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &[]);
    let checker = checker(settings(Some(responder.url())));

    let first = status_of(&checker, pki, "DEV-0001").await;
    let second = status_of(&checker, pki, "DEV-0001").await;

    let first = expect_good(&first);
    let second = expect_good(&second);
    assert!(!first.from_cache);
    assert!(second.from_cache);
    assert_eq!(second.status, first.status);
    assert_eq!(second.fetched_at, first.fetched_at);
    assert_eq!(responder.stats().await.requests, 1);
}

#[tokio::test]
async fn concurrent_lookups_share_one_request() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &["--delay", "0.5"]);
    let checker = checker(settings(Some(responder.url())));
    let leaf = pki.cert("DEV-0001");
    let issuer = pki.cert(DEVICE_CA);

    let mut lookups = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let checker = checker.clone();
        let leaf = leaf.clone();
        let issuer = issuer.clone();
        lookups.spawn(async move { checker.status(&leaf, &issuer, SystemTime::now()).await });
    }
    let mut results = Vec::new();
    while let Some(joined) = lookups.join_next().await {
        results.push(joined.expect("lookup task panicked"));
    }

    assert_eq!(results.len(), 8);
    for result in &results {
        expect_good(result);
    }
    assert_eq!(responder.stats().await.requests, 1);
}

#[tokio::test]
async fn slow_responder_blocks_only_its_waiters() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &["--delay", "3"]);
    let checker = checker(OcspSettings {
        timeout: Duration::from_secs(15),
        ..settings(Some(responder.url()))
    });
    let issuer = pki.cert(DEVICE_CA);
    let cached_leaf = pki.cert("DEV-0003");
    let slow_leaf = pki.cert("DEV-0001");
    expect_good(
        &checker
            .status(&cached_leaf, &issuer, SystemTime::now())
            .await,
    );

    let slow = {
        let checker = checker.clone();
        let issuer = issuer.clone();
        tokio::spawn(async move { checker.status(&slow_leaf, &issuer, SystemTime::now()).await })
    };
    // The responder counts a request when it arrives, before the delay, so a
    // second one means the slow lookup is waiting for its response.
    let deadline = Instant::now() + Duration::from_secs(10);
    while responder.stats().await.requests < 2 {
        assert!(
            Instant::now() < deadline,
            "the slow lookup sent no request within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let fast = checker
        .status(&cached_leaf, &issuer, SystemTime::now())
        .await;
    let elapsed = started.elapsed();

    assert!(expect_good(&fast).from_cache);
    // A lookup blocked behind the slow one would take about the 3 s delay.
    assert!(
        elapsed < Duration::from_secs(1),
        "cached lookup took {elapsed:?}"
    );
    assert!(
        !slow.is_finished(),
        "the slow lookup ended before the cached one"
    );
    expect_good(&slow.await.expect("slow lookup panicked"));
}

#[tokio::test]
async fn connections_are_reused() {
    let pki = shared();
    let (_logs, responder) = pki.responder(DEVICE_CA, &[]);
    let checker = checker(settings(Some(responder.url())));

    expect_good(&status_of(&checker, pki, "DEV-0001").await);
    expect_good(&status_of(&checker, pki, "DEV-0003").await);

    let stats = responder.stats().await;
    assert_eq!(stats.requests, 2, "{stats:?}");
    assert_eq!(stats.connections, 1, "{stats:?}");
}

#[tokio::test]
async fn full_cache_evicts_oldest() {
    let pki = shared();
    let checker = checker(OcspSettings {
        cache_capacity: 2,
        ..settings(None)
    });
    let issuer = pki.cert(DEVICE_CA);

    for device in ["DEV-0001", "DEV-0002", "DEV-0003"] {
        checker
            .status(&pki.cert(device), &issuer, SystemTime::now())
            .await
            .expect("lookup failed");
    }

    assert_eq!(checker.cache_len(), 2);
    assert!(checker.cached(&pki.cert("DEV-0001"), &issuer).is_none());
    assert!(checker.cached(&pki.cert("DEV-0002"), &issuer).is_some());
    assert!(checker.cached(&pki.cert("DEV-0003"), &issuer).is_some());
}

/// Makes a PKI of its own in a new directory, with a responder whose
/// responses are valid for one minute. Returns the directory, the PKI path
/// and the responder.
fn own_pki_with_short_responses() -> (tempfile::TempDir, PathBuf, Responder) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path().join("pki");
    let responder = Responder::start(
        &[
            responder_args(&pki, DEVICE_CA),
            vec!["--nmin".to_owned(), "1".to_owned()],
        ]
        .concat(),
        &dir.path().join("responder.log"),
    );
    make_pki(&pki, &responder.url());
    (dir, pki, responder)
}

#[tokio::test]
async fn refresh_reports_new_revocation() {
    // A PKI of its own, because the test revokes a certificate.
    let (_dir, pki, responder) = own_pki_with_short_responses();
    let checker = checker(settings(None));
    let mut events = checker.subscribe();
    let issuer = load_cert(&pki, DEVICE_CA);
    let leaf = load_cert(&pki, "DEV-0003");
    let now = SystemTime::now();
    expect_good(&checker.status(&leaf, &issuer, now).await);
    revoke(&pki, "DEV-0003");

    let live = |_: &str, _: &str| true;
    let outside_margin = checker
        .refresh_expiring(now, Duration::from_secs(10), live)
        .await;
    let requests_before = responder.stats().await.requests;
    let revoked = checker
        .refresh_expiring(now, Duration::from_secs(120), live)
        .await;

    assert!(outside_margin.is_empty(), "{outside_margin:?}");
    assert_eq!(requests_before, 1);
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    let revocation = &revoked[0];
    assert_eq!(
        Some(&revocation.cert_id),
        checker.cert_id(&leaf, &issuer).ok().as_ref()
    );
    assert_eq!(revocation.reason, Some(CrlReason::KeyCompromise));
    assert_eq!(revocation.responder_url, responder.url());
    let identity = ztgate::identity::extract_identity(&leaf, None).expect("identity");
    assert_eq!(revocation.serial_hex, identity.serial_hex);
    assert_eq!(revocation.issuer_raw_sha256, identity.issuer_raw_sha256);
    let event = events.try_recv().expect("no revocation event");
    assert_eq!(&event, revocation);
    let cached = checker.cached(&leaf, &issuer).expect("no cached status");
    assert!(
        matches!(cached.status, OcspStatus::Revoked { .. }),
        "{:?}",
        cached.status
    );
}

/// A cached status whose certificate has no live session is dropped when it
/// comes due instead of being fetched again. A certificate in use is
/// fetched again.
#[tokio::test]
async fn refresh_drops_statuses_without_sessions() {
    let (_dir, pki, responder) = own_pki_with_short_responses();
    let checker = checker(settings(None));
    let issuer = load_cert(&pki, DEVICE_CA);
    let in_use = load_cert(&pki, "DEV-0001");
    let departed = load_cert(&pki, "DEV-0003");
    let now = SystemTime::now();
    expect_good(&checker.status(&in_use, &issuer, now).await);
    expect_good(&checker.status(&departed, &issuer, now).await);
    assert_eq!(checker.cache_len(), 2);
    let live_serial = ztgate::identity::extract_identity(&in_use, None)
        .expect("identity")
        .serial_hex;

    let requests_before = responder.stats().await.requests;
    checker
        .refresh_expiring(now, Duration::from_secs(120), |_, serial| {
            serial == live_serial
        })
        .await;

    assert_eq!(responder.stats().await.requests, requests_before + 1);
    assert_eq!(checker.cache_len(), 1);
    assert!(checker.cached(&in_use, &issuer).is_some());
    assert!(checker.cached(&departed, &issuer).is_none());
}
