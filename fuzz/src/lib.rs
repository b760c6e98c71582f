//! The checks behind each fuzz target, shared by the libFuzzer binaries in
//! `fuzz_targets/` and by the main crate's `tests/fuzz_seeds.rs`, which runs
//! the seed corpus and the saved crash inputs through them on stable Rust.
//!
//! Each function takes arbitrary bytes. Besides "no panic", it asserts the
//! invariants named in its documentation, so a fuzzer also finds wrong results.

use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
use ztgate::identity::crl::{
    parse_crl, serial_bytes_from_hex, split_crl_file, CrlChecks, CrlSigner,
};
use ztgate::identity::device::validate_spiffe_id;
use ztgate::identity::{extract_identity, summarize_certificate, IdentityError};
use ztgate::protocol::{
    self, parse_preamble, ControlMessage, ControlReader, WireError, PROTOCOL_VERSION,
};

/// The hardware-bound OID of the development PKI.
const HARDWARE_BOUND_OID: &str = "1.3.6.1.4.1.55555.1.1";

/// Environment variable naming a directory written by scripts/dev-pki.sh. When
/// it is set, `config_load` links it as `pki/` beside the config file, so the
/// example config's relative paths resolve and the certificate and trust store
/// code runs too.
pub const PKI_ENV: &str = "ZTGATE_FUZZ_PKI";

fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `extract_identity` and `summarize_certificate` on `data` as a leaf
/// certificate.
///
/// Invariants: the summary's `cert_sha256` is the SHA-256 of `data`; an
/// identity that parses agrees with the summary on subject, issuer, serial and
/// hash; a SPIFFE ID is valid, listed among the SAN URIs and used as the
/// `device_id`; an invalid configured OID is always an error.
pub fn identity(data: &[u8]) {
    let summary = summarize_certificate(data);
    assert_eq!(summary.cert_sha256, sha256_hex(data));

    for oid in [None, Some(HARDWARE_BOUND_OID)] {
        let Ok(identity) = extract_identity(data, oid) else {
            continue;
        };
        assert_eq!(identity.cert_sha256, summary.cert_sha256);
        assert_eq!(identity.subject, summary.subject);
        assert_eq!(identity.issuer, summary.issuer);
        assert_eq!(identity.serial_hex, summary.serial_hex);
        if oid.is_none() {
            assert!(!identity.hardware_bound);
        }
        match &identity.spiffe_id {
            Some(spiffe_id) => {
                assert_eq!(validate_spiffe_id(spiffe_id), Ok(()));
                assert!(identity.san_uris.contains(spiffe_id));
                assert_eq!(&identity.device_id, spiffe_id);
            }
            None => assert!(
                identity.device_id.starts_with("permanent:")
                    || identity.device_id == format!("cert:{}", identity.cert_sha256),
                "unexpected device_id {:?}",
                identity.device_id
            ),
        }
    }

    let invalid_oid = extract_identity(data, Some("not-an-oid"));
    assert!(matches!(
        invalid_oid,
        Err(IdentityError::HardwareBoundOid { .. })
    ));
}

/// Re-encodes a decoded message and checks that the frame decodes to the same
/// message. Encoding may fail only because the body grew over the maximum.
fn assert_round_trip(message: &ControlMessage) {
    let frame = match message.encode() {
        Ok(frame) => frame,
        Err(WireError::TooLarge(_)) => return,
        Err(other) => panic!("encoding a decoded message failed: {other}"),
    };
    assert!(frame.len() >= 3);
    let body_len = usize::from(u16::from_be_bytes([frame[1], frame[2]]));
    assert_eq!(body_len, frame.len() - 3);
    let decoded =
        ControlMessage::decode(frame[0], &frame[3..]).expect("re-encoded frame does not decode");
    assert_eq!(&decoded, message);
}

/// Runs `ControlMessage::decode` with the first byte as the message type and
/// the rest as the body.
///
/// Invariant: a message that decodes survives an encode and decode round trip.
pub fn control_decode(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    if let Ok(message) = ControlMessage::decode(kind, body) {
        assert_round_trip(&message);
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("failed to build the tokio runtime")
    })
}

/// An `AsyncRead` over a byte slice that returns at most `chunk` bytes per
/// read, to exercise the reader's handling of short reads.
struct ChunkedReader<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let len = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(len);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// The messages a `ControlReader` produced from one input, in order, and the
/// error kind it stopped on (`None` for a clean end).
#[derive(Debug, PartialEq)]
struct ReadOutcome {
    messages: Vec<ControlMessage>,
    error: Option<std::io::ErrorKind>,
}

async fn read_all<R: AsyncRead + Unpin>(reader: R, max_messages: usize) -> ReadOutcome {
    let mut reader = ControlReader::new(reader);
    let mut messages = Vec::new();
    // Every message consumes at least its 3-byte header, so the input bounds
    // the loop. The explicit cap turns a reader that stops consuming into a
    // failed assertion instead of a hang.
    for _ in 0..=max_messages {
        match reader.next().await {
            Ok(Some(message)) => messages.push(message),
            Ok(None) => {
                return ReadOutcome {
                    messages,
                    error: None,
                }
            }
            Err(error) => {
                return ReadOutcome {
                    messages,
                    error: Some(error.kind()),
                }
            }
        }
    }
    panic!("ControlReader returned more than {max_messages} messages from the input");
}

/// Runs a `ControlReader` over `data[1..]`, once as one buffer and once in
/// reads of `data[0] % 8 + 1` bytes, and checks `parse_preamble` on the first
/// two bytes of the stream.
///
/// Invariants: both reads give the same messages and the same ending, and every
/// message survives a round trip. A stream that does not start with the
/// protocol version yields no message. The preamble is accepted exactly when it
/// is `preamble()`.
pub fn control_reader(data: &[u8]) {
    let Some((&chunk_byte, stream)) = data.split_first() else {
        return;
    };
    let max_messages = stream.len() / 3 + 1;
    let whole = runtime().block_on(read_all(stream, max_messages));
    let chunked = runtime().block_on(read_all(
        ChunkedReader {
            data: stream,
            chunk: usize::from(chunk_byte % 8) + 1,
        },
        max_messages,
    ));
    assert_eq!(whole, chunked);
    for message in &whole.messages {
        assert_round_trip(message);
    }
    if stream.first().is_some_and(|&v| v != PROTOCOL_VERSION) {
        assert!(whole.messages.is_empty());
        assert_eq!(whole.error, Some(std::io::ErrorKind::InvalidData));
    }
    if let [first, second, ..] = *stream {
        preamble_bytes([first, second]);
    }
}

fn preamble_bytes(bytes: [u8; 2]) {
    let result = parse_preamble(bytes);
    assert_eq!(
        result.is_ok(),
        bytes == protocol::preamble(),
        "{bytes:?}: {result:?}"
    );
    match result {
        Ok(()) => {}
        Err(WireError::UnsupportedVersion(version)) => assert_eq!(version, bytes[0]),
        Err(WireError::UnknownFlags(flags)) => {
            assert_eq!(bytes[0], PROTOCOL_VERSION);
            assert_eq!(flags, bytes[1]);
        }
        Err(other) => panic!("unexpected preamble error {other}"),
    }
}

/// Runs `parse_preamble` on the first two bytes.
///
/// Invariant: only `preamble()` is accepted, and an error names the first
/// offending byte.
pub fn preamble(data: &[u8]) {
    if let [first, second, ..] = *data {
        preamble_bytes([first, second]);
    }
}

/// Creates, once, a temp directory for config files, with `pki/` linked to
/// `$ZTGATE_FUZZ_PKI` when that is set.
fn config_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("failed to create a temp dir");
        if let Some(pki) = std::env::var_os(PKI_ENV) {
            std::os::unix::fs::symlink(&pki, dir.path().join("pki"))
                .expect("failed to link the PKI directory");
        }
        dir
    })
    .path()
}

fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| config_dir().join("ztgate.toml"))
}

/// Writes `data` as a config file and loads it with `load_generation`.
///
/// Invariant: loading returns a generation or a non-empty list of errors, each
/// naming the file, and never panics.
pub fn config_load(data: &[u8]) {
    let path = config_path();
    std::fs::write(path, data).expect("failed to write the config file");
    match ztgate::config::load_generation(path, 1) {
        Ok(generation) => {
            assert!(!generation.listen.is_empty());
            assert!(!generation.applications.is_empty());
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for error in &errors.0 {
                assert_eq!(&error.file, path);
                assert!(!error.message.is_empty());
            }
        }
    }
}

/// Fixtures written by `scripts/fuzz.sh --make-seeds` together with the CRL
/// and OCSP seeds: the device CA certificate whose key signed them, a device
/// certificate that CA issued, and the Unix time at which they were made.
/// With them, seeds verify and the fuzzer reaches the checks after the
/// signature.
const FIXTURE_CA: &[u8] = include_bytes!("../fixtures/device-ca.der");
const FIXTURE_LEAF: &[u8] = include_bytes!("../fixtures/DEV-0001.der");
const FIXTURE_MADE_AT: &str = include_str!("../fixtures/made-at");

/// The nonce that the OCSP seeds made with a nonce carry, as the extension
/// value (an OCTET STRING of 16 bytes).
const FIXTURE_NONCE: &[u8] = include_bytes!("../fixtures/ocsp-nonce.der");

/// Clock skew allowed in both checks, in seconds.
const SKEW_SECS: u64 = 300;

fn fixture_made_at() -> u64 {
    FIXTURE_MADE_AT
        .trim()
        .parse()
        .expect("fixtures/made-at contains Unix seconds")
}

fn fixture_leaf_serial() -> Vec<u8> {
    let summary = summarize_certificate(FIXTURE_LEAF);
    serial_bytes_from_hex(&summary.serial_hex).expect("the fixture leaf has a serial")
}

/// Splits `data` as a CRL file (PEM or DER), then decodes, verifies and
/// indexes each CRL against the fixture device CA.
///
/// Invariants for a CRL that passes: thisUpdate is not after nextUpdate nor
/// more than the skew after the fixture time; the issuer hash is the SHA-256
/// of the issuer DER; the CRL is the same issue as itself and not newer than
/// itself; an index lookup gives the same entry for a serial with and
/// without a redundant leading zero byte.
pub fn crl(data: &[u8]) {
    crl_accepted(data);
}

/// Runs the [`crl`] checks and returns how many CRLs passed them.
pub fn crl_accepted(data: &[u8]) -> usize {
    let mut accepted = 0;
    let Ok(signer) = CrlSigner::from_certificate(FIXTURE_CA) else {
        panic!("fixtures/device-ca.der does not parse");
    };
    let now = fixture_made_at() as i64;
    let checks = CrlChecks {
        signers: std::slice::from_ref(&signer),
        now_unix: now,
        clock_skew_secs: SKEW_SECS as i64,
    };
    let Ok(parts) = split_crl_file(data.to_vec()) else {
        return 0;
    };
    for der in parts {
        let crl = match parse_crl(&der, "fuzz", &checks) {
            Ok(crl) => crl,
            Err(error) => {
                assert_eq!(error.origin, "fuzz");
                assert!(!error.to_string().is_empty());
                continue;
            }
        };
        if let Some(next_update) = crl.next_update {
            assert!(crl.this_update <= next_update);
        }
        assert!(crl.this_update <= now + SKEW_SECS as i64);
        assert_eq!(sha256_hex(&crl.issuer_der), crl.issuer_sha256_hex());
        assert!(crl.is_same_issue(&crl));
        assert!(!crl.is_newer_than(&crl));

        let mut serials = vec![fixture_leaf_serial()];
        serials.extend(der.chunks(9).take(8).map(<[u8]>::to_vec));
        for serial in serials {
            let entry = crl.revoked.get(&serial);
            if serial.first().is_some_and(|b| *b < 0x80) {
                let mut padded = vec![0u8];
                padded.extend_from_slice(&serial);
                assert_eq!(crl.revoked.get(&padded).is_some(), entry.is_some());
            }
        }
        accepted += 1;
    }
    accepted
}

/// Verifies `data` as an OCSP response for the fixture leaf, with SHA-1 and
/// SHA-256 CertIDs, with and without the fixture nonce.
///
/// Invariants for a response that passes: thisUpdate is at most the skew
/// after the fixture time, the response is valid until at least the fixture
/// time minus the skew, and a good status carries that validity as its
/// nextUpdate. A failure formats as a message with a metrics label.
pub fn ocsp_response(data: &[u8]) {
    ocsp_responses_accepted(data);
}

/// Runs the [`ocsp_response`] checks and returns how many of the four
/// expectations the response passed.
pub fn ocsp_responses_accepted(data: &[u8]) -> usize {
    let mut accepted = 0;
    use std::time::{Duration, SystemTime};
    use ztgate::identity::ocsp::{
        verify_response, CertId, CertIdHash, ExpectedResponse, OcspStatus,
    };

    let issuer = CertificateDer::from(FIXTURE_CA.to_vec());
    let leaf = CertificateDer::from(FIXTURE_LEAF.to_vec());
    let skew = Duration::from_secs(SKEW_SECS);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(fixture_made_at());
    for hash in [CertIdHash::Sha1, CertIdHash::Sha256] {
        let Ok(cert_id) = CertId::new(&leaf, &issuer, hash) else {
            panic!("the fixture certificates give no CertID");
        };
        for nonce in [None, Some(FIXTURE_NONCE)] {
            let expected = ExpectedResponse {
                url: "http://127.0.0.1:1/fuzz",
                cert_id: &cert_id,
                issuer: &issuer,
                nonce,
                require_nonce: nonce.is_some(),
                clock_skew: skew,
                default_lifetime: Duration::from_secs(3600),
            };
            match verify_response(data, &expected, now) {
                Ok(verified) => {
                    assert!(verified.this_update <= now + skew);
                    assert!(verified.valid_until + skew >= now);
                    if let OcspStatus::Good { next_update, .. } = verified.status {
                        assert_eq!(next_update, verified.valid_until);
                    }
                    accepted += 1;
                }
                Err(error) => {
                    assert!(!error.to_string().is_empty());
                    assert!(!error.label().is_empty());
                }
            }
        }
    }
    accepted
}
