//! Tracing setup and rate limits for repetitive log lines.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

type LevelSetter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static LEVEL_SETTER: OnceLock<LevelSetter> = OnceLock::new();

/// Installs the global tracing subscriber. `RUST_LOG`, when set, overrides
/// the configured level for the life of the process.
pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = if format == "json" {
        let builder = tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = LEVEL_SETTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.try_init()
    } else {
        let builder = tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = LEVEL_SETTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.try_init()
    };
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

/// Allows a fixed number of events per source address per window, and
/// counts what it suppressed so the next allowed line can report it.
pub struct PerSourceLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<HashMap<IpAddr, (Instant, u32, u64)>>,
}

impl PerSourceLimiter {
    pub fn new(per_window: u32, window: Duration) -> PerSourceLimiter {
        PerSourceLimiter {
            per_window,
            window,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Returns `Some(suppressed_since_last)` when an event from `ip` may be
    /// logged now, `None` when it must be dropped.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Option<u64> {
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
