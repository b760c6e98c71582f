#!/usr/bin/env python3
"""TCP echo server and checking client for tests that run inside network
namespaces, where the test process itself cannot open sockets.

usage: tcp_echo.py server HOST PORT SECONDS
       tcp_echo.py client HOST PORT BYTES SECONDS

The server echoes every connection and half-closes after the peer does; it
prints "ready" once listening and exits after SECONDS. The client sends BYTES
of a fixed pattern, checks every echoed byte, prints "progress N" for each
MiB received and "ok N" at the end, and exits with status 1 on a mismatch or
when SECONDS pass first.
"""
import socket
import sys
import threading
import time


def pattern(total):
    block = bytes((i * 31 + 7) % 256 for i in range(65536))
    whole, rest = divmod(total, len(block))
    return block * whole + block[:rest]


def serve(host, port, seconds):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    listener.settimeout(1.0)
    print("ready", flush=True)

    def echo(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def client(host, port, total, seconds):
    data = pattern(total)
    conn = socket.create_connection((host, port), timeout=seconds)
    conn.settimeout(seconds)
    deadline = time.monotonic() + seconds

    def send():
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=send, daemon=True).start()
    received = 0
    next_report = 1 << 20
    while received < total:
        if time.monotonic() > deadline:
            print(f"timed out after {received} bytes", flush=True)
            return 1
        chunk = conn.recv(262144)
        if not chunk:
            break
        if chunk != data[received:received + len(chunk)]:
            print(f"mismatch at offset {received}", flush=True)
            return 1
        received += len(chunk)
        while received >= next_report:
            print(f"progress {next_report}", flush=True)
            next_report += 1 << 20
    if received != total:
        print(f"stream ended after {received} of {total} bytes", flush=True)
        return 1
    print(f"ok {received}", flush=True)
    return 0


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        serve(host, port, float(sys.argv[4]))
        return 0
    return client(host, port, int(sys.argv[4]), float(sys.argv[5]))


if __name__ == "__main__":
    sys.exit(main())
