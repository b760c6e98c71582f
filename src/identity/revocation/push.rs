//! Revocations pushed by an operator: validation, the lookup index and the
//! state file that keeps them across restarts.

use crate::identity::crl::{serial_bytes_from_hex, Crl};
use crate::identity::device::serial_hex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the state file inside the state directory.
pub const STATE_FILE_NAME: &str = "pushed-revocations.json";

/// Version of the state file format.
const STATE_FILE_VERSION: u32 = 1;

/// The certificates a pushed revocation matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PushTarget {
    /// Lower-case hex SHA-256 of the issuer Name's DER and the serial in the
    /// `DeviceIdentity::serial_hex` form.
    IssuerSerial {
        issuer_sha256: String,
        serial_hex: String,
    },
    /// Lower-case hex SHA-256 of the whole certificate DER.
    CertSha256 { sha256: String },
    /// Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo, which matches
    /// every certificate for the key.
    SpkiSha256 { sha256: String },
}

impl PushTarget {
    /// Lower-cases the hashes and rewrites the serial in its canonical form.
    ///
    /// # Errors
    ///
    /// Returns a message naming the field that is not valid hex of the right
    /// length.
    pub fn normalized(&self) -> Result<PushTarget, String> {
        Ok(match self {
            PushTarget::IssuerSerial {
                issuer_sha256,
                serial_hex: serial,
            } => {
                let bytes = serial_bytes_from_hex(serial)?;
                PushTarget::IssuerSerial {
                    issuer_sha256: normalize_sha256("issuer_sha256", issuer_sha256)?,
                    serial_hex: serial_hex(&bytes),
                }
            }
            PushTarget::CertSha256 { sha256 } => PushTarget::CertSha256 {
                sha256: normalize_sha256("sha256", sha256)?,
            },
            PushTarget::SpkiSha256 { sha256 } => PushTarget::SpkiSha256 {
                sha256: normalize_sha256("sha256", sha256)?,
            },
        })
    }
}

impl std::fmt::Display for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushTarget::IssuerSerial {
                issuer_sha256,
                serial_hex,
            } => write!(f, "issuer SHA-256 {issuer_sha256} serial {serial_hex}"),
            PushTarget::CertSha256 { sha256 } => write!(f, "certificate SHA-256 {sha256}"),
            PushTarget::SpkiSha256 { sha256 } => write!(f, "public key SHA-256 {sha256}"),
        }
    }
}

fn normalize_sha256(field: &str, hex: &str) -> Result<String, String> {
    let lower = hex.to_ascii_lowercase();
    if lower.len() != 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{field} must be a SHA-256 hash as 64 hex digits, got {hex:?}"
        ));
    }
    Ok(lower)
}

/// Decodes 64 hex digits into a SHA-256 hash.
pub(super) fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *slot = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// A revocation pushed by an operator, kept until a CRL lists the
/// certificate or the certificate expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedRevocation {
    #[serde(flatten)]
    pub target: PushTarget,
    /// The certificate's notAfter in seconds since the Unix epoch. The push
    /// is dropped after it. For an SPKI target, use the latest notAfter of
    /// the certificates for that key.
    pub not_after_unix: i64,
    /// Free text for logs and the refusal message.
    #[serde(default)]
    pub reason: Option<String>,
    /// When the store accepted the push; set by the store.
    #[serde(default)]
    pub pushed_at_unix: i64,
}

/// The pushed revocations, indexed for lookups during `check`.
#[derive(Debug, Default)]
pub(super) struct PushIndex {
    entries: Vec<PushedRevocation>,
    by_issuer_serial: HashMap<[u8; 32], HashMap<Box<[u8]>, usize>>,
    by_cert: HashMap<[u8; 32], usize>,
    by_spki: HashMap<[u8; 32], usize>,
}

impl PushIndex {
    /// Indexes pushes. The store passes only targets from
    /// [`PushTarget::normalized`], which decode. One that does not is skipped.
    pub(super) fn new(entries: Vec<PushedRevocation>) -> PushIndex {
        let mut index = PushIndex::default();
        for (position, push) in entries.iter().enumerate() {
            match &push.target {
                PushTarget::IssuerSerial {
                    issuer_sha256,
                    serial_hex,
                } => {
                    let (Some(issuer), Ok(serial)) = (
                        decode_sha256(issuer_sha256),
                        serial_bytes_from_hex(serial_hex),
                    ) else {
                        continue;
                    };
                    index
                        .by_issuer_serial
                        .entry(issuer)
                        .or_default()
                        .insert(serial.into_boxed_slice(), position);
                }
                PushTarget::CertSha256 { sha256 } => {
                    if let Some(hash) = decode_sha256(sha256) {
                        index.by_cert.insert(hash, position);
                    }
                }
                PushTarget::SpkiSha256 { sha256 } => {
                    if let Some(hash) = decode_sha256(sha256) {
                        index.by_spki.insert(hash, position);
                    }
                }
            }
        }
        index.entries = entries;
        index
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(super) fn has_hash_targets(&self) -> bool {
        !self.by_cert.is_empty() || !self.by_spki.is_empty()
    }

    pub(super) fn by_issuer_serial(
        &self,
        issuer_sha256: &[u8; 32],
        serial: &[u8],
    ) -> Option<&PushedRevocation> {
        let position = *self.by_issuer_serial.get(issuer_sha256)?.get(serial)?;
        self.entries.get(position)
    }

    pub(super) fn by_cert(&self, cert_sha256: &[u8; 32]) -> Option<&PushedRevocation> {
        self.entries.get(*self.by_cert.get(cert_sha256)?)
    }

    pub(super) fn by_spki(&self, spki_sha256: &[u8; 32]) -> Option<&PushedRevocation> {
        self.entries.get(*self.by_spki.get(spki_sha256)?)
    }

    pub(super) fn contains(&self, target: &PushTarget) -> bool {
        self.entries.iter().any(|push| &push.target == target)
    }
}

/// Returns whether a verified CRL lists the certificate of an issuer and
/// serial push. Other targets are never covered by a CRL.
pub(super) fn covered_by_crl(push: &PushedRevocation, crl: &Crl) -> bool {
    let PushTarget::IssuerSerial {
        issuer_sha256,
        serial_hex,
    } = &push.target
    else {
        return false;
    };
    if crl.issuer_sha256_hex() != *issuer_sha256 {
        return false;
    }
    serial_bytes_from_hex(serial_hex).is_ok_and(|serial| crl.revoked.get(&serial).is_some())
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    revocations: Vec<PushedRevocation>,
}

/// Reads the pushed revocations from `dir`. A missing file is no pushes.
///
/// # Errors
///
/// Returns a message naming the file when it cannot be read, is not valid
/// JSON of the expected shape, has an unknown version or an invalid target.
pub(super) fn load_state(dir: &Path) -> Result<Vec<PushedRevocation>, String> {
    let path = dir.join(STATE_FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("failed to read {}: {e}", path.display())),
    };
    let state: StateFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "invalid pushed-revocation state file {}: {e}",
            path.display()
        )
    })?;
    if state.version != STATE_FILE_VERSION {
        return Err(format!(
            "pushed-revocation state file {} has version {}, but this gateway reads version \
             {STATE_FILE_VERSION}",
            path.display(),
            state.version
        ));
    }
    let mut revocations = Vec::with_capacity(state.revocations.len());
    for mut push in state.revocations {
        push.target = push
            .target
            .normalized()
            .map_err(|e| format!("invalid entry in {}: {e}", path.display()))?;
        revocations.push(push);
    }
    Ok(revocations)
}

/// Writes the pushed revocations to `dir` atomically: a temporary file with
/// mode 0600 is written and synced, then renamed over the state file, and
/// the directory is synced so the rename survives a crash.
///
/// # Errors
///
/// Returns a message naming the path that failed.
pub(super) fn save_state(dir: &Path, revocations: &[PushedRevocation]) -> Result<(), String> {
    create_state_dir(dir)?;
    let path = dir.join(STATE_FILE_NAME);
    let temp = temp_path(&path);
    let state = StateFile {
        version: STATE_FILE_VERSION,
        revocations: revocations.to_vec(),
    };
    let text = serde_json::to_vec_pretty(&state)
        .map_err(|e| format!("failed to encode the pushed revocations: {e}"))?;

    let write = || -> std::io::Result<()> {
        match std::fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&temp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("failed to write {}: {e}", path.display()))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Creates the state directory with mode 0700 when it is missing.
pub fn create_state_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| {
            format!(
                "failed to create the state directory {}: {e}",
                dir.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(target: PushTarget) -> PushedRevocation {
        PushedRevocation {
            target,
            not_after_unix: 2_000_000_000,
            reason: Some("lost device".to_owned()),
            pushed_at_unix: 1_700_000_000,
        }
    }

    #[test]
    fn target_normalized() {
        let target = PushTarget::IssuerSerial {
            issuer_sha256: "AB".repeat(32),
            serial_hex: "0080".to_owned(),
        };

        let normalized = target.normalized().expect("valid target");

        assert_eq!(
            normalized,
            PushTarget::IssuerSerial {
                issuer_sha256: "ab".repeat(32),
                serial_hex: "80".to_owned(),
            }
        );
    }

    #[test]
    fn target_with_short_hash_rejected() {
        let target = PushTarget::CertSha256 {
            sha256: "abcd".to_owned(),
        };

        let error = target.normalized().expect_err("short hash accepted");

        assert!(error.contains("64 hex digits"), "{error}");
    }

    #[test]
    fn target_with_bad_serial_rejected() {
        let target = PushTarget::IssuerSerial {
            issuer_sha256: "ab".repeat(32),
            serial_hex: "12g4".to_owned(),
        };

        let error = target.normalized().expect_err("bad serial accepted");

        assert!(error.contains("'g'"), "{error}");
    }

    #[test]
    fn index_finds_each_kind() {
        let issuer = [0xab; 32];
        let pushes = vec![
            push(PushTarget::IssuerSerial {
                issuer_sha256: "ab".repeat(32),
                serial_hex: "80".to_owned(),
            }),
            push(PushTarget::CertSha256 {
                sha256: "01".repeat(32),
            }),
            push(PushTarget::SpkiSha256 {
                sha256: "02".repeat(32),
            }),
        ];

        let index = PushIndex::new(pushes);

        assert!(index.by_issuer_serial(&issuer, &[0x00, 0x80]).is_some());
        assert!(index.by_issuer_serial(&issuer, &[0x81]).is_none());
        assert!(index.by_cert(&[0x01; 32]).is_some());
        assert!(index.by_spki(&[0x02; 32]).is_some());
        assert!(index.by_spki(&[0x01; 32]).is_none());
        assert!(index.has_hash_targets());
    }

    #[test]
    fn state_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state_dir = dir.path().join("state");
        let pushes = vec![push(PushTarget::CertSha256 {
            sha256: "01".repeat(32),
        })];

        save_state(&state_dir, &pushes).expect("state saved");
        let loaded = load_state(&state_dir).expect("state loaded");

        assert_eq!(loaded, pushes);
        let mode = std::fs::metadata(state_dir.join(STATE_FILE_NAME))
            .expect("state file exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!temp_path(&state_dir.join(STATE_FILE_NAME)).exists());
    }

    #[test]
    fn missing_state_is_empty() {
        let dir = tempfile::tempdir().expect("temp dir");

        let loaded = load_state(dir.path()).expect("missing file accepted");

        assert!(loaded.is_empty());
    }

    #[test]
    fn corrupt_state_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(STATE_FILE_NAME), b"{not json").expect("write");

        let error = load_state(dir.path()).expect_err("corrupt file accepted");

        assert!(error.contains(STATE_FILE_NAME), "{error}");
    }
}
