//! The thin admin client behind `ztgate sessions`, `close-session`, `revoke`
//! and `reload`: one HTTP/1.1 request over the Unix socket or loopback TCP.

use super::api::{
    CloseOutcome, ErrorBody, PushOutcome, ReloadOutcome, RevocationRequest, SessionList,
    SessionView,
};
use super::auth::read_token_file;
use super::settings::DEFAULT_SOCKET_PATH;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Time allowed for one call, connect included. A reload parses the whole
/// configuration, so this is generous.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest response body read, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// The command-line options that select the admin API endpoint.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// Admin API Unix socket [default: /run/ztgate/admin.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub socket: Option<PathBuf>,
    /// Admin API on loopback TCP, as http://127.0.0.1:PORT (needs --token-file).
    #[arg(long, value_name = "URL", requires = "token_file")]
    pub url: Option<String>,
    /// File with the bearer token for --url (mode 0600 or stricter).
    #[arg(long, value_name = "FILE", requires = "url")]
    pub token_file: Option<PathBuf>,
}

/// The admin subcommands of `ztgate`.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// List the gateway's live sessions.
    Sessions {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Close a live session with the administratively-closed code.
    CloseSession {
        /// Session id, as `ztgate sessions` lists it.
        id: u64,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Push a revocation, which closes the certificate's live sessions at once.
    Revoke(RevokeArgs),
    /// Reload the gateway's configuration file.
    Reload {
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
}

/// The certificate to revoke: exactly one of issuer and serial, certificate
/// hash or key hash.
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new("certificate")
        .required(true)
        .args(["issuer_sha256", "cert_sha256", "spki_sha256"])
))]
pub struct RevokeArgs {
    /// SHA-256 of the issuer name's DER, in hex (needs --serial).
    #[arg(long, value_name = "HEX", requires = "serial")]
    pub issuer_sha256: Option<String>,
    /// Serial number in hex, the digits after "serial=" in `openssl x509 -noout -serial`
    /// (needs --issuer-sha256).
    #[arg(long, value_name = "HEX", requires = "issuer_sha256")]
    pub serial: Option<String>,
    /// SHA-256 of the certificate's DER, in hex.
    #[arg(long, value_name = "HEX")]
    pub cert_sha256: Option<String>,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo DER, in hex.
    #[arg(long, value_name = "HEX")]
    pub spki_sha256: Option<String>,
    /// Reason for the revocation, recorded in the audit log.
    #[arg(long)]
    pub reason: Option<String>,
    /// Unix time in seconds after which the gateway may forget the revocation,
    /// normally the certificate's notAfter.
    #[arg(long, value_name = "SECONDS")]
    pub not_after: Option<u64>,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

/// Runs one admin subcommand, prints its result, and returns the exit code:
/// 0 on success, 1 when the call failed.
pub fn run(command: AdminCommand) -> ExitCode {
    let name = command_name(&command);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ztgate {name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(command)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("ztgate {name}: {message}");
            ExitCode::FAILURE
        }
    }
}

fn command_name(command: &AdminCommand) -> &'static str {
    match command {
        AdminCommand::Sessions { .. } => "sessions",
        AdminCommand::CloseSession { .. } => "close-session",
        AdminCommand::Revoke(_) => "revoke",
        AdminCommand::Reload { .. } => "reload",
    }
}

/// Runs one subcommand and returns what to print on standard output, or an
/// error sentence.
async fn execute(command: AdminCommand) -> Result<String, String> {
    match command {
        AdminCommand::Sessions { json, endpoint } => {
            let client = AdminClient::new(Endpoint::from_args(&endpoint)?);
            let body = client.expect_ok(Method::GET, "/v1/sessions", None).await?;
            if json {
                return Ok(format!("{}\n", String::from_utf8_lossy(&body).trim_end()));
            }
            let list: SessionList = decode(&body)?;
            Ok(format_sessions(&list.sessions))
        }
        AdminCommand::CloseSession { id, endpoint } => {
            let client = AdminClient::new(Endpoint::from_args(&endpoint)?);
            let path = format!("/v1/sessions/{id}");
            let body = client.expect_ok(Method::DELETE, &path, None).await?;
            let outcome: CloseOutcome = decode(&body)?;
            Ok(format!("closed session id={}\n", outcome.id))
        }
        AdminCommand::Revoke(args) => {
            let client = AdminClient::new(Endpoint::from_args(&args.endpoint)?);
            let request = RevocationRequest {
                issuer_sha256: args.issuer_sha256,
                serial_hex: args.serial,
                cert_sha256: args.cert_sha256,
                spki_sha256: args.spki_sha256,
                reason: args.reason,
                not_after: args.not_after,
            };
            let json = serde_json::to_vec(&request)
                .map_err(|e| format!("cannot encode the revocation: {e}"))?;
            let body = client
                .expect_ok(Method::POST, "/v1/revocations", Some(json))
                .await?;
            let outcome: PushOutcome = decode(&body)?;
            Ok(format!(
                "revocation recorded; {} live session(s) closed\n",
                outcome.closed_sessions
            ))
        }
        AdminCommand::Reload { endpoint } => {
            let client = AdminClient::new(Endpoint::from_args(&endpoint)?);
            let body = client.expect_ok(Method::POST, "/v1/reload", None).await?;
            let outcome: ReloadOutcome = decode(&body)?;
            Ok(format!(
                "configuration reloaded; generation {} is in force\n",
                outcome.generation
            ))
        }
    }
}

/// The destination of admin calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp {
        address: SocketAddr,
        /// The Host header value, as the URL gave it.
        host: String,
        token: String,
    },
}

impl Endpoint {
    /// Resolves the command-line options. With neither --socket nor --url
    /// the endpoint is the default socket path.
    pub fn from_args(args: &EndpointArgs) -> Result<Endpoint, String> {
        match (&args.socket, &args.url, &args.token_file) {
            (Some(path), None, None) => Ok(Endpoint::Unix(path.clone())),
            (None, Some(url), Some(token_file)) => {
                let (address, host) = parse_url(url)?;
                let token = read_token_file(token_file).map_err(|e| e.to_string())?;
                Ok(Endpoint::Tcp {
                    address,
                    host,
                    token,
                })
            }
            (None, None, None) => Ok(Endpoint::Unix(PathBuf::from(DEFAULT_SOCKET_PATH))),
            _ => Err("give either --socket PATH, or --url URL with --token-file FILE".to_string()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Endpoint::Unix(path) => path.display().to_string(),
            Endpoint::Tcp { address, .. } => format!("http://{address}"),
        }
    }
}

/// Parses `http://HOST:PORT` where HOST is a loopback IP address or
/// "localhost". The token is sent only to loopback, so other hosts are rejected.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid admin URL {url:?}: {e}; use http://127.0.0.1:PORT"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "admin URL {url:?} must start with http://; the admin API speaks plain HTTP on \
             loopback"
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!(
            "admin URL {url:?} has no host; use http://127.0.0.1:PORT"
        ));
    };
    let Some(port) = authority.port_u16() else {
        return Err(format!(
            "admin URL {url:?} has no port; use http://127.0.0.1:PORT"
        ));
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "admin URL {url:?} has a path; give only http://HOST:PORT"
        ));
    }
    let host = authority.host();
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| {
                format!("admin URL {url:?} must name a loopback IP address or localhost")
            })?
    };
    if !ip.to_canonical().is_loopback() {
        return Err(format!(
            "admin URL {url:?} is not on loopback; the admin API listens only on 127.0.0.0/8 \
             or ::1, and the token is sent nowhere else"
        ));
    }
    Ok((SocketAddr::new(ip, port), authority.as_str().to_string()))
}

/// A client for one admin API endpoint. Each call opens a new connection.
pub struct AdminClient {
    endpoint: Endpoint,
}

impl AdminClient {
    pub fn new(endpoint: Endpoint) -> AdminClient {
        AdminClient { endpoint }
    }

    /// Sends one request and returns the status and body. Errors are
    /// sentences that name the endpoint.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let where_ = self.endpoint.describe();
        match tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the admin API at {where_} did not answer within {} s",
                CALL_TIMEOUT.as_secs()
            )),
        }
    }

    /// Sends one request and returns the body of a 2xx response. Any other
    /// status becomes an error sentence with the API's message.
    pub async fn expect_ok(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, String> {
        let (status, body) = self.call(method, path, body).await?;
        if status.is_success() {
            return Ok(body);
        }
        Err(describe_failure(status, &body))
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut builder = Request::builder().method(method).uri(path);
        builder = match &self.endpoint {
            Endpoint::Unix(_) => builder.header(HOST, "localhost"),
            Endpoint::Tcp { host, token, .. } => builder
                .header(HOST, host.as_str())
                .header(AUTHORIZATION, format!("Bearer {token}")),
        };
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("cannot build the request: {e}"))?;

        let where_ = self.endpoint.describe();
        let exchanged = match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .await
                    .map_err(|e| unreachable_message(&where_, &e))?;
                exchange(stream, request).await
            }
            Endpoint::Tcp { address, .. } => {
                let stream = TcpStream::connect(address)
                    .await
                    .map_err(|e| unreachable_message(&where_, &e))?;
                exchange(stream, request).await
            }
        };
        exchanged.map_err(|e| format!("the admin API at {where_} failed the request: {e}"))
    }
}

fn unreachable_message(where_: &str, error: &io::Error) -> String {
    let hint = if error.kind() == io::ErrorKind::PermissionDenied {
        "run as root or as a member of the admin socket's group"
    } else {
        "is ztgate serve running?"
    };
    format!("cannot reach the admin API at {where_}: {error}; {hint}")
}

/// Sends one request over a fresh HTTP/1.1 connection and reads the response.
async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), Box<dyn std::error::Error + Send + Sync>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "admin client connection ended with an error");
        }
    });
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

/// Turns an error response into a sentence: the status, the API's message,
/// and any listed errors on their own lines.
fn describe_failure(status: StatusCode, body: &[u8]) -> String {
    let mut message = format!("the admin API returned {status}");
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => {
            let _ = write!(message, ": {}", error.error);
            for item in error.errors {
                let _ = write!(message, "\n  {item}");
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if !text.is_empty() {
                let _ = write!(message, ": {text}");
            }
        }
    }
    message
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("the admin API sent a response this client cannot read: {e}"))
}

/// Formats sessions as a table sorted by id, with a count line.
pub fn format_sessions(sessions: &[SessionView]) -> String {
    let mut sorted: Vec<&SessionView> = sessions.iter().collect();
    sorted.sort_by_key(|session| session.id);
    let header = [
        "ID",
        "DEVICE",
        "APPLICATION",
        "CLIENT",
        "TRANSPORT",
        "AGE",
        "TO-UPSTREAM",
        "TO-CLIENT",
    ];
    let rows: Vec<[String; 8]> = sorted
        .iter()
        .map(|session| {
            [
                session.id.to_string(),
                session.device.clone(),
                session.application.clone(),
                session.client.to_string(),
                session.transport.clone(),
                format_age(session.age_secs),
                session.bytes_to_upstream.to_string(),
                session.bytes_to_client.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let mut out = String::new();
    push_row(&mut out, &header, &widths);
    for row in &rows {
        push_row(&mut out, row, &widths);
    }
    let noun = if rows.len() == 1 {
        "session"
    } else {
        "sessions"
    };
    let _ = writeln!(out, "{} {noun}", rows.len());
    out
}

fn push_row<S: AsRef<str>>(out: &mut String, cells: &[S], widths: &[usize]) {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(widths) {
        let _ = write!(line, "{:<width$}  ", cell.as_ref());
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// Formats an age in seconds as the two largest units, for example "3h04m".
pub fn format_age(secs: u64) -> String {
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_loopback_accepted() {
        let (address, host) = parse_url("http://127.0.0.1:9100").expect("v4");
        assert_eq!(address, "127.0.0.1:9100".parse().expect("address"));
        assert_eq!(host, "127.0.0.1:9100");
        let (address, _) = parse_url("http://[::1]:9100/").expect("v6");
        assert_eq!(address, "[::1]:9100".parse().expect("address"));
        let (address, host) = parse_url("http://localhost:9100").expect("localhost");
        assert_eq!(address, "127.0.0.1:9100".parse().expect("address"));
        assert_eq!(host, "localhost:9100");
    }

    #[test]
    fn url_rejections() {
        let cases = [
            ("https://127.0.0.1:9100", "http://"),
            ("http://192.0.2.1:9100", "not on loopback"),
            ("http://example.com:9100", "loopback IP address"),
            ("http://127.0.0.1", "no port"),
            ("http://127.0.0.1:9100/v1/sessions", "has a path"),
            ("127.0.0.1:9100", "http://"),
        ];
        for (url, expected) in cases {
            let error = parse_url(url).expect_err(url);
            assert!(error.contains(expected), "{url}: {error}");
        }
    }

    #[test]
    fn ages_formatted() {
        assert_eq!(format_age(0), "0s");
        assert_eq!(format_age(59), "59s");
        assert_eq!(format_age(65), "1m05s");
        assert_eq!(format_age(3_725), "1h02m");
        assert_eq!(format_age(90_000), "1d01h");
    }

    #[test]
    fn sessions_table_aligned() {
        let session = |id: u64, device: &str| SessionView {
            id,
            device: device.to_string(),
            application: "wiki".to_string(),
            client: "192.0.2.7:50000".parse().expect("address"),
            transport: "quic".to_string(),
            age_secs: 65,
            bytes_to_upstream: 1200,
            bytes_to_client: 34000,
        };
        let table =
            format_sessions(&[session(12, "dev-b"), session(3, "spiffe://example.test/d1")]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("ID  DEVICE"), "{table}");
        assert!(
            lines[1].starts_with("3   spiffe://example.test/d1  wiki"),
            "{table}"
        );
        assert!(lines[2].starts_with("12  dev-b"), "{table}");
        assert!(lines[1].ends_with("1m05s  1200         34000"), "{table}");
        assert_eq!(lines[3], "2 sessions");
    }

    #[test]
    fn failure_lists_errors() {
        let body = br#"{"error":"not reloaded","errors":["a.toml: bad","b.toml: worse"]}"#;
        let message = describe_failure(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(
            message,
            "the admin API returned 422 Unprocessable Entity: not reloaded\n  a.toml: bad\n  \
             b.toml: worse"
        );
    }
}
