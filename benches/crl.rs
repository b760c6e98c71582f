//! CRL benchmarks: decoding and indexing a large CRL, serial lookups, and
//! `RevocationStore::check` with that CRL loaded.
//!
//! The CRL comes from scripts/make-large-crl.sh and is kept in
//! target/crl-bench-ENTRIES/ between runs, because openssl needs 20 to 50 s
//! to sign a million entries. ZTGATE_BENCH_CRL_ENTRIES sets the number of
//! synthetic entries (default 1000000).
//!
//! Before the criterion groups, the bench prints the wall and CPU time and
//! the peak resident memory of one load of the DER and one of the PEM file.
//! The peak comes from VmHWM in /proc/self/status after resetting it through
//! /proc/self/clear_refs, so it covers reading the file, decoding, and the
//! index, on top of what the process held before. examples/crl_load.rs
//! measures the same from outside with /usr/bin/time -v.
//!
//! Run: cargo bench --bench crl

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use ztgate::identity::crl::{
    parse_crl, read_crl_file, serial_bytes_from_hex, Crl, CrlChecks, CrlSigner,
};
use ztgate::identity::revocation::{
    CaRevocationConfig, RevocationSettings, RevocationStore, RevocationVerdict, StoreOptions,
};

const DEFAULT_ENTRIES: usize = 1_000_000;

struct Fixture {
    dir: PathBuf,
    entries: usize,
    signers: Vec<CrlSigner>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let entries = std::env::var("ZTGATE_BENCH_CRL_ENTRIES")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(DEFAULT_ENTRIES);
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join(format!("target/crl-bench-{entries}"));
        if !dir.join("device-ca.crl").exists() {
            eprintln!("making a CRL with {entries} entries in {}", dir.display());
            let status = Command::new("bash")
                .arg(root.join("scripts/make-large-crl.sh"))
                .arg(&dir)
                .arg(entries.to_string())
                .status()
                .expect("run scripts/make-large-crl.sh");
            assert!(status.success(), "make-large-crl.sh failed");
        }
        let signer_cert = CertificateDer::from_pem_file(dir.join("device-ca.pem"))
            .expect("device CA certificate");
        let signers = vec![CrlSigner::from_certificate(&signer_cert).expect("device CA")];
        Fixture {
            dir,
            entries,
            signers,
        }
    })
}

fn now_unix() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(elapsed.as_secs()).expect("time fits i64")
}

fn checks(signers: &[CrlSigner]) -> CrlChecks<'_> {
    CrlChecks {
        signers,
        now_unix: now_unix(),
        clock_skew_secs: 300,
    }
}

/// Reads a CRL file and decodes every CRL in it, as a file source does.
fn load_file(path: &Path, signers: &[CrlSigner]) -> Vec<Crl> {
    let file = std::fs::File::open(path).expect("CRL file");
    read_crl_file(file)
        .expect("CRL file reads")
        .iter()
        .map(|der| parse_crl(der, "bench", &checks(signers)).expect("CRL verifies"))
        .collect()
}

/// Reads a field such as "VmHWM" from /proc/self/status, in KiB.
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time of the calling thread from /proc/thread-self/schedstat, which
/// unlike wall time does not grow when other processes share the cores.
fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Decodes `path` once and prints the time and the peak resident memory.
fn report_one_load(label: &str, path: &Path, signers: &[CrlSigner]) {
    // Writing 5 resets VmHWM to the current resident size (Linux 4.0 and later).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = proc_status_kib("VmRSS").unwrap_or(0);

    let started = Instant::now();
    let cpu_before = thread_cpu_time().unwrap_or_default();
    let crls = load_file(path, signers);
    let cpu = thread_cpu_time()
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    let elapsed = started.elapsed();

    let peak = proc_status_kib("VmHWM").unwrap_or(0);
    let after = proc_status_kib("VmRSS").unwrap_or(0);
    let entries: usize = crls.iter().map(|crl| crl.revoked.len()).sum();
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "{label}: {entries} entries, {:.1} MiB file, read+decode+index {:.3} s wall, \
         {:.3} s CPU, RSS before {:.1} MiB, peak {:.1} MiB{}, with the index held {:.1} MiB",
        size as f64 / 1048576.0,
        elapsed.as_secs_f64(),
        cpu.as_secs_f64(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        if reset {
            ""
        } else {
            " (VmHWM not reset, so this is the process peak)"
        },
        after as f64 / 1024.0,
    );
    drop(crls);
}

fn parse_benches(c: &mut Criterion) {
    let fixture = fixture();
    let der = std::fs::read(fixture.dir.join("device-ca.crl")).expect("DER CRL");
    let mut group = c.benchmark_group("crl_decode_index");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(fixture.entries as u64));
    group.bench_function(BenchmarkId::new("der", fixture.entries), |b| {
        b.iter(|| parse_crl(black_box(&der), "bench", &checks(&fixture.signers)).expect("CRL"))
    });
    group.finish();
}

fn lookup_benches(c: &mut Criterion) {
    let fixture = fixture();
    let crls = load_file(&fixture.dir.join("device-ca.crl"), &fixture.signers);
    let crl = &crls[0];
    let serials_text =
        std::fs::read_to_string(fixture.dir.join("large-crl-serials.txt")).expect("serials");
    let hits: Vec<Vec<u8>> = serials_text
        .lines()
        .map(|hex| serial_bytes_from_hex(hex).expect("serial"))
        .collect();
    let misses: Vec<Vec<u8>> = hits
        .iter()
        .map(|serial| {
            let mut miss = serial.clone();
            if let Some(last) = miss.last_mut() {
                *last ^= 0x5a;
            }
            miss
        })
        .collect();
    assert!(hits.iter().all(|serial| crl.revoked.get(serial).is_some()));
    assert!(misses
        .iter()
        .all(|serial| crl.revoked.get(serial).is_none()));

    let mut group = c.benchmark_group("crl_lookup");
    let mut next = 0usize;
    group.bench_function("hit", |b| {
        b.iter(|| {
            next = (next + 1) % hits.len();
            black_box(crl.revoked.get(black_box(&hits[next])))
        })
    });
    group.bench_function("miss", |b| {
        b.iter(|| {
            next = (next + 1) % misses.len();
            black_box(crl.revoked.get(black_box(&misses[next])))
        })
    });
    group.finish();
}

fn store_benches(c: &mut Criterion) {
    let fixture = fixture();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ca = CaRevocationConfig {
        name: "bench".to_owned(),
        anchors: vec![
            CertificateDer::from_pem_file(fixture.dir.join("device-ca.pem")).expect("device CA"),
        ],
        intermediates: Vec::new(),
        crl_files: vec![fixture.dir.join("device-ca.crl")],
        crl_urls: Vec::new(),
        settings: RevocationSettings::default(),
    };
    let store: Arc<RevocationStore> =
        RevocationStore::new(vec![ca], StoreOptions::default()).expect("store");
    let reports = runtime.block_on(store.refresh_now(None));
    assert!(reports.iter().all(|r| r.result.is_ok()), "{reports:?}");
    let chain = |name: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(fixture.dir.join(name))
            .expect("chain")
            .collect::<Result<_, _>>()
            .expect("chain PEM")
    };
    let good = chain("DEV-0001-chain.pem");
    let revoked = chain("DEV-0002-chain.pem");
    let now = now_unix();
    assert_eq!(store.check("bench", &good, now), RevocationVerdict::Good);
    assert!(matches!(
        store.check("bench", &revoked, now),
        RevocationVerdict::Revoked { .. }
    ));

    let mut group = c.benchmark_group("store_check");
    group.bench_function("good_leaf", |b| {
        b.iter(|| store.check(black_box("bench"), black_box(&good), now))
    });
    group.bench_function("revoked_leaf", |b| {
        b.iter(|| store.check(black_box("bench"), black_box(&revoked), now))
    });
    group.finish();
}

criterion_group!(benches, parse_benches, lookup_benches, store_benches);

fn main() {
    let fixture = fixture();
    report_one_load("DER", &fixture.dir.join("device-ca.crl"), &fixture.signers);
    report_one_load(
        "PEM",
        &fixture.dir.join("device-ca.crl.pem"),
        &fixture.signers,
    );
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
