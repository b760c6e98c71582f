//! The configured device CAs and chain verification with rustls-webpki.

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::CertificateError;
use std::sync::Arc;
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, X509Certificate};

/// One configured device CA: its name in the config and its trust anchors.
#[derive(Debug, Clone)]
pub struct DeviceCa {
    pub name: String,
    pub anchors: Vec<CertificateDer<'static>>,
    /// Intermediates the gateway adds to what the client sends.
    pub intermediates: Vec<CertificateDer<'static>>,
}

/// The result of a successful chain verification.
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    /// Name of the configured device CA whose anchor ended the path.
    pub ca_name: Arc<str>,
    /// The certificate that issued the leaf (needed for OCSP).
    pub issuer: CertificateDer<'static>,
    /// The verified path above the leaf: intermediates in order, then the
    /// anchor's certificate.
    pub path: Vec<CertificateDer<'static>>,
}

/// Why a device certificate chain was rejected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainError {
    #[error("certificate chain rejected: {0}")]
    Webpki(webpki::Error),
    #[error("the certificate has no extended key usage extension; device certificates must carry one that includes clientAuth")]
    MissingEku,
    #[error("the certificate's extended key usage does not include clientAuth")]
    EkuWithoutClientAuth,
    #[error("the certificate could not be parsed: {0}")]
    BadEncoding(String),
}

impl ChainError {
    /// The rustls error that produces the matching TLS alert.
    pub fn to_certificate_error(&self) -> CertificateError {
        use webpki::Error as E;
        match self {
            ChainError::MissingEku | ChainError::EkuWithoutClientAuth => {
                CertificateError::InvalidPurpose
            }
            ChainError::BadEncoding(_) => CertificateError::BadEncoding,
            ChainError::Webpki(err) => match err {
                E::CertExpired { .. } => CertificateError::Expired,
                E::CertNotValidYet { .. } => CertificateError::NotValidYet,
                E::UnknownIssuer => CertificateError::UnknownIssuer,
                E::CertRevoked => CertificateError::Revoked,
                E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
                E::UnsupportedCriticalExtension => CertificateError::UnhandledCriticalExtension,
                E::InvalidSignatureForPublicKey
                | E::UnsupportedSignatureAlgorithmContext(_)
                | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
                    CertificateError::BadSignature
                }
                E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
                _ => CertificateError::ApplicationVerificationFailure,
            },
        }
    }

    /// A short, stable reason for logs and metrics labels.
    pub fn reason_label(&self) -> &'static str {
        match self.to_certificate_error() {
            CertificateError::Expired | CertificateError::NotValidYet => "certificate-expired",
            CertificateError::UnknownIssuer => "unknown-ca",
            CertificateError::Revoked => "certificate-revoked",
            CertificateError::InvalidPurpose => "eku-without-client-auth",
            CertificateError::UnhandledCriticalExtension => "unknown-critical-extension",
            CertificateError::BadSignature => "bad-signature",
            CertificateError::BadEncoding => "bad-encoding",
            _ => "certificate-rejected",
        }
    }
}

/// The device CAs of one config generation, ready for verification.
pub struct TrustStore {
    anchors: Vec<TrustAnchor<'static>>,
    /// The CA name of each entry of `anchors`.
    anchor_ca: Vec<Arc<str>>,
    /// The certificate of each entry of `anchors`.
    anchor_certs: Vec<CertificateDer<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    hints: Vec<rustls::DistinguishedName>,
    ca_names: Vec<Arc<str>>,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore")
            .field("cas", &self.ca_names)
            .field("anchors", &self.anchors.len())
            .finish()
    }
}

impl TrustStore {
    /// Builds the store; fails naming the CA whose certificate is not a usable anchor.
    pub fn new(cas: &[DeviceCa]) -> Result<TrustStore, String> {
        let mut store = TrustStore {
            anchors: Vec::new(),
            anchor_ca: Vec::new(),
            anchor_certs: Vec::new(),
            intermediates: Vec::new(),
            hints: Vec::new(),
            ca_names: Vec::new(),
        };
        for ca in cas {
            let name: Arc<str> = Arc::from(ca.name.as_str());
            if ca.anchors.is_empty() {
                return Err(format!("device CA {:?} has no certificate", ca.name));
            }
            for cert in &ca.anchors {
                let anchor = webpki::anchor_from_trusted_cert(cert).map_err(|e| {
                    format!(
                        "device CA {:?}: certificate is not a usable trust anchor: {e}",
                        ca.name
                    )
                })?;
                // webpki stores the subject without its outer SEQUENCE, and
                // the hint must be a whole DER Name: OpenSSL clients reject
                // the CertificateRequest otherwise.
                store
                    .hints
                    .push(rustls::DistinguishedName::in_sequence(&anchor.subject));
                store.anchors.push(anchor.to_owned());
                store.anchor_ca.push(name.clone());
                store.anchor_certs.push(cert.clone());
            }
            store.intermediates.extend(ca.intermediates.iter().cloned());
            store.ca_names.push(name);
        }
        Ok(store)
    }

    /// Names of the configured device CAs.
    pub fn ca_names(&self) -> &[Arc<str>] {
        &self.ca_names
    }

    /// Subjects of the trust anchors, sent as hints in the CertificateRequest.
    pub fn root_hints(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    /// Verifies a client chain: path to a configured anchor, validity at `now`,
    /// and an extended key usage that is present and includes clientAuth on the
    /// leaf (webpki alone accepts a leaf without the extension).
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        presented: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedChain, ChainError> {
        check_leaf_eku(leaf)?;
        let end_entity = EndEntityCert::try_from(leaf).map_err(ChainError::Webpki)?;
        let mut intermediates: Vec<CertificateDer<'_>> =
            Vec::with_capacity(presented.len() + self.intermediates.len());
        intermediates.extend(presented.iter().map(|c| CertificateDer::from(c.as_ref())));
        intermediates.extend(
            self.intermediates
                .iter()
                .map(|c| CertificateDer::from(c.as_ref())),
        );
        let algorithms = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        let path = end_entity
            .verify_for_usage(
                algorithms,
                &self.anchors,
                &intermediates,
                now,
                KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(ChainError::Webpki)?;
        let anchor = path.anchor();
        let index = self
            .anchors
            .iter()
            .position(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            })
            .ok_or_else(|| {
                ChainError::BadEncoding("verified anchor not found in the store".into())
            })?;
        let mut path_certs: Vec<CertificateDer<'static>> = path
            .intermediate_certificates()
            .map(|c| c.der().into_owned())
            .collect();
        path_certs.push(self.anchor_certs[index].clone());
        Ok(VerifiedChain {
            ca_name: self.anchor_ca[index].clone(),
            issuer: path_certs[0].clone(),
            path: path_certs,
        })
    }
}

fn check_leaf_eku(leaf: &CertificateDer<'_>) -> Result<(), ChainError> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| ChainError::BadEncoding(e.to_string()))?;
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => Ok(()),
        Ok(Some(_)) => Err(ChainError::EkuWithoutClientAuth),
        Ok(None) => Err(ChainError::MissingEku),
        Err(e) => Err(ChainError::BadEncoding(format!(
            "extended key usage extension: {e}"
        ))),
    }
}
