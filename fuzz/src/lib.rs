//! The checks behind each fuzz target, shared by the libFuzzer binaries in
//! `fuzz_targets/` and by `tests/seeds.rs`, which runs the seed corpus and the
//! saved crash inputs through them on stable Rust.
//!
//! Each function takes arbitrary bytes. Besides "no panic", it asserts the
//! invariants named in its documentation, so a fuzzer also finds wrong results.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
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
