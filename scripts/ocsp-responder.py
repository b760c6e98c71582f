#!/usr/bin/env python3
"""Loopback-only OCSP responder for tests.

Serves OCSP over HTTP on 127.0.0.1 and computes each response with
`openssl ocsp` in offline mode (-reqin/-respout), which re-reads the CA's
index.txt on every request, so a revocation shows up in the next response.
`openssl ocsp -port` is not used because OpenSSL 3.0 binds it to every
interface.

It accepts POST (application/ocsp-request) and the RFC 6960 appendix A.1 GET
form, and keeps HTTP/1.1 connections open between requests. On start it
prints "listening 127.0.0.1:PORT" on stdout. Logs go to stderr.

GET /-/stats returns request counters as JSON: requests, get, post and
connections (TCP connections that carried at least one OCSP request). The path cannot collide with the GET
form, because URL-encoded base64 never contains '-'.

Modes other than `openssl` send fixed responses for failure tests: `garbage`
(bytes that are no DER), `try-later` and `unauthorized` (an OCSPResponse
with only that responseStatus), `http-error` (HTTP 500), `replay` (the bytes
of --replay-file) and `hang` (accept and read the request, then send nothing
until --hang-seconds pass).

Example:
  scripts/ocsp-responder.py --index pki/ca/device-ca/index.txt \\
      --ca pki/device-ca.pem --rsigner pki/device-ca.pem --rkey pki/device-ca.key
"""

import argparse
import base64
import binascii
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

# OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED } without responseBytes
# (RFC 6960 section 4.2.1): tryLater is 3 and unauthorized is 6.
TRY_LATER = bytes([0x30, 0x03, 0x0A, 0x01, 0x03])
UNAUTHORIZED = bytes([0x30, 0x03, 0x0A, 0x01, 0x06])
GARBAGE = b"this is not a DER-encoded OCSP response\n"

MAX_REQUEST_BYTES = 64 * 1024
OPENSSL_TIMEOUT_SECONDS = 10
STATS_PATH = "/-/stats"


def parse_args():
    parser = argparse.ArgumentParser(
        description="Loopback-only OCSP responder for tests, backed by `openssl ocsp`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 (the default) picks a free one")
    parser.add_argument("--index", help="the CA's `openssl ca` database (index.txt)")
    parser.add_argument("--ca", help="PEM certificate of the CA that issued the queried certificates")
    parser.add_argument("--rsigner", help="PEM certificate of the response signer")
    parser.add_argument("--rkey", help="PEM private key of the response signer")

    parser.add_argument("--nmin", type=int, default=5, help="minutes from thisUpdate to nextUpdate (default 5)")
    parser.add_argument("--no-next-update", action="store_true", help="leave nextUpdate out of responses")
    parser.add_argument("--rmd", help="digest for the response signature, passed to openssl ocsp -rmd")
    parser.add_argument(
        "--rsigopt", action="append", default=[], help="signature option such as rsa_padding_mode:pss, passed to openssl ocsp -rsigopt (repeatable)"
    )
    parser.add_argument(
        "--mode",
        default="openssl",
        choices=["openssl", "garbage", "try-later", "unauthorized", "http-error", "replay", "hang"],
        help="how to respond (default openssl)",
    )
    parser.add_argument("--replay-file", help="DER response that mode replay sends")

    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each response")
    parser.add_argument("--hang-seconds", type=float, default=30.0, help="seconds that mode hang waits before it closes the connection without a response (default 30)")
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="exit after this many seconds (default 600), so no run is unbounded"
    )
    parser.add_argument("--exit-on-eof", action="store_true", help="exit when stdin reaches end of file, for example when the parent test dies")

    args = parser.parse_args()
    if args.mode == "openssl":
        missing = [name for name in ("index", "ca", "rsigner", "rkey") if getattr(args, name) is None]
        if missing:
            parser.error("mode openssl needs " + ", ".join("--" + name for name in missing))
    if args.mode == "replay" and args.replay_file is None:
        parser.error("mode replay needs --replay-file")
    return args


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "get": 0, "post": 0, "connections": 0}

    def add(self, *names):
        with self.lock:
            for name in names:
                self.counts[name] += 1

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


def run_openssl(args, request):
    """Returns the DER response that `openssl ocsp` computes for a DER request."""
    with tempfile.TemporaryDirectory(prefix="ocsp-responder-") as work:
        request_path = os.path.join(work, "request.der")
        response_path = os.path.join(work, "response.der")
        with open(request_path, "wb") as file:
            file.write(request)
        command = [
            "openssl", "ocsp",
            "-index", args.index,
            "-CA", args.ca,
            "-rsigner", args.rsigner,
            "-rkey", args.rkey,
            "-reqin", request_path,
            "-respout", response_path,
        ]
        if not args.no_next_update:
            command += ["-nmin", str(args.nmin)]
        if args.rmd:
            command += ["-rmd", args.rmd]
        for option in args.rsigopt:
            command += ["-rsigopt", option]
        result = subprocess.run(command, capture_output=True, timeout=OPENSSL_TIMEOUT_SECONDS)
        if result.returncode != 0 or not os.path.exists(response_path):
            stderr = result.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"openssl ocsp exited with status {result.returncode}: {stderr}")
        with open(response_path, "rb") as file:
            return file.read()


def make_handler(args, stats):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        # One handler instance serves one connection.
        counted_connection = False

        def count(self, method):
            stats.add("requests", method)
            if not self.counted_connection:
                self.counted_connection = True
                stats.add("connections")

        def do_GET(self):
            if self.path == STATS_PATH:
                self.send_body(200, "application/json", json.dumps(stats.snapshot()).encode())
                return
            self.count("get")
            # The request is the last path segment, so a responder URL with a
            # path such as /ocsp also works.
            segment = self.path.rsplit("/", 1)[-1]
            try:
                request = base64.b64decode(urllib.parse.unquote(segment), validate=True)
            except (binascii.Error, ValueError) as error:
                self.log_message("invalid GET request path %r: %s", self.path, error)
                self.send_body(400, "text/plain", b"invalid base64 in the request path\n")
                return
            self.respond(request)

        def do_POST(self):
            self.count("post")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.send_body(411, "text/plain", b"Content-Length is required\n")
                return
            if length < 0 or length > MAX_REQUEST_BYTES:
                self.send_body(413, "text/plain", b"request too large\n")
                return
            self.respond(self.rfile.read(length))

        def respond(self, request):
            if args.delay > 0:
                time.sleep(args.delay)
            if args.mode == "hang":
                time.sleep(args.hang_seconds)
                self.close_connection = True
                return
            if args.mode == "http-error":
                self.send_body(500, "text/plain", b"internal server error (test mode http-error)\n")
                return
            if args.mode == "garbage":
                body = GARBAGE
            elif args.mode == "try-later":
                body = TRY_LATER
            elif args.mode == "unauthorized":
                body = UNAUTHORIZED
            elif args.mode == "replay":
                with open(args.replay_file, "rb") as file:
                    body = file.read()
            else:
                try:
                    body = run_openssl(args, request)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
                    self.log_message("failed to compute a response: %s", error)
                    self.send_body(500, "text/plain", b"the responder failed to compute a response\n")
                    return
            self.send_body(200, "application/ocsp-response", body)

        def send_body(self, status, content_type, body):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *values):
            sys.stderr.write("ocsp-responder: %s\n" % (format % values))

    return Handler


def exit_on_stdin_eof():
    while sys.stdin.buffer.read(4096):
        pass
    os._exit(0)


def main():
    args = parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args, Stats()))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening {host}:{port}", flush=True)
    if args.exit_on_eof:
        threading.Thread(target=exit_on_stdin_eof, daemon=True).start()
    timer = threading.Timer(args.max_seconds, server.shutdown)
    timer.daemon = True
    timer.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
