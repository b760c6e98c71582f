//! A session's client certificate chain, kept for re-evaluation. The CA
//! certificates in it are shared between sessions: every device of a CA
//! sends the same intermediates, so thousands of sessions hold one copy.

use ring::digest::{digest, SHA256};
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// The table size below which the interner never sweeps dead entries.
const MIN_SWEEP_AT: usize = 64;

/// One shared copy of each CA certificate that live sessions keep.
///
/// Entries are weak, so a certificate is freed with the last session that
/// uses it. A weak entry still keeps its allocation, so dead entries are
/// swept whenever the table has doubled since the last sweep.
pub struct CertInterner {
    table: Mutex<InternTable>,
}

struct InternTable {
    by_sha256: HashMap<[u8; 32], Weak<[u8]>>,
    sweep_at: usize,
}

impl Default for CertInterner {
    fn default() -> Self {
        CertInterner {
            table: Mutex::new(InternTable {
                by_sha256: HashMap::new(),
                sweep_at: MIN_SWEEP_AT,
            }),
        }
    }
}

impl CertInterner {
    /// Returns the shared copy of `der`, making it on first use.
    pub fn intern(&self, der: &[u8]) -> Arc<[u8]> {
        let mut key = [0u8; 32];
        key.copy_from_slice(digest(&SHA256, der).as_ref());
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = table.by_sha256.get(&key).and_then(Weak::upgrade) {
            return shared;
        }
        let shared: Arc<[u8]> = Arc::from(der);
        if table.by_sha256.len() >= table.sweep_at {
            table.by_sha256.retain(|_, entry| entry.strong_count() > 0);
            table.sweep_at = (table.by_sha256.len() * 2).max(MIN_SWEEP_AT);
        }
        table.by_sha256.insert(key, Arc::downgrade(&shared));
        shared
    }

    /// Returns the number of entries, live or not yet swept.
    pub fn len(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.by_sha256.len()
    }

    /// Returns true when the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client chain, leaf first: the leaf owned, the CA certificates shared
/// through a [`CertInterner`].
#[derive(Debug, Clone, Default)]
pub struct SessionChain {
    certificates: Vec<Arc<[u8]>>,
}

impl SessionChain {
    /// Takes the chain rustls received, sharing every certificate after
    /// the leaf through `interner`.
    pub fn new(chain: Vec<CertificateDer<'static>>, interner: &CertInterner) -> SessionChain {
        let certificates = chain
            .iter()
            .enumerate()
            .map(|(index, der)| match index {
                0 => Arc::from(der.as_ref()),
                _ => interner.intern(der.as_ref()),
            })
            .collect();
        SessionChain { certificates }
    }

    /// Returns the chain as rustls types that borrow from it.
    pub fn ders(&self) -> Vec<CertificateDer<'_>> {
        self.certificates
            .iter()
            .map(|der| CertificateDer::from(&der[..]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(byte: u8, len: usize) -> CertificateDer<'static> {
        CertificateDer::from(vec![byte; len])
    }

    #[test]
    fn sessions_share_ca_certificates() {
        let interner = CertInterner::default();
        let first = SessionChain::new(vec![der(1, 600), der(2, 450)], &interner);
        let second = SessionChain::new(vec![der(3, 600), der(2, 450)], &interner);

        assert!(Arc::ptr_eq(&first.certificates[1], &second.certificates[1]));
        assert!(!Arc::ptr_eq(
            &first.certificates[0],
            &second.certificates[0]
        ));
        assert_eq!(first.ders()[0].as_ref(), &[1u8; 600][..]);
        assert_eq!(second.ders()[1].as_ref(), &[2u8; 450][..]);
        // Leaves are never interned.
        assert_eq!(interner.len(), 1);
    }

    #[test]
    fn dead_entries_are_swept() {
        let interner = CertInterner::default();
        for round in 0..(MIN_SWEEP_AT * 4) {
            let chain = SessionChain::new(
                vec![
                    der(0, 10),
                    CertificateDer::from(round.to_be_bytes().to_vec()),
                ],
                &interner,
            );
            drop(chain);
        }

        assert!(interner.len() <= MIN_SWEEP_AT, "{}", interner.len());
    }

    #[test]
    fn live_entry_is_reused_after_sweep() {
        let interner = CertInterner::default();
        let live = SessionChain::new(vec![der(0, 10), der(9, 20)], &interner);
        for round in 0..(MIN_SWEEP_AT * 2) {
            drop(SessionChain::new(
                vec![
                    der(0, 10),
                    CertificateDer::from(round.to_be_bytes().to_vec()),
                ],
                &interner,
            ));
        }

        let again = SessionChain::new(vec![der(1, 10), der(9, 20)], &interner);

        assert!(Arc::ptr_eq(&live.certificates[1], &again.certificates[1]));
    }
}
