//! Forwarding: the application's upstream (resolution and connect) and the
//! copy loop between a QUIC stream and a TCP connection with its ending
//! mappings.

mod pump;
mod upstream;

pub use pump::{pump, PumpEnd, PumpStats, ResetCodes};
pub use upstream::{Upstream, UpstreamError};
