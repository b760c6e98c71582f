//! Property tests for decision logic that takes time as an input: session
//! deadlines (`admission::deadline_for`), the per-source log limiter and the
//! OCSP soft-fail staleness limit (`identity::ocsp::decide`). The caches'
//! expiry rules have unit property tests beside their private code.

use proptest::prelude::*;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};
use ztgate::admission::deadline_for;
use ztgate::identity::ocsp::{
    decide, Checked, OcspError, OcspMode, OcspStatus, SoftFailWithoutAnswer,
};
use ztgate::identity::DeviceIdentity;
use ztgate::policy::Decision;
use ztgate::protocol::{parse_preamble, preamble};
use ztgate::telemetry::PerSourceLimiter;

/// A fixed "now" in Unix seconds (2027-01-15).
const NOW_UNIX: i64 = 1_800_000_000;

fn identity(not_after_unix: i64) -> DeviceIdentity {
    DeviceIdentity {
        subject: "CN=device".into(),
        common_name: Some("device".into()),
        serial_hex: "01".into(),
        issuer: "CN=ca".into(),
        san_uris: Vec::new(),
        spiffe_id: None,
        permanent_identifiers: Vec::new(),
        hardware_modules: Vec::new(),
        hardware_bound: false,
        cert_sha256: "00".repeat(32),
        spki_sha256: "00".repeat(32),
        issuer_raw_sha256: "00".repeat(32),
        not_before_unix: NOW_UNIX - 86_400,
        not_after_unix,
        device_id: "cert:00".into(),
    }
}

/// Seconds for a duration: mostly realistic, sometimes past the range of
/// `Instant` (which holds about 2^63 seconds).
fn seconds() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..100_000,
        1 => Just(u64::MAX),
        1 => (1u64 << 62)..=u64::MAX,
    ]
}

/// The certificate's notAfter relative to `NOW_UNIX`: mostly ahead, sometimes
/// already past, sometimes at the extremes of i64.
fn not_after() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => (-1_000i64..200_000).prop_map(|offset| NOW_UNIX + offset),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

#[derive(Debug, Clone)]
struct DeadlineInput {
    lifetime: u64,
    decision_max: Option<u64>,
    configured_max: Option<u64>,
    /// How long ago the session started; `None` for a new admission.
    age: Option<u64>,
    not_after_unix: i64,
}

fn deadline_input() -> impl Strategy<Value = DeadlineInput> {
    (
        seconds(),
        proptest::option::of(seconds()),
        proptest::option::of(seconds()),
        proptest::option::of(0u64..1_000),
        not_after(),
    )
        .prop_map(
            |(lifetime, decision_max, configured_max, age, not_after_unix)| DeadlineInput {
                lifetime,
                decision_max,
                configured_max,
                age,
                not_after_unix,
            },
        )
}

fn allow(input: &DeadlineInput) -> Decision {
    Decision::Allow {
        lifetime: Duration::from_secs(input.lifetime),
        max_session: input.decision_max.map(Duration::from_secs),
        rule: "test".into(),
    }
}

/// `base + secs`, or `None` past the range of `Instant`.
fn add_secs(base: Instant, secs: u64) -> Option<Instant> {
    base.checked_add(Duration::from_secs(secs))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The deadline of an allowed session is never later than the decision's
    /// expiry, the certificate's notAfter or the maximum session length, it is
    /// one of them, and it asks for a re-evaluation only when the decision
    /// expires strictly before both others.
    #[test]
    fn allow_deadline_is_earliest_limit(input in deadline_input()) {
        let started = match input.age {
            Some(age) => {
                let started = Instant::now().checked_sub(Duration::from_secs(age));
                prop_assume!(started.is_some());
                started
            }
            None => None,
        };
        let decision = allow(&input);
        let identity = identity(input.not_after_unix);
        let configured_max = input.configured_max.map(Duration::from_secs);

        let before = Instant::now();
        let deadline = deadline_for(&decision, &identity, NOW_UNIX, started, configured_max);
        let after = Instant::now();

        // Each limit as a window [earliest, latest], because deadline_for reads
        // the clock itself somewhere between `before` and `after`.
        let remaining = input.not_after_unix.saturating_sub(NOW_UNIX);
        let remaining = u64::try_from(remaining).ok();
        let decision_limit = add_secs(before, input.lifetime).zip(add_secs(after, input.lifetime));
        let cert_limit = remaining
            .and_then(|secs| add_secs(before, secs).zip(add_secs(after, secs)));
        let max_secs = match (input.decision_max, input.configured_max) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A new session starts at the call, so its start also lies in a window.
        let max_limit = max_secs.and_then(|secs| match started {
            Some(started) => add_secs(started, secs).map(|at| (at, at)),
            None => add_secs(before, secs).zip(add_secs(after, secs)),
        });
        let limits = [decision_limit, cert_limit, max_limit];

        let Some(deadline) = deadline else {
            prop_assert!(
                limits.iter().all(Option::is_none),
                "no deadline although a limit is in range: {limits:?}"
            );
            return Ok(());
        };
        for (_, latest) in limits.iter().flatten() {
            prop_assert!(deadline.at <= *latest, "deadline after a limit");
        }
        prop_assert!(
            limits.iter().flatten().any(|(earliest, latest)| {
                *earliest <= deadline.at && deadline.at <= *latest
            }),
            "deadline is none of the limits"
        );

        // Whether the decision expires strictly before both other limits, where
        // the order is known. The decision, the certificate and a new session's
        // start are measured from the same instant, so their order follows from
        // the seconds alone.
        let before_certificate = remaining.is_none_or(|secs| input.lifetime < secs);
        let before_max = match (max_secs, started, decision_limit) {
            (None, _, _) | (_, _, None) => Some(true),
            (Some(secs), None, _) => Some(input.lifetime < secs || max_limit.is_none()),
            (Some(_), Some(_), Some((decision_earliest, decision_latest))) => match max_limit {
                None => Some(true),
                Some((max_at, _)) if max_at > decision_latest => Some(true),
                Some((max_at, _)) if max_at <= decision_earliest => Some(false),
                Some(_) => None,
            },
        };
        let decision_first =
            before_max.map(|first| first && before_certificate && decision_limit.is_some());
        if let Some(decision_first) = decision_first {
            prop_assert_eq!(deadline.reevaluate, decision_first);
        }
        if deadline.reevaluate {
            prop_assert_eq!(deadline.reason.as_str(), "the policy decision expired");
        } else {
            prop_assert_ne!(deadline.reason.as_str(), "the policy decision expired");
        }
    }

    /// A deny or step-up decision has no expiry of its own, so only the
    /// certificate's notAfter can set a deadline, and it never re-evaluates.
    #[test]
    fn refusal_deadline_is_certificate_expiry(
        not_after_unix in not_after(),
        step_up in any::<bool>(),
    ) {
        let decision = if step_up {
            Decision::StepUp {
                challenge: "https://idp.example.test".into(),
                grace: Duration::from_secs(60),
                reason: "step-up".into(),
                rule: "test".into(),
            }
        } else {
            Decision::Deny {
                reason: "denied".into(),
                remediation: None,
                rule: "test".into(),
            }
        };
        let before = Instant::now();
        let deadline = deadline_for(
            &decision,
            &identity(not_after_unix),
            NOW_UNIX,
            None,
            Some(Duration::from_secs(1)),
        );
        let after = Instant::now();

        let remaining = u64::try_from(not_after_unix.saturating_sub(NOW_UNIX)).ok();
        match (deadline, remaining) {
            (Some(deadline), Some(secs)) => {
                prop_assert!(!deadline.reevaluate);
                prop_assert_eq!(deadline.reason.as_str(), "the device certificate expired");
                prop_assert!(Some(deadline.at) >= add_secs(before, secs));
                prop_assert!(Some(deadline.at) <= add_secs(after, secs));
            }
            (None, remaining) => prop_assert!(
                remaining.is_none_or(|secs| add_secs(before, secs).is_none()),
                "no deadline although the certificate has {remaining:?} s left"
            ),
            (Some(deadline), None) => {
                prop_assert!(false, "deadline {:?} for an expired certificate", deadline.reason);
            }
        }
    }
}

/// A tie between the decision's expiry and the certificate's notAfter ends the
/// session, because it could not outlive the certificate anyway.
#[test]
fn deadline_tie_ends_session() {
    let decision = Decision::Allow {
        lifetime: Duration::from_secs(300),
        max_session: None,
        rule: "test".into(),
    };

    let deadline = deadline_for(&decision, &identity(NOW_UNIX + 300), NOW_UNIX, None, None)
        .expect("a deadline");

    assert!(!deadline.reevaluate);
    assert_eq!(deadline.reason, "the device certificate expired");
}

#[test]
fn deadline_overflowing_lifetime_is_ignored() {
    let decision = Decision::Allow {
        lifetime: Duration::from_secs(u64::MAX),
        max_session: Some(Duration::from_secs(u64::MAX)),
        rule: "test".into(),
    };

    let deadline = deadline_for(
        &decision,
        &identity(NOW_UNIX + 60),
        NOW_UNIX,
        Some(Instant::now()),
        Some(Duration::from_secs(u64::MAX)),
    )
    .expect("the certificate's notAfter is a deadline");

    assert!(!deadline.reevaluate);
    assert_eq!(deadline.reason, "the device certificate expired");
}

const WINDOW: Duration = Duration::from_millis(1_000);

/// One event for the limiter: a source index and the time since the previous
/// event in milliseconds.
fn limiter_events() -> impl Strategy<Value = Vec<(usize, u64)>> {
    proptest::collection::vec(
        (0usize..4, prop_oneof![3 => 0u64..50, 1 => 0u64..3_000]),
        0..400,
    )
}

fn source(index: usize) -> IpAddr {
    match index {
        0 => "192.0.2.1".parse().expect("address"),
        1 => "192.0.2.2".parse().expect("address"),
        2 => "2001:db8::1".parse().expect("address"),
        _ => "2001:db8::2".parse().expect("address"),
    }
}

/// The limiter's windows for one source: a window opens at an event and covers
/// `WINDOW` from there; the next event after it opens the next window. Returns
/// the window number of each event time, which depends on the times only.
fn window_numbers(times: &[Duration]) -> Vec<usize> {
    let mut numbers = Vec::with_capacity(times.len());
    let mut start: Option<Duration> = None;
    let mut number = 0;
    for &time in times {
        match start {
            Some(s) if time - s < WINDOW => {}
            Some(_) => {
                number += 1;
                start = Some(time);
            }
            None => start = Some(time),
        }
        numbers.push(number);
    }
    numbers
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Per source, the limiter allows the first `per_window` events of each
    /// window and drops the rest, so no window has more than `per_window`; any
    /// span of one window length has at most twice that, because a span can
    /// cover the end of one window and the start of the next. The suppressed
    /// count it reports with an allowed event is the number dropped since the
    /// previous allowed event of that source.
    #[test]
    fn limiter_allows_at_most_n_per_window(
        per_window in 1u32..6,
        events in limiter_events(),
    ) {
        let limiter = PerSourceLimiter::new(per_window, WINDOW);
        let base = Instant::now();
        let mut elapsed = Duration::ZERO;
        // Per source: (time, allowed, reported suppressed count).
        let mut per_source: Vec<Vec<(Duration, bool, u64)>> = vec![Vec::new(); 4];
        for (index, gap_ms) in events {
            elapsed += Duration::from_millis(gap_ms);
            let result = limiter.check(source(index), base + elapsed);
            per_source[index].push((elapsed, result.is_some(), result.unwrap_or(0)));
        }

        for log in &per_source {
            let times: Vec<Duration> = log.iter().map(|(time, _, _)| *time).collect();
            let windows = window_numbers(&times);
            let mut seen_in_window = 0u32;
            let mut dropped_since_allowed = 0u64;
            for (i, (_, allowed, suppressed)) in log.iter().enumerate() {
                if i > 0 && windows[i] != windows[i - 1] {
                    seen_in_window = 0;
                }
                seen_in_window += 1;
                prop_assert_eq!(*allowed, seen_in_window <= per_window, "event {} of its window", seen_in_window);
                if *allowed {
                    prop_assert_eq!(*suppressed, dropped_since_allowed);
                    dropped_since_allowed = 0;
                } else {
                    dropped_since_allowed += 1;
                }
            }

            let allowed_times: Vec<Duration> = log
                .iter()
                .filter(|(_, allowed, _)| *allowed)
                .map(|(time, _, _)| *time)
                .collect();
            for (i, start) in allowed_times.iter().enumerate() {
                let in_span = allowed_times[i..]
                    .iter()
                    .take_while(|time| **time - *start < WINDOW)
                    .count();
                prop_assert!(in_span <= 2 * per_window as usize, "{in_span} allowed within one window length");
            }
        }
    }
}

#[test]
fn preamble_accepts_only_version_and_zero_flags() {
    for version in 0..=u8::MAX {
        for flags in 0..=u8::MAX {
            let bytes = [version, flags];
            assert_eq!(
                parse_preamble(bytes).is_ok(),
                bytes == preamble(),
                "preamble {bytes:?}"
            );
        }
    }
}

const RESPONDER: &str = "http://127.0.0.1:1/";

fn ocsp_good(this_update: SystemTime, from_cache: bool) -> Checked {
    let valid_until = this_update + Duration::from_secs(3600);
    Checked {
        status: OcspStatus::Good {
            this_update,
            next_update: valid_until,
        },
        from_cache,
        fetched_at: this_update,
        this_update,
        valid_until,
        responder_url: RESPONDER.to_owned(),
    }
}

fn without_answer() -> impl Strategy<Value = SoftFailWithoutAnswer> {
    prop_oneof![
        Just(SoftFailWithoutAnswer::Admit),
        Just(SoftFailWithoutAnswer::Refuse),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// When the OCSP lookup fails, soft-fail admits on a cached good status
    /// exactly while it is at most `max_staleness` past its thisUpdate, and
    /// hard-fail never admits.
    #[test]
    fn ocsp_soft_fail_admits_within_staleness(
        max_staleness in 0u64..172_800,
        without_answer in without_answer(),
        exact in any::<bool>(),
        delta in -3i64..=3,
        anywhere in 0u64..400_000,
    ) {
        let this_update = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_UNIX as u64);
        let age = if exact {
            max_staleness.saturating_add_signed(delta)
        } else {
            anywhere
        };
        let now = this_update + Duration::from_secs(age);
        let cached = ocsp_good(this_update, true);
        let failure: Result<Checked, OcspError> = Err(OcspError::Timeout {
            url: RESPONDER.to_owned(),
            timeout: Duration::from_secs(2),
        });
        let soft = OcspMode::SoftFail {
            max_staleness: Duration::from_secs(max_staleness),
            without_answer,
        };

        let soft_decision = decide(&soft, &failure, Some(&cached), now);
        let hard_decision = decide(&OcspMode::HardFail, &failure, Some(&cached), now);

        prop_assert_eq!(
            soft_decision.is_admit(),
            age <= max_staleness,
            "age {}s, limit {}s: {:?}",
            age,
            max_staleness,
            soft_decision
        );
        prop_assert!(!hard_decision.is_admit(), "hard-fail admitted: {:?}", hard_decision);
    }
}
