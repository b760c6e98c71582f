//! Live sessions: the registry that indexes them, and the supervisor that
//! decides when each one must end. Both are transport-neutral; the ingress
//! that owns the connection applies the close the supervisor returns.

mod chain;
mod registry;
mod supervisor;

pub use chain::{CertInterner, SessionChain};
pub use registry::{Registry, Selector, SessionEntry, SessionGuard, SourceGuard};
pub use supervisor::{supervise, CloseRequest, SessionState, StepUpControl, StreamGate};
