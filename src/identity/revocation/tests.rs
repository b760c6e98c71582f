//! Store tests with openssl-made PKIs and CRLs, served from files and from a
//! loopback HTTP server. Time is a `ManualClock` set from the real clock,
//! because openssl stamps CRLs with the real time.

use super::*;
use crate::identity::crl::distribution_point_uris;
use crate::identity::extract_identity;
use crate::identity::test_pki::{now_unix, openssl_time, Pki, Reply, TestServer};
use std::time::Duration;

const CA: &str = "dev-devices";

/// Settings with no jitter and short timeouts, refusing on missing data.
fn settings() -> RevocationSettings {
    RevocationSettings {
        refresh_jitter: Duration::ZERO,
        fetch_timeout: Duration::from_secs(2),
        ..RevocationSettings::default()
    }
}

/// Builds a CA with the device CA as the only anchor, the layout of
/// config/ztgate.example.toml.
fn device_ca(pki: &Pki, settings: RevocationSettings) -> CaRevocationConfig {
    CaRevocationConfig {
        name: CA.to_owned(),
        anchors: vec![pki.cert("device-ca.pem")],
        intermediates: Vec::new(),
        crl_files: Vec::new(),
        crl_urls: Vec::new(),
        settings,
    }
}

struct Fixture {
    store: Arc<RevocationStore>,
    clock: Arc<ManualClock>,
}

fn store_with(cas: Vec<CaRevocationConfig>, state_dir: Option<PathBuf>) -> Fixture {
    let clock = Arc::new(ManualClock::new(now_unix()));
    let options = StoreOptions {
        state_dir,
        connect_timeout: Duration::from_secs(1),
        clock: clock.clone(),
    };
    let store = RevocationStore::new(cas, options).expect("store builds");
    Fixture { store, clock }
}

impl Fixture {
    fn now(&self) -> i64 {
        self.clock.now_unix()
    }

    fn check(&self, pki: &Pki, chain_file: &str) -> RevocationVerdict {
        self.store.check(CA, &pki.chain(chain_file), self.now())
    }
}

fn assert_revoked(verdict: &RevocationVerdict, depth: usize, serial: &str, reason: Option<&str>) {
    match verdict {
        RevocationVerdict::Revoked {
            depth: found_depth,
            serial_hex,
            reason: found_reason,
            ..
        } => {
            assert_eq!(*found_depth, depth, "{verdict:?}");
            assert_eq!(serial_hex, serial, "{verdict:?}");
            assert_eq!(found_reason.as_deref(), reason, "{verdict:?}");
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
}

fn single_result(reports: &[RefreshReport]) -> &Result<usize, String> {
    assert_eq!(reports.len(), 1, "{reports:?}");
    &reports[0].result
}

#[tokio::test]
async fn revoked_leaf_found_in_pem_file() {
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![pem.clone()];
    let fixture = store_with(vec![ca], None);

    let reports = fixture.store.refresh_now(None).await;
    let revoked = fixture.check(&pki, "DEV-0002-chain.pem");
    let good = fixture.check(&pki, "DEV-0001-chain.pem");

    assert_eq!(single_result(&reports), &Ok(1));
    assert_revoked(&revoked, 0, "2001", Some("keyCompromise"));
    let RevocationVerdict::Revoked { source, .. } = &revoked else {
        unreachable!()
    };
    assert_eq!(source, &pem.display().to_string());
    assert_eq!(good, RevocationVerdict::Good);
    let outcome = revoked.for_admission();
    assert!(
        matches!(
            &outcome,
            RevocationOutcome::Refuse {
                reason_label: "certificate-revoked",
                message
            } if message.contains("2001") && message.contains("keyCompromise")
        ),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn revoked_leaf_found_in_der_file() {
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0003.pem", "superseded");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let der_path = pki.path("device-ca.crl");
    std::fs::write(&der_path, pki.crl_der(&pem)).expect("write DER");
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![der_path];
    let fixture = store_with(vec![ca], None);

    fixture.store.refresh_now(None).await;

    assert_revoked(
        &fixture.check(&pki, "DEV-0003-chain.pem"),
        0,
        "2002",
        Some("superseded"),
    );
    assert_eq!(
        fixture.check(&pki, "DEV-0001-chain.pem"),
        RevocationVerdict::Good
    );
}

#[tokio::test]
async fn crl_fetched_over_http() {
    let server = TestServer::start().await;
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    server.set("/device-ca.crl", Reply::Body(pki.crl_der(&pem)));
    let mut ca = device_ca(&pki, settings());
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    let fixture = store_with(vec![ca], None);

    let reports = fixture.store.refresh_now(Some(CA)).await;

    assert_eq!(single_result(&reports), &Ok(1));
    assert_revoked(
        &fixture.check(&pki, "DEV-0002-chain.pem"),
        0,
        "2001",
        Some("keyCompromise"),
    );
    assert_eq!(
        fixture.check(&pki, "DEV-0001-chain.pem"),
        RevocationVerdict::Good
    );
}

#[tokio::test]
async fn pem_over_http_rejected() {
    let server = TestServer::start().await;
    let pki = Pki::new(None);
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    server.set(
        "/device-ca.crl",
        Reply::Body(std::fs::read(pem).expect("PEM")),
    );
    let mut ca = device_ca(&pki, settings());
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    let fixture = store_with(vec![ca], None);

    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports).clone().expect_err("PEM accepted");
    assert!(error.contains("PEM"), "{error}");
    assert!(error.contains("/device-ca.crl"), "{error}");
}

#[tokio::test]
async fn forged_crl_rejected_and_last_good_kept() {
    let server = TestServer::start().await;
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let good = pki.gencrl("device_ca", "good.crl.pem", &["-crlhours", "1"]);
    server.set("/device-ca.crl", Reply::Body(pki.crl_der(&good)));
    let mut ca = device_ca(&pki, settings());
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    let fixture = store_with(vec![ca], None);
    fixture.store.refresh_now(None).await;
    let mut signing = pki.impostor_signing_options();
    signing.extend(["-crlhours".to_owned(), "2".to_owned()]);
    let signing: Vec<&str> = signing.iter().map(String::as_str).collect();
    let forged = pki.gencrl("device_ca", "forged.crl.pem", &signing);
    server.set("/device-ca.crl", Reply::Body(pki.crl_der(&forged)));

    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports)
        .clone()
        .expect_err("forged CRL accepted");
    assert!(error.contains("signature does not verify"), "{error}");
    assert_revoked(
        &fixture.check(&pki, "DEV-0002-chain.pem"),
        0,
        "2001",
        Some("keyCompromise"),
    );
    let status = fixture.store.source_ages(fixture.now());
    assert_eq!(status[0].entries, 1);
    assert_eq!(status[0].last_error.as_deref(), Some(error.as_str()));
    assert!(!status[0].stale);
}

#[tokio::test]
async fn truncated_crl_rejected() {
    let server = TestServer::start().await;
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let der = pki.crl_der(&pem);
    server.set(
        "/device-ca.crl",
        Reply::Body(der[..der.len() - 40].to_vec()),
    );
    let mut ca = device_ca(&pki, settings());
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    let fixture = store_with(vec![ca], None);

    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports)
        .clone()
        .expect_err("truncated CRL accepted");
    assert!(error.contains("truncated"), "{error}");
    let verdict = fixture.check(&pki, "DEV-0002-chain.pem");
    assert!(
        matches!(verdict, RevocationVerdict::NoData { refuse: true, .. }),
        "{verdict:?}"
    );
}

/// A CRL valid for one hour: fresh, then within the grace period, then stale.
#[tokio::test]
async fn stale_crl_refused_or_admitted_per_policy() {
    let pki = Pki::new(None);
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let grace = Duration::from_secs(600);
    let refuse = RevocationSettings {
        stale_grace: grace,
        on_stale: StalePolicy::Refuse,
        ..settings()
    };
    let mut strict = device_ca(&pki, refuse.clone());
    strict.crl_files = vec![pem.clone()];
    let mut lenient = device_ca(
        &pki,
        RevocationSettings {
            on_stale: StalePolicy::Admit,
            ..refuse
        },
    );
    lenient.name = "lenient".to_owned();
    lenient.crl_files = vec![pem];
    let fixture = store_with(vec![strict, lenient], None);
    fixture.store.refresh_now(None).await;
    let chain = pki.chain("DEV-0001-chain.pem");

    let fresh = fixture.store.check(CA, &chain, fixture.now());
    fixture.clock.advance(Duration::from_secs(3600 + 300));
    let in_grace = fixture.store.check(CA, &chain, fixture.now());
    fixture.clock.advance(Duration::from_secs(600));
    let stale = fixture.store.check(CA, &chain, fixture.now());
    let stale_lenient = fixture.store.check("lenient", &chain, fixture.now());

    assert_eq!(fresh, RevocationVerdict::Good);
    assert_eq!(in_grace, RevocationVerdict::Good);
    assert!(
        matches!(stale, RevocationVerdict::Stale { refuse: true, age_secs, .. } if age_secs >= 4500),
        "{stale:?}"
    );
    assert!(
        matches!(
            stale.for_admission(),
            RevocationOutcome::Refuse {
                reason_label: "revocation-data-stale",
                ..
            }
        ),
        "{stale:?}"
    );
    assert!(
        matches!(
            stale.for_live_session(),
            RevocationOutcome::Admit { note: Some(_) }
        ),
        "stale_closes_sessions is off"
    );
    assert!(
        matches!(
            stale_lenient.for_admission(),
            RevocationOutcome::Admit { note: Some(_) }
        ),
        "{stale_lenient:?}"
    );
    let status = fixture.store.source_ages(fixture.now());
    assert!(status.iter().all(|s| s.stale), "{status:?}");
}

#[tokio::test]
async fn expired_crl_still_reports_revocation() {
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let now = now_unix();
    let pem = pki.gencrl(
        "device_ca",
        "old.crl.pem",
        &[
            "-crl_lastupdate",
            &openssl_time(now - 7200),
            "-crl_nextupdate",
            &openssl_time(now - 3600),
        ],
    );
    let mut ca = device_ca(
        &pki,
        RevocationSettings {
            stale_grace: Duration::ZERO,
            ..settings()
        },
    );
    ca.crl_files = vec![pem];
    let fixture = store_with(vec![ca], None);

    fixture.store.refresh_now(None).await;

    assert_revoked(
        &fixture.check(&pki, "DEV-0002-chain.pem"),
        0,
        "2001",
        Some("keyCompromise"),
    );
    let stale = fixture.check(&pki, "DEV-0001-chain.pem");
    assert!(
        matches!(stale, RevocationVerdict::Stale { .. }),
        "{stale:?}"
    );
}

#[tokio::test]
async fn future_this_update_rejected() {
    let pki = Pki::new(None);
    let now = now_unix();
    let pem = pki.gencrl(
        "device_ca",
        "future.crl.pem",
        &[
            "-crl_lastupdate",
            &openssl_time(now + 3600),
            "-crl_nextupdate",
            &openssl_time(now + 7200),
        ],
    );
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![pem];
    let fixture = store_with(vec![ca], None);

    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports)
        .clone()
        .expect_err("future CRL accepted");
    assert!(error.contains("thisUpdate"), "{error}");
    assert!(error.contains("clock skew of 300s"), "{error}");
}

#[tokio::test]
async fn delta_crl_rejected_by_store() {
    let pki = Pki::new(None);
    pki.add_config_section("[ delta_ext ]\n2.5.29.27 = critical, ASN1:INTEGER:4096\n");
    let pem = pki.gencrl(
        "device_ca",
        "delta.crl.pem",
        &["-crlhours", "1", "-crlexts", "delta_ext"],
    );
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![pem.clone()];
    let fixture = store_with(vec![ca], None);

    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports)
        .clone()
        .expect_err("delta CRL accepted");
    assert!(error.contains(&pem.display().to_string()), "{error}");
    assert!(error.contains("delta CRL"), "{error}");
    assert!(
        error.contains("only complete CRLs are supported"),
        "{error}"
    );
}

#[tokio::test]
async fn unknown_critical_extension_rejected_by_store() {
    let pki = Pki::new(None);
    pki.add_config_section(
        "[ critical_ext ]\n1.3.6.1.4.1.55555.9.9 = critical, ASN1:UTF8String:must-understand\n",
    );
    let pem = pki.gencrl(
        "device_ca",
        "critical.crl.pem",
        &["-crlhours", "1", "-crlexts", "critical_ext"],
    );
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![pem];
    let fixture = store_with(vec![ca], None);

    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports)
        .clone()
        .expect_err("critical extension accepted");
    assert!(
        error.contains("unknown critical extension 1.3.6.1.4.1.55555.9.9"),
        "{error}"
    );
}

#[tokio::test]
async fn oversized_crl_rejected() {
    let server = TestServer::start().await;
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let der = pki.crl_der(&pem);
    server.set("/device-ca.crl", Reply::Body(der.clone()));
    let small = RevocationSettings {
        max_crl_bytes: 100,
        ..settings()
    };
    let mut ca = device_ca(&pki, small);
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    ca.crl_files = vec![pem];
    let fixture = store_with(vec![ca], None);
    assert!(der.len() > 100);

    let reports = fixture.store.refresh_now(None).await;

    assert_eq!(reports.len(), 2);
    for report in &reports {
        let error = report.result.clone().expect_err("oversized CRL accepted");
        assert!(error.contains("100 bytes"), "{error}");
        assert!(error.contains(&report.source), "{error}");
    }
}

#[tokio::test]
async fn silent_server_times_out() {
    let server = TestServer::start().await;
    server.set("/device-ca.crl", Reply::Silent);
    let pki = Pki::new(None);
    let quick = RevocationSettings {
        fetch_timeout: Duration::from_millis(500),
        ..settings()
    };
    let mut ca = device_ca(&pki, quick);
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    let fixture = store_with(vec![ca], None);

    let started = std::time::Instant::now();
    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports)
        .clone()
        .expect_err("silent server answered");
    assert!(error.contains("timed out after 0.5s"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.requests(), ["/device-ca.crl"]);
}

#[test]
fn non_http_urls_refused() {
    let pki = Pki::new(None);
    for url in [
        "https://127.0.0.1/ca.crl",
        "file:///tmp/ca.crl",
        "ldap://127.0.0.1/cn=ca",
    ] {
        let mut ca = device_ca(&pki, settings());
        ca.crl_urls = vec![url.to_owned()];

        let error = RevocationStore::new(vec![ca], StoreOptions::default())
            .expect_err("non-http URL accepted");

        assert!(error.contains("only fetched over plain http://"), "{error}");
        assert!(error.contains(url), "{error}");
    }
}

#[tokio::test]
async fn learned_distribution_point_fetched() {
    let server = TestServer::start().await;
    let url = server.url("/device-ca.crl");
    let pki = Pki::new(Some(&url));
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    server.set("/device-ca.crl", Reply::Body(pki.crl_der(&pem)));
    let fixture = store_with(vec![device_ca(&pki, settings())], None);
    let uris = distribution_point_uris(&pki.cert("DEV-0002.pem")).expect("certificate");
    let refused = vec![
        "https://127.0.0.1/x.crl".to_owned(),
        "file:///x.crl".to_owned(),
    ];

    let before = fixture.check(&pki, "DEV-0002-chain.pem");
    let added = fixture.store.learn_distribution_points(CA, &uris);
    let added_again = fixture.store.learn_distribution_points(CA, &uris);
    let added_refused = fixture.store.learn_distribution_points(CA, &refused);
    fixture.store.refresh_now(None).await;

    assert!(
        matches!(before, RevocationVerdict::NoData { .. }),
        "{before:?}"
    );
    assert_eq!(uris, std::slice::from_ref(&url));
    assert_eq!((added, added_again, added_refused), (1, 0, 0));
    assert_revoked(
        &fixture.check(&pki, "DEV-0002-chain.pem"),
        0,
        "2001",
        Some("keyCompromise"),
    );
    let status = fixture.store.source_ages(fixture.now());
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].kind, "distribution point");
    assert_eq!(status[0].source, url);
}

#[tokio::test]
async fn learned_urls_capped() {
    let pki = Pki::new(None);
    let fixture = store_with(vec![device_ca(&pki, settings())], None);
    let urls: Vec<String> = (0..MAX_LEARNED_URLS_PER_CA + 3)
        .map(|i| format!("http://127.0.0.1:9/{i}.crl"))
        .collect();

    let added = fixture.store.learn_distribution_points(CA, &urls);
    let unknown_ca = fixture.store.learn_distribution_points("other", &urls);

    assert_eq!(added, MAX_LEARNED_URLS_PER_CA);
    assert_eq!(unknown_ca, 0);
}

#[tokio::test]
async fn push_persisted_and_reloaded() {
    let pki = Pki::new(None);
    let state = tempfile::tempdir().expect("temp dir");
    let state_dir = state.path().join("revocation");
    let identity = extract_identity(&pki.cert("DEV-0001.pem"), None).expect("identity");
    let fixture = store_with(vec![device_ca(&pki, settings())], Some(state_dir.clone()));
    let target = PushTarget::CertSha256 {
        sha256: identity.cert_sha256.to_uppercase(),
    };

    fixture
        .store
        .push(PushedRevocation {
            target: target.clone(),
            not_after_unix: identity.not_after_unix,
            reason: Some("device reported stolen".to_owned()),
            pushed_at_unix: 0,
        })
        .expect("push accepted");
    drop(fixture);
    let reloaded = store_with(vec![device_ca(&pki, settings())], Some(state_dir.clone()));

    assert!(reloaded.store.is_pushed(&target));
    let verdict = reloaded.check(&pki, "DEV-0001-chain.pem");
    assert_revoked(&verdict, 0, "2000", Some("device reported stolen"));
    let RevocationVerdict::Revoked { source, .. } = &verdict else {
        unreachable!()
    };
    assert_eq!(source, "pushed revocation");
    assert_eq!(
        reloaded.store.check_identity(CA, &identity, reloaded.now()),
        verdict
    );
    let mode = std::fs::metadata(state_dir.join(STATE_FILE_NAME))
        .expect("state file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
}

#[tokio::test]
async fn push_by_spki_matches_every_certificate_of_key() {
    let pki = Pki::new(None);
    let identity = extract_identity(&pki.cert("DEV-0003.pem"), None).expect("identity");
    let fixture = store_with(vec![device_ca(&pki, settings())], None);

    fixture
        .store
        .push(PushedRevocation {
            target: PushTarget::SpkiSha256 {
                sha256: identity.spki_sha256.clone(),
            },
            not_after_unix: identity.not_after_unix,
            reason: None,
            pushed_at_unix: 0,
        })
        .expect("push accepted");

    assert_revoked(&fixture.check(&pki, "DEV-0003-chain.pem"), 0, "2002", None);
    let other = fixture.check(&pki, "DEV-0001-chain.pem");
    assert!(
        matches!(other, RevocationVerdict::NoData { .. }),
        "{other:?}"
    );
}

#[tokio::test]
async fn invalid_pushes_rejected() {
    let pki = Pki::new(None);
    let fixture = store_with(vec![device_ca(&pki, settings())], None);
    let expired = PushedRevocation {
        target: PushTarget::CertSha256 {
            sha256: "ab".repeat(32),
        },
        not_after_unix: fixture.now() - 1,
        reason: None,
        pushed_at_unix: 0,
    };
    let bad_hash = PushedRevocation {
        target: PushTarget::CertSha256 {
            sha256: "xyz".to_owned(),
        },
        not_after_unix: fixture.now() + 60,
        ..expired.clone()
    };

    let expired_error = fixture
        .store
        .push(expired)
        .expect_err("expired push accepted");
    let hash_error = fixture.store.push(bad_hash).expect_err("bad hash accepted");

    assert!(expired_error.contains("expired"), "{expired_error}");
    assert!(hash_error.contains("64 hex digits"), "{hash_error}");
    assert!(fixture.store.pushed().is_empty());
}

#[tokio::test]
async fn push_dropped_after_covering_crl() {
    let pki = Pki::new(None);
    let state = tempfile::tempdir().expect("temp dir");
    let identity = extract_identity(&pki.cert("DEV-0002.pem"), None).expect("identity");
    let mut ca = device_ca(&pki, settings());
    let crl_path = pki.path("device-ca.crl.pem");
    ca.crl_files = vec![crl_path];
    let fixture = store_with(vec![ca], Some(state.path().to_owned()));
    let target = PushTarget::IssuerSerial {
        issuer_sha256: identity.issuer_raw_sha256.clone(),
        serial_hex: identity.serial_hex.clone(),
    };
    fixture
        .store
        .push(PushedRevocation {
            target: target.clone(),
            not_after_unix: identity.not_after_unix,
            reason: Some("lost".to_owned()),
            pushed_at_unix: 0,
        })
        .expect("push accepted");
    pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    fixture.store.refresh_now(None).await;
    let still_pushed = fixture.store.is_pushed(&target);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);

    fixture.store.refresh_now(None).await;

    assert!(
        still_pushed,
        "a CRL that does not list the certificate dropped the push"
    );
    assert!(!fixture.store.is_pushed(&target));
    assert!(fixture.store.pushed().is_empty());
    let reloaded = store_with(
        vec![device_ca(&pki, settings())],
        Some(state.path().to_owned()),
    );
    assert!(
        reloaded.store.pushed().is_empty(),
        "the drop was not persisted"
    );
    assert_revoked(
        &fixture.check(&pki, "DEV-0002-chain.pem"),
        0,
        "2001",
        Some("keyCompromise"),
    );
}

#[tokio::test]
async fn push_dropped_after_certificate_expiry() {
    let pki = Pki::new(None);
    let identity = extract_identity(&pki.cert("DEV-0001.pem"), None).expect("identity");
    let fixture = store_with(vec![device_ca(&pki, settings())], None);
    fixture
        .store
        .push(PushedRevocation {
            target: PushTarget::CertSha256 {
                sha256: identity.cert_sha256.clone(),
            },
            not_after_unix: fixture.now() + 60,
            reason: None,
            pushed_at_unix: 0,
        })
        .expect("push accepted");
    let mut changes = fixture.store.subscribe();
    changes.mark_unchanged();

    fixture.clock.advance(Duration::from_secs(61));
    fixture.store.refresh_now(None).await;

    assert!(fixture.store.pushed().is_empty());
    assert!(changes.has_changed().expect("sender alive"));
}

/// The device CA itself is revoked in the root CA's CRL, which only a chain
/// check detects.
#[tokio::test]
async fn chain_depth_catches_revoked_intermediate() {
    let pki = Pki::new(None);
    pki.revoke("root_ca", "device-ca.pem", "cACompromise");
    let root_crl = pki.gencrl("root_ca", "root-ca.crl.pem", &["-crlhours", "1"]);
    let device_crl = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let rooted = |name: &str, depth: Depth| CaRevocationConfig {
        name: name.to_owned(),
        anchors: vec![pki.cert("root-ca.pem")],
        intermediates: vec![pki.cert("device-ca.pem")],
        crl_files: vec![root_crl.clone(), device_crl.clone()],
        crl_urls: Vec::new(),
        settings: RevocationSettings {
            depth,
            ..settings()
        },
    };
    let fixture = store_with(
        vec![
            rooted("chain", Depth::Chain),
            rooted("leaf", Depth::EndEntity),
        ],
        None,
    );
    fixture.store.refresh_now(None).await;
    let chain = pki.chain("DEV-0001-chain.pem");
    let leaf_only = vec![pki.cert("DEV-0001.pem")];

    let chain_verdict = fixture.store.check("chain", &chain, fixture.now());
    let configured_intermediate = fixture.store.check("chain", &leaf_only, fixture.now());
    let leaf_verdict = fixture.store.check("leaf", &chain, fixture.now());

    assert_revoked(&chain_verdict, 1, "1000", Some("cACompromise"));
    assert_revoked(&configured_intermediate, 1, "1000", Some("cACompromise"));
    assert_eq!(leaf_verdict, RevocationVerdict::Good);
}

#[tokio::test]
async fn chain_depth_needs_crl_for_every_level() {
    let pki = Pki::new(None);
    let device_crl = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let ca = CaRevocationConfig {
        name: CA.to_owned(),
        anchors: vec![pki.cert("root-ca.pem")],
        intermediates: vec![pki.cert("device-ca.pem")],
        crl_files: vec![device_crl],
        crl_urls: Vec::new(),
        settings: RevocationSettings {
            depth: Depth::Chain,
            ..settings()
        },
    };
    let fixture = store_with(vec![ca], None);
    fixture.store.refresh_now(None).await;

    let verdict = fixture.check(&pki, "DEV-0001-chain.pem");

    assert!(
        matches!(
            verdict,
            RevocationVerdict::NoData {
                depth: 1,
                refuse: true,
                ..
            }
        ),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn missing_crl_follows_policy() {
    let pki = Pki::new(None);
    let mut admit = device_ca(
        &pki,
        RevocationSettings {
            without_crl: NoCrlPolicy::Admit,
            ..settings()
        },
    );
    admit.name = "admit".to_owned();
    let fixture = store_with(vec![device_ca(&pki, settings()), admit], None);
    let chain = pki.chain("DEV-0001-chain.pem");

    let refused = fixture.store.check(CA, &chain, fixture.now());
    let admitted = fixture.store.check("admit", &chain, fixture.now());
    let unconfigured = fixture.store.check("unknown", &chain, fixture.now());

    assert!(
        matches!(
            refused.for_admission(),
            RevocationOutcome::Refuse {
                reason_label: "revocation-data-missing",
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        matches!(
            admitted.for_admission(),
            RevocationOutcome::Admit { note: Some(_) }
        ),
        "{admitted:?}"
    );
    assert!(
        matches!(
            refused.for_live_session(),
            RevocationOutcome::Admit { note: Some(_) }
        ),
        "missing data closed a live session: {refused:?}"
    );
    assert_eq!(unconfigured, RevocationVerdict::NotConfigured);
}

#[tokio::test]
async fn subscribe_fires_on_change() {
    let pki = Pki::new(None);
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![pem];
    let fixture = store_with(vec![ca], None);
    let mut changes = fixture.store.subscribe();

    fixture.store.refresh_now(None).await;
    let after_load = changes.has_changed().expect("sender alive");
    changes.mark_unchanged();
    fixture.store.refresh_now(None).await;
    let after_same_crl = changes.has_changed().expect("sender alive");
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let waiter = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), changes.changed()).await
    });
    fixture.store.refresh_now(None).await;

    assert!(after_load);
    assert!(
        !after_same_crl,
        "reloading the same CRL notified subscribers"
    );
    let woken = waiter.await.expect("waiter task");
    assert!(matches!(woken, Ok(Ok(()))), "{woken:?}");
}

#[tokio::test]
async fn subscribe_fires_when_crl_goes_stale() {
    let pki = Pki::new(None);
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let mut ca = device_ca(
        &pki,
        RevocationSettings {
            stale_grace: Duration::ZERO,
            ..settings()
        },
    );
    ca.crl_files = vec![pem];
    let fixture = store_with(vec![ca], None);
    fixture.store.refresh_now(None).await;
    let mut changes = fixture.store.subscribe();
    changes.mark_unchanged();

    fixture.clock.advance(Duration::from_secs(3601));
    {
        let mut state = fixture.store.lock();
        fixture.store.housekeeping(&mut state, fixture.now());
    }

    assert!(changes.has_changed().expect("sender alive"));
}

#[tokio::test]
async fn older_crl_rejected() {
    let server = TestServer::start().await;
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let older = pki.gencrl("device_ca", "older.crl.pem", &["-crlhours", "3"]);
    let newer = pki.gencrl("device_ca", "newer.crl.pem", &["-crlhours", "3"]);
    server.set("/device-ca.crl", Reply::Body(pki.crl_der(&newer)));
    let mut ca = device_ca(&pki, settings());
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    let fixture = store_with(vec![ca], None);
    fixture.store.refresh_now(None).await;
    server.set("/device-ca.crl", Reply::Body(pki.crl_der(&older)));

    let reports = fixture.store.refresh_now(None).await;

    let error = single_result(&reports)
        .clone()
        .expect_err("older CRL accepted");
    assert!(error.contains("older than the installed CRL"), "{error}");
    assert!(error.contains("cRLNumber 1000"), "{error}");
    assert!(error.contains("cRLNumber 1001"), "{error}");
}

#[tokio::test]
async fn user_only_crl_does_not_cover_intermediate() {
    let pki = Pki::new(None);
    pki.add_config_section(
        "[ user_ext ]\nissuingDistributionPoint = critical, @idp_user\n\
         [ idp_user ]\nonlyuser = TRUE\n",
    );
    pki.revoke("root_ca", "device-ca.pem", "cACompromise");
    let root_crl = pki.gencrl(
        "root_ca",
        "root-ca.crl.pem",
        &["-crlhours", "1", "-crlexts", "user_ext"],
    );
    let device_crl = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let ca = CaRevocationConfig {
        name: CA.to_owned(),
        anchors: vec![pki.cert("root-ca.pem")],
        intermediates: vec![pki.cert("device-ca.pem")],
        crl_files: vec![root_crl, device_crl],
        crl_urls: Vec::new(),
        settings: RevocationSettings {
            depth: Depth::Chain,
            ..settings()
        },
    };
    let fixture = store_with(vec![ca], None);
    fixture.store.refresh_now(None).await;

    let verdict = fixture.check(&pki, "DEV-0001-chain.pem");

    assert!(
        matches!(verdict, RevocationVerdict::NoData { depth: 1, .. }),
        "a user-only CRL was applied to a CA certificate: {verdict:?}"
    );
}

#[tokio::test]
async fn partitioned_crl_applies_only_to_its_distribution_point() {
    let pki = Pki::new(Some("http://127.0.0.1:9/part-1.crl"));
    pki.add_config_section(
        "[ part_ext ]\nissuingDistributionPoint = critical, @idp_part\n\
         [ idp_part ]\nfullname = URI:http://127.0.0.1:9/part-2.crl\n",
    );
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let crl = pki.gencrl(
        "device_ca",
        "part-2.crl.pem",
        &["-crlhours", "1", "-crlexts", "part_ext"],
    );
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![crl];
    let fixture = store_with(vec![ca], None);
    fixture.store.refresh_now(None).await;

    let verdict = fixture.check(&pki, "DEV-0002-chain.pem");

    assert!(
        matches!(verdict, RevocationVerdict::NoData { depth: 0, .. }),
        "a CRL of another partition was applied: {verdict:?}"
    );
}

#[tokio::test]
async fn run_refresh_loads_then_stops() {
    let server = TestServer::start().await;
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    server.set("/device-ca.crl", Reply::Body(pki.crl_der(&pem)));
    let mut ca = device_ca(&pki, settings());
    ca.crl_urls = vec![server.url("/device-ca.crl")];
    let fixture = store_with(vec![ca], None);
    let mut changes = fixture.store.subscribe();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let refresher = tokio::spawn(fixture.store.clone().run_refresh(shutdown_rx));

    let loaded = tokio::time::timeout(Duration::from_secs(5), changes.changed()).await;
    let verdict = fixture.check(&pki, "DEV-0002-chain.pem");
    shutdown_tx.send(true).expect("refresher listens");
    let stopped = tokio::time::timeout(Duration::from_secs(5), refresher).await;

    assert!(matches!(loaded, Ok(Ok(()))), "{loaded:?}");
    assert_revoked(&verdict, 0, "2001", Some("keyCompromise"));
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "refresher did not stop: {stopped:?}"
    );
    let status = fixture.store.source_ages(fixture.now());
    let next_due = fixture.store.lock().sources[0].next_due;
    assert!(next_due > fixture.now() + 60, "{status:?}");
}

#[tokio::test]
async fn reconfigure_keeps_crls_of_unchanged_ca() {
    let pki = Pki::new(None);
    pki.revoke("device_ca", "DEV-0002.pem", "keyCompromise");
    let pem = pki.gencrl("device_ca", "device-ca.crl.pem", &["-crlhours", "1"]);
    let mut ca = device_ca(&pki, settings());
    ca.crl_files = vec![pem];
    let fixture = store_with(vec![ca.clone()], None);
    fixture.store.refresh_now(None).await;
    let mut other_anchor = ca.clone();
    other_anchor.anchors = vec![pki.cert("root-ca.pem")];
    other_anchor.intermediates = vec![pki.cert("device-ca.pem")];

    fixture
        .store
        .reconfigure(vec![ca])
        .expect("same config accepted");
    let kept = fixture.check(&pki, "DEV-0002-chain.pem");
    fixture
        .store
        .reconfigure(vec![other_anchor])
        .expect("new anchors accepted");
    let reset = fixture.check(&pki, "DEV-0002-chain.pem");

    assert_revoked(&kept, 0, "2001", Some("keyCompromise"));
    assert!(
        matches!(reset, RevocationVerdict::NoData { .. }),
        "{reset:?}"
    );
}

#[test]
fn duplicate_ca_names_rejected() {
    let pki = Pki::new(None);
    let ca = device_ca(&pki, settings());

    let error = RevocationStore::new(vec![ca.clone(), ca], StoreOptions::default())
        .expect_err("duplicate CA accepted");

    assert!(error.contains("configured twice"), "{error}");
}
