//! Turns an OCSP lookup result into an admit or refuse decision.

use super::{format_time, Checked, OcspError, OcspStatus};
use std::time::{Duration, SystemTime};

/// The effect of OCSP results on admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcspMode {
    /// No OCSP check. A revoked status that the caller still passes in
    /// refuses all the same.
    Off,
    /// Admit when the lookup fails or returns "unknown", if a good status
    /// no older than `max_staleness` (counted from its thisUpdate) is
    /// cached. When no good status is cached, `without_answer` decides.
    SoftFail {
        max_staleness: Duration,
        without_answer: SoftFailWithoutAnswer,
    },
    /// Admit only on a verified good status.
    HardFail,
}

/// The soft-fail decision when the lookup fails and no good status for the
/// certificate is cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SoftFailWithoutAnswer {
    /// Admit, which is what soft-fail usually means. The default.
    #[default]
    Admit,
    Refuse,
}

/// The outcome of [`decide`], with a sentence for logs and the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OcspDecision {
    Admit { note: String },
    Refuse { reason: String },
}

impl OcspDecision {
    pub fn is_admit(&self) -> bool {
        matches!(self, OcspDecision::Admit { .. })
    }
}

/// Decides on admission from a lookup `result`, the status cached for the
/// certificate (`last_checked`, from
/// [`OcspChecker::cached`](super::OcspChecker::cached)) and the mode.
///
/// A revoked status, in `result` or cached, always refuses. Hard-fail
/// refuses on any error and on "unknown". Soft-fail treats an error and
/// "unknown" alike and falls back to `last_checked` as
/// [`OcspMode::SoftFail`] describes. Each failure is logged at warn level
/// with the responder URL, the mode and the outcome.
pub fn decide(
    mode: &OcspMode,
    result: &Result<Checked, OcspError>,
    last_checked: Option<&Checked>,
    now: SystemTime,
) -> OcspDecision {
    if let Ok(checked) = result {
        if let OcspStatus::Revoked {
            revocation_time,
            reason,
        } = checked.status
        {
            let reason_text = reason.map_or_else(
                || "no reason given".to_owned(),
                |reason| format!("reason {}", super::crl_reason_name(reason)),
            );
            return OcspDecision::Refuse {
                reason: format!(
                    "OCSP responder {} reports the device certificate revoked at {} ({reason_text})",
                    checked.responder_url,
                    format_time(revocation_time)
                ),
            };
        }
    }

    let (max_staleness, without_answer) = match mode {
        OcspMode::Off => {
            return OcspDecision::Admit {
                note: "OCSP checking is off".to_owned(),
            }
        }
        OcspMode::SoftFail {
            max_staleness,
            without_answer,
        } => (Some(*max_staleness), *without_answer),
        OcspMode::HardFail => (None, SoftFailWithoutAnswer::Refuse),
    };

    let (failure, responder) = match result {
        Ok(checked) if matches!(checked.status, OcspStatus::Good { .. }) => {
            let source = if checked.from_cache {
                "cached"
            } else {
                "fetched"
            };
            return OcspDecision::Admit {
                note: format!(
                    "OCSP status is good until {} ({source})",
                    format_time(checked.valid_until)
                ),
            };
        }
        Ok(checked) => (
            format!(
                "OCSP responder {} returned status unknown for the device certificate",
                checked.responder_url
            ),
            Some(checked.responder_url.as_str()),
        ),
        Err(error) => (error.to_string(), error.responder_url()),
    };

    let decision = match max_staleness {
        Some(max_staleness) => {
            soft_fail(&failure, max_staleness, without_answer, last_checked, now)
        }
        None => OcspDecision::Refuse {
            reason: format!("{failure}; OCSP mode hard-fail refuses without a good status"),
        },
    };
    let outcome = if decision.is_admit() {
        "admit"
    } else {
        "refuse"
    };
    tracing::warn!(
        responder = responder.unwrap_or("-"),
        mode = mode_name(mode),
        outcome,
        error = %failure,
        "OCSP check failed"
    );
    decision
}

fn soft_fail(
    failure: &str,
    max_staleness: Duration,
    without_answer: SoftFailWithoutAnswer,
    last_checked: Option<&Checked>,
    now: SystemTime,
) -> OcspDecision {
    let Some(last_checked) = last_checked else {
        return without_good_status(failure, without_answer);
    };
    match last_checked.status {
        OcspStatus::Revoked { .. } => OcspDecision::Refuse {
            reason: format!(
                "{failure}; the cached status from {} is revoked",
                last_checked.responder_url
            ),
        },
        OcspStatus::Good { this_update, .. } => {
            let age = now.duration_since(this_update).unwrap_or(Duration::ZERO);
            if age <= max_staleness {
                OcspDecision::Admit {
                    note: format!(
                        "{failure}; soft-fail admits on the cached good status from {} ({}s old, limit {}s)",
                        format_time(this_update),
                        age.as_secs(),
                        max_staleness.as_secs()
                    ),
                }
            } else {
                OcspDecision::Refuse {
                    reason: format!(
                        "{failure}; the cached good status from {} is {}s old, over the soft-fail limit of {}s",
                        format_time(this_update),
                        age.as_secs(),
                        max_staleness.as_secs()
                    ),
                }
            }
        }
        OcspStatus::Unknown => without_good_status(failure, without_answer),
    }
}

fn without_good_status(failure: &str, without_answer: SoftFailWithoutAnswer) -> OcspDecision {
    match without_answer {
        SoftFailWithoutAnswer::Admit => OcspDecision::Admit {
            note: format!("{failure}; soft-fail admits because no good status is cached"),
        },
        SoftFailWithoutAnswer::Refuse => OcspDecision::Refuse {
            reason: format!("{failure}; soft-fail refuses because no good status is cached"),
        },
    }
}

fn mode_name(mode: &OcspMode) -> &'static str {
    match mode {
        OcspMode::Off => "off",
        OcspMode::SoftFail { .. } => "soft-fail",
        OcspMode::HardFail => "hard-fail",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn start() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn checked(status: OcspStatus) -> Checked {
        Checked {
            status,
            from_cache: true,
            fetched_at: start(),
            this_update: start(),
            valid_until: start() + 5 * MINUTE,
            responder_url: "http://127.0.0.1:1/".to_owned(),
        }
    }

    fn good() -> Checked {
        checked(OcspStatus::Good {
            this_update: start(),
            next_update: start() + 5 * MINUTE,
        })
    }

    fn revoked() -> Checked {
        checked(OcspStatus::Revoked {
            revocation_time: start(),
            reason: None,
        })
    }

    fn failure() -> Result<Checked, OcspError> {
        Err(OcspError::TryLater {
            url: "http://127.0.0.1:1/".to_owned(),
        })
    }

    fn soft(without_answer: SoftFailWithoutAnswer) -> OcspMode {
        OcspMode::SoftFail {
            max_staleness: 30 * MINUTE,
            without_answer,
        }
    }

    #[test]
    fn decision_table() {
        let admit = SoftFailWithoutAnswer::Admit;
        let refuse = SoftFailWithoutAnswer::Refuse;
        let now = start() + 10 * MINUTE;
        let late = start() + 40 * MINUTE;
        let unknown = checked(OcspStatus::Unknown);
        let cases = [
            ("off, failure", OcspMode::Off, failure(), None, now, true),
            (
                "off, revoked",
                OcspMode::Off,
                Ok(revoked()),
                None,
                now,
                false,
            ),
            (
                "hard, good",
                OcspMode::HardFail,
                Ok(good()),
                None,
                now,
                true,
            ),
            (
                "hard, revoked",
                OcspMode::HardFail,
                Ok(revoked()),
                None,
                now,
                false,
            ),
            (
                "hard, unknown",
                OcspMode::HardFail,
                Ok(unknown.clone()),
                None,
                now,
                false,
            ),
            (
                "hard, failure with cache",
                OcspMode::HardFail,
                failure(),
                Some(good()),
                now,
                false,
            ),
            ("soft, good", soft(refuse), Ok(good()), None, now, true),
            (
                "soft, revoked",
                soft(admit),
                Ok(revoked()),
                Some(good()),
                now,
                false,
            ),
            (
                "soft, failure, fresh cache",
                soft(refuse),
                failure(),
                Some(good()),
                now,
                true,
            ),
            (
                "soft, failure, stale cache",
                soft(admit),
                failure(),
                Some(good()),
                late,
                false,
            ),
            (
                "soft, failure, cached revoked",
                soft(admit),
                failure(),
                Some(revoked()),
                now,
                false,
            ),
            (
                "soft, failure, no cache, admit",
                soft(admit),
                failure(),
                None,
                now,
                true,
            ),
            (
                "soft, failure, no cache, refuse",
                soft(refuse),
                failure(),
                None,
                now,
                false,
            ),
            (
                "soft, failure, cached unknown",
                soft(refuse),
                failure(),
                Some(unknown.clone()),
                now,
                false,
            ),
            (
                "soft, unknown, fresh cache",
                soft(refuse),
                Ok(unknown),
                Some(good()),
                now,
                true,
            ),
        ];
        for (name, mode, result, last, now, admitted) in cases {
            let decision = decide(&mode, &result, last.as_ref(), now);

            assert_eq!(decision.is_admit(), admitted, "{name}: {decision:?}");
        }
    }

    #[test]
    fn reasons_name_responder_and_limit() {
        let now = start() + 40 * MINUTE;

        let decision = decide(
            &soft(SoftFailWithoutAnswer::Admit),
            &failure(),
            Some(&good()),
            now,
        );

        let OcspDecision::Refuse { reason } = decision else {
            panic!("a stale status admitted: {decision:?}");
        };
        assert!(reason.contains("http://127.0.0.1:1/"), "{reason}");
        assert!(reason.contains("tryLater"), "{reason}");
        assert!(reason.contains("2400s old"), "{reason}");
        assert!(reason.contains("limit of 1800s"), "{reason}");
    }

    #[test]
    fn default_without_answer_is_admit() {
        assert_eq!(
            SoftFailWithoutAnswer::default(),
            SoftFailWithoutAnswer::Admit
        );
    }
}
