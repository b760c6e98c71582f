//! UDP sockets for QUIC endpoints, with buffers sized for bursts.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;

/// Buffer sizes requested for a UDP socket, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct UdpBuffers {
    pub receive: usize,
    pub send: usize,
}

/// Binds a UDP socket with the requested buffer sizes. An unspecified IPv6
/// address also accepts IPv4.
pub fn bind_udp(addr: SocketAddr, buffers: UdpBuffers) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    set_buffers(&socket, addr, buffers);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Requests the buffer sizes on a UDP socket and logs what the kernel
/// granted. Linux reports twice the granted size and caps requests at
/// `net.core.rmem_max` / `net.core.wmem_max`; a shortfall is a warning, not
/// an error.
pub fn set_buffers(socket: &Socket, addr: SocketAddr, buffers: UdpBuffers) {
    if let Err(e) = socket.set_recv_buffer_size(buffers.receive) {
        tracing::warn!(%addr, requested = buffers.receive, error = %e, "cannot set the UDP receive buffer size");
    }
    if let Err(e) = socket.set_send_buffer_size(buffers.send) {
        tracing::warn!(%addr, requested = buffers.send, error = %e, "cannot set the UDP send buffer size");
    }
    let granted_receive = socket.recv_buffer_size().unwrap_or(0) / 2;
    let granted_send = socket.send_buffer_size().unwrap_or(0) / 2;
    if granted_receive < buffers.receive || granted_send < buffers.send {
        tracing::warn!(
            %addr,
            requested_receive = buffers.receive,
            granted_receive,
            requested_send = buffers.send,
            granted_send,
            "UDP buffers are smaller than configured; raise net.core.rmem_max and net.core.wmem_max (systemd/99-ztgate-udp-buffers.conf is a sysctl.d drop-in that does so)"
        );
    } else {
        tracing::debug!(%addr, granted_receive, granted_send, "UDP buffers set");
    }
}
