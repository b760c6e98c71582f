//! Per-CA revocation settings, the CA description the store is built from,
//! and the clock.

use rustls::pki_types::CertificateDer;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The action when the CRL for a certificate is past its nextUpdate by more
/// than the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StalePolicy {
    Refuse,
    Admit,
}

/// The certificates of a chain that are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// The leaf only.
    EndEntity,
    /// The leaf and every intermediate below the trust anchor.
    Chain,
}

/// The action when no CRL covers a certificate: none was loaded yet, or
/// none of the loaded ones is from the certificate's issuer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCrlPolicy {
    Admit,
    Refuse,
}

/// Revocation settings of one CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationSettings {
    /// How far a CRL's thisUpdate may be ahead of the local clock.
    pub clock_skew: Duration,
    /// How long after nextUpdate a CRL is still used as if it were fresh.
    pub stale_grace: Duration,
    /// The action for new connections when a CRL is past nextUpdate plus the
    /// grace period.
    pub on_stale: StalePolicy,
    /// Whether live sessions are closed too when the CRL goes stale and
    /// `on_stale` is `Refuse`.
    pub stale_closes_sessions: bool,
    pub depth: Depth,
    pub without_crl: NoCrlPolicy,
    /// Maximum time between two fetches of a source that keeps working.
    pub refresh_interval: Duration,
    /// Up to this much random delay is added to every scheduled fetch, so
    /// that gateway nodes do not fetch at the same moment.
    pub refresh_jitter: Duration,
    /// How long before a CRL's nextUpdate its source is fetched again.
    pub refresh_ahead: Duration,
    /// Total time for one HTTP fetch.
    pub fetch_timeout: Duration,
    /// Largest CRL accepted from a URL or a file, in bytes.
    pub max_crl_bytes: u64,
    /// Whether URLs from the cRLDistributionPoints of verified certificates
    /// become sources (see `RevocationStore::learn_distribution_points`).
    pub learn_distribution_points: bool,
}

impl Default for RevocationSettings {
    /// Refuses stale data and missing CRLs, checks the leaf only, refreshes
    /// hourly and 10 minutes ahead of nextUpdate, and accepts CRLs up to
    /// 64 MiB, about 1.4 million entries of 46 bytes.
    fn default() -> RevocationSettings {
        RevocationSettings {
            clock_skew: Duration::from_secs(300),
            stale_grace: Duration::from_secs(3600),
            on_stale: StalePolicy::Refuse,
            stale_closes_sessions: false,
            depth: Depth::EndEntity,
            without_crl: NoCrlPolicy::Refuse,
            refresh_interval: Duration::from_secs(3600),
            refresh_jitter: Duration::from_secs(60),
            refresh_ahead: Duration::from_secs(600),
            fetch_timeout: Duration::from_secs(10),
            max_crl_bytes: 64 * 1024 * 1024,
            learn_distribution_points: true,
        }
    }
}

/// One device CA in the form the revocation store uses.
#[derive(Debug, Clone)]
pub struct CaRevocationConfig {
    /// The CA name from the configuration, as in `VerifiedChain::ca_name`.
    pub name: String,
    /// Trust anchors. They end the chain walk and are never checked
    /// themselves. Their keys may sign CRLs.
    pub anchors: Vec<CertificateDer<'static>>,
    /// Configured intermediates. Their keys may sign CRLs, and the chain
    /// walk uses them when a client leaves them out.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// CRL files, PEM (one or more "X509 CRL" blocks) or DER.
    pub crl_files: Vec<PathBuf>,
    /// CRL URLs, plain http:// only, serving DER.
    pub crl_urls: Vec<String>,
    pub settings: RevocationSettings,
}

/// The current time in seconds since the Unix epoch. Tests move a
/// [`ManualClock`] instead of sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_unix(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(elapsed) => i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that moves only when a test sets or advances it.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    pub fn new(now_unix: i64) -> ManualClock {
        ManualClock {
            now: AtomicI64::new(now_unix),
        }
    }

    pub fn set(&self, now_unix: i64) {
        self.now.store(now_unix, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.now.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// Converts a duration to whole seconds as i64 for time arithmetic.
pub(super) fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}
