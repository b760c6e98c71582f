//! The session supervisor: one select over everything that can end a
//! session, with re-evaluation when the decision expires or the config changes.

use super::SessionEntry;
use crate::admission::{self, AdmissionRequest, Admitted, Deadline};
use crate::config::{Application, ConfigHandle};
use crate::policy::Transport;
use crate::protocol::Code;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// A request to end a session, with the code and reason sent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: Code,
    pub reason: String,
    pub remediation: Option<String>,
}

impl CloseRequest {
    pub fn new(code: Code, reason: impl Into<String>) -> CloseRequest {
        CloseRequest {
            code,
            reason: reason.into(),
            remediation: None,
        }
    }
}

/// Whether new streams of a session may reach the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamGate {
    Open,
    /// A step-up is pending: new streams wait.
    Held,
    /// The session is ending: waiting streams are reset.
    Closed,
}

/// The session side of a step-up: the gate new streams wait on, and the
/// channel that carries the challenge to the client's control stream.
pub struct StepUpControl {
    pub gate: watch::Sender<StreamGate>,
    /// Boxed messages: the channel allocates room for 32 of its items
    /// per connection up front, 8 bytes each this way.
    pub messages: tokio::sync::mpsc::UnboundedSender<Box<crate::protocol::ControlMessage>>,
    /// When the pending step-up started, if one is pending.
    pub since: Option<Instant>,
}

/// What the supervisor needs to re-evaluate a session.
pub struct SessionState {
    pub chain: super::SessionChain,
    pub server_name: Option<String>,
    pub transport: Transport,
    /// The validated client address.
    pub client: SocketAddr,
    /// Validated client address changes since the session started.
    pub path_changes: u32,
    /// The validated client address before the latest change.
    pub previous_address: Option<SocketAddr>,
    pub started: Instant,
    pub admitted: Admitted,
    /// The application as of the latest evaluation; streams opened later
    /// use it, so a reload that changes the upstream applies to them.
    pub application: Arc<ArcSwap<Application>>,
    /// When the policy engine started failing for this session, if it is failing.
    pub policy_outage_since: Option<Instant>,
    pub ocsp: Option<crate::identity::ocsp::OcspChecker>,
    pub posture: Option<Arc<crate::policy::PostureStore>>,
    pub crl: Option<Arc<crate::identity::revocation::RevocationStore>>,
    /// The registry entry. It records each evaluation and carries the
    /// requests to close the session or to evaluate it now (a posture push).
    pub entry: Arc<SessionEntry>,
    /// Step-up handling inside the session; `None` where a step-up ends the
    /// session instead (the TLS-over-TCP ingress).
    pub step_up: Option<StepUpControl>,
}

/// Waits until the session must end and returns why. Re-evaluates the
/// session when its decision expires, whenever a new config generation is in
/// force, and when `addresses` brings a new validated client address. The
/// certificate's notAfter and the maximum session length end it without
/// re-evaluation. A transport whose address cannot change passes a receiver
/// whose sender is dropped.
pub async fn supervise(
    state: &mut SessionState,
    config: &ConfigHandle,
    shutdown: &mut watch::Receiver<bool>,
    addresses: &mut watch::Receiver<SocketAddr>,
) -> CloseRequest {
    let mut generations = config.subscribe();
    generations.mark_unchanged();
    let mut addresses_open = true;
    let (mut crl_changes, mut crl_open) = match &state.crl {
        Some(store) => {
            let mut rx = store.subscribe();
            rx.mark_unchanged();
            (rx, true)
        }
        None => (tokio::sync::watch::channel(0u64).1, false),
    };
    loop {
        if let Some(request) = state.entry.close_request() {
            return request;
        }
        if *shutdown.borrow_and_update() {
            return drain(state, config).await;
        }
        let deadline = state.admitted.deadline.clone();
        let sleep = async {
            match deadline.as_ref() {
                Some(d) => tokio::time::sleep_until(d.at.into()).await,
                None => std::future::pending::<()>().await,
            }
        };
        let entry = state.entry.clone();
        tokio::select! {
            request = entry.closed() => return request,
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return drain(state, config).await;
                }
            }
            changed = crl_changes.changed(), if crl_open => {
                if changed.is_err() {
                    crl_open = false;
                    continue;
                }
                if let Some(request) = recheck_revocation(state) {
                    return request;
                }
            }
            _ = entry.reevaluate.notified() => {
                if let Err(request) = reevaluate(state, config, "requested").await {
                    return request;
                }
            }
            changed = addresses.changed(), if addresses_open => {
                if changed.is_err() {
                    addresses_open = false;
                    continue;
                }
                let address = *addresses.borrow_and_update();
                if address != state.client {
                    state.previous_address = Some(state.client);
                    state.client = address;
                    state.path_changes = state.path_changes.saturating_add(1);
                    if let Err(request) = reevaluate(state, config, "path-change").await {
                        return request;
                    }
                }
            }
            changed = generations.changed() => {
                if changed.is_ok() {
                    if let Err(request) = reevaluate(state, config, "config-reload").await {
                        return request;
                    }
                }
            }
            _ = sleep => {
                let Some(d) = deadline else { continue };
                if d.reevaluate {
                    if let Err(request) = reevaluate(state, config, "decision-expired").await {
                        return request;
                    }
                } else {
                    return CloseRequest::new(Code::SessionExpired, d.reason);
                }
            }
        }
    }
}

/// Evaluates the session again. Boxed: a re-evaluation is rare, and its
/// state would otherwise take room in every session's task for the whole
/// life of the session.
fn reevaluate<'a>(
    state: &'a mut SessionState,
    config: &'a ConfigHandle,
    trigger: &'static str,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CloseRequest>> + Send + 'a>> {
    Box::pin(evaluate_again(state, config, trigger))
}

async fn evaluate_again(
    state: &mut SessionState,
    config: &ConfigHandle,
    trigger: &'static str,
) -> Result<(), CloseRequest> {
    let generation = config.current();
    let chain = state.chain.ders();
    let request = AdmissionRequest {
        chain: &chain,
        server_name: state.server_name.as_deref(),
        client: state.client,
        path_changes: state.path_changes,
        previous_address: state.previous_address,
        transport: state.transport,
        now: SystemTime::now(),
        session_started: Some(state.started),
        previous: Some(state.admitted.decision.outcome()),
        ocsp: state.ocsp.as_ref(),
        posture: state.posture.as_deref(),
        crl: state.crl.as_deref(),
        allow_step_up: state.step_up.is_some(),
    };
    let outcome = admission::admit(&generation, &request).await;
    state.entry.evaluations.fetch_add(1, Ordering::Relaxed);
    *state
        .entry
        .evaluated_client
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = state.client;
    match outcome {
        Ok(admitted) => {
            state.policy_outage_since = None;
            if let crate::policy::Decision::StepUp {
                challenge,
                grace,
                reason,
                ..
            } = &admitted.decision
            {
                return step_up(state, admitted.clone(), challenge, *grace, reason, trigger);
            }
            if let Some(control) = state.step_up.as_mut() {
                if control.since.take().is_some() {
                    tracing::info!(trigger, "step-up satisfied; held streams released");
                }
                control.gate.send_replace(StreamGate::Open);
            }
            tracing::debug!(
                trigger,
                client = %state.client,
                rule = admitted.decision.rule(),
                "session re-evaluated: allowed"
            );
            state.application.store(admitted.application.clone());
            state.admitted = admitted;
            Ok(())
        }
        Err(refusal) if refusal.code == Code::PolicyUnavailable => {
            // The engine is failing: keep the last allow for the grace period,
            // trying again meanwhile, then close.
            let grace = generation.timeouts.policy_failure_grace;
            let now = Instant::now();
            let since = *state.policy_outage_since.get_or_insert(now);
            let Some(retry_at) = policy_outage_retry_at(grace, since, now) else {
                tracing::info!(trigger, reason = %refusal.reason, grace = ?grace, "policy engine still failing after the grace period; closing the session");
                return Err(CloseRequest {
                    code: refusal.code,
                    reason: refusal.reason,
                    remediation: None,
                });
            };
            let left = grace.saturating_sub(now.saturating_duration_since(since));
            tracing::warn!(trigger, reason = %refusal.reason, grace_left = ?left, "policy engine failing; the session keeps its last decision for now");
            state.admitted.deadline = Some(Deadline {
                at: retry_at,
                reevaluate: true,
                reason: "policy engine failing".into(),
            });
            Ok(())
        }
        Err(refusal) => {
            tracing::info!(
                trigger,
                client = %state.client,
                code = refusal.code.name(),
                reason = %refusal.reason,
                "session re-evaluated: closing"
            );
            Err(CloseRequest {
                code: refusal.code,
                reason: refusal.reason,
                remediation: refusal.remediation,
            })
        }
    }
}

/// Returns when to evaluate again a session whose policy engine has failed
/// since `outage_since`: after `POLICY_FAILURE_RETRY` at most, and no later
/// than the end of the failure `grace`. Returns `None` once the grace has run
/// out, when the session must close.
pub(crate) fn policy_outage_retry_at(
    grace: Duration,
    outage_since: Instant,
    now: Instant,
) -> Option<Instant> {
    let left = grace.saturating_sub(now.saturating_duration_since(outage_since));
    if left.is_zero() {
        return None;
    }
    Some(now + left.min(admission::POLICY_FAILURE_RETRY))
}

/// Checks the session's chain against changed revocation data, without a
/// full re-evaluation. Missing data never closes a live session, and stale
/// data only when the CA is configured so.
fn recheck_revocation(state: &SessionState) -> Option<CloseRequest> {
    use crate::identity::revocation::RevocationOutcome;
    let store = state.crl.as_ref()?;
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let verdict = store.check(&state.admitted.ca_name, &state.chain.ders(), now);
    match verdict.for_live_session() {
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
            tracing::info!(reason = reason_label, detail = %message, "revocation data changed; closing the session");
            Some(CloseRequest::new(code, message))
        }
    }
}

/// Holds new streams and sends the challenge on the first step-up decision;
/// closes the session when the grace period ends without an allow.
fn step_up(
    state: &mut SessionState,
    admitted: Admitted,
    challenge: &str,
    grace: std::time::Duration,
    reason: &str,
    trigger: &'static str,
) -> Result<(), CloseRequest> {
    let Some(control) = state.step_up.as_mut() else {
        return Err(CloseRequest::new(Code::StepUpRequired, reason.to_string()));
    };
    let since = match control.since {
        Some(since) => since,
        None => {
            let now = Instant::now();
            control.since = Some(now);
            control.gate.send_replace(StreamGate::Held);
            let _ = control
                .messages
                .send(Box::new(crate::protocol::ControlMessage::StepUp(
                    crate::protocol::StepUp {
                        challenge: challenge.to_string(),
                        grace_secs: grace.as_secs(),
                        reason: reason.to_string(),
                    },
                )));
            tracing::info!(trigger, challenge, grace = ?grace, "step-up required; new streams are held");
            now
        }
    };
    if since.elapsed() >= grace {
        control.gate.send_replace(StreamGate::Closed);
        return Err(CloseRequest {
            code: Code::StepUpRequired,
            reason: format!("{reason}; the step-up at {challenge} was not completed in time"),
            remediation: Some(challenge.to_string()),
        });
    }
    let mut admitted = admitted;
    admitted.deadline = Some(Deadline {
        at: since + grace,
        reevaluate: true,
        reason: "the step-up grace period ended".into(),
    });
    state.application.store(admitted.application.clone());
    state.admitted = admitted;
    Ok(())
}

/// Tells the client the gateway is going away, lets the session's streams
/// finish until `gateway.drain_secs` runs out, then asks for the close.
async fn drain(state: &SessionState, config: &ConfigHandle) -> CloseRequest {
    let drain = config.current().timeouts.drain;
    if let Some(control) = &state.step_up {
        let _ = control
            .messages
            .send(Box::new(crate::protocol::ControlMessage::GoingAway(
                crate::protocol::GoingAway {
                    drain_secs: drain.as_secs(),
                    reason: "the gateway is shutting down".into(),
                },
            )));
    }
    let deadline = tokio::time::Instant::now() + drain;
    while state.entry.streams_active.load(Ordering::Relaxed) > 0 {
        if let Some(request) = state.entry.close_request() {
            return request;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    CloseRequest::new(Code::GoingAway, "the gateway is shutting down")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_time::near_edge;
    use proptest::prelude::*;

    proptest! {
        /// During a policy engine outage the last allow is kept exactly while
        /// less than the failure grace has passed, and the next evaluation is
        /// never later than the end of the grace or one retry interval away.
        #[test]
        fn outage_keeps_decision_only_within_grace(
            grace_ms in 0u64..120_000,
            exact in any::<bool>(),
            delta in -3i64..=3,
            anywhere in 0u64..240_000,
        ) {
            let since = Instant::now();
            let grace = Duration::from_millis(grace_ms);
            let elapsed_ms = near_edge(grace_ms, delta, anywhere, exact);
            let now = since + Duration::from_millis(elapsed_ms);

            let retry_at = policy_outage_retry_at(grace, since, now);

            match retry_at {
                Some(at) => {
                    prop_assert!(elapsed_ms < grace_ms, "kept after {} ms of a {} ms grace", elapsed_ms, grace_ms);
                    prop_assert!(at > now);
                    prop_assert!(at <= since + grace, "retry after the grace ends");
                    prop_assert!(at <= now + admission::POLICY_FAILURE_RETRY);
                }
                None => prop_assert!(elapsed_ms >= grace_ms, "closed after {} ms of a {} ms grace", elapsed_ms, grace_ms),
            }
        }
    }
}
