//! The embedded Rego engine (regorus).

use super::output::decision_from_json;
use super::{DecisionFuture, PolicyClient, PolicyError, PolicyInput};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A compiled Rego policy with its data document.
pub struct RegoPolicy {
    /// Policies and data loaded once; each evaluation works on a clone.
    template: regorus::Engine,
    /// The rule compiled once, evaluated per input without cloning the engine.
    compiled: regorus::CompiledPolicy,
    rule: String,
    default_lifetime: Duration,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for RegoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoPolicy")
            .field("files", &self.files)
            .field("rule", &self.rule)
            .finish()
    }
}

impl RegoPolicy {
    /// Loads and compiles the policy files and the data file. Errors name
    /// the file and, for syntax errors, the line.
    pub fn load(
        policy_files: &[PathBuf],
        data_file: Option<&Path>,
        rule: &str,
        default_lifetime: Duration,
    ) -> Result<RegoPolicy, String> {
        let mut engine = regorus::Engine::new();
        engine.set_strict_builtin_errors(false);
        for file in policy_files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read Rego file {}: {e}", file.display()))?;
            engine
                .add_policy(file.display().to_string(), text)
                .map_err(|e| format!("invalid Rego in {}: {e}", file.display()))?;
        }
        if let Some(data) = data_file {
            let text = std::fs::read_to_string(data)
                .map_err(|e| format!("cannot read policy data {}: {e}", data.display()))?;
            let value = regorus::Value::from_json_str(&text)
                .map_err(|e| format!("invalid JSON in policy data {}: {e}", data.display()))?;
            engine
                .add_data(value)
                .map_err(|e| format!("policy data {} rejected: {e}", data.display()))?;
        }
        let compiled = engine
            .compile_with_entrypoint(&regorus::Rc::from(rule))
            .map_err(|e| format!("rule {rule} cannot be compiled: {e}"))?;
        let policy = RegoPolicy {
            compiled,
            template: engine,
            rule: rule.to_string(),
            default_lifetime,
            files: policy_files.to_vec(),
        };
        // Evaluate once on an empty input so a rule that does not exist is
        // reported at load time, not on the first connection.
        let mut probe = policy.template.clone();
        probe.set_input(regorus::Value::new_object());
        probe
            .eval_rule(rule.to_string())
            .map_err(|e| format!("rule {rule} cannot be evaluated: {e}"))?;
        Ok(policy)
    }

    /// Evaluates the rule for one input.
    pub fn evaluate(&self, input: &PolicyInput) -> Result<super::Decision, PolicyError> {
        let json = serde_json::to_value(input).map_err(|e| PolicyError::Engine {
            engine: "rego",
            message: format!("cannot encode the input: {e}"),
        })?;
        let value = self
            .compiled
            .eval_with_input(regorus::Value::from(json))
            .map_err(|e| PolicyError::Engine {
                engine: "rego",
                message: e.to_string(),
            })?;
        let output = serde_json::to_value(&value).map_err(|e| PolicyError::Engine {
            engine: "rego",
            message: format!("cannot read the decision: {e}"),
        })?;
        let output = if output == serde_json::Value::String("<undefined>".into()) {
            serde_json::Value::Null
        } else {
            output
        };
        decision_from_json("rego", output, self.default_lifetime)
    }
}

impl PolicyClient for RegoPolicy {
    fn engine(&self) -> &'static str {
        "rego"
    }

    fn decide<'a>(&'a self, input: &'a PolicyInput) -> DecisionFuture<'a> {
        // Evaluation is CPU work of microseconds for policies of the
        // example's size, so it runs on the calling task.
        let result = self.evaluate(input);
        Box::pin(async move { result })
    }
}
