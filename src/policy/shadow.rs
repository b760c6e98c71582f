//! Shadow mode: a candidate policy evaluated beside the enforced one on the
//! same inputs, never enforced, with every disagreement logged and counted.

use super::{Decision, DecisionFuture, PolicyClient, PolicyInput};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The enforced engine with a candidate in its shadow.
pub struct ShadowPolicy {
    enforced: Arc<dyn PolicyClient>,
    candidate: Arc<dyn PolicyClient>,
    disagreements: Arc<AtomicU64>,
}

impl ShadowPolicy {
    pub fn new(enforced: Arc<dyn PolicyClient>, candidate: Arc<dyn PolicyClient>) -> ShadowPolicy {
        ShadowPolicy {
            enforced,
            candidate,
            disagreements: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Disagreements seen since start.
    pub fn disagreements(&self) -> u64 {
        self.disagreements.load(Ordering::Relaxed)
    }
}

fn summary(result: &Result<Decision, super::PolicyError>) -> String {
    match result {
        Ok(d) => format!("{} ({})", d.outcome(), d.rule()),
        Err(e) => format!("error ({e})"),
    }
}

impl PolicyClient for ShadowPolicy {
    fn engine(&self) -> &'static str {
        self.enforced.engine()
    }

    fn decide<'a>(&'a self, input: &'a PolicyInput) -> DecisionFuture<'a> {
        Box::pin(async move {
            let enforced = self.enforced.decide(input).await;
            // The candidate runs on its own task so that a slow or failing
            // candidate never delays or changes the enforced decision.
            let candidate = self.candidate.clone();
            let disagreements = self.disagreements.clone();
            let input = input.clone();
            let enforced_outcome = enforced.as_ref().map(|d| d.outcome()).ok();
            let enforced_summary = summary(&enforced);
            tokio::spawn(async move {
                let result = candidate.decide(&input).await;
                let candidate_outcome = result.as_ref().map(|d| d.outcome()).ok();
                if candidate_outcome != enforced_outcome {
                    disagreements.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("ztgate_policy_shadow_disagreements_total").increment(1);
                    tracing::warn!(
                        target: "ztgate::shadow",
                        device = %input.device.device_id,
                        application = %input.application.name,
                        enforced = %enforced_summary,
                        candidate = %summary(&result),
                        "shadow policy disagrees with the enforced policy; the enforced decision applies"
                    );
                }
            });
            enforced
        })
    }
}
