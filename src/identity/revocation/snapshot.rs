//! The immutable view that `check` reads without locks, and the check itself.

use super::push::{decode_sha256, PushIndex};
use super::settings::{secs, Depth, NoCrlPolicy, RevocationSettings, StalePolicy};
use super::sources::{CaState, Source};
use super::verdict::RevocationVerdict;
use crate::identity::crl::{
    distribution_point_uris, read_cert_fields, serial_bytes_from_hex, sha256, CertFields, Crl,
};
use crate::identity::device::{hex_lower, serial_hex};
use crate::identity::DeviceIdentity;
use rustls::pki_types::CertificateDer;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Maximum chain depth walked for `Depth::Chain`, a guard against name loops.
const MAX_CHAIN_DEPTH: usize = 8;

/// The view every ingress reads: per CA the CRLs in force, and the pushes.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub cas: HashMap<Arc<str>, CaView>,
    pub pushes: PushIndex,
}

#[derive(Debug)]
pub(super) struct CaView {
    pub settings: RevocationSettings,
    /// Subject Names (DER) of the trust anchors, where the chain walk stops.
    pub anchor_subjects: Vec<Vec<u8>>,
    pub intermediates: Vec<CertificateDer<'static>>,
    /// By issuer Name DER, the newest CRL of each scope. Keying by the Name
    /// spares `check` a SHA-256 of the issuer.
    pub crls: HashMap<Box<[u8]>, Vec<Arc<Crl>>>,
    /// The issuer Name DER of each key of `crls` by its SHA-256, for checks
    /// of stored identities, which have only the hash.
    pub issuer_names: HashMap<[u8; 32], Box<[u8]>>,
    /// Configured and learned URLs, so that learning a known URL takes no lock.
    pub known_urls: HashSet<String>,
}

/// The input that decided a verdict, for the `source` metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VerdictSource {
    Crl,
    Push,
    None,
}

impl VerdictSource {
    pub(super) fn label(self) -> &'static str {
        match self {
            VerdictSource::Crl => "crl",
            VerdictSource::Push => "push",
            VerdictSource::None => "none",
        }
    }
}

impl Snapshot {
    pub(super) fn build(cas: &[CaState], sources: &[Source], pushes: PushIndex) -> Snapshot {
        let mut views = HashMap::with_capacity(cas.len());
        for ca in cas {
            let mut view = CaView {
                settings: ca.config.settings.clone(),
                anchor_subjects: ca.anchor_subjects.clone(),
                intermediates: ca.config.intermediates.clone(),
                crls: HashMap::new(),
                issuer_names: HashMap::new(),
                known_urls: HashSet::new(),
            };
            for source in sources.iter().filter(|s| s.ca == ca.name) {
                if let Some(url) = source.kind.url() {
                    view.known_urls.insert(url.to_owned());
                }
                for crl in &source.crls {
                    add_crl(&mut view.crls, crl);
                    view.issuer_names
                        .insert(crl.issuer_sha256, crl.issuer_der.clone().into());
                }
            }
            views.insert(ca.name.clone(), view);
        }
        Snapshot { cas: views, pushes }
    }

    /// Checks a chain, leaf first, for the CA that verified it.
    pub(super) fn check(
        &self,
        ca_name: &str,
        chain: &[CertificateDer<'_>],
        now_unix: i64,
    ) -> (RevocationVerdict, VerdictSource) {
        let Some(view) = self.cas.get(ca_name) else {
            return (RevocationVerdict::NotConfigured, VerdictSource::None);
        };
        let Some(leaf) = chain.first() else {
            let detail = "the chain is empty".to_owned();
            return (
                RevocationVerdict::Unreadable { detail },
                VerdictSource::None,
            );
        };

        let mut current: &[u8] = leaf.as_ref();
        let mut flagged: Option<RevocationVerdict> = None;
        for depth in 0..MAX_CHAIN_DEPTH {
            let fields = match read_cert_fields(current) {
                Ok(fields) => fields,
                Err(detail) => {
                    let detail = format!("certificate at depth {depth}: {detail}");
                    return (
                        RevocationVerdict::Unreadable { detail },
                        VerdictSource::None,
                    );
                }
            };
            let subject = CertSubject {
                issuer: Issuer::Der(fields.issuer),
                serial: fields.serial,
                der: Some(current),
                spki: Some(fields.spki),
                cert_sha256: None,
                spki_sha256: None,
            };
            match self.check_one(view, &subject, depth, now_unix) {
                (verdict @ RevocationVerdict::Revoked { .. }, source) => return (verdict, source),
                (RevocationVerdict::Good, _) => {}
                (verdict, _) => flagged = Some(worse(flagged, verdict)),
            }
            if view.settings.depth == Depth::EndEntity {
                break;
            }
            match next_in_chain(view, chain, &fields) {
                Some(issuer) => current = issuer,
                None => break,
            }
        }
        match flagged {
            Some(verdict) => (verdict, VerdictSource::Crl),
            None => (RevocationVerdict::Good, VerdictSource::Crl),
        }
    }

    /// Checks the leaf of a live session from the hashes and serial that its
    /// identity stores.
    pub(super) fn check_identity(
        &self,
        ca_name: &str,
        identity: &DeviceIdentity,
        now_unix: i64,
    ) -> (RevocationVerdict, VerdictSource) {
        let Some(view) = self.cas.get(ca_name) else {
            return (RevocationVerdict::NotConfigured, VerdictSource::None);
        };
        let decoded = (
            decode_sha256(&identity.issuer_raw_sha256),
            serial_bytes_from_hex(&identity.serial_hex),
        );
        let (Some(issuer_sha256), Ok(serial)) = decoded else {
            let detail = format!(
                "the stored identity of {} has an invalid issuer hash or serial",
                identity.device_id
            );
            return (
                RevocationVerdict::Unreadable { detail },
                VerdictSource::None,
            );
        };
        let subject = CertSubject {
            issuer: Issuer::Sha256(issuer_sha256),
            serial: &serial,
            der: None,
            spki: None,
            cert_sha256: decode_sha256(&identity.cert_sha256),
            spki_sha256: decode_sha256(&identity.spki_sha256),
        };
        let (verdict, source) = self.check_one(view, &subject, 0, now_unix);
        match verdict {
            RevocationVerdict::Good => (RevocationVerdict::Good, VerdictSource::Crl),
            verdict => (verdict, source),
        }
    }

    fn check_one(
        &self,
        view: &CaView,
        subject: &CertSubject<'_>,
        depth: usize,
        now_unix: i64,
    ) -> (RevocationVerdict, VerdictSource) {
        if let Some(reason) = self.pushed(subject) {
            let verdict = RevocationVerdict::Revoked {
                depth,
                serial_hex: serial_hex(subject.serial),
                source: "pushed revocation".to_owned(),
                reason,
            };
            return (verdict, VerdictSource::Push);
        }

        let Some(crl) = covering_crl(view, subject, depth > 0) else {
            let verdict = RevocationVerdict::NoData {
                depth,
                issuer_sha256: hex_lower(&subject.issuer.sha256()),
                refuse: view.settings.without_crl == NoCrlPolicy::Refuse,
            };
            return (verdict, VerdictSource::None);
        };
        if let Some(entry) = crl.revoked.get(subject.serial) {
            let verdict = RevocationVerdict::Revoked {
                depth,
                serial_hex: serial_hex(subject.serial),
                source: crl.origin.clone(),
                reason: entry.reason().map(|r| r.name().to_owned()),
            };
            return (verdict, VerdictSource::Crl);
        }

        let expired_at = crl_expiry(crl, &view.settings);
        if now_unix > crl_stale_after(crl, &view.settings) {
            let verdict = RevocationVerdict::Stale {
                depth,
                source: crl.origin.clone(),
                age_secs: now_unix - crl.this_update,
                expired_at,
                refuse: view.settings.on_stale == StalePolicy::Refuse,
                close_sessions: view.settings.stale_closes_sessions,
            };
            return (verdict, VerdictSource::Crl);
        }
        (RevocationVerdict::Good, VerdictSource::Crl)
    }

    /// Returns the reason of a push that matches the certificate, as
    /// `Some(reason)`, or `None` when no push matches.
    #[allow(clippy::option_option)]
    fn pushed(&self, subject: &CertSubject<'_>) -> Option<Option<String>> {
        if self.pushes.is_empty() {
            return None;
        }
        if let Some(push) = self
            .pushes
            .by_issuer_serial(&subject.issuer.sha256(), subject.serial)
        {
            return Some(push.reason.clone());
        }
        // The certificate and key hashes are computed only when a push by
        // hash exists, because hashing the whole certificate is the costliest
        // step of a check.
        if !self.pushes.has_hash_targets() {
            return None;
        }
        let cert_sha256 = subject.cert_sha256.or_else(|| subject.der.map(sha256));
        if let Some(push) = cert_sha256.and_then(|hash| self.pushes.by_cert(&hash)) {
            return Some(push.reason.clone());
        }
        let spki_sha256 = subject.spki_sha256.or_else(|| subject.spki.map(sha256));
        spki_sha256
            .and_then(|hash| self.pushes.by_spki(&hash))
            .map(|push| push.reason.clone())
    }
}

/// The parts of one certificate that the checks need. The hashes are computed from
/// `der` and `spki` when not given.
struct CertSubject<'a> {
    issuer: Issuer<'a>,
    /// Content octets of the serialNumber INTEGER.
    serial: &'a [u8],
    der: Option<&'a [u8]>,
    spki: Option<&'a [u8]>,
    cert_sha256: Option<[u8; 32]>,
    spki_sha256: Option<[u8; 32]>,
}

/// A certificate's issuer: its Name DER, or only the Name's SHA-256 for a
/// stored identity.
#[derive(Debug, Clone, Copy)]
enum Issuer<'a> {
    Der(&'a [u8]),
    Sha256([u8; 32]),
}

impl Issuer<'_> {
    fn sha256(&self) -> [u8; 32] {
        match self {
            Issuer::Der(name) => sha256(name),
            Issuer::Sha256(hash) => *hash,
        }
    }
}

/// When a CRL stops being fresh: its nextUpdate, or thisUpdate plus the
/// refresh interval for a CRL without nextUpdate.
fn crl_expiry(crl: &Crl, settings: &RevocationSettings) -> i64 {
    expiry_of(crl.this_update, crl.next_update, settings)
}

/// Returns the last Unix second at which `crl` is still current: its expiry
/// ([`crl_expiry`]) plus the stale grace. The CRL is stale after it.
pub(super) fn crl_stale_after(crl: &Crl, settings: &RevocationSettings) -> i64 {
    stale_after(crl.this_update, crl.next_update, settings)
}

fn expiry_of(this_update: i64, next_update: Option<i64>, settings: &RevocationSettings) -> i64 {
    next_update.unwrap_or_else(|| this_update.saturating_add(secs(settings.refresh_interval)))
}

/// [`crl_stale_after`] for a CRL's thisUpdate and nextUpdate.
pub(super) fn stale_after(
    this_update: i64,
    next_update: Option<i64>,
    settings: &RevocationSettings,
) -> i64 {
    expiry_of(this_update, next_update, settings).saturating_add(secs(settings.stale_grace))
}

/// Keeps `crl` unless a newer CRL of the same issuer and scope is present.
fn add_crl(crls: &mut HashMap<Box<[u8]>, Vec<Arc<Crl>>>, crl: &Arc<Crl>) {
    let same_issuer = crls
        .entry(crl.issuer_der.clone().into_boxed_slice())
        .or_default();
    let same_scope = same_issuer.iter_mut().find(|existing| {
        existing.scope == crl.scope && existing.distribution_points == crl.distribution_points
    });
    match same_scope {
        Some(existing) => {
            if crl.is_newer_than(existing) {
                *existing = crl.clone();
            }
        }
        None => same_issuer.push(crl.clone()),
    }
}

/// Finds the newest CRL of the issuer whose scope covers the certificate.
/// A CRL with issuingDistributionPoint URIs covers only certificates whose
/// cRLDistributionPoints name one of them (RFC 5280 section 6.3.3 (b)(2)).
fn covering_crl<'v>(
    view: &'v CaView,
    subject: &CertSubject<'_>,
    is_ca: bool,
) -> Option<&'v Arc<Crl>> {
    let candidates = match subject.issuer {
        Issuer::Der(name) => view.crls.get(name)?,
        Issuer::Sha256(hash) => view.crls.get(view.issuer_names.get(&hash)?)?,
    };
    let mut certificate_uris: Option<Vec<String>> = None;
    let mut best: Option<&Arc<Crl>> = None;
    for crl in candidates {
        if !crl.scope.covers(is_ca) {
            continue;
        }
        if !crl.distribution_points.is_empty() {
            // Without the certificate, as for a stored identity, its
            // distribution points are unknown and the CRL counts as not covering.
            let uris = certificate_uris.get_or_insert_with(|| {
                subject
                    .der
                    .and_then(|der| distribution_point_uris(der).ok())
                    .unwrap_or_default()
            });
            if !crl.distribution_points.iter().any(|uri| uris.contains(uri)) {
                continue;
            }
        }
        if best.map_or(true, |current| crl.is_newer_than(current)) {
            best = Some(crl);
        }
    }
    best
}

/// Finds the issuer of `fields` among the presented chain and the configured
/// intermediates, or `None` when the issuer is a trust anchor or absent.
///
/// The chain was verified already, so matching the issuer Name is enough to
/// follow it. When several certificates share a subject, the first presented
/// one is taken, which may differ from the path the verifier built.
fn next_in_chain<'c>(
    view: &'c CaView,
    chain: &'c [CertificateDer<'_>],
    fields: &CertFields<'_>,
) -> Option<&'c [u8]> {
    if view
        .anchor_subjects
        .iter()
        .any(|subject| subject.as_slice() == fields.issuer)
    {
        return None;
    }
    let presented = chain.iter().skip(1).map(|cert| cert.as_ref());
    let configured = view.intermediates.iter().map(|cert| cert.as_ref());
    presented.chain(configured).find(|candidate| {
        read_cert_fields(candidate).is_ok_and(|candidate| {
            candidate.subject == fields.issuer && candidate.subject != fields.subject
        })
    })
}

/// Keeps the verdict that matters more: a refusal over an admission, and
/// the first of two equal ones.
fn worse(current: Option<RevocationVerdict>, next: RevocationVerdict) -> RevocationVerdict {
    match current {
        None => next,
        Some(current) if !current.refuses() && next.refuses() => next,
        Some(current) => current,
    }
}

#[cfg(test)]
mod staleness_tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn settings(grace: u64, refresh_interval: u64, clock_skew: u64) -> RevocationSettings {
        RevocationSettings {
            stale_grace: Duration::from_secs(grace),
            refresh_interval: Duration::from_secs(refresh_interval),
            clock_skew: Duration::from_secs(clock_skew),
            ..RevocationSettings::default()
        }
    }

    proptest! {
        /// A CRL is current up to and including nextUpdate (or thisUpdate
        /// plus the refresh interval when it has none) plus the stale grace,
        /// and stale from the next second on.
        #[test]
        fn crl_stale_only_after_grace(
            this_update in 1_800_000_000i64..1_800_100_000,
            next_after in proptest::option::of(0i64..200_000),
            refresh_interval in 1u64..86_400,
            grace in 0u64..86_400,
            clock_skew in 0u64..900,
            exact in any::<bool>(),
            delta in -3i64..=3,
            anywhere in 1_799_900_000i64..1_800_500_000,
        ) {
            let settings = settings(grace, refresh_interval, clock_skew);
            let expiry = this_update + next_after.unwrap_or(refresh_interval as i64);
            let last_current = expiry + grace as i64;
            let now = if exact { last_current + delta } else { anywhere };

            let stale_after = stale_after(this_update, next_after.map(|after| this_update + after), &settings);
            let stale = now > stale_after;

            prop_assert_eq!(stale_after, last_current);
            prop_assert_eq!(stale, now > last_current, "now {} expiry {} grace {}", now, expiry, grace);
            if now <= expiry {
                prop_assert!(!stale, "stale before nextUpdate");
            }
        }

        /// A nextUpdate near the end of the i64 range never overflows into
        /// an early staleness.
        #[test]
        fn crl_far_next_update_never_stale(
            next_update in (i64::MAX - 1_000)..=i64::MAX,
            grace in 0u64..86_400,
            now in 1_800_000_000i64..1_900_000_000,
        ) {
            let settings = settings(grace, 3600, 300);

            let stale_after = stale_after(1_800_000_000, Some(next_update), &settings);

            prop_assert!(now <= stale_after);
        }
    }
}
