//! Network change detection for `ztgate connect`: on Linux, netlink address,
//! route and link events; everywhere, SIGUSR1 on demand.
//!
//! Events arrive in bursts (a new Wi-Fi address brings an address, several
//! routes and a link change), so the watcher waits [`SETTLE`] after the first
//! event of a burst and reports the burst once.

use std::time::Duration;
use tokio::sync::mpsc;

/// How long a burst of events is collected before it is reported.
pub const SETTLE: Duration = Duration::from_millis(150);

/// One reported network change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkChange {
    /// The first event of the burst, such as "route removed" or "SIGUSR1".
    pub cause: String,
    /// Events in the burst.
    pub events: u32,
}

/// Starts watching and returns the receiver of changes. Sources that cannot
/// start are logged as warnings, and the others keep working.
pub fn watch_network() -> mpsc::Receiver<NetworkChange> {
    let (raw_tx, raw_rx) = mpsc::channel::<String>(256);
    let (changes_tx, changes_rx) = mpsc::channel(16);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        Ok(mut signals) => {
            let tx = raw_tx.clone();
            tokio::spawn(async move {
                while signals.recv().await.is_some() {
                    if tx.send("SIGUSR1".to_string()).await.is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGUSR1; network changes cannot be signalled")
        }
    }
    #[cfg(target_os = "linux")]
    match netlink::subscribe() {
        Ok(socket) => {
            tokio::spawn(netlink::forward_events(socket, raw_tx));
        }
        Err(e) => tracing::warn!(
            error = %e,
            "cannot subscribe to netlink route events; network changes are detected only on SIGUSR1"
        ),
    }
    #[cfg(not(target_os = "linux"))]
    drop(raw_tx);
    tokio::spawn(settle(raw_rx, changes_tx));
    changes_rx
}

/// Turns raw events into one change per burst.
async fn settle(mut raw: mpsc::Receiver<String>, changes: mpsc::Sender<NetworkChange>) {
    while let Some(cause) = raw.recv().await {
        let mut events = 1;
        let window = tokio::time::sleep(SETTLE);
        tokio::pin!(window);
        loop {
            tokio::select! {
                _ = &mut window => break,
                more = raw.recv() => match more {
                    Some(_) => events += 1,
                    None => break,
                },
            }
        }
        if changes.send(NetworkChange { cause, events }).await.is_err() {
            return;
        }
    }
}

#[cfg(target_os = "linux")]
mod netlink {
    use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
    use tokio::sync::mpsc;

    /// Multicast groups (the `RTMGRP_*` bits of rtnetlink(7)): link changes,
    /// IPv4 and IPv6 addresses, IPv4 and IPv6 routes.
    const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;

    pub fn subscribe() -> std::io::Result<TokioSocket> {
        let mut socket = TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
        socket.socket_mut().bind(&SocketAddr::new(0, GROUPS))?;
        Ok(socket)
    }

    /// Reads netlink datagrams until the receiver is gone, sending one cause
    /// per relevant message.
    pub async fn forward_events(socket: TokioSocket, events: mpsc::Sender<String>) {
        loop {
            let datagram = match socket.recv_from_full().await {
                Ok((datagram, _)) => datagram,
                Err(e) => {
                    // ENOBUFS means events were dropped: report a change so
                    // the client rebinds rather than miss one.
                    tracing::debug!(error = %e, "netlink receive failed");
                    if e.raw_os_error() != Some(105) {
                        tracing::warn!(error = %e, "netlink events stopped; network changes are detected only on SIGUSR1");
                        return;
                    }
                    if events.send("netlink events lost".into()).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            for cause in causes(&datagram) {
                if events.send(cause.to_string()).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Names the route messages in one datagram, which may hold several.
    fn causes(mut datagram: &[u8]) -> Vec<&'static str> {
        let mut out = Vec::new();
        while !datagram.is_empty() {
            let Ok(buffer) = NetlinkBuffer::new_checked(datagram) else {
                break;
            };
            let length = buffer.length() as usize;
            if length == 0 || length > datagram.len() {
                break;
            }
            if let Ok(message) =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[..length])
            {
                if let NetlinkPayload::InnerMessage(inner) = message.payload {
                    let cause = match inner {
                        RouteNetlinkMessage::NewAddress(_) => Some("address added"),
                        RouteNetlinkMessage::DelAddress(_) => Some("address removed"),
                        RouteNetlinkMessage::NewRoute(_) => Some("route added"),
                        RouteNetlinkMessage::DelRoute(_) => Some("route removed"),
                        RouteNetlinkMessage::NewLink(_) => Some("link changed"),
                        RouteNetlinkMessage::DelLink(_) => Some("link removed"),
                        _ => None,
                    };
                    out.extend(cause);
                }
            }
            // Messages are aligned to 4 bytes.
            let aligned = (length + 3) & !3;
            datagram = datagram.get(aligned..).unwrap_or_default();
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::causes;
        use netlink_packet_core::NetlinkMessage;
        use netlink_packet_route::address::AddressMessage;
        use netlink_packet_route::route::RouteMessage;
        use netlink_packet_route::RouteNetlinkMessage;

        fn wire(inner: RouteNetlinkMessage) -> Vec<u8> {
            let mut message = NetlinkMessage::from(inner);
            message.finalize();
            let mut buffer = vec![0u8; message.buffer_len()];
            message.serialize(&mut buffer);
            buffer
        }

        #[test]
        fn causes_name_each_message_of_a_datagram() {
            let mut datagram = wire(RouteNetlinkMessage::NewAddress(AddressMessage::default()));
            datagram.extend(wire(RouteNetlinkMessage::DelRoute(RouteMessage::default())));
            assert_eq!(causes(&datagram), ["address added", "route removed"]);
        }

        #[test]
        fn causes_ignore_truncated_input() {
            let datagram = wire(RouteNetlinkMessage::NewRoute(RouteMessage::default()));
            assert!(causes(&datagram[..datagram.len() - 1]).is_empty());
            assert!(causes(&[]).is_empty());
        }
    }
}
