#!/usr/bin/env python3
"""Serve the OPA REST Data API on loopback from the real OPA engine.

The engine is OPA's Go `rego` package, embedded by the PyPI package
opa-golib-python-bindings (import name opa_bindings). It answers
POST /v1/data/<path> with {"input": ...} as {"result": ...}, and with {}
when the document is undefined, as OPA does.

usage: opa-server.py POLICY.rego [DATA.json]
Prints "listening 127.0.0.1:PORT" once ready; exits when stdin closes.
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from opa_bindings import OpaEngine
from opa_bindings.engine import OpaError, OpaUndefinedError

ENGINE = OpaEngine()
with open(sys.argv[1], encoding="utf-8") as policy:
    ENGINE.add_policy(sys.argv[1], policy.read())
if len(sys.argv) > 2:
    with open(sys.argv[2], encoding="utf-8") as data:
        ENGINE.add_data(json.load(data))


class DataApi(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        path = self.path.split("?", 1)[0]
        if not path.startswith("/v1/data/"):
            self.reply(404, {"code": "resource_not_found", "message": path})
            return
        try:
            request = json.loads(raw)
        except ValueError as error:
            self.reply(400, {"code": "invalid_parameter", "message": str(error)})
            return
        document = path[len("/v1/data/"):].strip("/").replace("/", ".")
        try:
            result = ENGINE.eval_document(document, request.get("input"))
        except OpaUndefinedError:
            self.reply(200, {})
            return
        except OpaError as error:
            self.reply(500, {"code": "internal_error", "message": str(error)})
            return
        self.reply(200, {"result": result})

    def log_message(self, format, *args):
        sys.stderr.write("opa-server: " + format % args + "\n")


server = HTTPServer(("127.0.0.1", 0), DataApi)
print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
