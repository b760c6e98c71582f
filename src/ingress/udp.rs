//! UDP sockets for QUIC endpoints, with buffers sized for bursts, and a
//! report of what the kernel granted: buffer sizes, GSO and GRO.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;

/// Buffer sizes requested for a UDP socket, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpBuffers {
    pub receive: usize,
    pub send: usize,
}

/// Buffer sizes and offloads the kernel granted a bound UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpReport {
    /// Granted buffer sizes, in bytes (half of what Linux reports, because
    /// Linux doubles the size to cover its bookkeeping).
    pub granted: UdpBuffers,
    /// Datagrams quinn-udp may send in one `sendmsg` (1 without GSO).
    pub gso_segments: usize,
    /// Datagrams the kernel may coalesce into one receive (1 without GRO).
    pub gro_segments: usize,
}

/// Binds a UDP socket with the requested buffer sizes. A shortfall is
/// logged by [`log_udp_report`], not treated as an error. An unspecified
/// IPv6 address also accepts IPv4.
pub fn bind_udp(addr: SocketAddr, buffers: UdpBuffers) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    set_buffers(&socket, addr, buffers);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Requests the buffer sizes on a UDP socket. Linux caps requests at
/// `net.core.rmem_max` / `net.core.wmem_max`; [`log_udp_report`] reports
/// what the kernel granted.
pub fn set_buffers(socket: &Socket, addr: SocketAddr, buffers: UdpBuffers) {
    if let Err(e) = socket.set_recv_buffer_size(buffers.receive) {
        tracing::warn!(%addr, requested = buffers.receive, error = %e, "cannot set the UDP receive buffer size");
    }
    if let Err(e) = socket.set_send_buffer_size(buffers.send) {
        tracing::warn!(%addr, requested = buffers.send, error = %e, "cannot set the UDP send buffer size");
    }
}

/// Reads the granted buffer sizes (getsockopt) and the GSO and GRO
/// capabilities quinn-udp finds on `socket`.
pub fn udp_report(socket: &std::net::UdpSocket) -> std::io::Result<UdpReport> {
    let sock = socket2::SockRef::from(socket);
    // Linux reports twice the size it granted and caps a request at
    // net.core.rmem_max / net.core.wmem_max.
    let granted = UdpBuffers {
        receive: sock.recv_buffer_size()? / 2,
        send: sock.send_buffer_size()? / 2,
    };
    let state = quinn::udp::UdpSocketState::new(socket.into())?;
    Ok(UdpReport {
        granted,
        gso_segments: state.max_gso_segments(),
        gro_segments: state.gro_segments(),
    })
}

/// Logs one line with what `socket` was granted, and a warning for each
/// setting that falls short of the configuration: buffers capped by the
/// sysctl maximum, or GSO requested but unavailable.
pub fn log_udp_report(
    socket: &std::net::UdpSocket,
    requested: UdpBuffers,
    gso_requested: bool,
) -> Option<UdpReport> {
    let addr = socket.local_addr().ok();
    let report = match udp_report(socket) {
        Ok(report) => report,
        Err(e) => {
            tracing::warn!(?addr, error = %e, "failed to read the UDP socket's buffer sizes and offloads");
            return None;
        }
    };
    let gso = gso_requested && report.gso_segments > 1;
    let gro = report.gro_segments > 1;
    tracing::info!(
        ?addr,
        gso,
        gso_segments = report.gso_segments,
        gro,
        gro_segments = report.gro_segments,
        receive_buffer = report.granted.receive,
        send_buffer = report.granted.send,
        "UDP socket offloads and buffers"
    );
    for (direction, granted, wanted, sysctl) in [
        (
            "receive",
            report.granted.receive,
            requested.receive,
            "net.core.rmem_max",
        ),
        (
            "send",
            report.granted.send,
            requested.send,
            "net.core.wmem_max",
        ),
    ] {
        if granted < wanted {
            tracing::warn!(
                ?addr,
                requested = wanted,
                granted,
                "the UDP {direction} buffer is {granted} bytes, less than the {wanted} configured; raise {sysctl} to at least {wanted} (systemd/99-ztgate-udp-buffers.conf is a sysctl.d drop-in that does so)"
            );
        }
    }
    if gso_requested && report.gso_segments <= 1 {
        tracing::warn!(
            ?addr,
            "GSO is configured but this kernel or interface does not offer it; each datagram costs one sendmsg"
        );
    }
    Some(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_granted_buffers() {
        let requested = UdpBuffers {
            receive: 64 * 1024,
            send: 64 * 1024,
        };
        let socket = bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)), requested).expect("bind");
        let report = udp_report(&socket).expect("report");
        // 64 KiB is below every Linux default maximum, so it is granted whole.
        assert_eq!(report.granted, requested);
        assert!(report.gso_segments >= 1);
        assert!(report.gro_segments >= 1);
    }
}
