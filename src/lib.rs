//! ztgate: a userspace zero-trust network access gateway.
//!
//! A device proves who it is with a certificate over mutual TLS (QUIC), the
//! gateway checks the chain, reads the device identity and asks a policy
//! engine, and then forwards each stream of the connection to the one
//! upstream of the application that the TLS server name selects. Trust is
//! checked after every handshake and again while the session lives.
//!
//! Module map: `config` (TOML, generations), `identity` (chains, device
//! identity), `policy` (the decision seam), `ingress` (listeners),
//! `admission` (post-handshake checks), `session` (live sessions),
//! `forward` (upstream and copy), `client` (the device side), `protocol`
//! (wire formats and codes), `telemetry` (logs), `admin` (the local admin
//! API and its thin client), `sandbox` (the gateway's Landlock sandbox).

pub mod admin;
pub mod admission;
pub mod client;
pub mod config;
pub mod forward;
pub mod gateway;
pub mod identity;
pub mod ingress;
pub mod policy;
pub mod protocol;
pub mod sandbox;
pub mod session;
pub mod telemetry;
#[cfg(test)]
mod test_time;
pub mod tuning;

/// Installs ring as the process-wide rustls crypto provider. Safe to call
/// more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
