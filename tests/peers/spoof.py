#!/usr/bin/env python3
"""On-path packet crafter for the hostile end-to-end tests (tests/tests/e2e_hostile.rs).

Runs in the router namespace of a test topology, so it sees both directions of a
client/server connection on the router's client-side device and can forge segments that
claim to come from the server. Standard library only (AF_PACKET to watch, a raw IPv4
socket to send), so it needs no package beyond python3.

    spoof.py <iface> <server_ip> <server_port>

Prints `pid <n>` and `ready`, then answers one line per command read from stdin:

    state                                 -> `state rcv_nxt=<n> ack=<n> client=<ip:port>`
    inject <flags> <delta> [ttl] [hex]    -> `injected seq=<n>`
        A segment server -> client with sequence number (client's rcv_nxt + delta) mod 2^32,
        ACK = the server's latest acknowledgement, the given TCP flags (letters of FSRPA),
        TTL (default 64) and payload (hex, default none).
    flood <n>                             -> `flooded <n>`
        n RST segments at pseudo-random sequence numbers that are never rcv_nxt.
    exit                                  -> `bye`

rcv_nxt of the client is derived from the server -> client segments seen so far (sequence
number + payload length + SYN + FIN of the one ending furthest).
"""

import os
import random
import socket
import struct
import sys
import threading

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def after(a: int, b: int) -> bool:
    """a is after b in sequence space."""
    return ((a - b) & 0xFFFFFFFF) != 0 and ((a - b) & 0xFFFFFFFF) < 0x80000000


class Watch:
    def __init__(self, iface: str, server_ip: str, server_port: int):
        self.server_ip = socket.inet_aton(server_ip)
        self.server_port = server_port
        self.lock = threading.Lock()
        self.rcv_nxt = None
        self.ack = None
        self.client = None
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((iface, 0))

    def run(self):
        while True:
            frame, addr = self.sock.recvfrom(65536)
            proto = addr[1]
            if proto != ETH_P_IP:
                continue
            ip = frame[14:]
            if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            src, dst = ip[12:16], ip[16:20]
            tcp = ip[ihl:]
            sport, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
            doff = (tcp[12] >> 4) * 4
            flags = tcp[13]
            if src != self.server_ip or sport != self.server_port:
                continue
            plen = total - ihl - doff
            end = (seq + plen + (flags & 0x02 and 1) + (flags & 0x01)) & 0xFFFFFFFF
            with self.lock:
                if self.rcv_nxt is None or after(end, self.rcv_nxt):
                    self.rcv_nxt = end
                if flags & 0x10:
                    self.ack = ack
                self.client = (dst, dport)


def build(src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int, flags: str,
          ttl: int, payload: bytes) -> bytes:
    bits = 0
    for ch in flags:
        bits |= {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}[ch]
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack if bits & 0x10 else 0, 5 << 4,
                      bits, 65535, 0, 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    csum = checksum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    total = 20 + len(tcp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, random.randint(0, 0xFFFF), 0, ttl, 6, 0,
                     src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


def main():
    iface, server_ip, server_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = Watch(iface, server_ip, server_port)
    threading.Thread(target=w.run, daemon=True).start()
    out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    print("pid %d" % os.getpid(), flush=True)
    print("ready", flush=True)
    rng = random.Random(9)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        with w.lock:
            rcv_nxt, ack, client = w.rcv_nxt, w.ack, w.client
        if words[0] == "exit":
            print("bye", flush=True)
            return
        if words[0] == "state":
            if client is None:
                print("error no server segment seen yet", flush=True)
            else:
                print("state rcv_nxt=%d ack=%d client=%s:%d"
                      % (rcv_nxt, ack or 0, socket.inet_ntoa(client[0]), client[1]), flush=True)
            continue
        if client is None or ack is None:
            print("error no server segment seen yet", flush=True)
            continue
        dst, dport = client
        if words[0] == "inject":
            flags, delta = words[1], int(words[2], 0)
            ttl = int(words[3]) if len(words) > 3 else 64
            payload = bytes.fromhex(words[4]) if len(words) > 4 else b""
            seq = (rcv_nxt + delta) & 0xFFFFFFFF
            pkt = build(w.server_ip, server_port, dst, dport, seq, ack, flags, ttl, payload)
            out.sendto(pkt, (socket.inet_ntoa(dst), 0))
            print("injected seq=%d" % seq, flush=True)
        elif words[0] == "flood":
            n = int(words[1])
            for _ in range(n):
                delta = rng.randint(1, 0xFFFFFFFF)
                seq = (rcv_nxt + delta) & 0xFFFFFFFF
                pkt = build(w.server_ip, server_port, dst, dport, seq, ack, "R", 64, b"")
                out.sendto(pkt, (socket.inet_ntoa(dst), 0))
            print("flooded %d" % n, flush=True)
        else:
            print("error unknown command %r" % words[0], flush=True)


if __name__ == "__main__":
    main()
