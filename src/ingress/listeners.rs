//! The listening sockets of a generation, opened before the runtime starts:
//! sockets inherited through systemd socket activation (`LISTEN_FDS` and
//! `LISTEN_PID`, as `sd_listen_fds(3)` describes), and sockets bound here
//! for the configured addresses that no inherited socket serves.

use super::udp::{bind_udp, set_buffers};
use crate::config::Generation;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};

/// The QUIC (UDP) and TLS-over-TCP sockets, in config order.
#[derive(Debug, Default)]
pub struct Listeners {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: Vec<std::net::TcpListener>,
}

/// A socket passed by the service manager.
#[derive(Debug)]
pub struct InheritedSocket {
    pub fd: RawFd,
    socket: Socket,
    kind: Option<Type>,
    local: Option<SocketAddr>,
}

impl InheritedSocket {
    fn describe(&self) -> String {
        let kind = match self.kind {
            Some(Type::DGRAM) => "UDP",
            Some(Type::STREAM) => "TCP",
            _ => "non-IP or unknown-type",
        };
        match self.local {
            Some(addr) => format!("fd {} ({kind} {addr})", self.fd),
            None => format!("fd {} ({kind} socket without an IP address)", self.fd),
        }
    }

    fn matches(&self, kind: Type, addr: SocketAddr) -> bool {
        self.kind == Some(kind) && self.local == Some(addr)
    }
}

/// Takes the sockets passed with `LISTEN_FDS` when `LISTEN_PID` names this
/// process, and unsets both variables. Returns none otherwise.
pub fn inherited_sockets() -> io::Result<Vec<InheritedSocket>> {
    let fds = sd_notify::listen_fds().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("invalid socket activation variables LISTEN_PID/LISTEN_FDS: {e}"),
        )
    })?;
    let mut out = Vec::new();
    for fd in fds {
        // SAFETY: under the sd_listen_fds protocol the service manager hands
        // descriptors 3..3+LISTEN_FDS to this process, and listen_fds()
        // yields each once, so this is the only owner of `fd`.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        let kind = socket.r#type().ok();
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        out.push(InheritedSocket {
            fd,
            socket,
            kind,
            local,
        });
    }
    Ok(out)
}

/// Opens a socket for every `gateway.listen` and `gateway.listen_tls`
/// address: an inherited socket of the same type and local address when
/// there is one, a newly bound socket otherwise. An inherited socket that
/// matches no configured address is an error that names it.
pub fn open_listeners(
    generation: &Generation,
    mut inherited: Vec<InheritedSocket>,
) -> io::Result<Listeners> {
    let mut take = |kind: Type, addr: SocketAddr| {
        inherited
            .iter()
            .position(|s| s.matches(kind, addr))
            .map(|i| inherited.swap_remove(i))
    };
    let buffers = generation.udp_buffers;
    let mut listeners = Listeners::default();
    for addr in &generation.listen {
        let socket = match take(Type::DGRAM, *addr) {
            Some(found) => {
                tracing::info!(fd = found.fd, %addr, "using the inherited UDP socket");
                // A socket unit may have set larger buffers than the
                // config with SO_RCVBUFFORCE; keep those.
                let granted_receive = found.socket.recv_buffer_size().unwrap_or(0) / 2;
                let granted_send = found.socket.send_buffer_size().unwrap_or(0) / 2;
                if granted_receive < buffers.receive || granted_send < buffers.send {
                    set_buffers(&found.socket, *addr, buffers);
                }
                found.socket.set_nonblocking(true)?;
                found.socket.into()
            }
            None => bind_udp(*addr, buffers).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on UDP {addr}: {e}"))
            })?,
        };
        listeners.udp.push(socket);
    }
    for addr in &generation.listen_tls {
        let listener = match take(Type::STREAM, *addr) {
            Some(found) => {
                tracing::info!(fd = found.fd, %addr, "using the inherited TCP socket");
                // listen() again is harmless on a listening socket and makes
                // one that the service manager only bound usable.
                found.socket.listen(1024)?;
                found.socket.set_nonblocking(true)?;
                found.socket.into()
            }
            None => bind_tcp(*addr).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on TCP {addr}: {e}"))
            })?,
        };
        listeners.tcp.push(listener);
    }
    if !inherited.is_empty() {
        let names: Vec<String> = inherited.iter().map(InheritedSocket::describe).collect();
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "inherited socket(s) {} match no gateway.listen (UDP) or gateway.listen_tls (TCP) address; add the address to the config, or remove it from the socket unit (ztgate.socket)",
                names.join(", ")
            ),
        ));
    }
    Ok(listeners)
}

/// Binds a TCP listener; an unspecified IPv6 address also accepts IPv4.
fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inherited(socket: Socket) -> InheritedSocket {
        InheritedSocket {
            fd: -1,
            kind: socket.r#type().ok(),
            local: socket.local_addr().ok().and_then(|a| a.as_socket()),
            socket,
        }
    }

    #[test]
    fn match_by_type_and_address() {
        let udp = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("udp");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        udp.bind(&any.into()).expect("bind");
        let found = inherited(udp);
        let addr = found.local.expect("local address");
        assert!(found.matches(Type::DGRAM, addr));
        assert!(!found.matches(Type::STREAM, addr));
        let other = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1));
        assert!(!found.matches(Type::DGRAM, other));
        assert!(
            found.describe().contains("UDP 127.0.0.1:"),
            "{}",
            found.describe()
        );
    }
}
