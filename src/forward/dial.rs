//! The cap on concurrent upstream dials of each application: a semaphore
//! per application name, kept across reloads.

use super::{Upstream, UpstreamError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Reason a dial produced no connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{max} upstream dials of this application are in progress and none finished within {waited:?}")]
    Busy { max: u32, waited: Duration },
    #[error(transparent)]
    Unreachable(#[from] UpstreamError),
}

/// Way a dial got its slot, recorded in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialSlot {
    /// A slot was free at once.
    Immediate,
    /// The dial waited for another dial to finish.
    Waited,
}

/// Upstream dials in progress, per application.
#[derive(Default)]
pub struct DialLimiter {
    slots: Mutex<HashMap<String, (u32, Arc<Semaphore>)>>,
}

impl DialLimiter {
    fn semaphore(&self, application: &str, max: u32) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get(application) {
            Some((cap, semaphore)) if *cap == max => semaphore.clone(),
            // NOTE: after a reload that changes the cap, dials that hold a
            // slot of the old semaphore are not counted against the new one,
            // so the cap can be exceeded until they finish.
            _ => {
                let semaphore = Arc::new(Semaphore::new(max as usize));
                slots.insert(application.to_string(), (max, semaphore.clone()));
                semaphore
            }
        }
    }

    /// Connects to `upstream` once fewer than `max` dials of `application`
    /// are in progress, waiting at most `wait` for a slot. The slot is held
    /// only while the TCP connect runs.
    pub async fn dial(
        &self,
        application: &str,
        upstream: &Upstream,
        max: u32,
        wait: Duration,
    ) -> Result<(TcpStream, DialSlot), DialError> {
        let semaphore = self.semaphore(application, max);
        let (_permit, slot) = match semaphore.clone().try_acquire_owned() {
            Ok(permit) => (permit, DialSlot::Immediate),
            Err(_) => match tokio::time::timeout(wait, semaphore.acquire_owned()).await {
                Ok(Ok(permit)) => (permit, DialSlot::Waited),
                _ => return Err(DialError::Busy { max, waited: wait }),
            },
        };
        let tcp = upstream.connect().await?;
        Ok((tcp, slot))
    }

    /// Dials in progress for `application`.
    pub fn in_progress(&self, application: &str) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(application).map_or(0, |(cap, s)| {
            (*cap as usize).saturating_sub(s.available_permits())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binds a loopback listener, kept open by the caller, and returns an upstream for it.
    async fn listening_upstream() -> (tokio::net::TcpListener, Upstream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let upstream = Upstream::parse(&addr, Duration::from_secs(5)).expect("upstream");
        (listener, upstream)
    }

    #[tokio::test]
    async fn full_cap_waits_then_reports_busy() {
        let (_listener, upstream) = listening_upstream().await;
        let limiter = DialLimiter::default();
        // Hold the only slot, as a dial in progress would.
        let occupied_slot = limiter
            .semaphore("wiki", 1)
            .try_acquire_owned()
            .expect("free slot");
        assert_eq!(limiter.in_progress("wiki"), 1);
        let result = limiter
            .dial("wiki", &upstream, 1, Duration::from_millis(50))
            .await;
        assert!(
            matches!(result, Err(DialError::Busy { max: 1, .. })),
            "{result:?}"
        );
        drop(occupied_slot);
        let result = limiter
            .dial("wiki", &upstream, 1, Duration::from_millis(50))
            .await;
        assert!(matches!(result, Ok((_, DialSlot::Immediate))), "{result:?}");
        assert_eq!(limiter.in_progress("wiki"), 0, "the slot is released");
    }

    #[tokio::test]
    async fn other_application_has_its_own_cap() {
        let (_listener, upstream) = listening_upstream().await;
        let limiter = DialLimiter::default();
        let _occupied_slot = limiter
            .semaphore("wiki", 1)
            .try_acquire_owned()
            .expect("free slot");
        let result = limiter
            .dial("ssh", &upstream, 1, Duration::from_millis(50))
            .await;
        assert!(result.is_ok(), "{result:?}");
    }
}
