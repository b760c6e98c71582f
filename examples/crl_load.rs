//! Loads one CRL file the way a file source does and prints the entry count
//! and the time, for measuring peak memory from outside:
//!
//!     cargo build --release --example crl_load
//!     /usr/bin/time -v target/release/examples/crl_load CRL_FILE CA_CERT_PEM
//!
//! The CRL must be signed by the key of CA_CERT_PEM.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use ztgate::identity::crl::{parse_crl, read_crl_file, CrlChecks, CrlSigner};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, crl_path, ca_path] = args.as_slice() else {
        eprintln!("usage: crl_load CRL_FILE CA_CERT_PEM");
        return ExitCode::from(2);
    };
    match run(crl_path, ca_path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("crl_load: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(crl_path: &str, ca_path: &str) -> Result<(), String> {
    let ca = CertificateDer::from_pem_file(ca_path)
        .map_err(|e| format!("failed to read CA certificate {ca_path}: {e}"))?;
    let signers = vec![CrlSigner::from_certificate(&ca)?];
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let checks = CrlChecks {
        signers: &signers,
        now_unix: i64::try_from(now_unix).map_err(|e| e.to_string())?,
        clock_skew_secs: 300,
    };

    let started = Instant::now();
    let file =
        std::fs::File::open(crl_path).map_err(|e| format!("failed to open {crl_path}: {e}"))?;
    let blocks = read_crl_file(file).map_err(|e| format!("{crl_path}: {e}"))?;
    let mut entries = 0;
    for der in blocks {
        let crl = parse_crl(&der, crl_path, &checks).map_err(|e| e.to_string())?;
        entries += crl.revoked.len();
    }
    println!(
        "{crl_path}: {entries} entries loaded in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
