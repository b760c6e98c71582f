//! Tracing setup and rate limits for repetitive log lines.

pub mod metrics;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

type LevelSetter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static LEVEL_SETTER: OnceLock<LevelSetter> = OnceLock::new();

/// Tracing target of the audit log: one JSON line per policy decision and
/// per operator action, kept apart from diagnostics.
pub const AUDIT_TARGET: &str = "ztgate::audit";

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stderr,
    File(std::path::PathBuf),
    Off,
}

/// Installs the global tracing subscriber: diagnostics as text or JSON on
/// stderr, and the audit log as JSON lines on its own sink. `RUST_LOG`,
/// when set, overrides the configured level for the life of the process.
pub fn init(level: &str, format: &str, audit: &AuditSink) {
    use tracing_subscriber::filter::{filter_fn, FilterExt, Targets};
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = LEVEL_SETTER.set(Box::new(move |f| {
        handle.reload(f).map_err(|e| e.to_string())
    }));
    let not_audit = filter_fn(|meta| meta.target() != AUDIT_TARGET);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let diagnostics = if format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let diagnostics = diagnostics.with_filter(filter.and(not_audit));
    let audit_writer = match audit {
        AuditSink::Off => None,
        AuditSink::Stderr => Some(BoxMakeWriter::new(std::io::stderr)),
        AuditSink::File(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => Some(BoxMakeWriter::new(Mutex::new(file))),
            Err(e) => {
                eprintln!(
                    "ztgate: cannot open the audit log {}: {e}; audit lines go to stderr",
                    path.display()
                );
                Some(BoxMakeWriter::new(std::io::stderr))
            }
        },
    };
    let audit_layer = audit_writer.map(|writer| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(Targets::new().with_target(AUDIT_TARGET, tracing::Level::INFO))
    });
    let result = tracing_subscriber::registry()
        .with(diagnostics)
        .with(audit_layer)
        .try_init();
    if let Err(e) = result {
        eprintln!("ztgate: logging was already initialised: {e}");
    }
}

/// Changes the log level at run time (on reload). Does nothing when
/// `RUST_LOG` is set or logging was not set up through [`init`].
pub fn set_level(level: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    let Some(setter) = LEVEL_SETTER.get() else {
        return;
    };
    match EnvFilter::try_new(level) {
        Ok(filter) => match setter(filter) {
            Ok(()) => tracing::info!(level, "log level changed"),
            Err(e) => tracing::warn!(level, error = %e, "cannot change the log level"),
        },
        Err(e) => tracing::warn!(level, error = %e, "invalid log level; keeping the current one"),
    }
}

/// Allows a fixed number of events per key (by default a source address)
/// per window, and counts what it suppressed so the next allowed line can
/// report it.
pub struct PerSourceLimiter<K = IpAddr> {
    per_window: u32,
    window: Duration,
    state: Mutex<HashMap<K, (Instant, u32, u64)>>,
}

impl<K: std::hash::Hash + Eq> PerSourceLimiter<K> {
    pub fn new(per_window: u32, window: Duration) -> PerSourceLimiter<K> {
        PerSourceLimiter {
            per_window,
            window,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Returns `Some(suppressed_since_last)` when an event from `ip` may be
    /// logged now, `None` when it must be dropped.
    pub fn check(&self, ip: K, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.len() > 10_000 {
            let window = self.window;
            state.retain(|_, (start, _, _)| now.duration_since(*start) < window);
        }
        let entry = state.entry(ip).or_insert((now, 0, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0, entry.2);
        }
        if entry.1 < self.per_window {
            entry.1 += 1;
            let suppressed = entry.2;
            entry.2 = 0;
            Some(suppressed)
        } else {
            entry.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_burst_then_suppresses() {
        let limiter = PerSourceLimiter::new(2, Duration::from_secs(10));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let t0 = Instant::now();
        assert_eq!(limiter.check(ip, t0), Some(0));
        assert_eq!(limiter.check(ip, t0), Some(0));
        assert_eq!(limiter.check(ip, t0), None);
        assert_eq!(limiter.check(ip, t0), None);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(limiter.check(ip, later), Some(2));
    }
}
