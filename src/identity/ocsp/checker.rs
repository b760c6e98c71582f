//! The OCSP client: lookups, the status cache, merged concurrent requests
//! and the refresh of cached statuses that are about to expire.

use super::cert_id::CertInfo;
use super::http::HttpClient;
use super::request;
use super::response::{self, Expected};
use super::{CertId, Checked, CrlReason, OcspError, OcspSettings, OcspStatus};
use rustls_pki_types::CertificateDer;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::JoinSet;

/// Capacity of the revocation event channel. A subscriber that falls
/// further behind gets `RecvError::Lagged` and loses the oldest events.
const REVOCATION_CHANNEL_CAPACITY: usize = 256;

type Outcome = Result<Checked, OcspError>;

/// A certificate whose status changed to revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub cert_id: CertId,
    /// The serial number in the form of `DeviceIdentity::serial_hex`.
    pub serial_hex: String,
    /// SHA-256 of the issuer Name, in the form of
    /// `DeviceIdentity::issuer_raw_sha256`.
    pub issuer_raw_sha256: String,
    pub revocation_time: SystemTime,
    pub reason: Option<CrlReason>,
    pub responder_url: String,
}

/// An OCSP client with a bounded status cache.
///
/// Cloning is cheap and clones share the cache. The cache lock is never held
/// across an await, so a slow responder delays only the lookups that wait
/// for its response. Requests run in spawned tasks, so a lookup that is
/// cancelled does not cancel the request that other lookups wait for.
#[derive(Clone)]
pub struct OcspChecker {
    inner: Arc<Inner>,
}

struct Inner {
    settings: OcspSettings,
    http: HttpClient,
    state: Mutex<State>,
    revocations: broadcast::Sender<Revocation>,
}

/// A certificate known to the cache, with what a new request needs.
struct Target {
    cert_id: CertId,
    issuer: CertificateDer<'static>,
    url: String,
    issuer_raw_sha256: String,
}

struct Entry {
    target: Arc<Target>,
    /// Key of this entry in `State::order`.
    sequence: u64,
    /// The last verified status, kept after it expires for soft-fail.
    checked: Option<Checked>,
    /// The last error and the time until which it is returned without a
    /// new request.
    failure: Option<(SystemTime, OcspError)>,
}

#[derive(Default)]
struct State {
    entries: HashMap<CertId, Entry>,
    /// Cache keys by the sequence number of their last store, oldest first.
    order: BTreeMap<u64, CertId>,
    next_sequence: u64,
    in_flight: HashMap<CertId, watch::Receiver<Option<Outcome>>>,
}

impl std::fmt::Debug for OcspChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OcspChecker")
            .field("settings", &self.inner.settings)
            .field("cached", &self.cache_len())
            .finish()
    }
}

impl OcspChecker {
    /// Creates a checker with an empty cache.
    ///
    /// # Errors
    ///
    /// Returns [`OcspError::InvalidSettings`] or
    /// [`OcspError::UnsupportedUrl`] for unusable settings.
    pub fn new(settings: OcspSettings) -> Result<OcspChecker, OcspError> {
        settings.validate()?;
        let http = HttpClient::new(
            settings.timeout,
            settings.max_response_bytes,
            settings.use_get,
        )?;
        let (revocations, _) = broadcast::channel(REVOCATION_CHANNEL_CAPACITY);
        Ok(OcspChecker {
            inner: Arc::new(Inner {
                settings,
                http,
                state: Mutex::new(State::default()),
                revocations,
            }),
        })
    }

    pub fn settings(&self) -> &OcspSettings {
        &self.inner.settings
    }

    /// Returns the status of `leaf`, which `issuer` issued, at time `now`:
    /// from the cache while the cached status is valid, otherwise from the
    /// responder. Concurrent lookups of one certificate share one request.
    ///
    /// # Errors
    ///
    /// Returns an error when the certificates do not parse, no responder
    /// URL is known, the request fails or times out, or the response fails
    /// verification. After a failure the same error is returned without a
    /// request for `failure_backoff`.
    pub async fn status(
        &self,
        leaf: &CertificateDer<'_>,
        issuer: &CertificateDer<'_>,
        now: SystemTime,
    ) -> Result<Checked, OcspError> {
        let target = self.target(leaf, issuer)?;
        self.lookup(target, now, false).await
    }

    /// Computes the cache key of `leaf`, which `issuer` issued.
    ///
    /// # Errors
    ///
    /// Fails when either certificate does not parse.
    pub fn cert_id(
        &self,
        leaf: &CertificateDer<'_>,
        issuer: &CertificateDer<'_>,
    ) -> Result<CertId, OcspError> {
        CertId::new(leaf, issuer, self.inner.settings.cert_id_hash)
    }

    /// Returns the last verified status of `leaf` without a request, even
    /// when it has expired, or `None` when there is none or the
    /// certificates do not parse.
    pub fn cached(
        &self,
        leaf: &CertificateDer<'_>,
        issuer: &CertificateDer<'_>,
    ) -> Option<Checked> {
        let cert_id = self.cert_id(leaf, issuer).ok()?;
        self.cached_by_id(&cert_id)
    }

    /// Returns the last verified status of `cert_id` without a request,
    /// even when it has expired.
    pub fn cached_by_id(&self, cert_id: &CertId) -> Option<Checked> {
        let state = self.inner.lock();
        let mut checked = state.entries.get(cert_id)?.checked.clone()?;
        checked.from_cache = true;
        Some(checked)
    }

    /// Removes a certificate from the cache, for example when its last
    /// session ends. Returns whether it was cached.
    pub fn forget(&self, cert_id: &CertId) -> bool {
        let mut state = self.inner.lock();
        match state.entries.remove(cert_id) {
            Some(entry) => {
                state.order.remove(&entry.sequence);
                true
            }
            None => false,
        }
    }

    /// Number of certificates in the cache.
    pub fn cache_len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Subscribes to revocations that any lookup or refresh of this checker
    /// finds: a certificate whose status changes to revoked, or whose first
    /// status is revoked.
    pub fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
    }

    /// Queries the responder again for every cached certificate whose status
    /// expires within `margin` of `now`, or that has no status because its
    /// lookups failed, except those in their failure backoff and those
    /// already revoked. `in_use(issuer_raw_sha256, serial_hex)` returns
    /// whether a certificate still has a live session. A certificate without
    /// one is removed from the cache instead of refreshed, so the cache
    /// shrinks back as devices leave. Returns the certificates whose status
    /// changed to revoked. At most `refresh_concurrency` requests run at once.
    pub async fn refresh_expiring(
        &self,
        now: SystemTime,
        margin: Duration,
        in_use: impl Fn(&str, &str) -> bool,
    ) -> Vec<Revocation> {
        let expiring: Vec<(Arc<Target>, bool)> = {
            let state = self.inner.lock();
            state
                .entries
                .values()
                .filter(|entry| needs_refresh(entry, now, margin))
                .map(|entry| {
                    let was_revoked = entry.checked.as_ref().is_some_and(|checked| {
                        matches!(checked.status, OcspStatus::Revoked { .. })
                    });
                    (entry.target.clone(), was_revoked)
                })
                .collect()
        };
        // Asked without the cache lock held: `in_use` may take locks of its own.
        let (due, unused): (Vec<_>, Vec<_>) = expiring.into_iter().partition(|(target, _)| {
            in_use(&target.issuer_raw_sha256, &target.cert_id.serial_hex())
        });
        if !unused.is_empty() {
            let mut state = self.inner.lock();
            for (target, _) in &unused {
                // A lookup since the list was made may have refreshed it
                // for a new session: keep it then.
                let still_expiring = state
                    .entries
                    .get(&target.cert_id)
                    .is_some_and(|entry| needs_refresh(entry, now, margin));
                if still_expiring {
                    if let Some(entry) = state.entries.remove(&target.cert_id) {
                        state.order.remove(&entry.sequence);
                    }
                }
            }
        }
        tracing::debug!(
            count = due.len(),
            dropped = unused.len(),
            "refreshing expiring OCSP statuses of live sessions"
        );

        let permits = Arc::new(Semaphore::new(self.inner.settings.refresh_concurrency));
        let mut tasks = JoinSet::new();
        for (target, was_revoked) in due {
            let checker = self.clone();
            let permits = permits.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let result = checker.lookup(target.clone(), now, true).await;
                (target, was_revoked, result)
            });
        }

        let mut revoked = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (target, was_revoked, result) = match joined {
                Ok(output) => output,
                Err(error) => {
                    tracing::warn!(%error, "OCSP refresh task failed");
                    continue;
                }
            };
            match result {
                Ok(checked) if !was_revoked => {
                    if let Some(revocation) = revocation_of(&target, &checked) {
                        revoked.push(revocation);
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(
                    responder = %target.url,
                    cert_id = %target.cert_id,
                    %error,
                    "OCSP refresh failed; the cached status stays until it expires"
                ),
            }
        }
        revoked
    }

    fn target(
        &self,
        leaf: &CertificateDer<'_>,
        issuer: &CertificateDer<'_>,
    ) -> Result<Arc<Target>, OcspError> {
        let settings = &self.inner.settings;
        let info = CertInfo::new(leaf, issuer, settings.cert_id_hash)?;
        let url = match (&settings.responder_url, info.aia_url) {
            (Some(configured), _) => configured.clone(),
            (None, Some(aia)) => aia,
            (None, None) => return Err(OcspError::NoResponder),
        };
        Ok(Arc::new(Target {
            cert_id: info.cert_id,
            issuer: CertificateDer::from(issuer.to_vec()),
            url,
            issuer_raw_sha256: info.issuer_raw_sha256,
        }))
    }

    /// Returns the cached status unless `refresh` is set, then joins the
    /// request in flight for the certificate or starts one.
    async fn lookup(&self, target: Arc<Target>, now: SystemTime, refresh: bool) -> Outcome {
        let receiver = {
            let mut state = self.inner.lock();
            if let Some(entry) = state.entries.get(&target.cert_id) {
                if let Some(outcome) = cached_outcome(entry, now, refresh) {
                    if outcome.is_ok() {
                        metrics::counter!("ztgate_ocsp_cache_hits_total").increment(1);
                    }
                    tracing::debug!(
                        responder = %target.url,
                        cert_id = %target.cert_id,
                        outcome = outcome_label(&outcome),
                        "OCSP status from cache"
                    );
                    return outcome;
                }
            }
            match state.in_flight.get(&target.cert_id) {
                Some(receiver) => receiver.clone(),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    state
                        .in_flight
                        .insert(target.cert_id.clone(), receiver.clone());
                    tokio::spawn(self.inner.clone().fetch(target.clone(), now, sender));
                    receiver
                }
            }
        };
        self.wait(&target.cert_id, receiver).await
    }

    async fn wait(
        &self,
        cert_id: &CertId,
        mut receiver: watch::Receiver<Option<Outcome>>,
    ) -> Outcome {
        let received = match receiver.wait_for(Option::is_some).await {
            Ok(outcome) => Some(outcome.clone()),
            Err(_) => None,
        };
        if let Some(outcome) = received {
            return outcome.unwrap_or_else(|| {
                Err(OcspError::Internal(
                    "the OCSP request ended without a result".to_owned(),
                ))
            });
        }
        // The request task ended without sending, which only a panic does.
        // Drop its entry so that the next lookup sends a new request.
        let mut state = self.inner.lock();
        if state
            .in_flight
            .get(cert_id)
            .is_some_and(|current| current.same_channel(&receiver))
        {
            state.in_flight.remove(cert_id);
        }
        Err(OcspError::Internal(
            "the OCSP request task ended without a result".to_owned(),
        ))
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding
        // it. Every update leaves the state consistent, so keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one request, stores the outcome and hands it to the waiters.
    async fn fetch(
        self: Arc<Self>,
        target: Arc<Target>,
        now: SystemTime,
        sender: watch::Sender<Option<Outcome>>,
    ) {
        let started = Instant::now();
        let (outcome, method) = self.query(&target, now).await;
        let label = outcome_label(&outcome);
        metrics::counter!("ztgate_ocsp_requests_total", "outcome" => label).increment(1);
        match &outcome {
            Ok(_) => tracing::debug!(
                responder = %target.url,
                cert_id = %target.cert_id,
                method = method.map_or("-", |method| method.as_str()),
                outcome = label,
                elapsed_ms = started.elapsed().as_millis(),
                "OCSP query"
            ),
            Err(error) => tracing::debug!(
                responder = %target.url,
                cert_id = %target.cert_id,
                method = method.map_or("-", |method| method.as_str()),
                outcome = label,
                elapsed_ms = started.elapsed().as_millis(),
                %error,
                "OCSP query failed"
            ),
        }

        let revocation = self.store(&target, &outcome, now);
        if let Some(revocation) = revocation {
            tracing::info!(
                responder = %target.url,
                cert_id = %target.cert_id,
                serial = %revocation.serial_hex,
                "OCSP responder reports the certificate revoked"
            );
            // Sending fails only when there is no subscriber.
            let _ = self.revocations.send(revocation);
        }
        // An error only means that every waiter was cancelled.
        let _ = sender.send(Some(outcome));
    }

    async fn query(
        &self,
        target: &Target,
        now: SystemTime,
    ) -> (Outcome, Option<super::http::HttpMethod>) {
        let settings = &self.settings;
        let encoded = match request::encode(&target.cert_id, settings.send_nonce) {
            Ok(encoded) => encoded,
            Err(detail) => {
                let error = OcspError::Encode {
                    url: target.url.clone(),
                    detail,
                };
                return (Err(error), None);
            }
        };
        let (body, method) = match self.http.send(&target.url, &encoded.der).await {
            Ok(sent) => sent,
            Err(error) => return (Err(error), None),
        };
        let expected = Expected {
            url: &target.url,
            cert_id: &target.cert_id,
            issuer: &target.issuer,
            nonce: encoded.nonce.as_deref(),
            require_nonce: settings.require_nonce,
            clock_skew: settings.clock_skew,
            default_lifetime: settings.default_lifetime,
        };
        let outcome = response::verify(&body, &expected, now).map(|verified| Checked {
            status: verified.status,
            from_cache: false,
            fetched_at: now,
            this_update: verified.this_update,
            valid_until: verified.valid_until,
            responder_url: target.url.clone(),
        });
        (outcome, Some(method))
    }

    /// Stores an outcome, evicting the oldest entry when the cache is full,
    /// and ends the request in flight. Returns a revocation when the status
    /// changed to revoked.
    fn store(
        &self,
        target: &Arc<Target>,
        outcome: &Outcome,
        now: SystemTime,
    ) -> Option<Revocation> {
        let settings = &self.settings;
        let mut state = self.lock();
        state.in_flight.remove(&target.cert_id);

        let sequence = state.next_sequence;
        state.next_sequence += 1;
        let previous = state.entries.remove(&target.cert_id);
        if let Some(previous) = &previous {
            state.order.remove(&previous.sequence);
        }
        while state.entries.len() >= settings.cache_capacity {
            let Some((_, oldest)) = state.order.pop_first() else {
                break;
            };
            state.entries.remove(&oldest);
        }

        let previous_checked = previous.and_then(|entry| entry.checked);
        let was_revoked = previous_checked
            .as_ref()
            .is_some_and(|checked| matches!(checked.status, OcspStatus::Revoked { .. }));
        let (checked, failure, revocation) = match outcome {
            Ok(checked) => {
                let revocation = if was_revoked {
                    None
                } else {
                    revocation_of(target, checked)
                };
                (Some(checked.clone()), None, revocation)
            }
            Err(error) => {
                let failure = now
                    .checked_add(settings.failure_backoff)
                    .filter(|_| !settings.failure_backoff.is_zero())
                    .map(|until| (until, error.clone()));
                (previous_checked, failure, None)
            }
        };
        state.order.insert(sequence, target.cert_id.clone());
        state.entries.insert(
            target.cert_id.clone(),
            Entry {
                target: target.clone(),
                sequence,
                checked,
                failure,
            },
        );
        revocation
    }
}

/// Returns the outcome that the cache gives without a request: a valid
/// status (unless `refresh` is set) or an error in its backoff period.
fn cached_outcome(entry: &Entry, now: SystemTime, refresh: bool) -> Option<Outcome> {
    if !refresh {
        if let Some(checked) = &entry.checked {
            if now < checked.valid_until {
                let mut checked = checked.clone();
                checked.from_cache = true;
                return Some(Ok(checked));
            }
        }
    }
    match &entry.failure {
        Some((until, error)) if now < *until => Some(Err(error.clone())),
        _ => None,
    }
}

fn needs_refresh(entry: &Entry, now: SystemTime, margin: Duration) -> bool {
    if entry
        .failure
        .as_ref()
        .is_some_and(|(until, _)| now < *until)
    {
        return false;
    }
    match &entry.checked {
        Some(checked) => {
            let expiring = now
                .checked_add(margin)
                .map_or(true, |horizon| checked.valid_until <= horizon);
            !matches!(checked.status, OcspStatus::Revoked { .. }) && expiring
        }
        None => true,
    }
}

fn revocation_of(target: &Target, checked: &Checked) -> Option<Revocation> {
    match checked.status {
        OcspStatus::Revoked {
            revocation_time,
            reason,
        } => Some(Revocation {
            cert_id: target.cert_id.clone(),
            serial_hex: target.cert_id.serial_hex(),
            issuer_raw_sha256: target.issuer_raw_sha256.clone(),
            revocation_time,
            reason,
            responder_url: target.url.clone(),
        }),
        _ => None,
    }
}

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Ok(checked) => checked.status.label(),
        Err(error) => error.label(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ocsp::CertIdHash;
    use crate::test_time::near_edge;
    use proptest::prelude::*;

    /// Converts seconds since the Unix epoch to a `SystemTime`.
    fn at(unix_secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs)
    }

    fn checked(status_revoked: bool, this_update: u64, valid_until: u64) -> Checked {
        let status = if status_revoked {
            OcspStatus::Revoked {
                revocation_time: at(this_update),
                reason: None,
            }
        } else {
            OcspStatus::Good {
                this_update: at(this_update),
                next_update: at(valid_until),
            }
        };
        Checked {
            status,
            from_cache: false,
            fetched_at: at(this_update),
            this_update: at(this_update),
            valid_until: at(valid_until),
            responder_url: "http://127.0.0.1:1/".to_owned(),
        }
    }

    fn entry(checked: Option<Checked>, failure_until: Option<u64>) -> Entry {
        let url = "http://127.0.0.1:1/".to_owned();
        let error = OcspError::Timeout {
            url: url.clone(),
            timeout: Duration::from_secs(1),
        };
        Entry {
            target: Arc::new(Target {
                cert_id: CertId {
                    hash: CertIdHash::Sha1,
                    issuer_name_hash: vec![1; 20],
                    issuer_key_hash: vec![2; 20],
                    serial: vec![0x20],
                },
                issuer: CertificateDer::from(Vec::new()),
                url,
                issuer_raw_sha256: "00".repeat(32),
            }),
            sequence: 0,
            checked,
            failure: failure_until.map(|until| (at(until), error)),
        }
    }

    proptest! {
        /// A cached status is returned without a request exactly while `now`
        /// is before its validUntil, and never when a refresh is requested.
        #[test]
        fn cached_status_served_before_valid_until(
            lifetime in 0u64..100_000,
            revoked in any::<bool>(),
            exact in any::<bool>(),
            delta in -3i64..=3,
            anywhere in 1_799_000_000u64..1_801_000_000,
        ) {
            let this_update = 1_800_000_000;
            let valid_until = this_update + lifetime;
            let now = near_edge(valid_until, delta, anywhere, exact);
            let entry = entry(Some(checked(revoked, this_update, valid_until)), None);

            let served = cached_outcome(&entry, at(now), false);
            let refreshed = cached_outcome(&entry, at(now), true);

            match served {
                Some(Ok(status)) => {
                    prop_assert!(now < valid_until, "served at {now}, valid until {valid_until}");
                    prop_assert!(status.from_cache);
                    prop_assert_eq!(status.valid_until, at(valid_until));
                }
                Some(Err(error)) => prop_assert!(false, "error without a failure: {error}"),
                None => prop_assert!(now >= valid_until, "not served at {now}, valid until {valid_until}"),
            }
            prop_assert!(refreshed.is_none(), "served although a refresh was asked for");
        }

        /// The cache returns the error of a failed request exactly while `now`
        /// is before the end of the failure backoff, unless a fresh status is
        /// cached.
        #[test]
        fn failure_served_only_during_backoff(
            backoff in 0u64..600,
            expired_status in any::<bool>(),
            exact in any::<bool>(),
            delta in -3i64..=3,
            anywhere in 1_799_999_000u64..1_800_001_000,
        ) {
            let failed_at = 1_800_000_000;
            let until = failed_at + backoff;
            let now = near_edge(until, delta, anywhere, exact);
            // A status that expired before the failure stays for soft-fail.
            let expired = expired_status.then(|| checked(false, failed_at - 7200, failed_at - 3600));
            let entry = entry(expired, Some(until));

            let served = cached_outcome(&entry, at(now), false);

            match served {
                Some(Err(_)) => prop_assert!(now < until, "error served at {now}, backoff ends {until}"),
                Some(Ok(_)) => prop_assert!(false, "an expired status was served at {now}"),
                None => prop_assert!(now >= until, "no error at {now}, backoff ends {until}"),
            }
        }

        /// A good status is due for refresh exactly when its validUntil is at
        /// most `margin` after `now`. A revoked status never is, and nothing is
        /// due during a failure backoff.
        #[test]
        fn refresh_due_at_margin(
            lifetime in 0u64..100_000,
            margin in 0u64..3_600,
            revoked in any::<bool>(),
            backoff_until in proptest::option::of(1_799_990_000u64..1_800_200_000),
            exact in any::<bool>(),
            delta in -3i64..=3,
            anywhere in 1_799_990_000u64..1_800_200_000,
        ) {
            let this_update = 1_800_000_000;
            let valid_until = this_update + lifetime;
            let now = near_edge(valid_until - margin.min(valid_until), delta, anywhere, exact);
            let entry = entry(Some(checked(revoked, this_update, valid_until)), backoff_until);

            let due = needs_refresh(&entry, at(now), Duration::from_secs(margin));

            let in_backoff = backoff_until.is_some_and(|until| now < until);
            let expected = !in_backoff && !revoked && valid_until <= now + margin;
            prop_assert_eq!(due, expected, "now {} valid until {} margin {}", now, valid_until, margin);
        }
    }

    /// An entry without a status is due for refresh unless it is in a
    /// failure backoff.
    #[test]
    fn entry_without_status_due_after_backoff() {
        let during = entry(None, Some(1_800_000_010));
        assert!(!needs_refresh(
            &during,
            at(1_800_000_009),
            Duration::from_secs(60)
        ));
        assert!(needs_refresh(
            &during,
            at(1_800_000_010),
            Duration::from_secs(60)
        ));
    }
}
