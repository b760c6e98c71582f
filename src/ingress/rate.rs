//! Token-bucket rate limits built on governor: new handshakes per source
//! address, shared by both ingresses, and new streams per QUIC connection.

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `burst` events at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// Builds a limit from config values. Returns `None` when `per_second`
    /// is 0, which turns the limit off. A burst of 0 counts as 1.
    pub fn new(per_second: u32, burst: u32) -> Option<RateLimit> {
        Some(RateLimit {
            per_second: NonZeroU32::new(per_second)?,
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        })
    }

    fn quota(&self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }

    /// Builds a limiter for one connection's new streams.
    pub fn direct_limiter(&self) -> DefaultDirectRateLimiter {
        DefaultDirectRateLimiter::direct(self.quota())
    }
}

/// The outcome of a per-source handshake check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceVerdict {
    /// The source had a token, which this check used.
    Allowed,
    /// The source's bucket is empty.
    Limited,
    /// The table of tracked sources is full even after pruning, so this
    /// source could not be checked.
    Untracked,
}

/// Shortest time between two prunes of a full source table, so that a
/// full table does not cost a scan on every new connection.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

struct KeyedState {
    limit: RateLimit,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    last_prune: Option<Instant>,
}

/// Per-source token buckets for new handshakes, with a bounded number of
/// tracked sources. A reload that changes the limit starts fresh buckets.
#[derive(Default)]
pub struct HandshakeRateLimiter {
    state: Mutex<Option<KeyedState>>,
}

impl HandshakeRateLimiter {
    /// Takes a token from `source`'s bucket. `limit` of `None` allows every
    /// handshake. At most `max_sources` addresses are tracked: a full table
    /// is pruned of sources whose buckets are full again, and while it stays
    /// full, sources it does not hold get [`SourceVerdict::Untracked`].
    pub fn check(
        &self,
        source: IpAddr,
        limit: Option<RateLimit>,
        max_sources: usize,
    ) -> SourceVerdict {
        let Some(limit) = limit else {
            return SourceVerdict::Allowed;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.as_ref().map(|s| s.limit) != Some(limit) {
            *state = Some(KeyedState {
                limit,
                limiter: DefaultKeyedRateLimiter::keyed(limit.quota()),
                last_prune: None,
            });
        }
        let Some(keyed) = state.as_mut() else {
            return SourceVerdict::Allowed;
        };
        if keyed.limiter.len() >= max_sources {
            let now = Instant::now();
            let due = match keyed.last_prune {
                None => true,
                Some(at) => now.duration_since(at) >= PRUNE_INTERVAL,
            };
            if due {
                keyed.limiter.retain_recent();
                keyed.limiter.shrink_to_fit();
                keyed.last_prune = Some(now);
            }
            // NOTE: governor offers no lookup without a token, so while the
            // table stays full, tracked sources are also reported untracked.
            if keyed.limiter.len() >= max_sources {
                return SourceVerdict::Untracked;
            }
        }
        match keyed.limiter.check_key(&source) {
            Ok(()) => SourceVerdict::Allowed,
            Err(_) => SourceVerdict::Limited,
        }
    }

    /// Number of tracked sources.
    pub fn tracked_sources(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.as_ref().map_or(0, |s| s.limiter.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn zero_rate_turns_the_limit_off() {
        assert_eq!(RateLimit::new(0, 5), None);
        let limiter = HandshakeRateLimiter::default();
        for _ in 0..100 {
            assert_eq!(limiter.check(ip(1), None, 10), SourceVerdict::Allowed);
        }
        assert_eq!(limiter.tracked_sources(), 0);
    }

    #[test]
    fn burst_then_limited_per_source() {
        let limiter = HandshakeRateLimiter::default();
        // One token per second: the checks below take far less than that.
        let slow = RateLimit::new(1, 3);
        for _ in 0..3 {
            assert_eq!(limiter.check(ip(1), slow, 10), SourceVerdict::Allowed);
        }
        assert_eq!(limiter.check(ip(1), slow, 10), SourceVerdict::Limited);
        assert_eq!(
            limiter.check(ip(2), slow, 10),
            SourceVerdict::Allowed,
            "another source has its own bucket"
        );
    }

    #[test]
    fn full_table_reports_untracked() {
        let limiter = HandshakeRateLimiter::default();
        let limit = RateLimit::new(1, 1);
        assert_eq!(limiter.check(ip(1), limit, 2), SourceVerdict::Allowed);
        assert_eq!(limiter.check(ip(2), limit, 2), SourceVerdict::Allowed);
        // Both buckets are empty, so pruning keeps both and the table stays full.
        assert_eq!(limiter.check(ip(3), limit, 2), SourceVerdict::Untracked);
        assert_eq!(limiter.tracked_sources(), 2);
    }

    #[test]
    fn changed_limit_starts_fresh_buckets() {
        let limiter = HandshakeRateLimiter::default();
        let one = RateLimit::new(1, 1);
        assert_eq!(limiter.check(ip(1), one, 10), SourceVerdict::Allowed);
        assert_eq!(limiter.check(ip(1), one, 10), SourceVerdict::Limited);
        let two = RateLimit::new(1, 2);
        assert_eq!(limiter.check(ip(1), two, 10), SourceVerdict::Allowed);
    }

    #[test]
    fn direct_limiter_allows_the_burst() {
        let limiter = RateLimit::new(1, 4).map(|l| l.direct_limiter());
        let Some(limiter) = limiter else {
            panic!("a rate of 1 builds a limiter");
        };
        let allowed = (0..10).filter(|_| limiter.check().is_ok()).count();
        assert_eq!(allowed, 4);
    }
}
