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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_time::near_edge;
    use proptest::prelude::*;

    /// An engine that is never called, because these tests call `store` and
    /// `lookup` directly.
    struct NoEngine;

    impl PolicyClient for NoEngine {
        fn engine(&self) -> &'static str {
            "none"
        }

        fn decide<'a>(&'a self, _input: &'a PolicyInput) -> DecisionFuture<'a> {
            Box::pin(async {
                Err(PolicyError::Engine {
                    engine: "none",
                    message: "not used in this test".to_owned(),
                })
            })
        }
    }

    fn key() -> CacheKey {
        CacheKey {
            cert_sha256: "00".repeat(32),
            application: "app".to_owned(),
            client_address: std::net::IpAddr::from([127, 0, 0, 1]),
            transport: "tcp",
            posture: 0,
        }
    }

    fn allow(lifetime_ms: u64) -> Decision {
        Decision::Allow {
            lifetime: Duration::from_millis(lifetime_ms),
            max_session: None,
            rule: "test".to_owned(),
        }
    }

    fn deny() -> Decision {
        Decision::Deny {
            reason: "denied".to_owned(),
            remediation: None,
            rule: "test".to_owned(),
        }
    }

    proptest! {
        /// An allow is served exactly before the expiry its lifetime gives,
        /// counted from when it was stored, and never at or after it.
        #[test]
        fn allow_served_only_before_expiry(
            stored_ms in 0u64..10_000,
            lifetime_ms in 0u64..100_000,
            exact in any::<bool>(),
            delta in -3i64..=3,
            anywhere in 0u64..200_000,
        ) {
            let base = Instant::now();
            let cache = CachedPolicy::new(Arc::new(NoEngine), 8);
            let expiry_ms = stored_ms + lifetime_ms;
            let now_ms = near_edge(expiry_ms, delta, anywhere, exact);

            cache.store(key(), &allow(lifetime_ms), base + Duration::from_millis(stored_ms));
            let served = cache.lookup(&key(), base + Duration::from_millis(now_ms));

            prop_assert_eq!(served.is_some(), now_ms < expiry_ms, "lookup at {} ms, expiry {} ms", now_ms, expiry_ms);
            if let Some(decision) = served {
                prop_assert_eq!(decision, allow(lifetime_ms));
            }
        }

        /// Storing a key again replaces its expiry with the one the latest
        /// allow gives, so a shorter new lifetime is never extended by an
        /// earlier, longer one.
        #[test]
        fn latest_allow_sets_expiry(
            stores in proptest::collection::vec((0u64..5_000, 0u64..50_000), 1..6),
            exact in any::<bool>(),
            delta in -3i64..=3,
            anywhere in 0u64..200_000,
        ) {
            let base = Instant::now();
            let cache = CachedPolicy::new(Arc::new(NoEngine), 8);
            let mut stored_ms = 0;
            let mut expiry_ms = 0;
            for (gap_ms, lifetime_ms) in &stores {
                stored_ms += gap_ms;
                expiry_ms = stored_ms + lifetime_ms;
                cache.store(key(), &allow(*lifetime_ms), base + Duration::from_millis(stored_ms));
            }
            let now_ms = stored_ms.max(near_edge(expiry_ms, delta, anywhere, exact));

            let served = cache.lookup(&key(), base + Duration::from_millis(now_ms));

            prop_assert_eq!(served.is_some(), now_ms < expiry_ms, "lookup at {} ms, last expiry {} ms", now_ms, expiry_ms);
        }

        /// Only allows are cached, and nothing is cached with capacity 0.
        #[test]
        fn only_allows_cached_with_capacity(
            lifetime_ms in 1u64..100_000,
            capacity in 0usize..3,
            now_ms in 0u64..1_000,
        ) {
            let base = Instant::now();
            let cache = CachedPolicy::new(Arc::new(NoEngine), capacity);

            cache.store(key(), &deny(), base);
            let denied = cache.lookup(&key(), base + Duration::from_millis(now_ms));
            cache.store(key(), &allow(lifetime_ms), base);
            let allowed = cache.lookup(&key(), base + Duration::from_millis(now_ms));

            prop_assert!(denied.is_none(), "a deny was cached");
            prop_assert_eq!(allowed.is_some(), capacity > 0 && now_ms < lifetime_ms);
        }
    }
}
