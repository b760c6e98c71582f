//! The built-in engine: per-application rules from the config file.

use super::{Decision, DecisionFuture, PolicyClient, PolicyInput};
use crate::config::schema::RawAccess;
use std::collections::HashMap;
use std::time::Duration;

/// Built-in rules of one application.
#[derive(Debug, Clone)]
pub struct AccessRules {
    device_cas: Vec<String>,
    spiffe_prefixes: Vec<String>,
    /// (assigner OID, value) pairs.
    permanent_identifiers: Vec<(String, String)>,
    require_hardware_bound: bool,
    allow_any_device: bool,
    remediation_url: Option<String>,
}

impl AccessRules {
    pub fn from_raw(raw: &RawAccess) -> AccessRules {
        AccessRules {
            device_cas: raw.device_cas.clone(),
            spiffe_prefixes: raw
                .spiffe_prefixes
                .iter()
                .map(|p| p.trim_end_matches('/').to_string())
                .collect(),
            permanent_identifiers: raw
                .permanent_identifiers
                .iter()
                .map(|p| (p.assigner.clone(), p.value.clone()))
                .collect(),
            require_hardware_bound: raw.require_hardware_bound,
            allow_any_device: raw.allow_any_device,
            remediation_url: raw.remediation_url.clone(),
        }
    }
}

/// Matches a SPIFFE ID against a prefix by whole path segments, so that
/// `spiffe://td/device` matches `spiffe://td/device/a` but not `spiffe://td/devices`.
pub fn spiffe_prefix_matches(prefix: &str, id: &str) -> bool {
    match id.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

/// The engine built from `[[application]].access` tables.
#[derive(Debug)]
pub struct BuiltinPolicy {
    rules: HashMap<String, AccessRules>,
    lifetime: Duration,
}

impl BuiltinPolicy {
    pub fn new(rules: HashMap<String, AccessRules>, lifetime: Duration) -> BuiltinPolicy {
        BuiltinPolicy { rules, lifetime }
    }

    fn evaluate(&self, input: &PolicyInput) -> Decision {
        let app = &input.application.name;
        let deny = |rule: &str, reason: String, rules: Option<&AccessRules>| Decision::Deny {
            reason,
            remediation: rules.and_then(|r| r.remediation_url.clone()),
            rule: format!("builtin:{app}:{rule}"),
        };
        let Some(rules) = self.rules.get(app) else {
            return deny(
                "no-rules",
                format!("application {app} has no access rules"),
                None,
            );
        };
        if !rules.device_cas.iter().any(|ca| ca == &input.issuing_ca) {
            return deny(
                "device-cas",
                format!("devices of CA {} may not reach {app}", input.issuing_ca),
                Some(rules),
            );
        }
        let device = &input.device;
        let matched = if rules.allow_any_device {
            Some("allow-any-device")
        } else if device.spiffe_id.as_deref().is_some_and(|id| {
            rules
                .spiffe_prefixes
                .iter()
                .any(|p| spiffe_prefix_matches(p, id))
        }) {
            Some("spiffe-prefix")
        } else if device.permanent_identifiers.iter().any(|pid| {
            rules.permanent_identifiers.iter().any(|(assigner, value)| {
                pid.assigner.as_deref() == Some(assigner.as_str())
                    && pid.value.as_deref() == Some(value.as_str())
            })
        }) {
            Some("permanent-identifier")
        } else {
            None
        };
        let Some(matched) = matched else {
            return deny(
                "identity",
                format!("device {} is not allowed to reach {app}", device.device_id),
                Some(rules),
            );
        };
        if rules.require_hardware_bound && !device.hardware_bound {
            return deny(
                "hardware-bound",
                format!(
                    "{app} requires a hardware-bound key and device {} has none",
                    device.device_id
                ),
                Some(rules),
            );
        }
        Decision::Allow {
            lifetime: self.lifetime,
            max_session: None,
            rule: format!("builtin:{app}:{matched}"),
        }
    }
}

impl PolicyClient for BuiltinPolicy {
    fn engine(&self) -> &'static str {
        "builtin"
    }

    fn decide<'a>(&'a self, input: &'a PolicyInput) -> DecisionFuture<'a> {
        let decision = self.evaluate(input);
        Box::pin(async move { Ok(decision) })
    }
}

#[cfg(test)]
mod tests {
    use super::spiffe_prefix_matches;

    #[test]
    fn spiffe_prefix_matches_whole_segments() {
        let prefix = "spiffe://example.test/device";
        assert!(spiffe_prefix_matches(
            prefix,
            "spiffe://example.test/device/DEV-1"
        ));
        assert!(spiffe_prefix_matches(
            prefix,
            "spiffe://example.test/device"
        ));
        assert!(!spiffe_prefix_matches(
            prefix,
            "spiffe://example.test/devices/DEV-1"
        ));
        assert!(!spiffe_prefix_matches(prefix, "spiffe://example.test/dev"));
        assert!(!spiffe_prefix_matches(
            prefix,
            "spiffe://other.test/device/DEV-1"
        ));
    }
}
