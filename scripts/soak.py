#!/usr/bin/env python3
"""Bounded soak of a ztgate gateway on loopback; scripts/soak.sh runs it.

Starts an echo upstream, a CRL server, the OCSP responder
(scripts/ocsp-responder.py), `ztgate serve` with a Rego policy, and one
`ztgate connect --listen` per steady device. Then, in cycles until MINUTES
pass, it:

- sends random data through every steady device's tunnel on several TCP
  connections at once and checks the SHA-256 of each echo;
- sends SIGUSR1 to one client, so it rebinds to a new UDP port (a
  migration), while its transfers run;
- stops and restarts one client, which closes and opens its QUIC connection;
- every third cycle issues a fresh device certificate and opens a tunnel
  with it. Then it revokes the certificate in the CA database, publishes a
  new CRL, pushes the revocation through the admin API, and measures how
  long the session outlives the push;
- every fourth cycle edits the policy data and sends SIGHUP;
- every fifth cycle stops the OCSP responder and restarts it one cycle later
  on the same port.

After the last cycle it waits for the revoked sessions to go, then compares
the gateway's resident memory (VmRSS) and open descriptors (/proc/PID/fd) with
the baseline taken after the first cycle. It prints a summary and exits 1 on
any failure: a checksum mismatch, a failed transfer, a session that outlived
its revocation by more than REVOCATION_GRACE, memory or descriptors above the
tolerance, or a gateway exit.

usage: soak.py --minutes M --ztgate BIN --pki DIR --work DIR --repo DIR
"""

import argparse
import base64
import hashlib
import http.server
import json
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

APP = "wiki.apps.example.test"
STEADY_DEVICES = ["DEV-0001", "DEV-0002", "DEV-0003"]
STREAMS_PER_DEVICE = 4
MAX_TRANSFER_BYTES = 512 * 1024
REVOCATION_GRACE = 5.0
# Growth allowed between the baseline and the end: allocator arenas and
# bounded state settle in the first minute (about 2 to 3 MiB), and pushed
# revocations are kept by design. A leak of 1 KiB per tunnel exceeds it
# within five minutes (the soak opens about 1,600 tunnels a minute).
RSS_TOLERANCE_KIB = 8 * 1024
FD_TOLERANCE = 8


def log(message):
    print(f"soak: {message}", flush=True)


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            self.request.sendall(data)
        try:
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class ThreadingTCP(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class QuietHTTP(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_in_thread(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server.server_address[1]


def read_line_with(process, marker, limit=30.0):
    """Reads process stdout lines until one contains marker; returns the text after it."""
    deadline = time.monotonic() + limit
    result = {}

    def reader():
        for line in process.stdout:
            if marker in line:
                result["line"] = line.split(marker, 1)[1].strip()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if "line" not in result:
        raise RuntimeError(f"no line with {marker!r} within {limit}s")
    # Keep draining so that the child never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    return result["line"]


def wait_in_file(path, marker, process, limit=30.0):
    """Waits until a line of file path contains marker; returns the text after it."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(path) as file:
            for line in file:
                if marker in line:
                    return line.split(marker, 1)[1].strip()
        if process.poll() is not None:
            break
        time.sleep(0.05)
    with open(path) as file:
        tail = file.read()[-2000:]
    raise RuntimeError(f"no line with {marker!r} in {path} within {limit}s; it ends with:\n{tail}")


def cert_der(pem_path):
    with open(pem_path) as file:
        text = file.read()
    body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    return base64.b64decode("".join(body.split()))


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, args):
        self.args = args
        self.pki = args.pki
        self.work = args.work
        self.failures = []
        self.stats = {
            "cycles": 0,
            "tunnels": 0,
            "bytes_checked": 0,
            "migrations": 0,
            "client_restarts": 0,
            "revocations": 0,
            "max_revocation_close_s": 0.0,
            "policy_reloads": 0,
            "ocsp_restarts": 0,
            "max_rss_kib": 0,
        }
        self.clients = {}
        self.children = []
        self.ocsp = None
        self.ocsp_port = 0
        self.victims = 0

    # Setup.

    def openssl(self, *arguments):
        subprocess.run(["openssl", *arguments], check=True, capture_output=True)

    def publish_crl(self):
        pem = os.path.join(self.work, "device-ca.crl.pem")
        self.openssl("ca", "-batch", "-config", f"{self.pki}/ca/ca.cnf", "-name", "device_ca",
                     "-gencrl", "-crlhours", "1", "-out", pem)
        tmp = os.path.join(self.crl_dir, "device-ca.crl.tmp")
        self.openssl("crl", "-in", pem, "-outform", "DER", "-out", tmp)
        os.replace(tmp, os.path.join(self.crl_dir, "device-ca.crl"))

    def start_ocsp(self):
        command = [sys.executable, f"{self.args.repo}/scripts/ocsp-responder.py",
                   "--port", str(self.ocsp_port),
                   "--index", f"{self.pki}/ca/device-ca/index.txt",
                   "--ca", f"{self.pki}/device-ca.pem",
                   "--rsigner", f"{self.pki}/device-ca.pem",
                   "--rkey", f"{self.pki}/device-ca.key", "--nmin", "1"]
        self.ocsp = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.children.append(self.ocsp)
        address = read_line_with(self.ocsp, "listening ")
        self.ocsp_port = int(address.rsplit(":", 1)[1])

    def stop_ocsp(self):
        self.ocsp.terminate()
        self.ocsp.wait(timeout=10)
        self.ocsp = None

    def write_policy(self, generation):
        data = {"soak": {"generation": generation, "denied": ["spiffe://example.test/device/NOBODY"]}}
        tmp = os.path.join(self.work, "policy-data.json.tmp")
        with open(tmp, "w") as file:
            json.dump(data, file)
        os.replace(tmp, os.path.join(self.work, "policy-data.json"))

    def setup(self):
        self.echo = ThreadingTCP(("127.0.0.1", 0), EchoHandler)
        echo_port = serve_in_thread(self.echo)
        self.crl_dir = os.path.join(self.work, "crl")
        os.makedirs(self.crl_dir, exist_ok=True)
        self.publish_crl()
        handler = lambda *a, **k: QuietHTTP(*a, directory=self.crl_dir, **k)  # noqa: E731
        self.crl_server = ThreadingTCP(("127.0.0.1", 0), handler)
        crl_port = serve_in_thread(self.crl_server)
        self.start_ocsp()

        with open(os.path.join(self.work, "policy.rego"), "w") as file:
            file.write(
                "package ztgate\n\nimport rego.v1\n\n"
                "default decision := {\"outcome\": \"deny\", \"reason\": \"not a soak device\"}\n\n"
                "decision := {\"outcome\": \"allow\", \"lifetime_secs\": 20} if {\n"
                "\tstartswith(input.device.device_id, \"spiffe://example.test/device/\")\n"
                "\tnot input.device.device_id in data.soak.denied\n}\n"
            )
        self.write_policy(0)
        self.admin_socket = os.path.join(self.work, "admin.sock")
        config = f"""[gateway]
listen = ["127.0.0.1:0"]
certificate = "{self.pki}/gateway-chain.pem"
private_key = "{self.pki}/gateway.key"
handshake_timeout_ms = 5000

[policy]
engine = "rego"
rego_files = ["{self.work}/policy.rego"]
data_file = "{self.work}/policy-data.json"

[ocsp]
responder_url = "http://127.0.0.1:{self.ocsp_port}/"
timeout_ms = 1000

[admin]
socket_path = "{self.admin_socket}"

[log]
level = "info"
audit = "off"

[[device_ca]]
name = "dev-devices"
certificates = ["{self.pki}/device-ca.pem"]
crl_urls = ["http://127.0.0.1:{crl_port}/device-ca.crl"]
crl_refresh_interval_secs = 5

[[application]]
name = "wiki"
server_name = "{APP}"
upstream = "127.0.0.1:{echo_port}"
ocsp = "soft-fail"
[application.access]
device_cas = ["dev-devices"]
allow_any_device = true
"""
        self.config = os.path.join(self.work, "ztgate.toml")
        with open(self.config, "w") as file:
            file.write(config)
        self.gateway_log = open(os.path.join(self.work, "gateway.log"), "w")
        self.gateway = subprocess.Popen([self.args.ztgate, "serve", "--config", self.config],
                                        stdout=subprocess.PIPE, stderr=self.gateway_log, text=True)
        self.children.append(self.gateway)
        self.gateway_addr = read_line_with(self.gateway, "ztgate: listening quic ")
        log(f"gateway {self.gateway_addr} (pid {self.gateway.pid}), OCSP port {self.ocsp_port}, CRL port {crl_port}")
        for device in STEADY_DEVICES:
            self.start_client(device, f"{self.pki}/{device}-chain.pem", f"{self.pki}/{device}.key")

    def start_client(self, name, chain, key):
        command = [self.args.ztgate, "connect", "--transport", "quic", "--gateway", self.gateway_addr,
                   "--app", APP, "--cert", chain, "--key", key, "--ca", f"{self.pki}/root-ca.pem",
                   "--listen", "127.0.0.1:0"]
        log_path = os.path.join(self.work, f"client-{name}.log")
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
        self.children.append(process)
        local = wait_in_file(log_path, "listening on ", process)
        host, port = local.rsplit(":", 1)
        self.clients[name] = (process, (host, int(port)), chain, key)

    def stop_client(self, name):
        process = self.clients.pop(name)[0]
        process.terminate()
        process.wait(timeout=15)

    # Checks.

    def transfer(self, name, address, results):
        size = random.randint(1, MAX_TRANSFER_BYTES)
        data = os.urandom(size)
        try:
            with socket.create_connection(address, timeout=30) as tcp:
                tcp.settimeout(30)
                sender = threading.Thread(target=lambda: (tcp.sendall(data), tcp.shutdown(socket.SHUT_WR)))
                sender.start()
                received = bytearray()
                while True:
                    chunk = tcp.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                sender.join(30)
            if hashlib.sha256(received).digest() != hashlib.sha256(data).digest():
                results.append(f"{name}: checksum mismatch ({len(received)} of {size} bytes echoed)")
            else:
                results.append(size)
        except OSError as error:
            results.append(f"{name}: transfer of {size} bytes failed: {error}")

    def traffic(self, names, during=None):
        results = []
        threads = []
        for name in names:
            address = self.clients[name][1]
            for _ in range(STREAMS_PER_DEVICE):
                thread = threading.Thread(target=self.transfer, args=(name, address, results))
                thread.start()
                threads.append(thread)
        if during is not None:
            during()
        for thread in threads:
            thread.join(120)
        for result in results:
            self.stats["tunnels"] += 1
            if isinstance(result, int):
                self.stats["bytes_checked"] += result
            else:
                self.failures.append(result)

    def sessions(self):
        out = subprocess.run([self.args.ztgate, "sessions", "--json", "--socket", self.admin_socket],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)["sessions"]

    def sample(self):
        rss = proc_rss_kib(self.gateway.pid)
        self.stats["max_rss_kib"] = max(self.stats["max_rss_kib"], rss)
        return rss, proc_fd_count(self.gateway.pid)

    # Cycle steps.

    def migrate(self, name):
        def send_signal():
            time.sleep(0.05)
            self.clients[name][0].send_signal(signal.SIGUSR1)
            self.stats["migrations"] += 1
        return send_signal

    def revoke_victim(self):
        """Issues a certificate for a new device, tunnels with it, revokes it and times the close."""
        self.victims += 1
        name = f"SOAK-{self.victims:04d}"
        ext = os.path.join(self.work, f"{name}.ext")
        with open(ext, "w") as file:
            file.write("[v]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
                       f"extendedKeyUsage = clientAuth\nsubjectAltName = URI:spiffe://example.test/device/{name}\n")
        key, csr, pem = (os.path.join(self.work, f"{name}.{suffix}") for suffix in ("key", "csr", "pem"))
        self.openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
                     "-keyout", key, "-subj", f"/O=ztgate Dev/OU=soak/CN={name}", "-out", csr)
        os.chmod(key, 0o600)
        self.openssl("ca", "-batch", "-notext", "-config", f"{self.pki}/ca/ca.cnf", "-name", "device_ca",
                     "-extfile", ext, "-extensions", "v", "-days", "1", "-in", csr, "-out", pem)
        chain = os.path.join(self.work, f"{name}-chain.pem")
        with open(chain, "w") as file:
            file.write(open(pem).read() + open(f"{self.pki}/device-ca.pem").read())
        self.start_client(name, chain, key)
        self.traffic([name])

        device = f"spiffe://example.test/device/{name}"
        if not any(s["device"] == device for s in self.sessions()):
            self.failures.append(f"{name}: no live session before its revocation")
        self.openssl("ca", "-batch", "-config", f"{self.pki}/ca/ca.cnf", "-name", "device_ca",
                     "-revoke", pem, "-crl_reason", "keyCompromise")
        self.publish_crl()

        digest = hashlib.sha256(cert_der(pem)).hexdigest()
        pushed = time.monotonic()
        subprocess.run([self.args.ztgate, "revoke", "--cert-sha256", digest, "--reason", "soak",
                        "--socket", self.admin_socket], check=True, capture_output=True)
        while any(s["device"] == device for s in self.sessions()):
            if time.monotonic() - pushed > REVOCATION_GRACE:
                self.failures.append(f"{name}: session outlived its revocation by more than {REVOCATION_GRACE}s")
                break
            time.sleep(0.05)
        closed_after = time.monotonic() - pushed
        self.stats["revocations"] += 1
        self.stats["max_revocation_close_s"] = max(self.stats["max_revocation_close_s"], closed_after)
        self.stop_client(name)

    def reload_policy(self):
        self.write_policy(self.stats["policy_reloads"] + 1)
        self.gateway.send_signal(signal.SIGHUP)
        self.stats["policy_reloads"] += 1

    def cycle(self, number):
        names = list(STEADY_DEVICES)
        migrating = names[number % len(names)]
        self.traffic(names, during=self.migrate(migrating))
        restarting = names[(number + 1) % len(names)]
        process, _, chain, key = self.clients[restarting]
        self.stop_client(restarting)
        self.start_client(restarting, chain, key)
        self.stats["client_restarts"] += 1
        if number % 3 == 0:
            self.revoke_victim()
        if number % 4 == 0:
            self.reload_policy()
        if number % 5 == 0 and self.ocsp is not None:
            self.stop_ocsp()
        elif self.ocsp is None:
            self.start_ocsp()
            self.stats["ocsp_restarts"] += 1
        if self.gateway.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {self.gateway.returncode}")
        self.stats["cycles"] += 1

    def wait_for_steady_sessions(self, limit=30.0):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if len(self.sessions()) == len(STEADY_DEVICES):
                return True
            time.sleep(0.2)
        return False

    def run(self):
        started = time.monotonic()
        end = started + self.args.minutes * 60
        self.setup()
        self.cycle(1)
        self.wait_for_steady_sessions()
        baseline = self.sample()
        log(f"baseline after the first cycle: RSS {baseline[0]} KiB, {baseline[1]} descriptors")
        number = 2
        next_report = time.monotonic() + 60
        while time.monotonic() < end:
            self.cycle(number)
            self.sample()
            number += 1
            if time.monotonic() >= next_report:
                rss, fds = self.sample()
                log(f"{(time.monotonic() - started) / 60:.1f} min: {self.stats['cycles']} cycles, "
                    f"{self.stats['tunnels']} tunnels, RSS {rss} KiB, {fds} descriptors, "
                    f"{len(self.failures)} failures")
                next_report += 60
        if self.ocsp is None:
            self.start_ocsp()
            self.stats["ocsp_restarts"] += 1
        if not self.wait_for_steady_sessions():
            self.failures.append("sessions did not return to the steady devices' count")
        final = self.sample()
        self.report(started, baseline, final)

    def report(self, started, baseline, final):
        rss_growth = final[0] - baseline[0]
        fd_growth = final[1] - baseline[1]
        if rss_growth > RSS_TOLERANCE_KIB:
            self.failures.append(f"RSS grew by {rss_growth} KiB, more than {RSS_TOLERANCE_KIB} KiB")
        if fd_growth > FD_TOLERANCE:
            self.failures.append(f"open descriptors grew by {fd_growth}, more than {FD_TOLERANCE}")
        with open(os.path.join(self.work, "gateway.log")) as file:
            panics = sum("panicked" in line for line in file)
        if panics:
            self.failures.append(f"the gateway log has {panics} panic lines")
        s = self.stats
        print(f"""
soak summary ({(time.monotonic() - started) / 60:.1f} min, {s['cycles']} cycles)
  tunnels (TCP connections through ztgate connect): {s['tunnels']}
  bytes echoed and checked (SHA-256): {s['bytes_checked']}
  migrations (SIGUSR1 rebinds): {s['migrations']}
  client restarts: {s['client_restarts']}
  revocations: {s['revocations']}, longest push-to-close {s['max_revocation_close_s'] * 1000:.0f} ms (limit {REVOCATION_GRACE:.0f} s)
  policy reloads (SIGHUP): {s['policy_reloads']}
  OCSP responder restarts: {s['ocsp_restarts']}
  gateway RSS: baseline {baseline[0]} KiB, end {final[0]} KiB, peak {s['max_rss_kib']} KiB (tolerance +{RSS_TOLERANCE_KIB} KiB)
  gateway descriptors: baseline {baseline[1]}, end {final[1]} (tolerance +{FD_TOLERANCE})
  failures: {len(self.failures)}""", flush=True)
        for failure in self.failures[:20]:
            print(f"    {failure}")

    def cleanup(self):
        for process in reversed(self.children):
            if process.poll() is None:
                process.terminate()
        for process in self.children:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--ztgate", required=True)
    parser.add_argument("--pki", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--repo", required=True)
    args = parser.parse_args()
    soak = Soak(args)
    try:
        soak.run()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        soak.failures.append(f"soak aborted: {error}")
        print(f"soak: aborted: {error}", file=sys.stderr)
    finally:
        soak.cleanup()
    sys.exit(1 if soak.failures else 0)


if __name__ == "__main__":
    main()
