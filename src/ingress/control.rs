//! The gateway side of the control stream.

use crate::protocol::{ControlMessage, PROTOCOL_VERSION};
use quinn::SendStream;
use std::time::Duration;

/// Writes framed control messages on the unidirectional stream the gateway
/// opens right after the handshake.
pub struct ControlWriter {
    stream: SendStream,
    version_sent: bool,
}

impl ControlWriter {
    pub async fn open(
        connection: &quinn::Connection,
    ) -> Result<ControlWriter, quinn::ConnectionError> {
        let stream = connection.open_uni().await?;
        Ok(ControlWriter {
            stream,
            version_sent: false,
        })
    }

    pub async fn send(&mut self, message: &ControlMessage) -> std::io::Result<()> {
        let frame = message
            .encode()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if !self.version_sent {
            self.stream
                .write_all(&[PROTOCOL_VERSION])
                .await
                .map_err(std::io::Error::from)?;
            self.version_sent = true;
        }
        self.stream
            .write_all(&frame)
            .await
            .map_err(std::io::Error::from)
    }

    /// Finishes the stream and waits, at most `limit`, until the peer has
    /// acknowledged everything, so a close that follows does not discard it.
    pub async fn finish_and_flush(&mut self, limit: Duration) {
        if self.stream.finish().is_ok() {
            let _ = tokio::time::timeout(limit, self.stream.stopped()).await;
        }
    }
}
