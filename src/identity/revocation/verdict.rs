//! The result of a revocation check and the decision it leads to.

use crate::policy::rfc3339_utc;

/// The revocation status of a chain. `depth` is 0 for the leaf and counts up
/// towards the trust anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationVerdict {
    /// Every checked certificate is covered by a fresh CRL that does not list
    /// it, and no push matches it.
    Good,
    Revoked {
        depth: usize,
        serial_hex: String,
        /// The CRL's file path or URL, or "pushed revocation".
        source: String,
        /// The CRL reasonCode name ("keyCompromise") or the push's reason.
        reason: Option<String>,
    },
    /// The covering CRL is past nextUpdate plus the grace period.
    Stale {
        depth: usize,
        source: String,
        /// Seconds since the CRL's thisUpdate.
        age_secs: i64,
        /// The CRL's nextUpdate, or thisUpdate plus the refresh interval for a
        /// CRL without one.
        expired_at: i64,
        /// Whether new connections are refused (`on_stale`).
        refuse: bool,
        /// Whether live sessions are closed (`stale_closes_sessions`).
        close_sessions: bool,
    },
    /// No loaded CRL covers the certificate at `depth`.
    NoData {
        depth: usize,
        /// Lower-case hex SHA-256 of the certificate's issuer Name.
        issuer_sha256: String,
        /// Whether new connections are refused (`without_crl`).
        refuse: bool,
    },
    /// The CA has no revocation configuration in the store.
    NotConfigured,
    /// A certificate of the chain could not be decoded.
    Unreadable { detail: String },
}

/// The decision a verdict leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationOutcome {
    /// Proceed. `note` explains why revocation was not fully checked.
    Admit { note: Option<String> },
    /// Reject, with a stable label for logs and metrics and a message.
    Refuse {
        reason_label: &'static str,
        message: String,
    },
}

impl RevocationVerdict {
    /// Returns the decision for a new connection.
    pub fn for_admission(&self) -> RevocationOutcome {
        self.outcome(false)
    }

    /// Returns the decision for a live session when revocation data changed.
    /// It is the admission decision, except that stale data closes a session
    /// only with `stale_closes_sessions`, and missing data never does. Data
    /// goes missing on a reconfiguration with new CA certificates, until the
    /// new CRLs load, which is no reason to cut every session of the CA.
    pub fn for_live_session(&self) -> RevocationOutcome {
        self.outcome(true)
    }

    fn outcome(&self, live: bool) -> RevocationOutcome {
        match self {
            RevocationVerdict::Good => RevocationOutcome::Admit { note: None },
            RevocationVerdict::NotConfigured => RevocationOutcome::Admit {
                note: Some("revocation checking is not configured for this CA".to_owned()),
            },
            RevocationVerdict::Revoked {
                depth,
                serial_hex,
                source,
                reason,
            } => RevocationOutcome::Refuse {
                reason_label: "certificate-revoked",
                message: format!(
                    "the {} with serial {serial_hex} is revoked according to {source}{}",
                    depth_name(*depth),
                    reason
                        .as_deref()
                        .map(|r| format!(" (reason: {r})"))
                        .unwrap_or_default()
                ),
            },
            RevocationVerdict::Stale {
                depth,
                source,
                expired_at,
                refuse,
                close_sessions,
                ..
            } => {
                let message = format!(
                    "the CRL for the {} from {source} expired at {} and no newer one could be \
                     loaded",
                    depth_name(*depth),
                    rfc3339_utc(*expired_at)
                );
                let refuse = if live {
                    *refuse && *close_sessions
                } else {
                    *refuse
                };
                if refuse {
                    RevocationOutcome::Refuse {
                        reason_label: "revocation-data-stale",
                        message,
                    }
                } else {
                    RevocationOutcome::Admit {
                        note: Some(message),
                    }
                }
            }
            RevocationVerdict::NoData {
                depth,
                issuer_sha256,
                refuse,
            } => {
                let message = format!(
                    "no CRL is loaded for the issuer (SHA-256 {issuer_sha256}) of the {}",
                    depth_name(*depth)
                );
                if *refuse && !live {
                    RevocationOutcome::Refuse {
                        reason_label: "revocation-data-missing",
                        message,
                    }
                } else {
                    RevocationOutcome::Admit {
                        note: Some(message),
                    }
                }
            }
            RevocationVerdict::Unreadable { detail } => RevocationOutcome::Refuse {
                reason_label: "bad-encoding",
                message: format!("revocation check failed: {detail}"),
            },
        }
    }

    /// Short label for the `outcome` label of `ztgate_revocation_checks_total`.
    pub fn label(&self) -> &'static str {
        match self {
            RevocationVerdict::Good => "good",
            RevocationVerdict::Revoked { .. } => "revoked",
            RevocationVerdict::Stale { .. } => "stale",
            RevocationVerdict::NoData { .. } => "no_data",
            RevocationVerdict::NotConfigured => "not_configured",
            RevocationVerdict::Unreadable { .. } => "unreadable",
        }
    }

    /// Returns whether the verdict refuses a new connection.
    pub fn refuses(&self) -> bool {
        matches!(self.for_admission(), RevocationOutcome::Refuse { .. })
    }
}

fn depth_name(depth: usize) -> String {
    if depth == 0 {
        "device certificate".to_owned()
    } else {
        format!("intermediate CA certificate at depth {depth}")
    }
}
