//! The rustls server configurations of both ingresses.

use crate::config::Generation;
use crate::identity::{HandshakeOutcome, HandshakeVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// ring's provider with AES-128-GCM and SHA-256 first. Device and gateway
/// keys are P-256, a 128-bit security level, so AES-256 and SHA-384 add
/// cost without adding strength: CPUs with SHA extensions hash SHA-256 in
/// hardware but not SHA-384, and AES-128 runs 10 rounds to AES-256's 14.
/// The other suites stay for clients that offer only them.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::cipher_suite;
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites = vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ];
            Arc::new(provider)
        })
        .clone()
}

/// Builds a TLS 1.3-only server config for one connection whose client
/// verifier reports into the returned outcome. `alpn` is the list offered
/// (empty for none); `tickets` makes the session tickets.
pub fn server_tls_config(
    generation: &Generation,
    alpn: &[&[u8]],
    tickets: Arc<dyn ProducesTickets>,
) -> Result<(rustls::ServerConfig, Arc<Mutex<HandshakeOutcome>>), rustls::Error> {
    let (verifier, outcome) = HandshakeVerifier::new(generation.trust.clone());
    let config = build(generation, alpn, tickets, verifier)?;
    Ok((config, outcome))
}

fn build(
    generation: &Generation,
    alpn: &[&[u8]],
    tickets: Arc<dyn ProducesTickets>,
    verifier: Arc<HandshakeVerifier>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(generation.certified_key.clone())));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The gateway's order of cipher suites wins over the client's.
    config.ignore_client_order = true;
    // Stateless tickets: the session (the client chain and the resumption
    // secret, about 1.4 KiB) travels encrypted in the ticket. The gateway
    // keeps nothing per session, so its memory does not grow with the
    // number of handshakes. The ticket keys rotate every 6 hours and exist
    // only in memory.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.ticketer = tickets;
    // A client resumes with one ticket and gets a fresh one each time, so
    // one per handshake is enough.
    config.send_tls13_tickets = 1;
    // 0-RTT stays off: early data would reach an upstream before admission.
    config.max_early_data_size = 0;
    Ok(config)
}

/// The TLS-over-TCP ingress's server configs of the current generation,
/// one per ALPN list, with one verifier they share. rustls keeps a
/// connection's config for the connection's life, so sharing saves every
/// TLS tunnel its own copy. Handshakes must run inside
/// `identity::HANDSHAKE_OUTCOME.scope` for rejections to be
/// recorded.
pub struct TlsConfigCache {
    tickets: Arc<dyn ProducesTickets>,
    current: Mutex<CachedConfigs>,
}

#[derive(Default)]
struct CachedConfigs {
    generation: u64,
    verifier: Option<Arc<HandshakeVerifier>>,
    by_alpn: HashMap<Vec<Vec<u8>>, Arc<rustls::ServerConfig>>,
}

impl TlsConfigCache {
    pub fn new(tickets: Arc<dyn ProducesTickets>) -> TlsConfigCache {
        TlsConfigCache {
            tickets,
            current: Mutex::new(CachedConfigs::default()),
        }
    }

    /// Returns the config for `generation` that offers `alpn`, building it
    /// on first use. A newer generation replaces every cached config.
    pub fn get(
        &self,
        generation: &Generation,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut cached = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if generation.id < cached.generation {
            // A connection accepted just before a reload: serve it without
            // displacing the newer generation's configs.
            let verifier = HandshakeVerifier::task_scoped(generation.trust.clone());
            return Ok(Arc::new(build(
                generation,
                alpn,
                self.tickets.clone(),
                verifier,
            )?));
        }
        if cached.generation != generation.id || cached.verifier.is_none() {
            *cached = CachedConfigs {
                generation: generation.id,
                verifier: Some(HandshakeVerifier::task_scoped(generation.trust.clone())),
                by_alpn: HashMap::new(),
            };
        }
        let key: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        if let Some(config) = cached.by_alpn.get(&key) {
            return Ok(config.clone());
        }
        let verifier = cached
            .verifier
            .clone()
            .unwrap_or_else(|| HandshakeVerifier::task_scoped(generation.trust.clone()));
        let config = Arc::new(build(generation, alpn, self.tickets.clone(), verifier)?);
        cached.by_alpn.insert(key, config.clone());
        Ok(config)
    }
}
