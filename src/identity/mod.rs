//! Device certificates: chain verification against the configured device CAs,
//! the handshake-time verifier handed to rustls, the device identity read
//! from the leaf, and revocation: CRLs, pushed revocations and OCSP status
//! checks.

pub mod crl;
pub mod device;
pub mod http_fetch;
pub mod ocsp;
pub mod revocation;
#[cfg(test)]
pub(crate) mod test_pki;
mod trust;
mod verifier;

pub use device::{
    extract_identity, summarize_certificate, CertSummary, DeviceIdentity, HardwareModuleName,
    IdentityError, PermanentIdentifier,
};
pub use trust::{ChainError, DeviceCa, TrustStore, VerifiedChain};
pub use verifier::{HandshakeOutcome, HandshakeVerifier, HANDSHAKE_OUTCOME};
