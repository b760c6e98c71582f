//! Runs every file of `seeds/TARGET/` through the check of that fuzz target, so
//! the seed corpus and saved crash inputs stay regression tests on stable Rust,
//! without libFuzzer.

use std::path::Path;

fn run_seeds(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
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
