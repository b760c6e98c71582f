#!/usr/bin/env python3
"""An independent ztgate client built on aioquic, for interoperability tests.

usage: aioquic_client.py HOST PORT --cert CHAIN --key KEY --ca CA --sni NAME
                         [--bind 127.0.0.1] [--hold SECONDS]

It completes mutual TLS with ALPN ztgate/1, reads `admitted` from the
gateway's control stream (a version byte 0x01, then frames of a type byte, a
big-endian u16 length and a JSON body), opens a bidirectional stream, sends
the preamble 0x01 0x00 and checks that the upstream echoes what follows. Then
it moves to a new UDP socket on a new local port, keeping the same
connection and stream, and goes on exchanging a message every 100 ms until a
line arrives on stdin, stdin closes, or --hold seconds pass.

Lines printed on stdout:
  admitted {"session_id": ...}     the control stream's first message
  echo 1 ok                        the first exchange, before the move
  migrated local=IP:PORT           the new socket's address
  done N                           N exchanges after the move, all echoed
Exits with status 1 and a message when anything fails.
"""
import argparse
import asyncio
import json
import socket
import ssl
import struct
import sys

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

PREAMBLE = b"\x01\x00"
ADMITTED = 1


def udp_socket(host):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


async def read_control_message(reader):
    kind, length = struct.unpack("!BH", await reader.readexactly(3))
    return kind, json.loads(await reader.readexactly(length))


async def exchange(reader, writer, payload, timeout):
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    if echoed != payload:
        raise RuntimeError(f"echo differs: sent {payload!r}, got {echoed!r}")


async def run(args):
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=["ztgate/1"],
        server_name=args.sni,
        verify_mode=ssl.CERT_REQUIRED,
        idle_timeout=30.0,
    )
    config.load_cert_chain(args.cert, args.key)
    config.load_verify_locations(cafile=args.ca)

    loop = asyncio.get_running_loop()
    control = loop.create_future()

    def on_stream(reader, _writer):
        # The gateway's first stream is its unidirectional control stream.
        if not control.done():
            control.set_result(reader)

    connection = QuicConnection(configuration=config)
    _, protocol = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(connection, stream_handler=on_stream),
        sock=udp_socket(args.bind),
    )
    protocol.connect((args.host, args.port))
    await asyncio.wait_for(protocol.wait_connected(), args.timeout)

    control_reader = await asyncio.wait_for(control, args.timeout)
    version = await asyncio.wait_for(control_reader.readexactly(1), args.timeout)
    if version != b"\x01":
        raise RuntimeError(f"control stream version {version!r}, expected 0x01")
    kind, body = await asyncio.wait_for(read_control_message(control_reader), args.timeout)
    if kind != ADMITTED:
        raise RuntimeError(f"control message type {kind}, expected admitted: {body}")
    print("admitted " + json.dumps(body), flush=True)

    reader, writer = await protocol.create_stream()
    writer.write(PREAMBLE)
    await exchange(reader, writer, b"echo before the move\n", args.timeout)
    print("echo 1 ok", flush=True)

    # A new socket on a new port for the same protocol object: every later
    # packet leaves from it, as after a NAT rebinding or a network change.
    old = protocol._transport
    await loop.create_datagram_endpoint(lambda: protocol, sock=udp_socket(args.bind))
    old.close()
    protocol.change_connection_id()
    local = protocol._transport.get_extra_info("sockname")
    print(f"migrated local={local[0]}:{local[1]}", flush=True)

    stop = loop.create_future()

    def on_stdin():
        if not stop.done():
            stop.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    exchanges = 0
    deadline = loop.time() + args.hold
    while not stop.done() and loop.time() < deadline:
        exchanges += 1
        await exchange(reader, writer, f"echo {exchanges} after the move\n".encode(), args.timeout)
        await asyncio.sleep(0.1)
    loop.remove_reader(sys.stdin.fileno())
    writer.write_eof()
    protocol.close()
    await asyncio.wait_for(protocol.wait_closed(), args.timeout)
    print(f"done {exchanges}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--sni", required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except Exception as error:  # noqa: BLE001 - report any failure as a line and a status
        print(f"failed: {type(error).__name__}: {error}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
