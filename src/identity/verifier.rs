//! The client certificate verifier that rustls calls during the handshake.
//!
//! The verifier records what it saw in a [`HandshakeOutcome`] that the
//! ingress reads once the handshake ends, so that a rejection is logged with
//! the connection's source address and server name. A QUIC connection gets
//! a verifier of its own, because quinn runs the handshake in its own task.
//! The TLS-over-TCP ingress shares one verifier per config generation and
//! runs each handshake inside [`HANDSHAKE_OUTCOME`], a task-local slot the
//! verifier writes to.

use super::device::{summarize_certificate, CertSummary};
use super::trust::{ChainError, TrustStore};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::{Arc, Mutex};

/// What the verifier saw during one handshake.
#[derive(Debug, Default, Clone)]
pub struct HandshakeOutcome {
    /// The chain was verified in this handshake. False after a resumed
    /// handshake, where rustls skips verification.
    pub verified: bool,
    /// The unverified leaf and the error, when the chain was rejected.
    pub rejected: Option<(CertSummary, ChainError)>,
}

tokio::task_local! {
    /// The outcome of the handshake that the current task runs, for a
    /// verifier made by [`HandshakeVerifier::task_scoped`].
    pub static HANDSHAKE_OUTCOME: Arc<Mutex<HandshakeOutcome>>;
}

/// The destination of a verifier's records.
#[derive(Debug)]
enum OutcomeSink {
    /// The one connection this verifier serves.
    Connection(Arc<Mutex<HandshakeOutcome>>),
    /// [`HANDSHAKE_OUTCOME`] of the task that runs the handshake.
    Task,
}

/// A rustls client verifier backed by a [`TrustStore`].
#[derive(Debug)]
pub struct HandshakeVerifier {
    trust: Arc<TrustStore>,
    sink: OutcomeSink,
}

impl HandshakeVerifier {
    /// Makes a verifier for one connection and the outcome it writes to.
    pub fn new(trust: Arc<TrustStore>) -> (Arc<Self>, Arc<Mutex<HandshakeOutcome>>) {
        let outcome = Arc::new(Mutex::new(HandshakeOutcome::default()));
        let verifier = Arc::new(HandshakeVerifier {
            trust,
            sink: OutcomeSink::Connection(outcome.clone()),
        });
        (verifier, outcome)
    }

    /// Makes a verifier that many connections share. It records into
    /// [`HANDSHAKE_OUTCOME`], so each handshake must run inside
    /// `HANDSHAKE_OUTCOME.scope`. Outside one, nothing is recorded.
    pub fn task_scoped(trust: Arc<TrustStore>) -> Arc<Self> {
        Arc::new(HandshakeVerifier {
            trust,
            sink: OutcomeSink::Task,
        })
    }

    fn record(&self, update: impl FnOnce(&mut HandshakeOutcome)) {
        // A poisoned lock only means another thread panicked while holding
        // it; the outcome is plain data, so keep using it.
        let apply = |outcome: &Mutex<HandshakeOutcome>| {
            update(&mut outcome.lock().unwrap_or_else(|p| p.into_inner()));
        };
        match &self.sink {
            OutcomeSink::Connection(outcome) => apply(outcome),
            OutcomeSink::Task => {
                if HANDSHAKE_OUTCOME.try_with(|o| apply(o)).is_err() {
                    tracing::debug!(
                        "certificate verified outside a handshake scope; outcome not recorded"
                    );
                }
            }
        }
    }
}

impl ClientCertVerifier for HandshakeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.trust.root_hints()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        match self.trust.verify(end_entity, intermediates, now) {
            Ok(_) => {
                self.record(|o| o.verified = true);
                Ok(ClientCertVerified::assertion())
            }
            Err(err) => {
                let rustls_error = Error::InvalidCertificate(err.to_certificate_error());
                let summary = summarize_certificate(end_entity);
                self.record(|o| o.rejected = Some((summary, err)));
                Err(rustls_error)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The gateway speaks TLS 1.3 only.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
