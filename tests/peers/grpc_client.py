#!/usr/bin/env python3
"""gRPC client peer for the whoclosed HTTP/2 end-to-end tests (grpcio, no codegen).

Usage:
  grpc_client.py --target ADDR:PORT [--opt KEY=VALUE]... [--options-json JSON]

  Each `--opt` is a grpc channel argument (e.g. `grpc.keepalive_time_ms=1000`); values
  that look like integers are passed as integers.

Prints `pid <n>`, then `ready` once the channel object exists (no connection is made yet).
Talks to grpc_server.py (methods /whoclosed.Test/Peer and /whoclosed.Test/Slow).

Then one command per stdin line, one response line each on stdout:
  connect [ms]          wait until the channel is READY   -> `connected`
  call [n]              n (default 1) unary Peer calls     -> `done <n> local=<ADDR:PORT>`
                        (the client socket's address as the server saw it on the last call)
  slow <ms>             start a Slow(<ms>) call in the background -> `started`
  cancel                cancel the background call; waits until grpc reports it cancelled
                        -> `cancelled`
  slow-cancel <ms> <after_ms>   slow <ms>, sleep <after_ms>, cancel -> `cancelled`
  state                 channel connectivity  -> `state <IDLE|CONNECTING|READY|
                        TRANSIENT_FAILURE|SHUTDOWN|UNKNOWN>`
  wait-state <S>[,<S>...] [ms]  wait until the channel is in one of the states
                        -> `state <S>` (or `error timeout ...`)
  wait-down [ms]        wait until the channel, once reported READY, has left READY
                        (IDLE, TRANSIENT_FAILURE or SHUTDOWN) -> `state <S>`
                        (state callbacks arrive on a grpc thread, late: right after a
                        call the last one delivered can still be the initial IDLE)
  sleep <ms>            -> `slept`
  close                 channel.close()                     -> `closed`
  pid                   -> `pid <n>`
  exit                  -> `bye`, exits 0 without closing the channel
Failures are `error <text>` (grpc errors as `error <StatusCode> <details>`). EOF on stdin
exits.
"""

import argparse
import json
import os
import sys
import threading
import time

import grpc

SERVICE = "whoclosed.Test"

_state_lock = threading.Condition()
_state = "UNKNOWN"
# Set once the callback thread has reported READY; later states are real transitions.
_ready_seen = False


def say(line):
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        os._exit(0)


def ident(b):
    return b


def parse_value(v):
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return v
    return v


def on_state(conn):
    global _state, _ready_seen
    with _state_lock:
        _state = conn.name
        _ready_seen = _ready_seen or _state == "READY"
        _state_lock.notify_all()


def rpc_error(e):
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        try:
            return f"{e.code().name} {e.details()}"
        except Exception:  # noqa: BLE001
            pass
    return f"{type(e).__name__}: {e}"


class Client:
    """One method per command; each returns the response line."""

    def __init__(self, channel, peer, slow):
        self.channel = channel
        self.peer = peer
        self.slow = slow
        self.pending = None

    def cmd_connect(self, rest):
        ms = int(rest[0]) if rest else 10000
        grpc.channel_ready_future(self.channel).result(timeout=ms / 1000.0)
        return "connected"

    def cmd_call(self, rest):
        n = int(rest[0]) if rest else 1
        local = ""
        for _ in range(n):
            local = self.peer(b"", timeout=10).decode()
        return f"done {n} local={local}"

    def cmd_slow(self, rest):
        ms = int(rest[0])
        self.pending = self.slow.future(str(ms).encode(), timeout=ms / 1000.0 + 30)
        return "started"

    def cmd_cancel(self, rest):
        if self.pending is None:
            return "error no pending call"
        pending, self.pending = self.pending, None
        ok = pending.cancel()
        try:
            pending.result(timeout=10)
            return f"error call finished before it was cancelled (cancel()={ok})"
        except grpc.FutureCancelledError:
            return "cancelled"
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return "cancelled"
            return f"error {rpc_error(e)}"

    def cmd_slow_cancel(self, rest):
        self.cmd_slow(rest[:1])
        time.sleep(int(rest[1]) / 1000.0)
        return self.cmd_cancel([])

    def cmd_state(self, rest):
        with _state_lock:
            return f"state {_state}"

    def cmd_wait_state(self, rest):
        want = rest[0].split(",")
        ms = int(rest[1]) if len(rest) > 1 else 10000
        deadline = time.monotonic() + ms / 1000.0
        with _state_lock:
            while _state not in want:
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"error timeout: state {_state} after {ms} ms, wanted {rest[0]}"
                _state_lock.wait(left)
            return f"state {_state}"

    def cmd_wait_down(self, rest):
        ms = int(rest[0]) if rest else 10000
        deadline = time.monotonic() + ms / 1000.0
        down = ("IDLE", "TRANSIENT_FAILURE", "SHUTDOWN")
        with _state_lock:
            while not (_ready_seen and _state in down):
                left = deadline - time.monotonic()
                if left <= 0:
                    return (
                        f"error timeout: state {_state} after {ms} ms "
                        f"(READY reported: {_ready_seen}), wanted it to leave READY"
                    )
                _state_lock.wait(left)
            return f"state {_state}"

    def cmd_sleep(self, rest):
        time.sleep(int(rest[0]) / 1000.0)
        return "slept"

    def cmd_close(self, rest):
        self.channel.close()
        return "closed"

    def cmd_pid(self, rest):
        return f"pid {os.getpid()}"

    def cmd_exit(self, rest):
        say("bye")
        os._exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--opt", action="append", default=[])
    ap.add_argument("--options-json", default=None)
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

    try:
        channel = grpc.insecure_channel(a.target, options=list(opts.items()))
        channel.subscribe(on_state, try_to_connect=False)
        peer = channel.unary_unary(
            f"/{SERVICE}/Peer", request_serializer=ident, response_deserializer=ident
        )
        slow = channel.unary_unary(
            f"/{SERVICE}/Slow", request_serializer=ident, response_deserializer=ident
        )
    except Exception as e:  # noqa: BLE001
        say(f"error {e}")
        sys.exit(1)
    say("ready")

    client = Client(channel, peer, slow)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, rest = words[0], words[1:]
        fn = getattr(client, "cmd_" + cmd.replace("-", "_"), None)
        if fn is None:
            say(f"error unknown command {cmd!r}")
            continue
        try:
            say(fn(rest))
        except grpc.RpcError as e:
            say(f"error {rpc_error(e)}")
        except Exception as e:  # noqa: BLE001
            say(f"error {type(e).__name__}: {e}")
    os._exit(0)


if __name__ == "__main__":
    main()
