//! The listeners: binding the Unix socket and loopback TCP, accepting with a
//! connection cap, and serving HTTP/1.1 on each connection with hyper.

use super::api::AdminBackend;
use super::auth::{resolve_group, BearerToken, Caller, UnixPolicy};
use super::routes::{self, Peer};
use super::settings::AdminSettings;
use crate::telemetry::PerSourceLimiter;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Mode of the admin socket: read and write for its owner and group.
const SOCKET_MODE: u32 = 0o660;

/// Maximum size of a request's header block, in bytes.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// How long a shutdown waits for requests in flight before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long the stale-socket check waits for a connection to an existing socket.
const STALE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// State shared by the handlers of every connection.
pub(super) struct ServerState {
    pub backend: Arc<dyn AdminBackend>,
    pub token: Option<BearerToken>,
    pub unix_policy: UnixPolicy,
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    /// Limits warn lines about rejected TCP requests per source address.
    pub rejection_limiter: PerSourceLimiter,
    connection_slots: Arc<Semaphore>,
    http: http1::Builder,
}

/// A running admin API. Dropping the handle leaves the listeners running
/// until the shutdown channel stops them.
pub struct AdminHandle {
    tcp_addr: Option<SocketAddr>,
    socket_path: Option<PathBuf>,
    tasks: Vec<JoinHandle<()>>,
}

impl AdminHandle {
    /// Returns the bound TCP address, with port 0 resolved.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Returns the path of the Unix socket.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket_path.as_deref()
    }

    /// Waits until every listener has stopped. They stop when the shutdown
    /// channel turns true or its sender is dropped, after requests in flight
    /// finish (at most 5 s). The Unix socket file is removed on the way out.
    pub async fn wait(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "admin listener task failed");
            }
        }
    }
}

/// Binds the configured listeners and starts serving the admin API. Returns
/// once every listener is bound, so a TCP port 0 can be read from the handle.
///
/// Fails with `InvalidInput` when no listener is configured, when the TCP
/// address is not loopback, when TCP has no token file, or when the token
/// file is unsafe or empty. Fails when the socket path exists and is not a
/// socket or is a socket another process serves on.
pub async fn serve(
    settings: AdminSettings,
    backend: Arc<dyn AdminBackend>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<AdminHandle> {
    let Access { token, group } = check_access_settings(&settings)?;

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    let state = Arc::new(ServerState {
        backend,
        token,
        unix_policy: UnixPolicy {
            own_uid: nix::unistd::geteuid().as_raw(),
            group: group.clone(),
        },
        max_body_bytes: settings.max_body_bytes,
        body_read_timeout: settings.body_read_timeout,
        rejection_limiter: PerSourceLimiter::new(10, Duration::from_secs(60)),
        connection_slots: Arc::new(Semaphore::new(settings.max_connections.max(1))),
        http,
    });

    // Bind everything before spawning, so a failure leaves nothing running.
    let tcp = match settings.tcp_address {
        Some(address) => {
            let listener = TcpListener::bind(address).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on admin TCP address {address}: {e}"),
                )
            })?;
            Some(listener)
        }
        None => None,
    };
    let tcp_addr = tcp.as_ref().map(TcpListener::local_addr).transpose()?;
    let unix = match &settings.socket_path {
        Some(path) => Some(bind_socket(path, group.as_ref().map(|(_, gid)| *gid)).await?),
        None => None,
    };

    let mut tasks = Vec::new();
    if let (Some(listener), Some(address)) = (tcp, tcp_addr) {
        tracing::info!(address = %address, "admin API listening on TCP");
        tasks.push(tokio::spawn(run_tcp(
            listener,
            state.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(bound) = unix {
        tracing::info!(
            path = %bound.path.display(),
            group = group.as_ref().map(|(name, _)| name.as_str()),
            "admin API listening on a Unix socket"
        );
        tasks.push(tokio::spawn(run_unix(bound, state, shutdown)));
    }
    Ok(AdminHandle {
        tcp_addr,
        socket_path: settings.socket_path,
        tasks,
    })
}

/// The credentials that the access settings name.
struct Access {
    token: Option<BearerToken>,
    /// The socket group as configured, and its gid.
    group: Option<(String, u32)>,
}

/// Checks the listener and access settings before anything is bound, and
/// loads the bearer token and resolves the socket group.
fn check_access_settings(settings: &AdminSettings) -> io::Result<Access> {
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
    if settings.socket_path.is_none() && settings.tcp_address.is_none() {
        return Err(invalid(
            "the admin API has no listener; configure a socket path, a TCP address, or both"
                .to_string(),
        ));
    }
    let token = match (settings.tcp_address, &settings.token_file) {
        (Some(address), _) if !address.ip().to_canonical().is_loopback() => {
            return Err(invalid(format!(
                "admin TCP address {address} is not a loopback address; the admin API \
                 listens only on 127.0.0.0/8 or ::1, for example 127.0.0.1:{}",
                address.port()
            )));
        }
        (Some(address), None) => {
            return Err(invalid(format!(
                "admin TCP address {address} is configured without a token file; \
                 configure a token file that holds the bearer token TCP clients must send"
            )));
        }
        (Some(_), Some(path)) => Some(BearerToken::load(path)?),
        (None, Some(path)) => {
            tracing::warn!(
                token_file = %path.display(),
                "admin token file is configured but no TCP address, so it is not used"
            );
            None
        }
        (None, None) => None,
    };
    let group = match (&settings.socket_path, &settings.socket_group) {
        (Some(_), Some(spec)) => Some((spec.clone(), resolve_group(spec)?)),
        (None, Some(spec)) => {
            tracing::warn!(
                group = %spec,
                "admin socket group is configured but no socket path, so it is not used"
            );
            None
        }
        _ => None,
    };
    Ok(Access { token, group })
}

/// A bound Unix socket and the identity of its file, so that only this
/// socket's file is removed at shutdown.
struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    device: u64,
    inode: u64,
}

/// Binds the admin socket: removes a stale socket file, binds, sets mode
/// 0660 and hands the file to `group`.
///
/// NOTE: between bind and chmod the file has the mode the umask gives. The
/// peer check on every connection still applies in that window.
async fn bind_socket(path: &Path, group: Option<u32>) -> io::Result<BoundSocket> {
    remove_stale_socket(path).await?;
    let listener = UnixListener::bind(path).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::NotFound {
            "; create its directory first (under systemd, RuntimeDirectory=ztgate creates \
             /run/ztgate)"
        } else {
            ""
        };
        io::Error::new(
            e.kind(),
            format!("cannot create admin socket {}: {e}{hint}", path.display()),
        )
    })?;
    let prepared = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
            |e| {
                format!(
                    "cannot set mode 0660 on admin socket {}: {e}",
                    path.display()
                )
            },
        )?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                format!(
                    "cannot give admin socket {} to gid {gid}: {e}; the gateway must run as \
                     root or as a member of that group",
                    path.display()
                )
            })?;
        }
        std::fs::symlink_metadata(path)
            .map_err(|e| format!("cannot read admin socket {}: {e}", path.display()))
    })();
    match prepared {
        Ok(metadata) => Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            device: metadata.dev(),
            inode: metadata.ino(),
        }),
        Err(message) => {
            let _ = std::fs::remove_file(path);
            Err(io::Error::other(message))
        }
    }
}

/// Removes a socket file that no process serves on. Rejects a path that is
/// not a socket, and a socket that accepts connections.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot inspect admin socket path {}: {e}", path.display()),
            ))
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "admin socket path {} exists and is not a socket; remove it or configure \
                 another path",
                path.display()
            ),
        ));
    }
    match tokio::time::timeout(STALE_CHECK_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot remove stale admin socket {}: {e}", path.display()),
                )
            })?;
            tracing::info!(path = %path.display(), "removed a stale admin socket");
            Ok(())
        }
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!(
                "cannot check whether admin socket {} is in use: {e}",
                path.display()
            ),
        )),
        Ok(Ok(_)) | Err(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process is serving on admin socket {}; stop it or configure another \
                 path",
                path.display()
            ),
        )),
    }
}

async fn run_tcp(
    listener: TcpListener,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stop_requested(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(permit) = take_slot(&state, &peer.to_string()) else {
                        continue;
                    };
                    let state = state.clone();
                    let peer = Peer::Tcp(peer);
                    let connection = serve_connection(stream, peer, state, &graceful, permit);
                    connections.spawn(connection);
                }
                Err(e) => accept_failed(&e).await,
            },
        }
    }
    drain(graceful, connections).await;
    tracing::info!("admin API stopped listening on TCP");
}

async fn run_unix(
    bound: BoundSocket,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stop_requested(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = bound.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(permit) = take_slot(&state, "unix socket peer") else {
                        continue;
                    };
                    let peer = unix_peer(&stream, &state.unix_policy);
                    let state = state.clone();
                    let connection = serve_connection(stream, peer, state, &graceful, permit);
                    connections.spawn(connection);
                }
                Err(e) => accept_failed(&e).await,
            },
        }
    }
    drop(bound.listener);
    drain(graceful, connections).await;
    remove_own_socket(&bound.path, bound.device, bound.inode);
    tracing::info!(path = %bound.path.display(), "admin API stopped listening on the Unix socket");
}

/// Reads the peer's credentials and applies the access policy to them.
fn unix_peer(stream: &UnixStream, policy: &UnixPolicy) -> Peer {
    match stream.peer_cred() {
        Ok(credentials) => {
            let (uid, gid, pid) = (credentials.uid(), credentials.gid(), credentials.pid());
            Peer::Unix {
                credentials: Some(Caller::Unix { uid, gid, pid }),
                verdict: policy.authorize(uid, gid, pid),
            }
        }
        Err(e) => Peer::Unix {
            credentials: None,
            verdict: Err(format!("cannot read the peer's credentials: {e}")),
        },
    }
}

/// Takes a connection slot, or logs and returns `None` when every slot is in use.
fn take_slot(state: &ServerState, peer: &str) -> Option<OwnedSemaphorePermit> {
    match state.connection_slots.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) => {
            tracing::warn!(
                peer,
                "admin connection closed: the connection limit is reached"
            );
            None
        }
    }
}

/// Serves HTTP/1.1 on one connection until the client or a shutdown ends it.
fn serve_connection<S>(
    stream: S,
    peer: Peer,
    state: Arc<ServerState>,
    graceful: &GracefulShutdown,
    permit: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    let service_peer = peer.clone();
    let service_state = state.clone();
    let service = service_fn(move |request| {
        let peer = service_peer.clone();
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(routes::handle(request, &peer, &state).await) }
    });
    let connection = graceful.watch(state.http.serve_connection(TokioIo::new(stream), service));
    async move {
        if let Err(e) = connection.await {
            tracing::debug!(peer = %peer, error = %e, "admin connection ended with an error");
        }
        drop(permit);
    }
}

/// Resolves when the shutdown channel turns true or its sender is dropped.
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    // The guard that wait_for returns is not Send, so it is dropped here.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Logs an accept error and pauses, so that a full file table does not spin
/// the loop.
async fn accept_failed(error: &io::Error) {
    tracing::warn!(error = %error, "admin API accept failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Lets requests in flight finish, up to the grace period, then drops the rest.
async fn drain(graceful: GracefulShutdown, mut connections: JoinSet<()>) {
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "admin connections still open after the shutdown grace period; closing them"
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Removes the socket file if it is still the one this server created.
fn remove_own_socket(path: &Path, device: u64, inode: u64) {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.dev() == device && metadata.ino() == inode => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot remove the admin socket"
                );
            }
        }
        Ok(_) => tracing::info!(
            path = %path.display(),
            "admin socket path now holds another file; leaving it in place"
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot inspect the admin socket")
        }
    }
}
