//! Forwarding: the application's upstream (resolution and connect), the
//! cap on concurrent upstream dials, and the copy loop between a QUIC stream
//! and a TCP connection with its ending mappings.

mod dial;
mod pump;
mod upstream;

pub use dial::{DialError, DialLimiter, DialSlot};
pub use pump::{pump, PumpEnd, PumpStats, ResetCodes};
pub use upstream::{Upstream, UpstreamError};
