//! The revocation store: per device CA, the CRLs in force and where they
//! come from, plus revocations pushed by an operator.
//!
//! Every ingress calls [`RevocationStore::check`], which reads an immutable
//! snapshot through `arc-swap` and takes no lock. Loading a CRL, a push or a
//! configuration change builds a new snapshot under a mutex, swaps it in and
//! bumps the counter that [`RevocationStore::subscribe`] returns, so the
//! session layer can check live sessions again.
//!
//! CRLs come from files, configured URLs, and the cRLDistributionPoints of
//! certificates whose chain already verified. When a source fails, its last
//! good CRLs stay in force; whether they may still be used once stale is the
//! CA's [`StalePolicy`]. [`RevocationStore::run_refresh`] fetches each source
//! again ahead of nextUpdate and at the refresh interval.
//!
//! The store loads no CRL on construction: call
//! [`RevocationStore::refresh_now`] before serving, then spawn
//! [`RevocationStore::run_refresh`].

mod push;
mod settings;
mod snapshot;
mod sources;
mod verdict;

#[cfg(test)]
mod tests;

pub use push::{create_state_dir, PushTarget, PushedRevocation, STATE_FILE_NAME};
pub use settings::{
    CaRevocationConfig, Clock, Depth, ManualClock, NoCrlPolicy, RevocationSettings, StalePolicy,
    SystemClock,
};
pub use verdict::{RevocationOutcome, RevocationVerdict};

use self::push::{covered_by_crl, load_state, save_state, PushIndex};
use self::snapshot::{crl_stale_after, Snapshot};
use self::sources::{
    compare_with_installed, load, next_due_after_failure, next_due_after_success, CaState, LoadJob,
    LoadResult, Source, SourceKind,
};
use crate::identity::crl::Crl;
use crate::identity::http_fetch::{check_url, HttpFetcher};
use crate::identity::DeviceIdentity;
use crate::policy::rfc3339_utc;
use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Most distribution-point URLs learned per CA. Further URLs are ignored, so
/// that certificates naming many URLs cannot grow the source list without
/// bound.
pub const MAX_LEARNED_URLS_PER_CA: usize = 8;

/// Maximum sleep of the refresher between two looks at its schedule.
const MAX_REFRESH_SLEEP_SECS: i64 = 300;

/// Store-wide options.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Directory of the pushed-revocation state file. `None` keeps pushes in
    /// memory only.
    pub state_dir: Option<PathBuf>,
    /// TCP connect timeout of the shared HTTP client.
    pub connect_timeout: Duration,
    pub clock: Arc<dyn Clock>,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            state_dir: None,
            connect_timeout: Duration::from_secs(5),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The state of one source, for readiness checks and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    pub ca: String,
    /// The file path or URL.
    pub source: String,
    /// "file", "url" or "distribution point".
    pub kind: &'static str,
    /// Revoked entries in the source's CRLs.
    pub entries: usize,
    /// The earliest thisUpdate of the source's CRLs.
    pub this_update: Option<i64>,
    /// Seconds from `this_update` to the `now_unix` passed in.
    pub age_secs: Option<i64>,
    /// The earliest nextUpdate of the source's CRLs.
    pub next_update: Option<i64>,
    /// When the CRLs last loaded or were found unchanged.
    pub loaded_at: Option<i64>,
    /// True when the source has no CRL, or one is past nextUpdate plus the
    /// grace period.
    pub stale: bool,
    pub last_error: Option<String>,
}

/// The result of loading one source in [`RevocationStore::refresh_now`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshReport {
    pub ca: String,
    pub source: String,
    /// The number of revoked entries in force from this source, or the error.
    /// After an error the previous CRLs stay in force.
    pub result: Result<usize, String>,
}

#[derive(Debug, Default)]
struct State {
    cas: Vec<CaState>,
    sources: Vec<Source>,
    pushes: Vec<PushedRevocation>,
    next_source_id: u64,
    /// (CA, issuer hash) of the CRLs that were stale at the last look, to
    /// notify subscribers when a CRL goes stale or fresh again.
    stale: BTreeSet<(Arc<str>, [u8; 32])>,
    /// CAs whose learned URLs reached [`MAX_LEARNED_URLS_PER_CA`] and were
    /// warned about.
    learning_capped: HashSet<Arc<str>>,
}

impl State {
    fn add_source(&mut self, ca: Arc<str>, kind: SourceKind, due: i64) {
        self.next_source_id += 1;
        self.sources
            .push(Source::new(self.next_source_id, ca, kind, due));
    }

    fn ca(&self, name: &str) -> Option<&CaState> {
        self.cas.iter().find(|ca| &*ca.name == name)
    }
}

/// Revocation data shared by every ingress. See the module documentation.
pub struct RevocationStore {
    snapshot: ArcSwap<Snapshot>,
    state: Mutex<State>,
    fetcher: HttpFetcher,
    clock: Arc<dyn Clock>,
    state_dir: Option<PathBuf>,
    changes: watch::Sender<u64>,
    wake: Notify,
    /// Serializes loads, so a source is never loaded twice at once.
    refresh_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RevocationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snapshot = self.snapshot.load();
        f.debug_struct("RevocationStore")
            .field("cas", &snapshot.cas.keys().collect::<Vec<_>>())
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl RevocationStore {
    /// Builds the store and loads the pushed revocations from the state
    /// directory. No CRL is loaded yet.
    ///
    /// # Errors
    ///
    /// Returns a message for a duplicate CA name, a CA certificate that does
    /// not parse, a CRL URL that is not plain http, an unreadable or invalid
    /// state file, or an HTTP client that cannot be built.
    pub fn new(
        cas: Vec<CaRevocationConfig>,
        options: StoreOptions,
    ) -> Result<Arc<RevocationStore>, String> {
        let now = options.clock.now_unix();
        let mut state = State::default();
        for ca in validate_cas(cas)? {
            add_configured_sources(&mut state, &ca, now);
            state.cas.push(ca);
        }
        if let Some(dir) = &options.state_dir {
            state.pushes = load_state(dir)?;
            state.pushes.retain(|push| push.not_after_unix >= now);
            tracing::info!(
                pushed = state.pushes.len(),
                dir = %dir.display(),
                "loaded pushed revocations"
            );
        }

        let fetcher = HttpFetcher::new(options.connect_timeout)?;
        let snapshot = Snapshot::build(
            &state.cas,
            &state.sources,
            PushIndex::new(state.pushes.clone()),
        );
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(RevocationStore {
            snapshot: ArcSwap::from_pointee(snapshot),
            state: Mutex::new(state),
            fetcher,
            clock: options.clock,
            state_dir: options.state_dir,
            changes,
            wake: Notify::new(),
            refresh_lock: tokio::sync::Mutex::new(()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding
        // it. Every update leaves the state consistent, so keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Checks a verified chain, leaf first, as presented by the client, for
    /// the CA that verified it (`VerifiedChain::ca_name`).
    ///
    /// With `Depth::EndEntity` only the leaf is checked. With `Depth::Chain`
    /// the issuer of each certificate is looked up among the presented and
    /// configured intermediates until a trust anchor's subject is reached, and
    /// each certificate below the anchor is checked against the CRL of its
    /// issuer. Pushed revocations are checked first. A revoked certificate
    /// anywhere wins over stale or missing data.
    pub fn check(
        &self,
        ca_name: &str,
        chain: &[CertificateDer<'_>],
        now_unix: i64,
    ) -> RevocationVerdict {
        let (verdict, source) = self.snapshot.load().check(ca_name, chain, now_unix);
        metrics::counter!(
            "ztgate_revocation_checks_total",
            "source" => source.label(),
            "outcome" => verdict.label()
        )
        .increment(1);
        verdict
    }

    /// Checks the leaf of a live session from its stored identity, for
    /// sweeps after [`subscribe`](Self::subscribe) fires.
    ///
    /// NOTE: the identity has no intermediates and no cRLDistributionPoints,
    /// so this checks the leaf only, whatever the CA's `depth`, and a CRL
    /// scoped to distribution-point URIs counts as not covering it. Use
    /// [`check`](Self::check) with the stored chain where one is kept.
    pub fn check_identity(
        &self,
        ca_name: &str,
        identity: &DeviceIdentity,
        now_unix: i64,
    ) -> RevocationVerdict {
        let (verdict, source) = self
            .snapshot
            .load()
            .check_identity(ca_name, identity, now_unix);
        metrics::counter!(
            "ztgate_revocation_checks_total",
            "source" => source.label(),
            "outcome" => verdict.label()
        )
        .increment(1);
        verdict
    }

    /// Returns a receiver of a counter that increases whenever CRL data, pushes, the
    /// configuration, or the stale state of a CRL change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn publish(&self, state: &State) {
        let snapshot = Snapshot::build(
            &state.cas,
            &state.sources,
            PushIndex::new(state.pushes.clone()),
        );
        self.snapshot.store(Arc::new(snapshot));
        self.changes.send_modify(|version| *version += 1);
    }

    /// Adds or replaces a pushed revocation and persists the list.
    ///
    /// The target is normalized (lower-case hex, canonical serial). A push
    /// for the same target replaces the earlier one. An issuer and serial
    /// push that a loaded CRL already lists is dropped at once, because the
    /// CRL revokes the certificate already.
    ///
    /// # Errors
    ///
    /// Returns a message when the target is invalid, `not_after_unix` is
    /// already past, or the state file cannot be written. On error nothing
    /// changes.
    pub fn push(&self, revocation: PushedRevocation) -> Result<(), String> {
        let now = self.clock.now_unix();
        let target = revocation.target.normalized()?;
        if revocation.not_after_unix < now {
            return Err(format!(
                "the certificate expired at {}, so a revocation is not needed",
                rfc3339_utc(revocation.not_after_unix)
            ));
        }
        let revocation = PushedRevocation {
            target,
            pushed_at_unix: now,
            ..revocation
        };

        let mut state = self.lock();
        let mut pushes = state.pushes.clone();
        pushes.retain(|push| push.target != revocation.target);
        pushes.push(revocation.clone());
        if let Some(dir) = &self.state_dir {
            save_state(dir, &pushes)?;
        }
        state.pushes = pushes;
        tracing::info!(
            target = %revocation.target,
            not_after = %rfc3339_utc(revocation.not_after_unix),
            reason = revocation.reason.as_deref().unwrap_or(""),
            "pushed revocation added"
        );
        self.prune_pushes(&mut state, now);
        self.publish(&state);
        Ok(())
    }

    /// Returns whether a push for `target` is in force.
    pub fn is_pushed(&self, target: &PushTarget) -> bool {
        match target.normalized() {
            Ok(target) => self.snapshot.load().pushes.contains(&target),
            Err(_) => false,
        }
    }

    /// Returns the pushed revocations in force.
    pub fn pushed(&self) -> Vec<PushedRevocation> {
        self.lock().pushes.clone()
    }

    /// Drops pushes whose certificate expired or that a loaded CRL lists,
    /// and persists the list when it changed. Returns whether it changed.
    fn prune_pushes(&self, state: &mut State, now_unix: i64) -> bool {
        let before = state.pushes.len();
        let sources = &state.sources;
        state.pushes.retain(|push| {
            if push.not_after_unix < now_unix {
                tracing::info!(target = %push.target, "pushed revocation dropped: the certificate expired");
                return false;
            }
            let covering = sources
                .iter()
                .flat_map(|source| source.crls.iter())
                .find(|crl| covered_by_crl(push, crl));
            if let Some(crl) = covering {
                tracing::info!(
                    target = %push.target,
                    crl = %crl.origin,
                    "pushed revocation dropped: a verified CRL lists the certificate"
                );
                return false;
            }
            true
        });
        if state.pushes.len() == before {
            return false;
        }
        if let Some(dir) = &self.state_dir {
            if let Err(error) = save_state(dir, &state.pushes) {
                tracing::warn!(%error, "failed to save the pushed revocations. The dropped ones return after a restart until a CRL or expiry drops them again");
            }
        }
        true
    }

    /// Adds distribution-point URLs from a certificate of `ca_name` whose
    /// chain verified, and wakes the refresher to fetch new ones. URLs that
    /// are not plain http are skipped. Returns how many were added.
    ///
    /// A URL already known costs a hash lookup and no lock, so this can run
    /// on every admission.
    pub fn learn_distribution_points(&self, ca_name: &str, urls: &[String]) -> usize {
        {
            let snapshot = self.snapshot.load();
            let Some(view) = snapshot.cas.get(ca_name) else {
                return 0;
            };
            if !view.settings.learn_distribution_points
                || urls.iter().all(|url| view.known_urls.contains(url))
            {
                return 0;
            }
        }

        let now = self.clock.now_unix();
        let mut state = self.lock();
        let Some(ca) = state.ca(ca_name).map(|ca| ca.name.clone()) else {
            return 0;
        };
        let mut added = 0;
        for url in urls {
            let known = state
                .sources
                .iter()
                .any(|s| s.ca == ca && s.kind.url() == Some(url.as_str()));
            if known || check_url(url).is_err() {
                continue;
            }
            let learned = state
                .sources
                .iter()
                .filter(|s| s.ca == ca && matches!(s.kind, SourceKind::DistributionPoint(_)))
                .count();
            if learned >= MAX_LEARNED_URLS_PER_CA {
                if state.learning_capped.insert(ca.clone()) {
                    tracing::warn!(
                        ca = %ca,
                        url = %url,
                        max = MAX_LEARNED_URLS_PER_CA,
                        "distribution point ignored: the CA already has the maximum number of \
                         learned CRL URLs; further ones are ignored without a warning"
                    );
                }
                break;
            }
            tracing::info!(ca = %ca, url = %url, "learned a CRL distribution point");
            state.add_source(ca.clone(), SourceKind::DistributionPoint(url.clone()), now);
            added += 1;
        }
        if added > 0 {
            self.publish(&state);
            self.wake.notify_one();
        }
        added
    }

    /// Loads every source of `ca` (every CA when `None`) now, reading files
    /// even when unchanged, and returns one report per source.
    pub async fn refresh_now(&self, ca: Option<&str>) -> Vec<RefreshReport> {
        self.refresh(|source| ca.map_or(true, |name| &*source.ca == name), true)
            .await
    }

    async fn refresh(&self, select: impl Fn(&Source) -> bool, force: bool) -> Vec<RefreshReport> {
        let _serial = self.refresh_lock.lock().await;
        let jobs: Vec<LoadJob> = {
            let state = self.lock();
            state
                .sources
                .iter()
                .filter(|source| select(source))
                .filter_map(|source| {
                    let ca = state.ca(&source.ca)?;
                    Some(LoadJob {
                        id: source.id,
                        kind: source.kind.clone(),
                        signers: ca.signers.clone(),
                        settings: ca.config.settings.clone(),
                        stamp: source.file_stamp,
                        force,
                    })
                })
                .collect()
        };
        let now = self.clock.now_unix();
        if jobs.is_empty() {
            self.housekeeping(&mut self.lock(), now);
            return Vec::new();
        }

        let loads = jobs.into_iter().map(|job| async move {
            let id = job.id;
            (id, load(job, &self.fetcher, now).await)
        });
        let results = futures_util::future::join_all(loads).await;

        let now = self.clock.now_unix();
        let mut state = self.lock();
        let mut changed = false;
        let mut reports = Vec::with_capacity(results.len());
        for (id, result) in results {
            if let Some(report) = self.apply(&mut state, id, result, now, &mut changed) {
                reports.push(report);
            }
        }
        if changed {
            self.prune_pushes(&mut state, now);
            self.publish(&state);
        }
        self.housekeeping(&mut state, now);
        reports
    }

    /// Records the result of one load. Returns `None` when the source was
    /// removed by a reconfiguration while it loaded.
    fn apply(
        &self,
        state: &mut State,
        id: u64,
        result: LoadResult,
        now: i64,
        changed: &mut bool,
    ) -> Option<RefreshReport> {
        let index = state.sources.iter().position(|s| s.id == id)?;
        let settings = state.ca(&state.sources[index].ca)?.config.settings.clone();
        let outcome = match result {
            LoadResult::Unchanged => Ok(false),
            LoadResult::Failed(error) => Err(error),
            LoadResult::Loaded { crls, stamp } => {
                let source = &mut state.sources[index];
                match compare_with_installed(&source.crls, &crls) {
                    Ok(true) => {
                        source.crls = crls.into_iter().map(Arc::new).collect();
                        source.file_stamp = stamp;
                        Ok(true)
                    }
                    Ok(false) => {
                        source.file_stamp = stamp;
                        Ok(false)
                    }
                    Err(error) => Err(error),
                }
            }
        };

        let report = match outcome {
            Ok(installed) => {
                *changed |= installed;
                let source = &mut state.sources[index];
                source.loaded_at = Some(now);
                source.last_error = None;
                source.failures = 0;
                source.warn.reset();
                source.next_due =
                    next_due_after_success(now, source.earliest_next_update(), &settings);
                log_loaded(source, installed);
                Ok(source.crls.iter().map(|crl| crl.revoked.len()).sum())
            }
            Err(error) => {
                let consequence = failure_consequence(state, index, &settings);
                let source = &mut state.sources[index];
                source.failures = source.failures.saturating_add(1);
                source.next_due = next_due_after_failure(now, source.failures, &settings);
                metrics::counter!("ztgate_crl_fetch_failures_total", "ca" => source.ca.to_string())
                    .increment(1);
                if let Some(suppressed) = source.warn.should_log(&error, now) {
                    tracing::warn!(
                        ca = %source.ca,
                        source = %source.kind.label(),
                        %error,
                        repeated_unlogged = suppressed,
                        retry_at = %rfc3339_utc(source.next_due),
                        "CRL source failed; {consequence}"
                    );
                }
                source.last_error = Some(error.clone());
                Err(error)
            }
        };
        let source = &state.sources[index];
        Some(RefreshReport {
            ca: source.ca.to_string(),
            source: source.kind.label(),
            result: report,
        })
    }

    /// Drops expired pushes, notifies subscribers when a CRL went stale or
    /// fresh, and updates the age gauges. Returns the next time something
    /// changes by itself: a source falls due, a CRL goes stale, or a push
    /// expires.
    fn housekeeping(&self, state: &mut State, now: i64) -> i64 {
        let mut changed = self.prune_pushes(state, now);
        let snapshot = self.snapshot.load();
        let mut stale = BTreeSet::new();
        let mut wake = now.saturating_add(MAX_REFRESH_SLEEP_SECS);

        for (name, view) in &snapshot.cas {
            let mut oldest_age: Option<i64> = None;
            for crl in view.crls.values().flatten() {
                let stale_at = crl_stale_after(crl, &view.settings);
                if now > stale_at {
                    stale.insert((name.clone(), crl.issuer_sha256));
                } else {
                    wake = wake.min(stale_at.saturating_add(1));
                }
                let age = now - crl.this_update;
                oldest_age = Some(oldest_age.map_or(age, |oldest| oldest.max(age)));
            }
            if let Some(age) = oldest_age {
                metrics::gauge!("ztgate_crl_age_seconds", "ca" => name.to_string()).set(age as f64);
            }
        }
        for source in &state.sources {
            wake = wake.min(source.next_due);
        }
        for push in &state.pushes {
            wake = wake.min(push.not_after_unix.saturating_add(1));
        }

        if stale != state.stale {
            for (ca, issuer) in stale.difference(&state.stale) {
                tracing::warn!(
                    ca = %ca,
                    issuer_sha256 = %crate::identity::device::hex_lower(issuer),
                    "CRL is past nextUpdate and the grace period"
                );
            }
            state.stale = stale;
            changed = true;
        }
        if changed {
            self.publish(state);
        }
        wake
    }

    /// Runs until `shutdown` turns true or its sender is dropped: loads each
    /// source when it falls due (see `RevocationSettings`), drops expired
    /// pushes, and notifies subscribers when a CRL goes stale.
    pub async fn run_refresh(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        tracing::info!("CRL refresher started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            let now = self.clock.now_unix();
            let due: HashSet<u64> = {
                let state = self.lock();
                state
                    .sources
                    .iter()
                    .filter(|source| source.next_due <= now)
                    .map(|source| source.id)
                    .collect()
            };
            if !due.is_empty() {
                tokio::select! {
                    _ = self.refresh(|source| due.contains(&source.id), false) => {}
                    result = shutdown.changed() => {
                        if result.is_err() {
                            break;
                        }
                    }
                }
                continue;
            }

            let next = {
                let mut state = self.lock();
                self.housekeeping(&mut state, now)
            };
            let wait = (next - now).clamp(1, MAX_REFRESH_SLEEP_SECS);
            let wait = Duration::from_secs(u64::try_from(wait).unwrap_or(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                result = shutdown.changed() => {
                    if result.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::info!("CRL refresher stopped");
    }

    /// Returns the state of every source at `now_unix`.
    pub fn source_ages(&self, now_unix: i64) -> Vec<SourceStatus> {
        let state = self.lock();
        state
            .sources
            .iter()
            .map(|source| {
                let settings = state.ca(&source.ca).map(|ca| &ca.config.settings);
                let this_update = source.crls.iter().map(|crl| crl.this_update).min();
                let stale = source.crls.is_empty()
                    || settings.is_some_and(|settings| {
                        source
                            .crls
                            .iter()
                            .any(|crl| now_unix > crl_stale_after(crl, settings))
                    });
                SourceStatus {
                    ca: source.ca.to_string(),
                    source: source.kind.label(),
                    kind: source.kind.name(),
                    entries: source.crls.iter().map(|crl| crl.revoked.len()).sum(),
                    this_update,
                    age_secs: this_update.map(|this_update| now_unix - this_update),
                    next_update: source.earliest_next_update(),
                    loaded_at: source.loaded_at,
                    stale,
                    last_error: source.last_error.clone(),
                }
            })
            .collect()
    }

    /// Replaces the CA configuration, for a configuration reload.
    ///
    /// A CA whose anchors and intermediates are unchanged keeps the CRLs of
    /// the sources it still lists and its learned distribution points (unless
    /// learning is now off). Any other source starts empty and is due at once;
    /// call [`refresh_now`](Self::refresh_now) or let the refresher load it.
    ///
    /// # Errors
    ///
    /// Returns the same errors as [`new`](Self::new) for the CA list; on
    /// error the previous configuration stays in force.
    pub fn reconfigure(&self, cas: Vec<CaRevocationConfig>) -> Result<(), String> {
        let cas = validate_cas(cas)?;
        let now = self.clock.now_unix();
        let mut state = self.lock();
        let old_cas = std::mem::take(&mut state.cas);
        let mut old_sources: HashMap<(Arc<str>, SourceKind), Source> =
            std::mem::take(&mut state.sources)
                .into_iter()
                .map(|source| ((source.ca.clone(), source.kind.clone()), source))
                .collect();

        for ca in cas {
            let same_certificates = old_cas.iter().any(|old| {
                old.name == ca.name
                    && old.config.anchors == ca.config.anchors
                    && old.config.intermediates == ca.config.intermediates
            });
            let mut kinds = configured_kinds(&ca.config);
            if same_certificates && ca.config.settings.learn_distribution_points {
                let learned = old_sources
                    .keys()
                    .filter(|(name, kind)| {
                        *name == ca.name && matches!(kind, SourceKind::DistributionPoint(_))
                    })
                    .map(|(_, kind)| kind.clone())
                    .collect::<Vec<_>>();
                kinds.extend(learned);
            }
            for kind in kinds {
                let kept = old_sources.remove(&(ca.name.clone(), kind.clone()));
                match kept {
                    Some(source) if same_certificates => state.sources.push(source),
                    _ => state.add_source(ca.name.clone(), kind, now),
                }
            }
            state.cas.push(ca);
        }
        tracing::info!(
            cas = state.cas.len(),
            sources = state.sources.len(),
            "revocation configuration replaced"
        );
        self.publish(&state);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }
}

/// Builds the CA states, rejecting duplicate names and unusable URLs.
fn validate_cas(cas: Vec<CaRevocationConfig>) -> Result<Vec<CaState>, String> {
    let mut names = HashSet::new();
    let mut states = Vec::with_capacity(cas.len());
    for ca in cas {
        if !names.insert(ca.name.clone()) {
            return Err(format!("device CA {:?} is configured twice", ca.name));
        }
        for url in &ca.crl_urls {
            check_url(url).map_err(|e| format!("device CA {:?}: CRL URL: {e}", ca.name))?;
        }
        states.push(CaState::new(ca)?);
    }
    Ok(states)
}

fn configured_kinds(config: &CaRevocationConfig) -> Vec<SourceKind> {
    let files = config.crl_files.iter().cloned().map(SourceKind::File);
    let urls = config.crl_urls.iter().cloned().map(SourceKind::Url);
    files.chain(urls).collect()
}

fn add_configured_sources(state: &mut State, ca: &CaState, now: i64) {
    for kind in configured_kinds(&ca.config) {
        state.add_source(ca.name.clone(), kind, now);
    }
}

/// Describes what a failed load means for the CA's devices, for the warning.
fn failure_consequence(state: &State, index: usize, settings: &RevocationSettings) -> String {
    let source = &state.sources[index];
    if let (Some(loaded_at), false) = (source.loaded_at, source.crls.is_empty()) {
        let next_update = source
            .earliest_next_update()
            .map_or_else(|| "none".to_owned(), rfc3339_utc);
        return format!(
            "keeping the CRL loaded at {} (nextUpdate {next_update})",
            rfc3339_utc(loaded_at)
        );
    }
    let others_loaded = state
        .sources
        .iter()
        .any(|other| other.ca == source.ca && !other.crls.is_empty());
    if others_loaded {
        return format!("CA {} keeps the CRLs of its other sources", source.ca);
    }
    match settings.without_crl {
        NoCrlPolicy::Refuse => format!(
            "devices of CA {} will be refused until a CRL loads (without_crl = refuse)",
            source.ca
        ),
        NoCrlPolicy::Admit => format!(
            "devices of CA {} are admitted without a revocation check until a CRL loads \
             (without_crl = admit)",
            source.ca
        ),
    }
}

fn log_loaded(source: &Source, installed: bool) {
    for crl in &source.crls {
        let next_update = crl
            .next_update
            .map_or_else(|| "none".to_owned(), rfc3339_utc);
        if installed {
            log_crl(&source.ca, crl, &next_update, "CRL loaded");
        } else {
            tracing::debug!(
                ca = %source.ca,
                source = %crl.origin,
                next_update = %next_update,
                "CRL unchanged"
            );
        }
    }
}

fn log_crl(ca: &str, crl: &Crl, next_update: &str, message: &str) {
    tracing::info!(
        ca,
        source = %crl.origin,
        issuer = %crl.issuer,
        entries = crl.revoked.len(),
        crl_number = crl.crl_number_hex().as_deref().unwrap_or("none"),
        this_update = %rfc3339_utc(crl.this_update),
        next_update,
        "{message}"
    );
}
