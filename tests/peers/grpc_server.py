#!/usr/bin/env python3
"""gRPC server peer for the whoclosed HTTP/2 end-to-end tests (grpcio, no codegen).

Usage:
  grpc_server.py --listen ADDR:PORT [--opt KEY=VALUE]... [--options-json JSON]
                 [--workers N]

  ADDR:PORT is `10.241.2.2:50051` or `[fd00:241:2::2]:50051`. Each `--opt` is a grpc
  channel argument for the server (e.g. `grpc.max_connection_idle_ms=1000`); values that
  look like integers are passed as integers. `--options-json` takes an object of the same.

Prints `pid <n>`, then `listening <ADDR:PORT>` once serving (or `error <text>` and exits 1).

Methods (generic handlers, identity bytes serializers):
  /whoclosed.Test/Peer   replies with the caller's address as the server sees it
                         (`10.241.1.2:41236`, `[fd00:241:1::2]:41236`)
  /whoclosed.Test/Slow   request: ASCII milliseconds; sleeps that long (or until the call is
                         cancelled), then replies like Peer

Then one command per stdin line, one response line each on stdout:
  stats                       -> `stats calls=<n> cancelled=<n> peers=<a>,<b>,...`
  wait-cancelled <n> [ms]     wait until >= n Slow calls saw their cancellation
                              -> `cancelled <n>` (or `error timeout ...`)
  stop [grace_ms]             server.stop(grace) and wait -> `stopped`
  pid                         -> `pid <n>`
  exit                        -> `bye`, exits 0 (no graceful stop)
Failures are `error <text>`. EOF on stdin exits.
"""

import argparse
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "whoclosed.Test"

_lock = threading.Lock()
_calls = 0
_cancelled = 0
_peers = []


def say(line):
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        os._exit(0)


def peer_addr(peer):
    """`ipv4:1.2.3.4:5` / `ipv6:[::1]:5` -> `1.2.3.4:5` / `[::1]:5` (percent-decoded)."""
    for pfx in ("ipv4:", "ipv6:"):
        if peer.startswith(pfx):
            peer = peer[len(pfx):]
            break
    return peer.replace("%5B", "[").replace("%5D", "]")


def _record(context):
    global _calls
    p = peer_addr(context.peer())
    with _lock:
        _calls += 1
        if p not in _peers:
            _peers.append(p)
    return p


def peer_method(request, context):
    return _record(context).encode()


def slow_method(request, context):
    global _cancelled
    p = _record(context)
    try:
        ms = int(request.decode() or "0")
    except ValueError:
        ms = 0
    deadline = time.monotonic() + ms / 1000.0
    while time.monotonic() < deadline:
        if not context.is_active():
            with _lock:
                _cancelled += 1
            return b""
        time.sleep(0.01)
    return p.encode()


def ident(b):
    return b


def parse_value(v):
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return v
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--opt", action="append", default=[])
    ap.add_argument("--options-json", default=None)
    ap.add_argument("--workers", type=int, default=8)
    a = ap.parse_args()
    say(f"pid {os.getpid()}")

    opts = {}
    if a.options_json:
        for k, v in json.loads(a.options_json).items():
            opts[k] = parse_value(v)
    for kv in a.opt:
        if "=" not in kv:
            say(f"error bad --opt {kv!r}: expected KEY=VALUE")
            sys.exit(2)
        k, v = kv.split("=", 1)
        opts[k] = parse_value(v)

    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Peer": grpc.unary_unary_rpc_method_handler(
                peer_method, request_deserializer=ident, response_serializer=ident
            ),
            "Slow": grpc.unary_unary_rpc_method_handler(
                slow_method, request_deserializer=ident, response_serializer=ident
            ),
        },
    )
    try:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=a.workers),
            handlers=[handlers],
            options=list(opts.items()),
        )
        port = server.add_insecure_port(a.listen)
        if port == 0:
            raise RuntimeError(f"cannot bind {a.listen}")
        server.start()
    except Exception as e:  # noqa: BLE001 - reported on the line protocol
        say(f"error {e}")
        sys.exit(1)
    host = a.listen.rsplit(":", 1)[0]
    say(f"listening {host}:{port}")

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, rest = words[0], words[1:]
        try:
            if cmd == "stats":
                with _lock:
                    say(f"stats calls={_calls} cancelled={_cancelled} peers={','.join(_peers)}")
            elif cmd == "wait-cancelled":
                n = int(rest[0])
                ms = int(rest[1]) if len(rest) > 1 else 10000
                deadline = time.monotonic() + ms / 1000.0
                while True:
                    with _lock:
                        c = _cancelled
                    if c >= n:
                        say(f"cancelled {c}")
                        break
                    if time.monotonic() >= deadline:
                        say(f"error timeout: {c} of {n} cancellations after {ms} ms")
                        break
                    time.sleep(0.01)
            elif cmd == "stop":
                grace = int(rest[0]) / 1000.0 if rest else None
                server.stop(grace).wait()
                say("stopped")
            elif cmd == "pid":
                say(f"pid {os.getpid()}")
            elif cmd == "exit":
                say("bye")
                os._exit(0)
            else:
                say(f"error unknown command {cmd!r}")
        except Exception as e:  # noqa: BLE001
            say(f"error {type(e).__name__}: {e}")
    os._exit(0)


if __name__ == "__main__":
    main()
