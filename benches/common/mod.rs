//! Fixtures shared by the benches: the development PKI from
//! scripts/dev-pki.sh and `openssl ca` runs against its device CA.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

/// Creates a fresh development PKI in a temporary directory.
pub fn dev_pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dev-pki.sh");
    let status = Command::new("bash")
        .arg(script)
        .arg(dir.path())
        .stdout(Stdio::null())
        .status()
        .expect("run dev-pki.sh");
    assert!(status.success(), "dev-pki.sh failed");
    dir
}

/// Runs `openssl ca` with the device CA section of the PKI in `pki`.
pub fn openssl_ca(pki: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(["ca", "-config"])
        .arg(pki.join("ca/ca.cnf"))
        .args(["-name", "device_ca"])
        .args(args)
        .output()
        .expect("run openssl ca");
    assert!(
        output.status.success(),
        "openssl ca failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
