//! Admin API settings: listeners, the access group, the token file and the
//! request limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default path of the admin socket, for `ztgate serve` and the thin client.
pub const DEFAULT_SOCKET_PATH: &str = "/run/ztgate/admin.sock";

/// Largest request body accepted, in bytes. A revocation or a posture push
/// is well under 4 KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Time allowed for a client to send a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for a client to send a request's body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Maximum connections served at once over both listeners. Connections
/// beyond it are closed at accept.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// Listener, access and limit settings of the admin API.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Unix socket path. The server creates it with mode 0660, replacing a
    /// stale socket, and rejects a path that exists and is not a socket.
    pub socket_path: Option<PathBuf>,
    /// Group name or numeric gid that owns the socket. Its members may call
    /// the API, as may root and the gateway's own user.
    pub socket_group: Option<String>,
    /// Loopback TCP address (127.0.0.0/8 or ::1). Port 0 picks a free port.
    pub tcp_address: Option<SocketAddr>,
    /// File with the bearer token that TCP clients must send. Required with
    /// `tcp_address`, and must not be readable by group or others.
    pub token_file: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for AdminSettings {
    /// No listeners and the default limits.
    fn default() -> AdminSettings {
        AdminSettings {
            socket_path: None,
            socket_group: None,
            tcp_address: None,
            token_file: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}
