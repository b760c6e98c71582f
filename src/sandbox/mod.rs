//! The gateway's own Landlock sandbox: after the config is loaded and the
//! sockets are bound, `ztgate serve` restricts its file system access to
//! the paths the config names and the few system files it needs.
//!
//! Landlock restricts the calling thread and the threads it creates later,
//! so [`apply`] must run before the tokio runtime starts its workers.

mod rules;

pub use rules::{ConfigPath, PathAccess, PathRules};

use landlock::{
    path_beneath_rules, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};
use std::path::PathBuf;

/// The Landlock ABI whose file system access rights the gateway handles:
/// version 5 (Linux 6.10) adds device ioctls to the rights of version 4.
/// A kernel with an older ABI enforces the subset it supports.
const TARGET_ABI: ABI = ABI::V5;

/// `sandbox.landlock`: whether the sandbox is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LandlockMode {
    /// Apply it where the kernel supports Landlock; start unsandboxed with a
    /// warning where it does not.
    #[default]
    Auto,
    /// Refuse to start unless the kernel enforces the rules, fully or partly.
    Required,
    /// Do not apply it.
    Off,
}

impl LandlockMode {
    /// Parses the config value.
    pub fn parse(value: &str) -> Option<LandlockMode> {
        match value {
            "auto" => Some(LandlockMode::Auto),
            "required" => Some(LandlockMode::Required),
            "off" => Some(LandlockMode::Off),
            _ => None,
        }
    }
}

/// The `[sandbox]` settings of a generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSettings {
    pub landlock: LandlockMode,
    /// More files or directory trees the gateway may read.
    pub extra_read_paths: Vec<PathBuf>,
    /// More files or directory trees the gateway may read and write.
    pub extra_write_paths: Vec<PathBuf>,
}

/// The result of [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The rules are in force for this thread and the threads it starts.
    Enforced {
        /// The kernel's Landlock ABI version.
        abi: i32,
        /// False when the kernel lacks some access rights of [`TARGET_ABI`].
        fully: bool,
        rules: PathRules,
    },
    /// `sandbox.landlock = "off"`.
    Disabled,
    /// The kernel does not support Landlock, with the reason.
    Unsupported(String),
}

impl Outcome {
    /// Returns the rules in force, if any.
    pub fn rules(&self) -> Option<&PathRules> {
        match self {
            Outcome::Enforced { rules, .. } => Some(rules),
            _ => None,
        }
    }
}

/// Applies `rules` to the calling thread and the threads it starts later,
/// as `mode` requests. Fails when the kernel rejects the ruleset, and when the
/// mode is `required` and the kernel does not enforce Landlock.
pub fn apply(mode: LandlockMode, rules: PathRules) -> Result<Outcome, String> {
    if mode == LandlockMode::Off {
        return Ok(Outcome::Disabled);
    }
    let threads = count_threads();
    if threads > 1 {
        // The rules do not reach threads that already exist.
        tracing::warn!(
            threads,
            "threads exist before the sandbox is applied; they stay unrestricted"
        );
    }
    let status = restrict(&rules).map_err(|e| format!("cannot apply the Landlock sandbox: {e}"))?;
    let abi = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => kernel_abi.unwrap_or(effective_abi as i32),
        LandlockStatus::NotEnabled | LandlockStatus::NotImplemented => 0,
    };
    let outcome = match status.ruleset {
        RulesetStatus::FullyEnforced => Outcome::Enforced {
            abi,
            fully: true,
            rules,
        },
        RulesetStatus::PartiallyEnforced => Outcome::Enforced {
            abi,
            fully: false,
            rules,
        },
        RulesetStatus::NotEnforced => Outcome::Unsupported(match status.landlock {
            LandlockStatus::NotEnabled => {
                "Landlock is built into the kernel but not enabled; add landlock to the lsm= boot parameter".to_string()
            }
            LandlockStatus::NotImplemented => "the kernel has no Landlock support, or a seccomp filter (such as systemd's SystemCallFilter=) blocks the landlock_* system calls".to_string(),
            LandlockStatus::Available { .. } => "the kernel did not enforce the ruleset".to_string(),
        }),
    };
    if let (LandlockMode::Required, Outcome::Unsupported(reason)) = (mode, &outcome) {
        return Err(format!(
            "sandbox.landlock is \"required\" but {reason}; run a kernel with Landlock \
             (Linux 5.13 or later) or set sandbox.landlock = \"auto\""
        ));
    }
    Ok(outcome)
}

fn restrict(rules: &PathRules) -> Result<landlock::RestrictionStatus, landlock::RulesetError> {
    Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .create()?
        .add_rules(path_beneath_rules(
            &rules.read,
            AccessFs::from_read(TARGET_ABI),
        ))?
        .add_rules(path_beneath_rules(
            &rules.write,
            AccessFs::from_all(TARGET_ABI),
        ))?
        .restrict_self()
}

/// Counts this process's threads from /proc/self/task; 0 when unreadable.
fn count_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// Logs what [`apply`] did.
pub fn log_outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Enforced { abi, fully, rules } => {
            let read: Vec<String> = rules.read.iter().map(|p| p.display().to_string()).collect();
            let write: Vec<String> = rules
                .write
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let enforcement = if *fully { "fully" } else { "partially" };
            tracing::info!(
                abi,
                enforcement,
                read = ?read,
                read_write = ?write,
                "Landlock sandbox applied"
            );
            if !fully {
                tracing::warn!(
                    abi,
                    "the kernel enforces only part of the Landlock access rights the gateway asks for (Landlock ABI 5, Linux 6.10)"
                );
            }
        }
        Outcome::Disabled => {
            tracing::info!("Landlock sandbox off (sandbox.landlock = \"off\")");
        }
        Outcome::Unsupported(reason) => {
            tracing::warn!(reason = %reason, "Landlock sandbox not applied; the gateway runs without it (sandbox.landlock = \"auto\")");
        }
    }
}
