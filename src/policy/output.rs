//! The JSON decision document that Rego policies and OPA return, and its
//! conversion into a [`Decision`].

use super::{Decision, PolicyError};
use serde::Deserialize;
use std::time::Duration;

/// The document a policy rule evaluates to. docs/policy.md describes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionDocument {
    outcome: String,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    lifetime_secs: Option<u64>,
    #[serde(default)]
    max_session_secs: Option<u64>,
    #[serde(default)]
    remediation: Option<String>,
    #[serde(default)]
    challenge: Option<String>,
    #[serde(default)]
    grace_secs: Option<u64>,
}

/// Converts an engine's output into a decision. `default_lifetime` applies
/// to an allow without `lifetime_secs`.
pub fn decision_from_json(
    engine: &'static str,
    value: serde_json::Value,
    default_lifetime: Duration,
) -> Result<Decision, PolicyError> {
    let malformed = |message: String| PolicyError::Engine {
        engine,
        message: format!("malformed decision: {message}"),
    };
    if value.is_null() {
        return Err(malformed(
            "the decision rule is undefined for this input; make the policy define it for every input (a default rule)".into(),
        ));
    }
    let doc: DecisionDocument =
        serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
    let rule = doc.rule.unwrap_or_else(|| format!("{engine}:unnamed"));
    match doc.outcome.as_str() {
        "allow" => Ok(Decision::Allow {
            lifetime: doc
                .lifetime_secs
                .map(Duration::from_secs)
                .unwrap_or(default_lifetime)
                .max(Duration::from_secs(1)),
            max_session: doc.max_session_secs.map(Duration::from_secs),
            rule,
        }),
        "deny" => Ok(Decision::Deny {
            reason: doc.reason.unwrap_or_else(|| "denied by policy".into()),
            remediation: doc.remediation,
            rule,
        }),
        "step_up" | "step-up" => {
            let challenge = doc
                .challenge
                .ok_or_else(|| malformed("a step_up decision needs a challenge link".into()))?;
            Ok(Decision::StepUp {
                challenge,
                grace: Duration::from_secs(doc.grace_secs.unwrap_or(120)),
                reason: doc
                    .reason
                    .unwrap_or_else(|| "additional verification required".into()),
                rule,
            })
        }
        other => Err(malformed(format!(
            "outcome {other:?} is not one of \"allow\", \"deny\", \"step_up\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIFETIME: Duration = Duration::from_secs(60);

    #[test]
    fn allow_uses_default_lifetime() {
        let d = decision_from_json("rego", json!({"outcome": "allow", "rule": "r1"}), LIFETIME);
        assert_eq!(
            d.ok(),
            Some(Decision::Allow {
                lifetime: LIFETIME,
                max_session: None,
                rule: "r1".into()
            })
        );
    }

    #[test]
    fn step_up_requires_challenge() {
        let d = decision_from_json("rego", json!({"outcome": "step_up"}), LIFETIME);
        assert!(d.is_err());
        let d = decision_from_json(
            "rego",
            json!({"outcome": "step_up", "challenge": "https://idp.example/mfa", "grace_secs": 30}),
            LIFETIME,
        );
        assert!(
            matches!(d, Ok(Decision::StepUp { grace, .. }) if grace == Duration::from_secs(30))
        );
    }

    #[test]
    fn malformed_documents_are_errors() {
        for bad in [
            json!(null),
            json!("allow"),
            json!({"outcome": "maybe"}),
            json!({"outcome": "allow", "lifetime_secs": "soon"}),
            json!({"outcome": "allow", "extra": 1}),
        ] {
            assert!(
                decision_from_json("opa", bad.clone(), LIFETIME).is_err(),
                "{bad}"
            );
        }
    }
}
