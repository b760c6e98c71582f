//! Runs every file of `fuzz/seeds/TARGET/` through the check of that fuzz
//! target, so the seed corpus and saved crash inputs stay regression tests on
//! stable Rust, without libFuzzer. The checks are fuzz/src/lib.rs, compiled
//! here as a module so that this test reuses the main crate's build.
//! `scripts/fuzz.sh` in seeds mode runs this file with a development PKI.

#[path = "../fuzz/src/lib.rs"]
mod ztgate_fuzz;

use std::path::{Path, PathBuf};

fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("seeds")
        .join(target)
}

fn run_seeds(target: &str, check: fn(&[u8])) {
    let dir = seed_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the seed directory {}: {e}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("failed to list a seed file").path();
        let data = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("cannot read seed {}: {e}", path.display()));
        eprintln!("{target}: {}", path.display());
        check(&data);
        count += 1;
    }
    assert!(count > 0, "{} contains no seed file", dir.display());
}

#[test]
fn identity_seeds() {
    run_seeds("identity", ztgate_fuzz::identity);
}

#[test]
fn control_decode_seeds() {
    run_seeds("control_decode", ztgate_fuzz::control_decode);
}

#[test]
fn control_reader_seeds() {
    run_seeds("control_reader", ztgate_fuzz::control_reader);
}

#[test]
fn preamble_seeds() {
    run_seeds("preamble", ztgate_fuzz::preamble);
}

#[test]
fn config_load_seeds() {
    run_seeds("config_load", ztgate_fuzz::config_load);
}

#[test]
fn crl_seeds() {
    run_seeds("crl", ztgate_fuzz::crl);
    assert_seeds_pass_signature("crl", ztgate_fuzz::crl_accepted);
}

#[test]
fn ocsp_response_seeds() {
    run_seeds("ocsp_response", ztgate_fuzz::ocsp_response);
    assert_seeds_pass_signature("ocsp_response", ztgate_fuzz::ocsp_responses_accepted);
}

/// Checks that some seeds pass every check, which they do only while
/// fuzz/fixtures matches the key that signed them.
fn assert_seeds_pass_signature(target: &str, accepted: fn(&[u8]) -> usize) {
    let dir = seed_dir(target);
    let mut total = 0;
    for entry in std::fs::read_dir(&dir).expect("list seeds") {
        let path = entry.expect("seed entry").path();
        total += accepted(&std::fs::read(&path).expect("read seed"));
    }
    assert!(
        total > 0,
        "no seed of {} verifies; run scripts/fuzz.sh --make-seeds to rewrite the seeds and fuzz/fixtures together",
        dir.display()
    );
}
