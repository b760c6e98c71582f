//! Tracks the client address of a QUIC connection and reports a change only
//! once the new path has been validated.
//!
//! quinn 0.11 (quinn-proto 0.11.19) switches `Connection::remote_address()`
//! as soon as a non-probing packet with the highest packet number so far
//! arrives from a new address, before path validation, and reports neither
//! the switch nor the validation. What it does expose follows from how
//! quinn-proto validates a path:
//!
//! - while a path is unvalidated, every packet sent on it carries a
//!   PATH_CHALLENGE frame (`frame_tx.path_challenge` grows);
//! - moving away from a validated path sends a PATH_CHALLENGE on the old path
//!   at once;
//! - a path that is not validated within three PTOs is abandoned, and the
//!   connection returns to the previous address.
//!
//! So the tracker accepts a new address when it has been the remote address
//! at three polls in a row, no PATH_CHALLENGE was sent across the last two
//! intervals, and datagrams were sent in the last one. Those datagrams went
//! to a validated path at that address. An idle connection sends nothing, so
//! an address that stays current with no PATH_CHALLENGE sent for longer than
//! quinn's validation deadline is accepted too.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often a connection's path is sampled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// quinn's default initial RTT (`TransportConfig::initial_rtt`), which a path
/// to a new IP address starts from until it has an RTT sample.
const INITIAL_RTT: Duration = Duration::from_millis(333);

/// quinn's default maximum ACK delay, part of every PTO.
const MAX_ACK_DELAY: Duration = Duration::from_millis(25);

/// One reading of a connection's path state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSample {
    pub at: Instant,
    /// The canonical remote address quinn sends to now, validated or not.
    pub remote: SocketAddr,
    /// PATH_CHALLENGE frames sent so far.
    pub challenges_sent: u64,
    /// UDP datagrams sent so far.
    pub datagrams_sent: u64,
    /// The current path's smoothed RTT.
    pub rtt: Duration,
}

impl PathSample {
    /// Reads the connection's current path state.
    pub fn read(connection: &quinn::Connection) -> PathSample {
        let remote = super::quic::canonical(connection.remote_address());
        let stats = connection.stats();
        PathSample {
            at: Instant::now(),
            remote,
            challenges_sent: stats.frame_tx.path_challenge,
            datagrams_sent: stats.udp_tx.datagrams,
            rtt: stats.path.rtt,
        }
    }
}

/// A run of consecutive samples that all saw the same unvalidated address.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    remote: SocketAddr,
    /// When the run started or a PATH_CHALLENGE was last seen sent, whichever is later.
    quiet_since: Instant,
    /// Intervals in a row, inside the run, in which no PATH_CHALLENGE was sent.
    quiet_intervals: u32,
    max_rtt: Duration,
}

/// The validated client address of one connection.
#[derive(Debug)]
pub struct PathTracker {
    validated: SocketAddr,
    validated_rtt: Duration,
    last: Option<PathSample>,
    candidate: Option<Candidate>,
}

impl PathTracker {
    /// Starts from the handshake's address, which the handshake validated.
    pub fn new(validated: SocketAddr) -> PathTracker {
        PathTracker {
            validated,
            validated_rtt: Duration::ZERO,
            last: None,
            candidate: None,
        }
    }

    pub fn validated(&self) -> SocketAddr {
        self.validated
    }

    /// Records a sample and returns the new address when this sample
    /// shows that the path moved to it and was validated.
    pub fn observe(&mut self, sample: PathSample) -> Option<SocketAddr> {
        let previous = self.last.replace(sample);
        if sample.remote == self.validated {
            self.candidate = None;
            self.validated_rtt = sample.rtt;
            return None;
        }
        let continues = |c: &Candidate| {
            c.remote == sample.remote && previous.is_some_and(|p| p.remote == sample.remote)
        };
        let (Some(candidate), Some(previous)) =
            (self.candidate.as_mut().filter(|c| continues(c)), previous)
        else {
            self.candidate = Some(Candidate {
                remote: sample.remote,
                quiet_since: sample.at,
                quiet_intervals: 0,
                max_rtt: sample.rtt,
            });
            return None;
        };
        candidate.max_rtt = candidate.max_rtt.max(sample.rtt);
        if sample.challenges_sent == previous.challenges_sent {
            candidate.quiet_intervals += 1;
        } else {
            candidate.quiet_since = sample.at;
            candidate.quiet_intervals = 0;
        }
        let sent_unchallenged =
            candidate.quiet_intervals >= 2 && sample.datagrams_sent > previous.datagrams_sent;
        let deadline = validation_deadline(candidate.max_rtt.max(self.validated_rtt));
        let outlived_deadline = sample.at.duration_since(candidate.quiet_since) >= deadline;
        if !(sent_unchallenged || outlived_deadline) {
            return None;
        }
        self.validated = sample.remote;
        self.validated_rtt = sample.rtt;
        self.candidate = None;
        Some(sample.remote)
    }
}

/// Estimates an upper bound on the time quinn gives a new path to be
/// validated, which is three PTOs of the slower of the two paths. The PTO is estimated as four RTTs
/// (for the RTT variance term) plus the maximum ACK delay, from an RTT of at
/// least quinn's initial RTT, because a path to a new IP address starts from
/// that value.
fn validation_deadline(rtt: Duration) -> Duration {
    let pto = rtt.max(INITIAL_RTT) * 4 + MAX_ACK_DELAY;
    pto * 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    struct Feed {
        start: Instant,
        tracker: PathTracker,
        challenges: u64,
        datagrams: u64,
        polls: u32,
    }

    impl Feed {
        fn new(validated: &str) -> Feed {
            Feed {
                start: Instant::now(),
                tracker: PathTracker::new(addr(validated)),
                challenges: 0,
                datagrams: 0,
                polls: 0,
            }
        }

        /// Feeds one sample; `challenges` and `datagrams` count what was sent since the last one.
        fn poll(&mut self, remote: &str, challenges: u64, datagrams: u64) -> Option<SocketAddr> {
            self.polls += 1;
            self.challenges += challenges;
            self.datagrams += datagrams;
            self.tracker.observe(PathSample {
                at: self.start + POLL_INTERVAL * self.polls,
                remote: addr(remote),
                challenges_sent: self.challenges,
                datagrams_sent: self.datagrams,
                rtt: Duration::from_millis(1),
            })
        }
    }

    #[test]
    fn validated_move_is_reported_once() {
        let mut feed = Feed::new("127.0.0.1:5000");
        assert_eq!(feed.poll("127.0.0.1:5000", 0, 10), None);
        // The move: challenges go out until the client's PATH_RESPONSE arrives.
        assert_eq!(feed.poll("127.0.0.2:6000", 3, 10), None);
        assert_eq!(feed.poll("127.0.0.2:6000", 0, 10), None);
        assert_eq!(
            feed.poll("127.0.0.2:6000", 0, 10),
            Some(addr("127.0.0.2:6000"))
        );
        assert_eq!(feed.tracker.validated(), addr("127.0.0.2:6000"));
        assert_eq!(feed.poll("127.0.0.2:6000", 0, 10), None);
    }

    #[test]
    fn challenges_in_flight_hold_the_change() {
        let mut feed = Feed::new("127.0.0.1:5000");
        for _ in 0..20 {
            assert_eq!(feed.poll("127.0.0.9:7000", 2, 10), None);
        }
        assert_eq!(feed.tracker.validated(), addr("127.0.0.1:5000"));
    }

    #[test]
    fn flapping_address_is_never_reported() {
        // A forged address that keeps winning the race for a moment and
        // falling back: each new run starts over.
        let mut feed = Feed::new("127.0.0.1:5000");
        for _ in 0..20 {
            assert_eq!(feed.poll("127.0.0.9:7000", 1, 5), None);
            assert_eq!(feed.poll("127.0.0.9:7000", 0, 5), None);
            assert_eq!(feed.poll("127.0.0.1:5000", 0, 5), None);
        }
        assert_eq!(feed.tracker.validated(), addr("127.0.0.1:5000"));
    }

    #[test]
    fn idle_connection_needs_the_validation_deadline() {
        let mut feed = Feed::new("127.0.0.1:5000");
        assert_eq!(feed.poll("127.0.0.2:6000", 1, 1), None);
        let deadline = validation_deadline(Duration::from_millis(1));
        let polls = deadline.as_millis().div_ceil(POLL_INTERVAL.as_millis()) as u32;
        for _ in 0..polls - 1 {
            assert_eq!(feed.poll("127.0.0.2:6000", 0, 0), None);
        }
        assert_eq!(
            feed.poll("127.0.0.2:6000", 0, 0),
            Some(addr("127.0.0.2:6000"))
        );
    }

    #[test]
    fn return_to_validated_address_clears_the_candidate() {
        let mut feed = Feed::new("127.0.0.1:5000");
        assert_eq!(feed.poll("127.0.0.9:7000", 1, 1), None);
        assert_eq!(feed.poll("127.0.0.9:7000", 0, 1), None);
        assert_eq!(feed.poll("127.0.0.1:5000", 0, 1), None);
        assert_eq!(feed.poll("127.0.0.9:7000", 0, 1), None);
        assert_eq!(feed.poll("127.0.0.9:7000", 0, 1), None);
        assert_eq!(feed.tracker.validated(), addr("127.0.0.1:5000"));
    }
}
