//! Test fixtures: a fresh development PKI from scripts/dev-pki.sh per test,
//! revocations and CRLs made with `openssl ca`, and a loopback HTTP server.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The subject of the dev device CA, as scripts/dev-pki.sh writes it.
pub const DEVICE_CA_SUBJECT: &str = "/O=ztgate Dev/CN=ztgate Dev Device CA";

pub fn now_unix() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(elapsed.as_secs()).expect("time fits i64")
}

/// Formats a Unix time as the YYYYMMDDHHMMSSZ that `openssl ca` takes.
pub fn openssl_time(unix: i64) -> String {
    crate::policy::rfc3339_utc(unix)
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'Z')
        .collect()
}

/// One throwaway PKI in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Runs scripts/dev-pki.sh, with `crl_url` as the devices' CRL
    /// distribution point when given.
    pub fn new(crl_url: Option<&str>) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dev-pki.sh");
        let mut command = Command::new("bash");
        command.arg(&script).arg(dir.path());
        if let Some(url) = crl_url {
            command.env("CRL_URL", url);
        }
        let output = command.output().expect("run dev-pki.sh");
        assert!(
            output.status.success(),
            "dev-pki.sh failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> String {
        self.path("ca/ca.cnf").display().to_string()
    }

    /// Reads the first certificate of a PEM file in the PKI directory.
    pub fn cert(&self, name: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.path(name)).expect("certificate PEM")
    }

    /// Reads every certificate of a PEM file, for example "DEV-0001-chain.pem".
    pub fn chain(&self, name: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(self.path(name))
            .expect("chain file")
            .collect::<Result<Vec<_>, _>>()
            .expect("chain PEM")
    }

    /// Revokes `cert` (a file in the PKI directory) in the database of
    /// `ca_section` ("device_ca" or "root_ca").
    pub fn revoke(&self, ca_section: &str, cert: &str, reason: &str) {
        openssl(&[
            "ca",
            "-config",
            &self.config(),
            "-name",
            ca_section,
            "-revoke",
            &self.path(cert).display().to_string(),
            "-crl_reason",
            reason,
        ]);
    }

    /// Writes a PEM CRL of `ca_section` to `out` with extra `openssl ca`
    /// options, such as "-crlhours" "1", and returns its path.
    pub fn gencrl(&self, ca_section: &str, out: &str, extra: &[&str]) -> PathBuf {
        let out = self.path(out);
        let config = self.config();
        let out_text = out.display().to_string();
        let mut args = vec![
            "ca", "-batch", "-config", &config, "-name", ca_section, "-gencrl", "-out", &out_text,
        ];
        args.extend_from_slice(extra);
        openssl(&args);
        out
    }

    /// Converts a PEM CRL to DER and returns the DER.
    pub fn crl_der(&self, pem: &Path) -> Vec<u8> {
        let der = pem.with_extension("der");
        openssl(&[
            "crl",
            "-in",
            &pem.display().to_string(),
            "-outform",
            "DER",
            "-out",
            &der.display().to_string(),
        ]);
        std::fs::read(der).expect("DER CRL")
    }

    /// Appends an extension section to the openssl config, for `-crlexts`.
    pub fn add_config_section(&self, text: &str) {
        let mut config = std::fs::read_to_string(self.path("ca/ca.cnf")).expect("ca.cnf");
        config.push('\n');
        config.push_str(text);
        config.push('\n');
        std::fs::write(self.path("ca/ca.cnf"), config).expect("write ca.cnf");
    }

    /// Makes a self-signed certificate with the device CA's subject but a new
    /// key, and returns the `-cert`/`-keyfile` options that sign a CRL with it.
    pub fn impostor_signing_options(&self) -> Vec<String> {
        let key = self.path("impostor.key").display().to_string();
        let cert = self.path("impostor.pem").display().to_string();
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-config",
            &self.config(),
            "-extensions",
            "ext_root_ca",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-noenc",
            "-keyout",
            &key,
            "-subj",
            DEVICE_CA_SUBJECT,
            "-days",
            "30",
            "-out",
            &cert,
        ]);
        vec!["-cert".to_owned(), cert, "-keyfile".to_owned(), key]
    }
}

pub fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What the test HTTP server does for a path.
#[derive(Clone)]
pub enum Reply {
    Body(Vec<u8>),
    /// Accepts the request and never sends a response.
    Silent,
}

/// A loopback HTTP/1.1 server whose replies the test changes while it runs.
/// Unknown paths get 404.
#[derive(Clone)]
pub struct TestServer {
    pub address: SocketAddr,
    replies: Arc<Mutex<HashMap<String, Reply>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = TestServer {
            address: listener.local_addr().expect("address"),
            replies: Arc::new(Mutex::new(HashMap::new())),
            requests: Arc::new(Mutex::new(Vec::new())),
        };
        let handle = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle.clone().serve(stream));
            }
        });
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn set(&self, path: &str, reply: Reply) {
        self.replies
            .lock()
            .expect("replies lock")
            .insert(path.to_owned(), reply);
    }

    /// Returns the paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests lock").clone()
    }

    async fn serve(self, mut stream: TcpStream) {
        loop {
            let Some(path) = read_request_path(&mut stream).await else {
                return;
            };
            self.requests
                .lock()
                .expect("requests lock")
                .push(path.clone());
            let reply = self
                .replies
                .lock()
                .expect("replies lock")
                .get(&path)
                .cloned();
            let response = match reply {
                Some(Reply::Body(body)) => {
                    let mut response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\n\
                         Content-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    response.extend_from_slice(&body);
                    response
                }
                Some(Reply::Silent) => {
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                    return;
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            };
            if stream.write_all(&response).await.is_err() {
                return;
            }
        }
    }
}

/// Reads one request head and returns its path.
async fn read_request_path(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 || head.len() > 8192 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let request_line = text.lines().next()?;
    request_line.split_whitespace().nth(1).map(str::to_owned)
}
