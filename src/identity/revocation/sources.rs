//! CRL sources: their state, loading one source, and the fetch schedule.

use super::settings::{secs, CaRevocationConfig, RevocationSettings};
use crate::identity::crl::{
    looks_like_pem, parse_crl, read_crl_file, Crl, CrlChecks, CrlError, CrlErrorKind, CrlSigner,
};
use crate::identity::http_fetch::{FetchLimits, HttpFetcher};
use crate::policy::rfc3339_utc;
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// Media type of a DER CRL (RFC 2585 section 4.2).
const CRL_MEDIA_TYPE: &str = "application/pkix-crl";

/// Shortest delay before the next fetch after a success, for CRLs whose
/// nextUpdate minus `refresh_ahead` is already past.
const MIN_REFETCH_SECS: i64 = 30;

/// First retry delay after a failure. It doubles with every further failure
/// up to the refresh interval.
const RETRY_BASE_SECS: i64 = 10;

/// A repeated failure of one source is logged at most this often.
const WARN_REPEAT_SECS: i64 = 600;

/// The origin of a source's CRLs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum SourceKind {
    File(PathBuf),
    Url(String),
    /// A URL from the cRLDistributionPoints of a verified certificate.
    DistributionPoint(String),
}

impl SourceKind {
    pub(super) fn url(&self) -> Option<&str> {
        match self {
            SourceKind::File(_) => None,
            SourceKind::Url(url) | SourceKind::DistributionPoint(url) => Some(url),
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            SourceKind::File(_) => "file",
            SourceKind::Url(_) => "url",
            SourceKind::DistributionPoint(_) => "distribution point",
        }
    }

    pub(super) fn label(&self) -> String {
        match self {
            SourceKind::File(path) => path.display().to_string(),
            SourceKind::Url(url) | SourceKind::DistributionPoint(url) => url.clone(),
        }
    }
}

/// Modification time and size of a CRL file, to skip unchanged files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// Counts repeated failures so that each source logs one warning per
/// distinct error and then one per [`WARN_REPEAT_SECS`].
#[derive(Debug, Default)]
pub(super) struct WarnLimiter {
    last_message: Option<String>,
    last_logged_at: i64,
    suppressed: u64,
}

impl WarnLimiter {
    /// Returns `Some(suppressed count)` when this failure should be logged.
    pub(super) fn should_log(&mut self, message: &str, now_unix: i64) -> Option<u64> {
        let repeated = self.last_message.as_deref() == Some(message);
        if repeated && now_unix - self.last_logged_at < WARN_REPEAT_SECS {
            self.suppressed += 1;
            return None;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.last_message = Some(message.to_owned());
        self.last_logged_at = now_unix;
        Some(suppressed)
    }

    pub(super) fn reset(&mut self) {
        *self = WarnLimiter::default();
    }
}

/// One source of CRLs for one CA.
#[derive(Debug)]
pub(super) struct Source {
    pub id: u64,
    pub ca: Arc<str>,
    pub kind: SourceKind,
    /// The last CRLs that loaded and verified, kept when a later load fails.
    pub crls: Vec<Arc<Crl>>,
    pub loaded_at: Option<i64>,
    pub last_error: Option<String>,
    pub failures: u32,
    pub next_due: i64,
    pub file_stamp: Option<FileStamp>,
    pub warn: WarnLimiter,
}

impl Source {
    pub(super) fn new(id: u64, ca: Arc<str>, kind: SourceKind, due: i64) -> Source {
        Source {
            id,
            ca,
            kind,
            crls: Vec::new(),
            loaded_at: None,
            last_error: None,
            failures: 0,
            next_due: due,
            file_stamp: None,
            warn: WarnLimiter::default(),
        }
    }

    /// Returns the earliest nextUpdate of the source's CRLs.
    pub(super) fn earliest_next_update(&self) -> Option<i64> {
        self.crls.iter().filter_map(|crl| crl.next_update).min()
    }
}

/// One configured CA with what is derived from its certificates.
#[derive(Debug)]
pub(super) struct CaState {
    pub name: Arc<str>,
    pub config: CaRevocationConfig,
    pub signers: Arc<[CrlSigner]>,
    pub anchor_subjects: Vec<Vec<u8>>,
}

impl CaState {
    pub(super) fn new(config: CaRevocationConfig) -> Result<CaState, String> {
        let mut signers = Vec::new();
        let mut anchor_subjects = Vec::new();
        for (role, certs) in [
            ("certificate", &config.anchors),
            ("intermediate", &config.intermediates),
        ] {
            for (index, cert) in certs.iter().enumerate() {
                let signer = CrlSigner::from_certificate(cert).map_err(|e| {
                    format!("device CA {:?}: {role} {}: {e}", config.name, index + 1)
                })?;
                if role == "certificate" {
                    anchor_subjects.push(signer.subject_der().to_vec());
                }
                signers.push(signer);
            }
        }
        Ok(CaState {
            name: Arc::from(config.name.as_str()),
            config,
            signers: signers.into(),
            anchor_subjects,
        })
    }
}

/// Everything a load of one source needs, taken out of the locked state.
#[derive(Debug, Clone)]
pub(super) struct LoadJob {
    pub id: u64,
    pub kind: SourceKind,
    pub signers: Arc<[CrlSigner]>,
    pub settings: RevocationSettings,
    pub stamp: Option<FileStamp>,
    /// Reads a file even when its stamp is unchanged.
    pub force: bool,
}

#[derive(Debug)]
pub(super) enum LoadResult {
    Loaded {
        crls: Vec<Crl>,
        stamp: Option<FileStamp>,
    },
    /// The file has the same modification time and size as at the last load.
    Unchanged,
    Failed(String),
}

/// Loads and verifies the CRLs of one source. Parsing runs on the blocking
/// thread pool, because a CRL with a million entries takes most of a second.
pub(super) async fn load(job: LoadJob, fetcher: &HttpFetcher, now_unix: i64) -> LoadResult {
    match &job.kind {
        SourceKind::File(path) => {
            let path = path.clone();
            let job = job.clone();
            let task = tokio::task::spawn_blocking(move || load_file(&path, &job, now_unix));
            task.await
                .unwrap_or_else(|e| LoadResult::Failed(format!("CRL load task failed: {e}")))
        }
        SourceKind::Url(url) | SourceKind::DistributionPoint(url) => {
            let limits = FetchLimits {
                timeout: job.settings.fetch_timeout,
                max_bytes: job.settings.max_crl_bytes,
            };
            let body = match fetcher.get(url, CRL_MEDIA_TYPE, limits).await {
                Ok(body) => body,
                Err(e) => return LoadResult::Failed(e.to_string()),
            };
            let url = url.clone();
            let task =
                tokio::task::spawn_blocking(move || parse_http_body(&body, &url, &job, now_unix));
            task.await
                .unwrap_or_else(|e| LoadResult::Failed(format!("CRL parse task failed: {e}")))
        }
    }
}

fn checks(job: &LoadJob, now_unix: i64) -> CrlChecks<'_> {
    CrlChecks {
        signers: &job.signers,
        now_unix,
        clock_skew_secs: secs(job.settings.clock_skew),
    }
}

fn parse_http_body(body: &[u8], url: &str, job: &LoadJob, now_unix: i64) -> LoadResult {
    if looks_like_pem(body) {
        let error = CrlError {
            origin: url.to_owned(),
            kind: CrlErrorKind::PemNotAllowed,
        };
        return LoadResult::Failed(error.to_string());
    }
    match parse_crl(body, url, &checks(job, now_unix)) {
        Ok(crl) => LoadResult::Loaded {
            crls: vec![crl],
            stamp: None,
        },
        Err(e) => LoadResult::Failed(e.to_string()),
    }
}

fn load_file(path: &std::path::Path, job: &LoadJob, now_unix: i64) -> LoadResult {
    let label = path.display().to_string();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) => return LoadResult::Failed(format!("failed to read CRL file {label}: {e}")),
    };
    let stamp = FileStamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
    };
    if !job.force && job.stamp == Some(stamp) {
        return LoadResult::Unchanged;
    }
    if metadata.len() > job.settings.max_crl_bytes {
        return LoadResult::Failed(format!(
            "CRL file {label} has {} bytes, more than the maximum of {} bytes",
            metadata.len(),
            job.settings.max_crl_bytes
        ));
    }
    let blocks = match std::fs::File::open(path).map(read_crl_file) {
        Ok(Ok(blocks)) => blocks,
        Ok(Err(kind)) => {
            let error = CrlError {
                origin: label,
                kind,
            };
            return LoadResult::Failed(error.to_string());
        }
        Err(e) => return LoadResult::Failed(format!("failed to read CRL file {label}: {e}")),
    };

    let mut crls = Vec::with_capacity(blocks.len());
    for block in blocks {
        match parse_crl(&block, &label, &checks(job, now_unix)) {
            Ok(crl) => crls.push(crl),
            Err(e) => return LoadResult::Failed(e.to_string()),
        }
    }
    LoadResult::Loaded {
        crls,
        stamp: Some(stamp),
    }
}

/// Checks new CRLs of a source against the ones it had. Returns `Ok(true)`
/// when they differ, `Ok(false)` when they are the same issues, and an error
/// when one is older than the CRL it would replace, which would undo
/// revocations (a replayed or rolled-back CRL).
pub(super) fn compare_with_installed(installed: &[Arc<Crl>], new: &[Crl]) -> Result<bool, String> {
    let mut changed = installed.len() != new.len();
    for crl in new {
        let previous = installed.iter().find(|old| {
            old.issuer_sha256 == crl.issuer_sha256
                && old.scope == crl.scope
                && old.distribution_points == crl.distribution_points
        });
        let Some(previous) = previous else {
            changed = true;
            continue;
        };
        if previous.is_same_issue(crl) {
            continue;
        }
        if previous.is_newer_than(crl) {
            return Err(format!(
                "CRL from {} rejected: it ({}) is older than the installed CRL ({})",
                crl.origin,
                describe_issue(crl),
                describe_issue(previous)
            ));
        }
        changed = true;
    }
    Ok(changed)
}

fn describe_issue(crl: &Crl) -> String {
    match crl.crl_number_hex() {
        Some(number) => format!(
            "cRLNumber {number}, thisUpdate {}",
            rfc3339_utc(crl.this_update)
        ),
        None => format!("thisUpdate {}", rfc3339_utc(crl.this_update)),
    }
}

/// When to load a source again after it loaded: one refresh interval later,
/// or `refresh_ahead` before the earliest nextUpdate if that comes first, but
/// not sooner than [`MIN_REFETCH_SECS`], plus jitter.
pub(super) fn next_due_after_success(
    now_unix: i64,
    next_update: Option<i64>,
    settings: &RevocationSettings,
) -> i64 {
    let mut due = now_unix.saturating_add(secs(settings.refresh_interval));
    if let Some(next_update) = next_update {
        due = due.min(next_update.saturating_sub(secs(settings.refresh_ahead)));
    }
    due.max(now_unix + MIN_REFETCH_SECS) + jitter(settings)
}

/// When to retry a source after its `failures`-th failure in a row.
pub(super) fn next_due_after_failure(
    now_unix: i64,
    failures: u32,
    settings: &RevocationSettings,
) -> i64 {
    let doublings = failures.saturating_sub(1).min(20);
    let backoff = RETRY_BASE_SECS
        .saturating_mul(1 << doublings)
        .min(secs(settings.refresh_interval).max(RETRY_BASE_SECS));
    now_unix.saturating_add(backoff) + jitter(settings)
}

fn jitter(settings: &RevocationSettings) -> i64 {
    let max = secs(settings.refresh_jitter);
    if max <= 0 {
        return 0;
    }
    rand::thread_rng().gen_range(0..=max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> RevocationSettings {
        RevocationSettings {
            refresh_interval: Duration::from_secs(3600),
            refresh_ahead: Duration::from_secs(600),
            refresh_jitter: Duration::ZERO,
            ..RevocationSettings::default()
        }
    }

    #[test]
    fn next_due_uses_interval_when_crl_lasts() {
        let due = next_due_after_success(1000, Some(1000 + 86_400), &settings());

        assert_eq!(due, 1000 + 3600);
    }

    #[test]
    fn next_due_refreshes_ahead_of_next_update() {
        let due = next_due_after_success(1000, Some(1000 + 1800), &settings());

        assert_eq!(due, 1000 + 1800 - 600);
    }

    #[test]
    fn next_due_has_minimum_delay() {
        let due = next_due_after_success(1000, Some(900), &settings());

        assert_eq!(due, 1000 + MIN_REFETCH_SECS);
    }

    #[test]
    fn next_due_jitter_bounded() {
        let settings = RevocationSettings {
            refresh_jitter: Duration::from_secs(60),
            ..settings()
        };

        for _ in 0..100 {
            let due = next_due_after_success(1000, None, &settings);
            assert!((1000 + 3600..=1000 + 3660).contains(&due), "{due}");
        }
    }

    #[test]
    fn retry_backoff_doubles_up_to_interval() {
        let settings = settings();

        let delays: Vec<i64> = (1..=12)
            .map(|failures| next_due_after_failure(0, failures, &settings))
            .collect();

        assert_eq!(&delays[..4], &[10, 20, 40, 80]);
        assert_eq!(delays[11], 3600);
    }

    #[test]
    fn warn_limiter_suppresses_repeats() {
        let mut limiter = WarnLimiter::default();

        assert_eq!(limiter.should_log("timeout", 0), Some(0));
        assert_eq!(limiter.should_log("timeout", 10), None);
        assert_eq!(limiter.should_log("timeout", 20), None);
        assert_eq!(limiter.should_log("status 404", 30), Some(2));
        assert_eq!(
            limiter.should_log("status 404", 30 + WARN_REPEAT_SECS),
            Some(0)
        );
    }
}
