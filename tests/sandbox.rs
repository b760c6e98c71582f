//! The gateway's Landlock sandbox: the kernel denies reads outside the
//! derived rules, a reload naming a file outside them is rejected while the
//! old generation keeps serving, and certificate rotation by symlink swap
//! still reloads. Each test prints why it skips on a kernel without Landlock.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use ztgate::sandbox::{self, ConfigPath, LandlockMode, PathAccess, PathRules};

const START_LIMIT: Duration = Duration::from_secs(30);

/// Runs `apply` on a thread of its own, so the rules bind only that thread
/// and the test harness's other threads stay unrestricted.
fn in_sandboxed_thread<T: Send + 'static>(
    rules: PathRules,
    body: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    std::thread::spawn(move || {
        let outcome = sandbox::apply(LandlockMode::Auto, rules).expect("apply the sandbox");
        if outcome.rules().is_none() {
            eprintln!("skipped: this kernel does not enforce Landlock ({outcome:?})");
            return None;
        }
        Some(body())
    })
    .join()
    .expect("sandboxed thread")
}

#[test]
fn kernel_denies_reads_outside_rules() {
    let config_dir = tempfile::tempdir().expect("config dir");
    let config = config_dir.path().join("ztgate.toml");
    std::fs::write(&config, "").expect("config");
    let state = tempfile::tempdir().expect("state dir");
    let outside = tempfile::tempdir().expect("outside dir");
    let secret = outside.path().join("secret.pem");
    std::fs::write(&secret, "outside").expect("outside file");
    let paths = [ConfigPath {
        key: "gateway.state_dir".into(),
        path: state.path().to_path_buf(),
        access: PathAccess::WriteTree,
    }];
    let rules = PathRules::derive(&config, &paths, false);
    let state_file = state.path().join("written");
    let config_copy = config.clone();
    let new_config_file = config_dir.path().join("new.toml");
    let results = in_sandboxed_thread(rules, move || {
        (
            std::fs::read(&config_copy).map(|_| ()),
            std::fs::read(&secret).map(|_| ()),
            std::fs::write(&state_file, b"state"),
            std::fs::write(&new_config_file, b"x"),
            std::fs::read_to_string("/etc/hosts").map(|_| ()),
        )
    });
    let Some((config_read, outside_read, state_write, config_write, hosts_read)) = results else {
        return;
    };
    assert!(config_read.is_ok(), "config dir readable: {config_read:?}");
    let denied = outside_read.expect_err("outside file must be denied");
    assert_eq!(denied.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(state_write.is_ok(), "state dir writable: {state_write:?}");
    let denied = config_write.expect_err("config dir is read-only");
    assert_eq!(denied.kind(), std::io::ErrorKind::PermissionDenied);
    if Path::new("/etc/hosts").exists() {
        assert!(hosts_read.is_ok(), "/etc/hosts readable: {hosts_read:?}");
    }
}

/// Writes a TLS-only gateway config whose certificate and key are the given
/// files and whose admin socket is `socket`.
fn write_gateway_config(dir: &Path, cert: &Path, key: &Path, ca: &Path, socket: &Path) -> PathBuf {
    let text = format!(
        r#"[gateway]
listen_tls = ["127.0.0.1:0"]
certificate = "{cert}"
private_key = "{key}"

[admin]
socket_path = "{socket}"

[[device_ca]]
name = "dev-devices"
certificates = ["{ca}"]

[[application]]
name = "wiki"
server_name = "{WIKI}"
upstream = "127.0.0.1:9"

[application.access]
device_cas = ["dev-devices"]
allow_any_device = true
"#,
        cert = cert.display(),
        key = key.display(),
        ca = ca.display(),
        socket = socket.display(),
    );
    let path = dir.join("ztgate.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Starts a sandboxed `ztgate serve` child and returns it with its TLS
/// listener, or `None` when the kernel has no Landlock (the skip is printed).
fn serve_sandboxed(config: &Path) -> Option<(Running, SocketAddr)> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    command.args(["serve", "--config"]).arg(config);
    let running = Running::spawn(command, true);
    let line = running.wait_for_all(&["Landlock sandbox"], START_LIMIT);
    if !line.contains("Landlock sandbox applied") {
        eprintln!("skipped: the gateway runs without Landlock on this kernel: {line}");
        return None;
    }
    let addr = running
        .wait_for("TLS listener started local_addr=", START_LIMIT)
        .parse()
        .expect("TLS listener address");
    running.wait_for_all(&["gateway started"], START_LIMIT);
    Some((running, addr))
}

/// Runs `ztgate reload` against the admin socket and returns (success, output).
fn reload(socket: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .arg("reload")
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("run ztgate reload");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Returns the leaf certificate the gateway's TLS listener presents.
async fn served_certificate(addr: SocketAddr) -> Vec<u8> {
    let stream = tls_connect(addr, "DEV-0001", WIKI)
        .await
        .expect("TLS handshake");
    let (_, connection) = stream.get_ref();
    connection.peer_certificates().expect("server certificates")[0].to_vec()
}

fn leaf_der(pem_file: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(pem_file)
        .expect("open PEM")
        .next()
        .expect("one certificate")
        .expect("valid PEM")
        .to_vec()
}

/// Copies the development gateway certificate chain and key into `dir`.
fn copy_gateway_files(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create dir");
    std::fs::copy(
        pki().join("gateway-chain.pem"),
        dir.join("gateway-chain.pem"),
    )
    .expect("chain");
    std::fs::copy(pki().join("gateway.key"), dir.join("gateway.key")).expect("key");
}

#[tokio::test]
async fn reload_outside_sandbox_rejected() {
    let dir = tempfile::tempdir().expect("dir");
    let run = tempfile::tempdir().expect("run dir");
    let socket = run.path().join("admin.sock");
    let certs = dir.path().join("certs");
    copy_gateway_files(&certs);
    let config = write_gateway_config(
        dir.path(),
        &certs.join("gateway-chain.pem"),
        &certs.join("gateway.key"),
        &pki().join("device-ca.pem"),
        &socket,
    );
    let Some((_gateway, addr)) = serve_sandboxed(&config) else {
        return;
    };
    let outside = tempfile::tempdir().expect("outside dir");
    let moved_ca = outside.path().join("device-ca.pem");
    std::fs::copy(pki().join("device-ca.pem"), &moved_ca).expect("copy CA");
    write_gateway_config(
        dir.path(),
        &certs.join("gateway-chain.pem"),
        &certs.join("gateway.key"),
        &moved_ca,
        &socket,
    );
    let (ok, output) = reload(&socket);
    assert!(!ok, "the reload must be rejected: {output}");
    assert!(output.contains("device_ca[0].certificates[0]"), "{output}");
    assert!(output.contains(&moved_ca.display().to_string()), "{output}");
    assert!(
        output.contains("outside the directories the sandbox"),
        "{output}"
    );
    assert!(output.contains("restart the gateway"), "{output}");
    // The old generation keeps serving.
    let served = served_certificate(addr).await;
    assert_eq!(served, leaf_der(&certs.join("gateway-chain.pem")));
}

/// Issues a second gateway certificate for the development gateway key,
/// signed by the root CA with the development profile, into `dir`.
fn issue_second_gateway_certificate(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create dir");
    let pki = pki();
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "basicConstraints = critical, CA:false\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = DNS:*.apps.example.test, DNS:localhost, IP:127.0.0.1\n",
    )
    .expect("extensions");
    let out = Command::new("openssl")
        .args(["x509", "-req", "-days", "30", "-set_serial", "4242"])
        .arg("-in")
        .arg(pki.join("ca/csr/gateway.csr"))
        .arg("-CA")
        .arg(pki.join("root-ca.pem"))
        .arg("-CAkey")
        .arg(pki.join("root-ca.key"))
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(dir.join("gateway.pem"))
        .output()
        .expect("run openssl x509");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut chain = std::fs::read(dir.join("gateway.pem")).expect("leaf");
    chain.extend(std::fs::read(pki.join("root-ca.pem")).expect("root"));
    std::fs::write(dir.join("gateway-chain.pem"), chain).expect("chain");
    std::fs::copy(pki.join("gateway.key"), dir.join("gateway.key")).expect("key");
}

#[tokio::test]
async fn symlink_rotation_reloads_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let run = tempfile::tempdir().expect("run dir");
    let socket = run.path().join("admin.sock");
    let certs = dir.path().join("certs");
    copy_gateway_files(&certs.join("v1"));
    std::os::unix::fs::symlink("v1", certs.join("current")).expect("symlink");
    let current = certs.join("current");
    let config = write_gateway_config(
        dir.path(),
        &current.join("gateway-chain.pem"),
        &current.join("gateway.key"),
        &pki().join("device-ca.pem"),
        &socket,
    );
    let Some((_gateway, addr)) = serve_sandboxed(&config) else {
        return;
    };
    let first = served_certificate(addr).await;
    assert_eq!(first, leaf_der(&certs.join("v1/gateway-chain.pem")));
    // v2 is written after the sandbox was applied, next to v1.
    issue_second_gateway_certificate(&certs.join("v2"));
    let swap = certs.join("current.new");
    std::os::unix::fs::symlink("v2", &swap).expect("new symlink");
    std::fs::rename(&swap, &current).expect("swap the symlink");
    let (ok, output) = reload(&socket);
    assert!(ok, "reload after rotation: {output}");
    let second = served_certificate(addr).await;
    let expected = leaf_der(&certs.join("v2/gateway-chain.pem"));
    assert_ne!(first, expected, "v2 must be a different certificate");
    assert_eq!(second, expected, "the rotated certificate is served");
}
