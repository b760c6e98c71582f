//! The admin API over real sockets. `ztgate::admin::serve` runs in this
//! process on a Unix socket and loopback TCP, with a fake backend that
//! records every call. The tests send raw HTTP/1.1 requests, run the `ztgate`
//! thin client as a process, and run curl as another user for the group check.
use serde_json::{json, Value};
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use ztgate::admin::{
    serve, AdminBackend, AdminHandle, AdminSettings, PushOutcome, Readiness, ReloadFuture,
    RevocationPush, RevocationSourceStatus, RevocationTarget, SessionView,
};

const TOKEN: &str = "s3cr3t-admin-token-0123456789";
const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

// ---- the fake backend ----

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Close(u64),
    Revoke(RevocationPush, String),
    Posture(String, serde_json::Map<String, Value>, String),
    Reload,
}

struct FakeBackend {
    sessions: Vec<SessionView>,
    readiness: Readiness,
    reload_result: Result<u64, Vec<String>>,
    calls: Mutex<Vec<Call>>,
}

impl FakeBackend {
    fn new() -> FakeBackend {
        FakeBackend {
            sessions: vec![
                session(7, "spiffe://example.test/device/laptop-1", "wiki"),
                session(9, "serial:ABC123", "ssh"),
            ],
            readiness: Readiness {
                ready: true,
                revocation_sources: vec![],
            },
            reload_result: Ok(7),
            calls: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, call: Call) {
        self.calls.lock().expect("calls lock").push(call);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls lock").clone()
    }
}

fn session(id: u64, device: &str, application: &str) -> SessionView {
    SessionView {
        id,
        device: device.to_string(),
        application: application.to_string(),
        client: "127.0.0.1:50123".parse().expect("address"),
        transport: "quic".to_string(),
        age_secs: 3_725,
        bytes_to_upstream: 1_024,
        bytes_to_client: 65_536,
    }
}

impl AdminBackend for FakeBackend {
    fn sessions(&self) -> Vec<SessionView> {
        self.sessions.clone()
    }

    fn close_session(&self, id: u64) -> bool {
        self.record(Call::Close(id));
        self.sessions.iter().any(|s| s.id == id)
    }

    fn push_revocation(&self, push: RevocationPush, caller: &str) -> Result<PushOutcome, String> {
        self.record(Call::Revoke(push, caller.to_string()));
        Ok(PushOutcome { closed_sessions: 2 })
    }

    fn push_posture(
        &self,
        device_id: String,
        attributes: serde_json::Map<String, Value>,
        caller: &str,
    ) -> Result<usize, String> {
        self.record(Call::Posture(device_id, attributes, caller.to_string()));
        Ok(1)
    }

    fn reload(&self) -> ReloadFuture<'_> {
        self.record(Call::Reload);
        let result = self.reload_result.clone();
        Box::pin(async move { result })
    }

    fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }
}

// ---- log capture ----

/// Installs the log capture once and returns the buffer of every log line
/// of this test binary. Tests look for values unique to them, since they run
/// in parallel.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer_buffer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Capture(writer_buffer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("install the log capture");
        buffer
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(needle: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().lock().expect("log lock")).into_owned();
    text.lines()
        .filter(|line| line.contains(needle))
        .map(str::to_string)
        .collect()
}

// ---- servers and requests ----

struct Running {
    handle: Option<AdminHandle>,
    backend: Arc<FakeBackend>,
    shutdown: watch::Sender<bool>,
    dir: tempfile::TempDir,
}

impl Running {
    fn handle(&self) -> &AdminHandle {
        self.handle.as_ref().expect("server handle")
    }

    fn socket(&self) -> PathBuf {
        self.handle()
            .socket_path()
            .expect("the server has a socket")
            .to_path_buf()
    }

    fn tcp(&self) -> std::net::SocketAddr {
        self.handle().tcp_addr().expect("the server listens on TCP")
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }
}

/// Settings for a socket in `dir` and loopback TCP with a token file.
fn settings_in(dir: &Path) -> AdminSettings {
    let token_file = dir.join("token");
    write_private(&token_file, &format!("{TOKEN}\n"));
    AdminSettings {
        socket_path: Some(dir.join("admin.sock")),
        tcp_address: Some("127.0.0.1:0".parse().expect("address")),
        token_file: Some(token_file),
        ..AdminSettings::default()
    }
}

fn write_private(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create private file");
    file.write_all(text.as_bytes()).expect("write private file");
}

async fn start_with(backend: FakeBackend, adjust: impl FnOnce(&mut AdminSettings)) -> Running {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings_in(dir.path());
    adjust(&mut settings);
    let backend = Arc::new(backend);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let handle = serve(settings, backend.clone(), shutdown_rx)
        .await
        .expect("admin API starts");
    Running {
        handle: Some(handle),
        backend,
        shutdown,
        dir,
    }
}

async fn start() -> Running {
    start_with(FakeBackend::new(), |_| {}).await
}

/// Starts a server that must fail, and returns its error.
async fn start_error(adjust: impl FnOnce(&mut AdminSettings, &Path)) -> std::io::Error {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings_in(dir.path());
    adjust(&mut settings, dir.path());
    let (_shutdown, shutdown_rx) = watch::channel(false);
    match serve(settings, Arc::new(FakeBackend::new()), shutdown_rx).await {
        Ok(_) => panic!("the admin API started with invalid settings"),
        Err(e) => e,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// Writes raw request bytes and reads one response (head and a
/// Content-Length body), within 10 s.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, request: &[u8]) -> Reply {
    tokio::time::timeout(Duration::from_secs(10), async {
        stream.write_all(request).await.expect("write request");
        read_reply(stream).await
    })
    .await
    .expect("a response within 10 s")
}

async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S) -> Reply {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(position) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break position;
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.expect("read response");
        assert!(
            read > 0,
            "connection closed before a full response: {buffer:?}"
        );
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut reply = Reply {
        status,
        head,
        body: String::new(),
    };
    let length: usize = reply
        .header("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.expect("read body");
        assert!(read > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..read]);
    }
    reply.body = String::from_utf8_lossy(&body).into_owned();
    reply
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes()
}

async fn over_socket(server: &Running, method: &str, path: &str, body: &str) -> Reply {
    let mut stream = UnixStream::connect(server.socket())
        .await
        .expect("connect to the admin socket");
    exchange(&mut stream, &request(method, path, &[], body)).await
}

async fn over_tcp(
    server: &Running,
    authorization: Option<&str>,
    method: &str,
    path: &str,
) -> Reply {
    let mut stream = TcpStream::connect(server.tcp())
        .await
        .expect("connect to the admin TCP port");
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| vec![("Authorization", value)])
        .unwrap_or_default();
    exchange(&mut stream, &request(method, path, &headers, "")).await
}

fn own_caller_prefix() -> String {
    format!(
        "uid={} gid={} pid={}",
        nix::unistd::geteuid(),
        nix::unistd::getegid(),
        std::process::id()
    )
}

// ---- listeners ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_created_with_mode_0660() {
    let server = start().await;
    let metadata = std::fs::symlink_metadata(server.socket()).expect("socket exists");
    assert!(
        metadata.file_type().is_socket(),
        "not a socket: {metadata:?}"
    );
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_request_from_own_uid_succeeds() {
    let server = start().await;
    let health = over_socket(&server, "GET", "/v1/health", "").await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json(), json!({"status": "ok"}));
    assert_eq!(
        health.header("content-type").as_deref(),
        Some("application/json")
    );

    let sessions = over_socket(&server, "GET", "/v1/sessions", "").await;
    assert_eq!(sessions.status, 200, "{sessions:?}");
    let list = sessions.json();
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(2));
    assert_eq!(list["sessions"][0]["id"], 7);
    assert_eq!(
        list["sessions"][0]["device"],
        "spiffe://example.test/device/laptop-1"
    );
    assert_eq!(list["sessions"][0]["application"], "wiki");
    assert_eq!(list["sessions"][0]["client"], "127.0.0.1:50123");
    assert_eq!(list["sessions"][0]["transport"], "quic");
    assert_eq!(list["sessions"][0]["age_secs"], 3725);
    assert_eq!(list["sessions"][0]["bytes_to_upstream"], 1024);
    assert_eq!(list["sessions"][0]["bytes_to_client"], 65536);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_replaced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a socket to leave behind"));
    assert!(
        path.exists(),
        "the stale socket file stays after its listener closes"
    );
    let path_for_settings = path.clone();
    let server = start_with(FakeBackend::new(), move |settings| {
        settings.socket_path = Some(path_for_settings);
    })
    .await;
    assert_eq!(server.socket(), path);
    let health = over_socket(&server, "GET", "/v1/health", "").await;
    assert_eq!(health.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_socket_not_replaced() {
    let error = start_error(|settings, dir| {
        let path = dir.join("live.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // Kept open for the rest of the test binary so the socket stays live.
        std::mem::forget(listener);
        settings.socket_path = Some(path);
    })
    .await;
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    assert!(
        error.to_string().contains("another process is serving"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regular_file_at_socket_path_rejected() {
    let error = start_error(|settings, dir| {
        let path = dir.join("not-a-socket");
        std::fs::write(&path, "data").expect("write file");
        settings.socket_path = Some(path);
    })
    .await;
    assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists, "{error}");
    assert!(error.to_string().contains("is not a socket"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_tcp_rejected() {
    for address in [
        "0.0.0.0:0",
        "[::]:0",
        "192.0.2.10:9100",
        "[2001:db8::1]:9100",
    ] {
        let error = start_error(|settings, _| {
            settings.tcp_address = Some(address.parse().expect("address"));
        })
        .await;
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::InvalidInput,
            "{address}: {error}"
        );
        assert!(
            error.to_string().contains("is not a loopback address"),
            "{address}: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback_tcp_accepted() {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings_in(dir.path());
    settings.socket_path = None;
    settings.tcp_address = Some("[::1]:0".parse().expect("address"));
    let (_shutdown, shutdown_rx) = watch::channel(false);
    match serve(settings, Arc::new(FakeBackend::new()), shutdown_rx).await {
        Ok(handle) => {
            let address = handle.tcp_addr().expect("TCP address");
            assert!(address.is_ipv6(), "{address}");
            assert!(address.ip().is_loopback(), "{address}");
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            eprintln!("skipping ipv6_loopback_tcp_accepted: this host has no ::1 ({e})");
        }
        Err(e) => panic!("[::1]:0 was rejected: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_without_listener_rejected() {
    let error = start_error(|settings, _| {
        settings.socket_path = None;
        settings.tcp_address = None;
    })
    .await;
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(error.to_string().contains("no listener"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_without_token_file_rejected() {
    let error = start_error(|settings, _| settings.token_file = None).await;
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(
        error.to_string().contains("without a token file"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_mode_0644_rejected() {
    let error = start_error(|settings, dir| {
        let path = dir.join("token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        settings.token_file = Some(path);
    })
    .await;
    let message = error.to_string();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{message}");
    assert!(message.contains("mode 0644"), "{message}");
    assert!(message.contains("chmod 0600"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_empty_rejected() {
    let error = start_error(|_, dir| write_private(&dir.join("token"), "\n")).await;
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(error.to_string().contains("is empty"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_short_token_rejected() {
    let error = start_error(|_, dir| write_private(&dir.join("token"), "short")).await;
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(
        error.to_string().contains("fewer than the minimum"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_missing_rejected() {
    let error = start_error(|settings, dir| {
        settings.token_file = Some(dir.join("no-such-token"));
    })
    .await;
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    assert!(error.to_string().contains("no-such-token"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_removes_socket() {
    let mut server = start().await;
    let path = server.socket();
    let tcp = server.tcp();
    server.shutdown.send_replace(true);
    let handle = server.handle.take().expect("handle");
    tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("listeners stop within 10 s");
    assert!(
        !path.exists(),
        "socket file left behind at {}",
        path.display()
    );
    // Linux refuses to bind a port that a socket listens on, even with
    // SO_REUSEADDR, so this bind also shows the listener is gone. Holding the
    // port bound without listening keeps other tests from taking it before
    // the connect below.
    let _held_port = bind_without_listening(tcp);
    let refused = TcpStream::connect(tcp).await;
    assert!(
        refused.is_err(),
        "TCP listener still accepts after shutdown"
    );
}

/// Binds a TCP socket to `address` without listening on it.
fn bind_without_listening(address: std::net::SocketAddr) -> socket2::Socket {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&address.into())
        .unwrap_or_else(|e| panic!("cannot bind {address} after shutdown: {e}"));
    socket
}

// ---- TCP authentication ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_bearer_token_required() {
    let server = start().await;

    let missing = over_tcp(&server, None, "GET", "/v1/sessions").await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert_eq!(
        missing.header("www-authenticate").as_deref(),
        Some("Bearer")
    );
    assert!(missing.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("missing Authorization header")));

    let wrong = over_tcp(
        &server,
        Some("Bearer not-the-token-0123456789"),
        "GET",
        "/v1/sessions",
    )
    .await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert_eq!(wrong.json()["error"], "invalid bearer token");

    let basic_value = format!("Basic {TOKEN}");
    let basic = over_tcp(&server, Some(&basic_value), "GET", "/v1/sessions").await;
    assert_eq!(basic.status, 401, "{basic:?}");

    let bearer = format!("Bearer {TOKEN}");
    let right = over_tcp(&server, Some(&bearer), "GET", "/v1/sessions").await;
    assert_eq!(right.status, 200, "{right:?}");
    assert_eq!(right.json()["sessions"].as_array().map(Vec::len), Some(2));

    let warned = log_lines_with("peer=tcp 127.0.0.1:");
    assert!(
        warned
            .iter()
            .any(|line| line.contains("WARN") && line.contains("admin request rejected")),
        "no warn line for the rejected requests: {warned:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_token_unlocks_mutating_calls() {
    let server = start().await;
    let mut stream = TcpStream::connect(server.tcp()).await.expect("connect");
    let bearer = format!("Bearer {TOKEN}");
    let reply = exchange(
        &mut stream,
        &request(
            "DELETE",
            "/v1/sessions/9",
            &[("Authorization", &bearer)],
            "",
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json(), json!({"id": 9, "closed": true}));
    let audit = log_lines_with("action=\"close-session\"");
    let local = stream.local_addr().expect("local address");
    assert!(
        audit
            .iter()
            .any(|line| line.contains("ztgate::audit")
                && line.contains(&format!("token from {local}"))),
        "no audit line with the token caller {local}: {audit:#?}"
    );
}

// ---- request limits ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_too_large_rejected() {
    let server = start_with(FakeBackend::new(), |settings| {
        settings.max_body_bytes = 1024
    })
    .await;
    let big = format!("{{\"cert_sha256\": \"{}\"}}", "a".repeat(4096));
    let declared = over_socket(&server, "POST", "/v1/revocations", &big).await;
    assert_eq!(declared.status, 413, "{declared:?}");
    assert!(declared.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("1024 bytes")));

    // Without Content-Length the limit applies while the body streams in.
    let mut stream = UnixStream::connect(server.socket()).await.expect("connect");
    let mut chunked = b"POST /v1/revocations HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    chunked.extend_from_slice(format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len()).as_bytes());
    let streamed = exchange(&mut stream, &chunked).await;
    assert_eq!(streamed.status, 413, "{streamed:?}");
    assert!(
        server.backend.calls().is_empty(),
        "{:?}",
        server.backend.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_closes_connection() {
    let server = start_with(FakeBackend::new(), |settings| {
        settings.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = UnixStream::connect(server.socket()).await.expect("connect");
    stream
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: local")
        .await
        .expect("write a partial header");
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection stayed open for 5 s without a full header"
    );
    // The default header timeout is 5 s, so an earlier close comes from the
    // 300 ms setting.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_extra_connections() {
    let server = start_with(FakeBackend::new(), |settings| settings.max_connections = 1).await;
    // The first connection keeps its slot: keep-alive, with one response read.
    let mut first = UnixStream::connect(server.socket()).await.expect("connect");
    let keep_alive = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let reply = exchange(&mut first, keep_alive).await;
    assert_eq!(reply.status, 200);

    let mut second = UnixStream::connect(server.socket()).await.expect("connect");
    let _ = second.write_all(keep_alive).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the extra connection was not closed");
    assert!(
        rest.is_empty(),
        "the extra connection got a response: {rest:?}"
    );

    drop(first);
    // The slot is free again once the first connection ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut third = UnixStream::connect(server.socket()).await.expect("connect");
        let _ = third
            .write_all(&request("GET", "/v1/health", &[], ""))
            .await;
        let mut bytes = Vec::new();
        // The server sends a response or closes the connection at once, with or
        // without a free slot.
        let ended =
            tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut bytes)).await;
        assert!(ended.is_ok(), "the connection stayed open for 5 s");
        if bytes.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the connection slot was not released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- endpoints ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_bad_hex_names_field() {
    let server = start().await;
    let cases = [
        (json!({"cert_sha256": "xyz"}), "cert_sha256"),
        (json!({"spki_sha256": "abcd"}), "spki_sha256"),
        (
            json!({"issuer_sha256": "12", "serial_hex": "10"}),
            "issuer_sha256",
        ),
        (
            json!({"issuer_sha256": DIGEST, "serial_hex": "f".repeat(41)}),
            "serial_hex",
        ),
        (
            json!({"issuer_sha256": DIGEST, "serial_hex": ""}),
            "serial_hex",
        ),
        (json!({"issuer_sha256": DIGEST}), "serial_hex"),
        (json!({"cert_sha256": DIGEST, "not_after": 1}), "not_after"),
    ];
    for (body, field) in cases {
        let reply = over_socket(&server, "POST", "/v1/revocations", &body.to_string()).await;
        assert_eq!(reply.status, 400, "{body}: {reply:?}");
        let error = reply.json();
        assert_eq!(error["field"], field, "{body}: {error}");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{body}: {message}");
    }
    assert!(
        server.backend.calls().is_empty(),
        "{:?}",
        server.backend.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_malformed_body_rejected() {
    let server = start().await;
    let cases = [
        ("", "empty"),
        ("{not json", "invalid JSON body"),
        (r#"{"cert_sha256": 5}"#, "invalid JSON body"),
        (r#"{"certificate": "x"}"#, "unknown field `certificate`"),
        ("{}", "names no certificate"),
    ];
    for (body, expected) in cases {
        let reply = over_socket(&server, "POST", "/v1/revocations", body).await;
        assert_eq!(reply.status, 400, "{body}: {reply:?}");
        let message = reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(expected), "{body}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_backend_and_audit() {
    let server = start().await;
    let body = json!({
        "issuer_sha256": DIGEST.to_uppercase(),
        "serial_hex": "00:10:AB",
        "reason": "laptop stolen, ticket audit-test-4711",
        "not_after": 4_102_444_800u64,
    });
    let reply = over_socket(&server, "POST", "/v1/revocations", &body.to_string()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json(), json!({"closed_sessions": 2}));

    let calls = server.backend.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let Call::Revoke(push, caller) = &calls[0] else {
        panic!("expected a revocation, got {calls:?}");
    };
    assert_eq!(
        push.target,
        RevocationTarget::IssuerSerial {
            issuer_sha256: DIGEST.to_string(),
            serial_hex: "10ab".to_string(),
        }
    );
    assert_eq!(
        push.reason.as_deref(),
        Some("laptop stolen, ticket audit-test-4711")
    );
    assert_eq!(push.not_after, Some(4_102_444_800));
    assert_eq!(caller, &own_caller_prefix());

    let audit = log_lines_with("audit-test-4711");
    assert_eq!(audit.len(), 1, "{audit:#?}");
    let line = &audit[0];
    assert!(line.contains("ztgate::audit"), "{line}");
    assert!(line.contains("action=\"revoke\""), "{line}");
    assert!(
        line.contains(&format!("caller=\"{}\"", own_caller_prefix())),
        "{line}"
    );
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains("closed 2 sessions"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_rejection_audited() {
    let server = start().await;
    let body = json!({"cert_sha256": "audit-reject-probe"});
    let reply = over_socket(&server, "POST", "/v1/revocations", &body.to_string()).await;
    assert_eq!(reply.status, 400);
    let audit = log_lines_with("audit-reject-probe");
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert!(audit[0].contains("status=400"), "{}", audit[0]);
    assert!(audit[0].contains("rejected: cert_sha256"), "{}", audit[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_session_known_and_unknown() {
    let server = start().await;
    let known = over_socket(&server, "DELETE", "/v1/sessions/7", "").await;
    assert_eq!(known.status, 200, "{known:?}");
    assert_eq!(known.json(), json!({"id": 7, "closed": true}));

    let unknown = over_socket(&server, "DELETE", "/v1/sessions/424242", "").await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(unknown.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("no live session has id 424242")));

    let not_a_number = over_socket(&server, "DELETE", "/v1/sessions/abc", "").await;
    assert_eq!(not_a_number.status, 400, "{not_a_number:?}");
    assert_eq!(not_a_number.json()["field"], "id");

    assert_eq!(
        server.backend.calls(),
        vec![Call::Close(7), Call::Close(424242)]
    );
    let audit = log_lines_with("id=424242");
    assert!(
        audit
            .iter()
            .any(|line| line.contains("ztgate::audit") && line.contains("not found")),
        "{audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_reports_stale_sources() {
    let mut backend = FakeBackend::new();
    backend.readiness = Readiness {
        ready: false,
        revocation_sources: vec![
            RevocationSourceStatus {
                name: "crl:http://127.0.0.1:8080/devices.crl".to_string(),
                age_secs: Some(90_000),
                stale: true,
                last_error: Some("connection refused".to_string()),
            },
            RevocationSourceStatus {
                name: "pushes".to_string(),
                age_secs: None,
                stale: false,
                last_error: None,
            },
        ],
    };
    let server = start_with(backend, |_| {}).await;
    let reply = over_socket(&server, "GET", "/v1/ready", "").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    let body = reply.json();
    assert_eq!(body["ready"], false);
    assert_eq!(body["revocation_sources"][0]["age_secs"], 90_000);
    assert_eq!(body["revocation_sources"][0]["stale"], true);
    assert_eq!(
        body["revocation_sources"][0]["last_error"],
        "connection refused"
    );
    assert_eq!(body["revocation_sources"][1]["age_secs"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_when_sources_fresh() {
    let server = start().await;
    let reply = over_socket(&server, "GET", "/v1/ready", "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["ready"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posture_reaches_backend() {
    let server = start().await;
    let body = json!({
        "device_id": "serial:ABC123",
        "attributes": {"disk_encrypted": true, "os_version": "14.2"},
    });
    let reply = over_socket(&server, "POST", "/v1/posture", &body.to_string()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json(), json!({"reevaluated_sessions": 1}));
    let calls = server.backend.calls();
    let Some(Call::Posture(device, attributes, caller)) = calls.first() else {
        panic!("expected a posture push, got {calls:?}");
    };
    assert_eq!(device, "serial:ABC123");
    assert_eq!(attributes.get("disk_encrypted"), Some(&json!(true)));
    assert_eq!(caller, &own_caller_prefix());

    let empty_device = json!({"device_id": "", "attributes": {}});
    let reply = over_socket(&server, "POST", "/v1/posture", &empty_device.to_string()).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["field"], "device_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_success_and_errors() {
    let server = start().await;
    let reply = over_socket(&server, "POST", "/v1/reload", "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json(), json!({"generation": 7}));

    let mut failing = FakeBackend::new();
    failing.reload_result = Err(vec![
        "ztgate.toml: applications.wiki.upstream: missing".to_string(),
        "ztgate.toml: gateway.listen: invalid address".to_string(),
    ]);
    let server = start_with(failing, |_| {}).await;
    let reply = over_socket(&server, "POST", "/v1/reload", "").await;
    assert_eq!(reply.status, 422, "{reply:?}");
    let body = reply.json();
    assert_eq!(body["errors"].as_array().map(Vec::len), Some(2));
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.contains("2 error(s)")));
    assert_eq!(server.backend.calls(), vec![Call::Reload]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_and_wrong_method() {
    let server = start().await;
    let unknown = over_socket(&server, "GET", "/v2/sessions", "").await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(unknown.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("/v1/sessions")));

    let wrong = over_socket(&server, "POST", "/v1/sessions", "{}").await;
    assert_eq!(wrong.status, 405, "{wrong:?}");
    assert_eq!(wrong.header("allow").as_deref(), Some("GET"));
}

// ---- the thin client ----

fn ztgate() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command.env_remove("RUST_LOG").kill_on_drop(true);
    command
}

async fn run(command: &mut tokio::process::Command) -> (bool, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("ztgate finishes within 30 s")
        .expect("run ztgate");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_prints_sessions_over_socket() {
    let server = start().await;
    let (ok, stdout, stderr) = run(ztgate()
        .arg("sessions")
        .arg("--socket")
        .arg(server.socket()))
    .await;
    assert!(ok, "stderr: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].starts_with("ID  DEVICE"), "{stdout}");
    assert!(
        lines[1].starts_with("7   spiffe://example.test/device/laptop-1"),
        "{stdout}"
    );
    assert!(lines[1].contains("1h02m"), "{stdout}");
    assert!(lines[2].starts_with("9   serial:ABC123"), "{stdout}");
    assert_eq!(lines[3], "2 sessions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_uses_url_and_token() {
    let server = start().await;
    let url = format!("http://{}", server.tcp());
    let (ok, stdout, stderr) = run(ztgate()
        .args(["sessions", "--json", "--url", &url, "--token-file"])
        .arg(server.token_file()))
    .await;
    assert!(ok, "stderr: {stderr}");
    let body: Value = serde_json::from_str(&stdout).expect("JSON output");
    assert_eq!(body["sessions"][1]["id"], 9);

    let (ok, stdout, stderr) = run(ztgate()
        .args([
            "revoke",
            "--cert-sha256",
            DIGEST,
            "--url",
            &url,
            "--token-file",
        ])
        .arg(server.token_file()))
    .await;
    assert!(ok, "stderr: {stderr}");
    assert_eq!(stdout, "revocation recorded; 2 live session(s) closed\n");
    let calls = server.backend.calls();
    let Some(Call::Revoke(push, caller)) = calls.first() else {
        panic!("expected a revocation, got {calls:?}");
    };
    assert_eq!(
        push.target,
        RevocationTarget::CertSha256(DIGEST.to_string())
    );
    assert!(caller.starts_with("token from 127.0.0.1:"), "{caller}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_reload_and_errors() {
    let server = start().await;
    let socket = server.socket();

    let (ok, stdout, stderr) = run(ztgate()
        .args(["close-session", "9", "--socket"])
        .arg(&socket))
    .await;
    assert!(ok, "stderr: {stderr}");
    assert_eq!(stdout, "closed session id=9\n");

    let (ok, _, stderr) = run(ztgate()
        .args(["close-session", "31337", "--socket"])
        .arg(&socket))
    .await;
    assert!(!ok);
    assert!(stderr.contains("404 Not Found"), "{stderr}");
    assert!(stderr.contains("no live session has id 31337"), "{stderr}");

    let (ok, stdout, stderr) = run(ztgate().args(["reload", "--socket"]).arg(&socket)).await;
    assert!(ok, "stderr: {stderr}");
    assert_eq!(stdout, "configuration reloaded; generation 7 is in force\n");

    let (ok, _, stderr) = run(ztgate()
        .args([
            "revoke",
            "--issuer-sha256",
            DIGEST,
            "--serial",
            "zz",
            "--socket",
        ])
        .arg(&socket))
    .await;
    assert!(!ok);
    assert!(stderr.contains("400 Bad Request"), "{stderr}");
    assert!(stderr.contains("serial_hex"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_unreachable_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.sock");
    let (ok, _, stderr) = run(ztgate().args(["sessions", "--socket"]).arg(&path)).await;
    assert!(!ok);
    assert!(
        stderr.contains(&format!("cannot reach the admin API at {}", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("is ztgate serve running?"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_non_loopback_url() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    write_private(&token, TOKEN);
    let (ok, _, stderr) = run(ztgate()
        .args([
            "sessions",
            "--url",
            "http://192.0.2.10:9100",
            "--token-file",
        ])
        .arg(&token))
    .await;
    assert!(!ok);
    assert!(stderr.contains("not on loopback"), "{stderr}");
}

// ---- the group check, with a client running as another user ----

/// Runs curl as `uid` with primary group `gid` and `groups` as its only
/// supplementary groups, and returns curl's exit code and the HTTP status.
async fn curl_as(socket: &Path, uid: u32, gid: u32, groups: &[u32]) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        command.arg(format!("--groups={}", list.join(",")));
    }
    command
        .args([
            "curl",
            "--silent",
            "--max-time",
            "5",
            "--output",
            "/dev/null",
        ])
        .args(["--write-out", "%{http_code}", "--unix-socket"])
        .arg(socket)
        .arg("http://localhost/v1/sessions")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(15), command.output())
        .await
        .expect("curl finishes within 15 s")
        .expect("run setpriv");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn has_command(name: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_group_check_for_other_uid() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipping socket_group_check_for_other_uid: it must run as root to start a client \
             as another uid"
        );
        return;
    }
    if !has_command("setpriv") || !has_command("curl") {
        eprintln!(
            "skipping socket_group_check_for_other_uid: it needs setpriv (util-linux) and curl"
        );
        return;
    }
    const GROUP: u32 = 4242;
    const NOBODY: u32 = 65534;
    let server = start_with(FakeBackend::new(), |settings| {
        settings.socket_group = Some(GROUP.to_string());
    })
    .await;
    let socket = server.socket();
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("let other users reach the socket's directory");
    let metadata = std::fs::metadata(&socket).expect("socket metadata");
    assert_eq!(metadata.gid(), GROUP, "the socket's group");

    // The kernel itself refuses a connect from outside the group: mode 0660.
    let (code, status) = curl_as(&socket, NOBODY, NOBODY, &[]).await;
    assert_eq!(
        code,
        Some(7),
        "curl should fail to connect; HTTP status {status:?}"
    );

    // A supplementary member and a primary member get in.
    let (code, status) = curl_as(&socket, NOBODY, NOBODY, &[GROUP]).await;
    assert_eq!(
        (code, status.as_str()),
        (Some(0), "200"),
        "supplementary member"
    );
    let (code, status) = curl_as(&socket, NOBODY, GROUP, &[]).await;
    assert_eq!((code, status.as_str()), (Some(0), "200"), "primary member");

    // With the file mode opened up, the server's own peer check returns 403.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let (code, status) = curl_as(&socket, NOBODY, NOBODY, &[]).await;
    assert_eq!((code, status.as_str()), (Some(0), "403"), "non-member");
    let warned = log_lines_with(&format!("peer=unix uid={NOBODY} gid={NOBODY}"));
    assert!(
        warned
            .iter()
            .any(|line| line.contains("WARN") && line.contains(&format!("group {GROUP}"))),
        "no warn line for the rejected peer: {warned:#?}"
    );
}
