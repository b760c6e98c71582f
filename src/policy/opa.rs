//! A client of the Open Policy Agent REST Data API: `POST /v1/data/<path>`
//! with `{"input": ...}`, answered by `{"result": <decision document>}`.

use super::output::decision_from_json;
use super::{Decision, DecisionFuture, PolicyClient, PolicyError, PolicyInput};
use rand::Rng;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Settings of the OPA client.
#[derive(Debug, Clone)]
pub struct OpaSettings {
    /// Base URL such as `http://127.0.0.1:8181`.
    pub url: String,
    /// Data path of the decision document, such as `ztgate/decision`.
    pub path: String,
    pub timeout: Duration,
    /// Extra attempts after a failed one.
    pub retries: u32,
    pub retry_backoff: Duration,
    /// Consecutive failures that open the circuit.
    pub circuit_failures: u32,
    /// How long an open circuit refuses calls before one probe is let through.
    pub circuit_open: Duration,
    pub default_lifetime: Duration,
}

#[derive(Debug)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// The OPA engine.
pub struct OpaPolicy {
    settings: OpaSettings,
    endpoint: String,
    http: reqwest::Client,
    circuit: Mutex<Circuit>,
}

impl std::fmt::Debug for OpaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpaPolicy")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl OpaPolicy {
    pub fn new(settings: OpaSettings) -> Result<OpaPolicy, String> {
        let base = settings.url.trim_end_matches('/');
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(format!(
                "OPA URL {:?} must start with http:// or https://",
                settings.url
            ));
        }
        let endpoint = format!("{base}/v1/data/{}", settings.path.trim_matches('/'));
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the OPA HTTP client: {e}"))?;
        Ok(OpaPolicy {
            settings,
            endpoint,
            http,
            circuit: Mutex::new(Circuit::Closed { failures: 0 }),
        })
    }

    fn circuit_allows(&self) -> bool {
        let mut circuit = self.circuit.lock().unwrap_or_else(|p| p.into_inner());
        match *circuit {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } if Instant::now() >= until => {
                *circuit = Circuit::HalfOpen;
                true
            }
            Circuit::Open { .. } => false,
            // One probe is in flight; others wait for its outcome by failing fast.
            Circuit::HalfOpen => false,
        }
    }

    fn record(&self, success: bool) {
        let mut circuit = self.circuit.lock().unwrap_or_else(|p| p.into_inner());
        *circuit = match (&*circuit, success) {
            (_, true) => Circuit::Closed { failures: 0 },
            (Circuit::Closed { failures }, false)
                if failures + 1 < self.settings.circuit_failures =>
            {
                Circuit::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => {
                tracing::warn!(endpoint = %self.endpoint, open_for = ?self.settings.circuit_open, "OPA circuit opened after repeated failures; new connections fail closed unless their application admits on policy failure");
                Circuit::Open {
                    until: Instant::now() + self.settings.circuit_open,
                }
            }
        };
    }

    async fn query_once(&self, body: &serde_json::Value) -> Result<serde_json::Value, String> {
        let response = self
            .http
            .post(&self.endpoint)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("request to {} failed: {e}", self.endpoint))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("{} answered HTTP {status}", self.endpoint));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("reading the answer of {} failed: {e}", self.endpoint))?;
        if bytes.len() > 1 << 20 {
            return Err(format!(
                "{} answered {} bytes, more than 1 MiB",
                self.endpoint,
                bytes.len()
            ));
        }
        let mut document: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} answered invalid JSON: {e}", self.endpoint))?;
        Ok(document
            .get_mut("result")
            .map(serde_json::Value::take)
            .unwrap_or(serde_json::Value::Null))
    }

    async fn evaluate(&self, input: &PolicyInput) -> Result<Decision, PolicyError> {
        if !self.circuit_allows() {
            return Err(PolicyError::Engine {
                engine: "opa",
                message: format!("circuit open for {}: recent requests failed", self.endpoint),
            });
        }
        let body = serde_json::json!({ "input": input });
        let mut attempt = 0;
        loop {
            match self.query_once(&body).await {
                Ok(result) => {
                    // A well-formed HTTP answer proves the engine is up, even
                    // when the document is malformed.
                    self.record(true);
                    return decision_from_json("opa", result, self.settings.default_lifetime);
                }
                Err(message) if attempt < self.settings.retries => {
                    attempt += 1;
                    let base = self.settings.retry_backoff.as_millis() as u64 * u64::from(attempt);
                    let jitter = rand::thread_rng().gen_range(0..=base.max(1));
                    tracing::debug!(attempt, error = %message, "OPA request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
                }
                Err(message) => {
                    self.record(false);
                    return Err(PolicyError::Engine {
                        engine: "opa",
                        message,
                    });
                }
            }
        }
    }
}

impl PolicyClient for OpaPolicy {
    fn engine(&self) -> &'static str {
        "opa"
    }

    fn decide<'a>(&'a self, input: &'a PolicyInput) -> DecisionFuture<'a> {
        Box::pin(self.evaluate(input))
    }
}
