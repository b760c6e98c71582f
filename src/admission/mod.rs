//! Admission: the checks that run after every handshake, full or resumed,
//! and again whenever a session is re-evaluated. A resumed TLS 1.3
//! handshake skips certificate verification, so the stored chain is checked
//! again here against the trust anchors in force now.

use crate::config::{Application, Generation};
use crate::identity::{extract_identity, CertSummary, DeviceIdentity};
use crate::policy::{
    rfc3339_utc, AppInput, Decision, NetworkInput, PolicyInput, SessionInput, Transport,
};
use crate::protocol::Code;
use rustls::pki_types::{CertificateDer, UnixTime};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How soon a decision made without the engine is evaluated again.
pub const POLICY_FAILURE_RETRY: Duration = Duration::from_secs(10);

/// Inputs of one admission.
pub struct AdmissionRequest<'a> {
    /// The peer's chain, leaf first, as rustls stored it.
    pub chain: &'a [CertificateDer<'a>],
    pub server_name: Option<&'a str>,
    /// The validated, canonical client address.
    pub client: SocketAddr,
    /// Validated client address changes since the session started.
    pub path_changes: u32,
    /// The validated client address before the latest change.
    pub previous_address: Option<SocketAddr>,
    pub transport: Transport,
    pub now: SystemTime,
    pub session_started: Option<Instant>,
    pub previous: Option<&'static str>,
    /// The OCSP client, when the gateway has one.
    pub ocsp: Option<&'a crate::identity::ocsp::OcspChecker>,
    /// Posture attributes pushed for devices.
    pub posture: Option<&'a crate::policy::PostureStore>,
    /// CRLs and pushed revocations.
    pub crl: Option<&'a crate::identity::revocation::RevocationStore>,
    /// A step-up decision admits the session with its new streams held
    /// (a live QUIC session) instead of refusing it.
    pub allow_step_up: bool,
}

/// When a session must next be looked at.
#[derive(Debug, Clone)]
pub struct Deadline {
    pub at: Instant,
    /// True when the decision expires (evaluate again), false when the
    /// certificate or the maximum session length ends the session.
    pub reevaluate: bool,
    pub reason: String,
}

/// A successful admission.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub identity: Arc<DeviceIdentity>,
    pub ca_name: Arc<str>,
    pub application: Arc<Application>,
    pub decision: Decision,
    pub deadline: Option<Deadline>,
}

/// A refused admission, with what is known of the device for the log.
#[derive(Debug, Clone)]
pub struct Refused {
    pub code: Code,
    pub reason: String,
    pub remediation: Option<String>,
    pub device: Option<String>,
    pub application: Option<String>,
    pub rule: Option<String>,
}

impl Refused {
    fn new(code: Code, reason: impl Into<String>) -> Refused {
        Refused {
            code,
            reason: reason.into(),
            remediation: None,
            device: None,
            application: None,
            rule: None,
        }
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Runs the admission checks in order: chain and validity, application,
/// identity, policy. Never blocks the calling task.
pub async fn admit(
    generation: &Generation,
    req: &AdmissionRequest<'_>,
) -> Result<Admitted, Refused> {
    let Some((leaf, intermediates)) = req.chain.split_first() else {
        return Err(Refused::new(
            Code::CertificateUntrusted,
            "no client certificate was presented",
        ));
    };
    let now_unix = unix_seconds(req.now);
    let unix_time = UnixTime::since_unix_epoch(Duration::from_secs(now_unix.max(0) as u64));
    let verified = generation
        .trust
        .verify(leaf, intermediates, unix_time)
        .map_err(|e| {
            let summary: CertSummary = crate::identity::summarize_certificate(leaf);
            let mut r = Refused::new(Code::CertificateUntrusted, e.to_string());
            r.device = Some(format!(
                "unverified {} serial {}",
                summary.subject, summary.serial_hex
            ));
            r
        })?;

    let server_name = req.server_name.unwrap_or("");
    let Some(application) = generation.application(server_name).cloned() else {
        let mut r = Refused::new(
            Code::UnknownApplication,
            if server_name.is_empty() {
                "the client sent no TLS server name, so no application is selected".to_string()
            } else {
                format!("no application is configured for server name {server_name:?}")
            },
        );
        r.application = Some(server_name.to_string());
        return Err(r);
    };

    if let Some(refused) = check_crl(req, leaf, &verified, now_unix, &application.name) {
        return Err(refused);
    }
    check_ocsp(req, leaf, &verified, &application).await?;

    let identity =
        extract_identity(leaf, generation.hardware_bound_oid.as_deref()).map_err(|e| {
            let summary = crate::identity::summarize_certificate(leaf);
            let mut r = Refused::new(Code::InvalidIdentity, e.to_string());
            r.device = Some(format!("{} serial {}", summary.subject, summary.serial_hex));
            r.application = Some(application.name.clone());
            r
        })?;
    let identity = Arc::new(identity);

    let age = req.session_started.map_or(0, |s| s.elapsed().as_secs());
    let input = PolicyInput {
        device: (*identity).clone(),
        issuing_ca: verified.ca_name.to_string(),
        application: AppInput {
            name: application.name.clone(),
            server_name: application.server_name.clone(),
            labels: application.labels.clone(),
        },
        network: NetworkInput {
            client_address: req.client.ip(),
            client_port: req.client.port(),
            transport: req.transport,
            path_changes: req.path_changes,
            previous_address: req.previous_address,
        },
        time: rfc3339_utc(now_unix),
        now_unix,
        session: SessionInput {
            age_secs: age,
            previous_decision: req.previous,
            posture: req
                .posture
                .map(|p| p.get(&identity.device_id))
                .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new())),
        },
    };
    let policy = &generation.policy;
    let timeout = generation.timeouts.admission;
    let outcome = match tokio::time::timeout(timeout, policy.decide(&input)).await {
        Ok(Ok(decision)) => Ok(decision),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "policy engine {} did not answer within {timeout:?}",
            policy.engine()
        )),
    };
    let decision = match outcome {
        Ok(decision) => decision,
        Err(message) if application.admit_on_policy_failure => {
            tracing::warn!(device = %identity.device_id, app = %application.name, error = %message, "policy engine failed; admitting because the application admits on policy failure");
            Decision::Allow {
                lifetime: POLICY_FAILURE_RETRY,
                max_session: None,
                rule: "on-policy-failure:admit".into(),
            }
        }
        Err(message) => {
            let mut r = Refused::new(Code::PolicyUnavailable, message);
            r.device = Some(identity.device_id.clone());
            r.application = Some(application.name.clone());
            return Err(r);
        }
    };
    let refusal = |code, reason: &str, remediation: Option<String>, rule: &str| Refused {
        code,
        reason: reason.to_string(),
        remediation,
        device: Some(identity.device_id.clone()),
        application: Some(application.name.clone()),
        rule: Some(rule.to_string()),
    };
    match &decision {
        Decision::Allow { .. } => {}
        Decision::Deny {
            reason,
            remediation,
            rule,
        } => {
            return Err(refusal(
                Code::PolicyDenied,
                reason,
                remediation.clone(),
                rule,
            ))
        }
        Decision::StepUp { grace, .. } if req.allow_step_up => {
            let grace = *grace;
            return Ok(Admitted {
                identity,
                ca_name: verified.ca_name,
                application,
                decision,
                deadline: Some(Deadline {
                    at: Instant::now() + grace,
                    reevaluate: true,
                    reason: "the step-up grace period ended".into(),
                }),
            });
        }
        Decision::StepUp {
            reason,
            challenge,
            rule,
            ..
        } => {
            return Err(refusal(
                Code::StepUpRequired,
                &format!("{reason}; complete the step-up at {challenge} and reconnect"),
                Some(challenge.clone()),
                rule,
            ))
        }
    }
    let deadline = deadline_for(
        &decision,
        &identity,
        now_unix,
        req.session_started,
        generation.timeouts.max_session,
    );
    Ok(Admitted {
        identity,
        ca_name: verified.ca_name,
        application,
        decision,
        deadline,
    })
}

/// Returns the earliest of the decision's expiry, the certificate's notAfter
/// and the maximum session length. On a tie the session ends instead of being
/// evaluated again. A time past the range of `Instant` is never reached, so it
/// is left out instead of overflowing.
pub fn deadline_for(
    decision: &Decision,
    identity: &DeviceIdentity,
    now_unix: i64,
    session_started: Option<Instant>,
    configured_max: Option<Duration>,
) -> Option<Deadline> {
    let now = Instant::now();
    let started = session_started.unwrap_or(now);
    let mut candidates: Vec<Deadline> = Vec::with_capacity(3);
    if let Decision::Allow {
        lifetime,
        max_session,
        ..
    } = decision
    {
        if let Some(at) = now.checked_add(*lifetime) {
            candidates.push(Deadline {
                at,
                reevaluate: true,
                reason: "the policy decision expired".into(),
            });
        }
        let max = match (max_session, configured_max) {
            (Some(a), Some(b)) => Some((*a).min(b)),
            (a, b) => a.or(b),
        };
        if let Some(max) = max {
            if let Some(at) = started.checked_add(max) {
                candidates.push(Deadline {
                    at,
                    reevaluate: false,
                    reason: format!(
                        "the session reached its maximum length of {}s",
                        max.as_secs()
                    ),
                });
            }
        }
    }
    let remaining = identity.not_after_unix.saturating_sub(now_unix);
    if let Some(at) = u64::try_from(remaining)
        .ok()
        .and_then(|secs| now.checked_add(Duration::from_secs(secs)))
    {
        candidates.push(Deadline {
            at,
            reevaluate: false,
            reason: "the device certificate expired".into(),
        });
    }
    // false sorts first, so a deadline that ends the session wins a tie.
    candidates.into_iter().min_by_key(|d| (d.at, d.reevaluate))
}

/// Asks OCSP about the leaf when the application's mode wants it.
async fn check_ocsp(
    req: &AdmissionRequest<'_>,
    leaf: &CertificateDer<'_>,
    verified: &crate::identity::VerifiedChain,
    application: &Application,
) -> Result<(), Refused> {
    use crate::identity::ocsp::{decide, OcspDecision, OcspMode, OcspStatus};
    if matches!(application.ocsp, OcspMode::Off) {
        return Ok(());
    }
    let Some(checker) = req.ocsp else {
        return Ok(());
    };
    let result = checker.status(leaf, &verified.issuer, req.now).await;
    let last = checker.cached(leaf, &verified.issuer);
    let revoked = matches!(&result, Ok(c) if matches!(c.status, OcspStatus::Revoked { .. }));
    match decide(&application.ocsp, &result, last.as_ref(), req.now) {
        OcspDecision::Admit { .. } => Ok(()),
        OcspDecision::Refuse { reason } => {
            let summary = crate::identity::summarize_certificate(leaf);
            let code = if revoked {
                Code::CertificateRevoked
            } else {
                Code::RevocationUnknown
            };
            let mut r = Refused::new(code, reason);
            r.device = Some(format!("{} serial {}", summary.subject, summary.serial_hex));
            r.application = Some(application.name.clone());
            r.rule = Some("ocsp".into());
            Err(r)
        }
    }
}

/// Checks the chain against the CRLs and pushed revocations in memory, and
/// remembers the leaf's CRL distribution points for the refresher. Returns
/// the refusal when the chain must not be admitted.
fn check_crl(
    req: &AdmissionRequest<'_>,
    leaf: &CertificateDer<'_>,
    verified: &crate::identity::VerifiedChain,
    now_unix: i64,
    application: &str,
) -> Option<Refused> {
    use crate::identity::revocation::RevocationOutcome;
    let store = req.crl?;
    let mut chain: Vec<CertificateDer<'_>> = Vec::with_capacity(1 + verified.path.len());
    chain.push(CertificateDer::from(leaf.as_ref()));
    chain.extend(
        verified
            .path
            .iter()
            .map(|c| CertificateDer::from(c.as_ref())),
    );
    let verdict = store.check(&verified.ca_name, &chain, now_unix);
    let outcome = if req.session_started.is_some() {
        verdict.for_live_session()
    } else {
        if let Ok(urls) = crate::identity::crl::distribution_point_uris(leaf) {
            if !urls.is_empty() {
                store.learn_distribution_points(&verified.ca_name, &urls);
            }
        }
        verdict.for_admission()
    };
    match outcome {
        RevocationOutcome::Admit { .. } => None,
        RevocationOutcome::Refuse {
            reason_label,
            message,
        } => {
            let code = if reason_label == "certificate-revoked" {
                Code::CertificateRevoked
            } else {
                Code::RevocationUnknown
            };
            let summary = crate::identity::summarize_certificate(leaf);
            let mut r = Refused::new(code, message);
            r.device = Some(format!("{} serial {}", summary.subject, summary.serial_hex));
            r.application = Some(application.to_string());
            r.rule = Some(format!("crl:{reason_label}"));
            Some(r)
        }
    }
}
