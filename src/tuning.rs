//! Data-path tuning shared by the gateway and `ztgate connect`: the QUIC
//! transport settings (congestion controller, flow-control windows, GSO,
//! acknowledgement frequency) and the tokio runtime's worker count.
//! docs/tuning.md lists each setting with its default and measured effect.

use std::sync::Arc;

/// The congestion controllers quinn 0.11 offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionController {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// NewReno (RFC 9002, section 7).
    NewReno,
    /// BBR, which quinn marks as experimental.
    Bbr,
}

impl CongestionController {
    /// The accepted spellings, for error and help text.
    pub const ACCEPTED: &'static str = "\"cubic\", \"newreno\" or \"bbr\" (experimental in quinn)";

    /// Parses `cubic`, `newreno` or `bbr`.
    pub fn parse(value: &str) -> Result<CongestionController, String> {
        match value {
            "cubic" => Ok(CongestionController::Cubic),
            "newreno" => Ok(CongestionController::NewReno),
            "bbr" => Ok(CongestionController::Bbr),
            other => Err(format!(
                "{other:?} is not a congestion controller; use {}",
                Self::ACCEPTED
            )),
        }
    }

    /// Returns the name as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            CongestionController::Cubic => "cubic",
            CongestionController::NewReno => "newreno",
            CongestionController::Bbr => "bbr",
        }
    }

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            CongestionController::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            CongestionController::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
            CongestionController::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
        }
    }
}

/// QUIC transport settings that decide bulk throughput.
#[derive(Debug, Clone, PartialEq)]
pub struct QuicTuning {
    pub congestion_controller: CongestionController,
    /// Generic segmentation offload: several datagrams per `sendmsg`.
    pub gso: bool,
    /// Flow-control limit per stream, in bytes.
    pub stream_receive_window: u64,
    /// Flow-control limit of the whole connection, in bytes.
    pub receive_window: u64,
    /// Unacknowledged bytes the sender keeps buffered per connection.
    pub send_window: u64,
    /// Ack-eliciting packets the peer may receive before it must send an
    /// ACK, requested with the ACK_FREQUENCY extension. `None` leaves the
    /// extension unused, so the peer acknowledges every second packet.
    pub ack_eliciting_threshold: Option<u32>,
}

impl QuicTuning {
    /// Writes these settings into a quinn transport config.
    pub fn apply(&self, transport: &mut quinn::TransportConfig) {
        transport
            .congestion_controller_factory(self.congestion_controller.factory())
            .enable_segmentation_offload(self.gso)
            .stream_receive_window(varint(self.stream_receive_window))
            .receive_window(varint(self.receive_window))
            .send_window(self.send_window);
        let ack_frequency = self.ack_eliciting_threshold.map(|threshold| {
            let mut config = quinn::AckFrequencyConfig::default();
            config.ack_eliciting_threshold(threshold.into());
            config
        });
        transport.ack_frequency_config(ack_frequency);
    }
}

/// Converts a byte count to a QUIC varint, saturating at its maximum.
pub fn varint(value: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(value).unwrap_or(quinn::VarInt::MAX)
}

/// Builds the multi-threaded tokio runtime with `worker_threads` workers,
/// or one per CPU core when it is 0.
pub fn build_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_controller_names_round_trip() {
        for controller in [
            CongestionController::Cubic,
            CongestionController::NewReno,
            CongestionController::Bbr,
        ] {
            assert_eq!(
                CongestionController::parse(controller.name()),
                Ok(controller)
            );
        }
    }

    #[test]
    fn congestion_controller_rejects_unknown() {
        let error = CongestionController::parse("reno").unwrap_err();
        assert!(error.contains("\"reno\""), "{error}");
        assert!(error.contains("\"newreno\""), "{error}");
    }

    #[test]
    fn runtime_honours_worker_threads() {
        let runtime = build_runtime(1).expect("runtime");
        assert_eq!(runtime.metrics().num_workers(), 1);
    }
}
