//! A decision cache in front of an engine: bounded, honouring each allow's
//! lifetime, merging identical concurrent requests into one evaluation, and
//! writing the audit line of every decision.

use super::{Decision, DecisionFuture, PolicyClient, PolicyError, PolicyInput};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// The inputs a cached decision depends on. Time of day is not part of the
/// key, so a policy that depends on it must give allows a lifetime that ends
/// when its answer could change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    cert_sha256: String,
    application: String,
    client_address: std::net::IpAddr,
    transport: &'static str,
    posture: u64,
}

impl CacheKey {
    fn of(input: &PolicyInput) -> CacheKey {
        let mut posture = std::collections::hash_map::DefaultHasher::new();
        input.session.posture.to_string().hash(&mut posture);
        CacheKey {
            cert_sha256: input.device.cert_sha256.clone(),
            application: input.application.name.clone(),
            client_address: input.network.client_address,
            transport: input.network.transport.as_str(),
            posture: posture.finish(),
        }
    }
}

type Shared = Result<Decision, PolicyError>;

#[derive(Default)]
struct State {
    entries: HashMap<CacheKey, (Decision, Instant)>,
    order: VecDeque<CacheKey>,
    in_flight: HashMap<CacheKey, broadcast::Sender<Shared>>,
}

/// The cache and audit wrapper around one engine.
pub struct CachedPolicy {
    engine: Arc<dyn PolicyClient>,
    capacity: usize,
    state: Mutex<State>,
}

impl CachedPolicy {
    /// `capacity` 0 turns caching off; the audit line is written either way.
    pub fn new(engine: Arc<dyn PolicyClient>, capacity: usize) -> CachedPolicy {
        CachedPolicy {
            engine,
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    fn lookup(&self, key: &CacheKey, now: Instant) -> Option<Decision> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .entries
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(d, _)| d.clone())
    }

    fn store(&self, key: CacheKey, decision: &Decision, now: Instant) {
        let Decision::Allow { lifetime, .. } = decision else {
            return;
        };
        if self.capacity == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.entries.contains_key(&key) {
            while state.entries.len() >= self.capacity {
                let Some(oldest) = state.order.pop_front() else {
                    break;
                };
                state.entries.remove(&oldest);
            }
            state.order.push_back(key.clone());
        }
        state
            .entries
            .insert(key, (decision.clone(), now + *lifetime));
    }

    /// Number of cached decisions, expired ones included until evicted.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn evaluate(&self, input: &PolicyInput) -> Result<Decision, PolicyError> {
        let started = Instant::now();
        let key = CacheKey::of(input);
        if let Some(decision) = self.lookup(&key, started) {
            audit(
                self.engine.engine(),
                input,
                Ok(&decision),
                started.elapsed(),
                true,
            );
            return Ok(decision);
        }
        // Join an identical evaluation in flight, or become its leader.
        let follower = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match state.in_flight.get(&key) {
                Some(sender) => Some(sender.subscribe()),
                None => {
                    let (sender, _) = broadcast::channel(1);
                    state.in_flight.insert(key.clone(), sender);
                    None
                }
            }
        };
        if let Some(mut receiver) = follower {
            if let Ok(result) = receiver.recv().await {
                audit(
                    self.engine.engine(),
                    input,
                    result.as_ref(),
                    started.elapsed(),
                    true,
                );
                return result;
            }
            // The leader was dropped before it finished; evaluate directly.
        }
        let result = self.engine.decide(input).await;
        if let Ok(decision) = &result {
            self.store(key.clone(), decision, Instant::now());
        }
        if let Some(sender) = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight
            .remove(&key)
        {
            let _ = sender.send(result.clone());
        }
        audit(
            self.engine.engine(),
            input,
            result.as_ref(),
            started.elapsed(),
            false,
        );
        result
    }
}

/// Writes one audit line per decision on the `ztgate::audit` target.
fn audit(
    engine: &'static str,
    input: &PolicyInput,
    result: Result<&Decision, &PolicyError>,
    latency: Duration,
    cache_hit: bool,
) {
    let latency_us = latency.as_micros() as u64;
    let outcome = result.map(|d| d.outcome()).unwrap_or("error");
    metrics::counter!(crate::telemetry::metrics::POLICY_DECISIONS_TOTAL, "engine" => engine, "outcome" => outcome)
        .increment(1);
    metrics::histogram!(crate::telemetry::metrics::POLICY_DECISION_SECONDS, "engine" => engine)
        .record(latency.as_secs_f64());
    match result {
        Ok(decision) => {
            let reason = match decision {
                Decision::Allow { .. } => "",
                Decision::Deny { reason, .. } | Decision::StepUp { reason, .. } => reason,
            };
            tracing::info!(
                target: "ztgate::audit",
                kind = "decision",
                device = %input.device.device_id,
                application = %input.application.name,
                client = %input.network.client_address,
                engine,
                outcome = decision.outcome(),
                rule = decision.rule(),
                reason,
                latency_us,
                cache_hit,
            );
        }
        Err(error) => tracing::info!(
            target: "ztgate::audit",
            kind = "decision",
            device = %input.device.device_id,
            application = %input.application.name,
            client = %input.network.client_address,
            engine,
            outcome = "error",
            rule = "",
            reason = %error,
            latency_us,
            cache_hit,
        ),
    }
}

impl PolicyClient for CachedPolicy {
    fn engine(&self) -> &'static str {
        self.engine.engine()
    }

    fn decide<'a>(&'a self, input: &'a PolicyInput) -> DecisionFuture<'a> {
        Box::pin(self.evaluate(input))
    }
}
