//! The policy seam: [`PolicyClient`] decides whether a device may reach an
//! application now. Admission and sessions use only this trait; engines live
//! behind it.

mod builtin;
mod cache;
mod opa;
mod output;
mod posture;
mod rego;
mod shadow;

pub use builtin::{AccessRules, BuiltinPolicy};
pub use cache::CachedPolicy;
pub use opa::{OpaPolicy, OpaSettings};
pub use output::decision_from_json;
pub use posture::PostureStore;
pub use rego::RegoPolicy;
pub use shadow::ShadowPolicy;

use crate::identity::DeviceIdentity;
use serde::Serialize;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

/// The transport a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Quic,
    Tls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tls => "tls",
        }
    }
}

/// The application part of a policy input.
#[derive(Debug, Clone, Serialize)]
pub struct AppInput {
    pub name: String,
    pub server_name: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The network context of a policy input. Addresses are validated and canonical.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInput {
    pub client_address: std::net::IpAddr,
    pub client_port: u16,
    pub transport: Transport,
    pub path_changes: u32,
    pub previous_address: Option<SocketAddr>,
}

/// The session part of a policy input.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInput {
    pub age_secs: u64,
    pub previous_decision: Option<&'static str>,
    /// Attributes pushed for the device through the admin API (an object).
    pub posture: serde_json::Value,
}

/// Everything a policy engine may base a decision on.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInput {
    pub device: DeviceIdentity,
    /// Name of the configured device CA that verified the chain.
    pub issuing_ca: String,
    pub application: AppInput,
    pub network: NetworkInput,
    /// RFC 3339 time in UTC.
    pub time: String,
    #[serde(skip)]
    pub now_unix: i64,
    pub session: SessionInput,
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// How long the decision holds before it is evaluated again.
        lifetime: Duration,
        /// Longest the session may last under this decision.
        max_session: Option<Duration>,
        rule: String,
    },
    Deny {
        reason: String,
        remediation: Option<String>,
        rule: String,
    },
    StepUp {
        challenge: String,
        grace: Duration,
        reason: String,
        rule: String,
    },
}

impl Decision {
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allow",
            Decision::Deny { .. } => "deny",
            Decision::StepUp { .. } => "step-up",
        }
    }

    /// The rule or check that produced the decision.
    pub fn rule(&self) -> &str {
        match self {
            Decision::Allow { rule, .. }
            | Decision::Deny { rule, .. }
            | Decision::StepUp { rule, .. } => rule,
        }
    }
}

/// Why an engine could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy engine {engine} failed: {message}")]
    Engine {
        engine: &'static str,
        message: String,
    },
    #[error("policy engine {engine} timed out after {after:?}")]
    Timeout {
        engine: &'static str,
        after: Duration,
    },
}

pub type DecisionFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Decision, PolicyError>> + Send + 'a>>;

/// A policy engine. Implementations must not block the calling task.
pub trait PolicyClient: Send + Sync {
    /// Short engine name for logs and metrics.
    fn engine(&self) -> &'static str;
    fn decide<'a>(&'a self, input: &'a PolicyInput) -> DecisionFuture<'a>;
}

/// Formats a Unix time as RFC 3339 in UTC, to the second.
pub fn rfc3339_utc(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_796_400_000), "2026-12-04T16:00:00Z");
    }
}
