//! The running gateway: binds the listeners of a config, runs them, and
//! offers reload and shutdown. `ztgate serve` and the tests both use it.

use crate::config::{ConfigErrors, ConfigHandle, Generation};
use crate::ingress::{bind_quic, bind_tls, Shared};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A started gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    quic_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Gateway {
    /// Loads the config and binds every listener. Must run inside a tokio runtime.
    pub async fn start(config_path: &Path) -> Result<Gateway, StartError> {
        crate::install_crypto_provider();
        let path = config_path.to_path_buf();
        let config = tokio::task::spawn_blocking(move || ConfigHandle::load(&path))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Shared::new(config, shutdown_rx);
        let listeners = bind_quic(&shared)?;
        let tls_listeners = bind_tls(&shared)?;
        let quic_addrs = listeners.iter().map(|l| l.local_addr).collect();
        let tls_addrs = tls_listeners.iter().map(|l| l.local_addr).collect();
        let mut tasks = JoinSet::new();
        for listener in listeners {
            tasks.spawn(listener.run(shared.clone()));
        }
        for listener in tls_listeners {
            tasks.spawn(listener.run(shared.clone()));
        }
        Ok(Gateway {
            shared,
            quic_addrs,
            tls_addrs,
            shutdown,
            tasks,
        })
    }

    /// The bound QUIC addresses, in config order (port 0 resolved).
    pub fn quic_addrs(&self) -> &[SocketAddr] {
        &self.quic_addrs
    }

    /// The bound TLS-over-TCP addresses, in config order (port 0 resolved).
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The config's one reload entry point.
    pub async fn reload(&self) -> Result<Arc<Generation>, ConfigErrors> {
        self.shared.config.reload().await
    }

    /// Stops accepting, tells every session to close with going-away, and
    /// waits for the listeners to stop.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        // Give sessions a moment to send their close messages.
        let deadline = tokio::time::Instant::now() + self.shared.config.current().timeouts.drain;
        while self.shared.registry.session_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
