#!/usr/bin/env python3
"""Loopback recorders for fuzz/seeds/capture.sh.

udp LISTEN_PORT UPSTREAM_PORT REQ_DIR REPLY_DIR PREFIX SECONDS
    A UDP relay on 127.0.0.1:LISTEN_PORT to 127.0.0.1:UPSTREAM_PORT (chimed):
    every datagram a client sends is written to REQ_DIR/PREFIX-N and
    forwarded; every reply is written to REPLY_DIR/PREFIX-reply-N and sent
    back to the client. Runs SECONDS seconds at most.

ntske LISTEN_PORT CERT KEY OUT_DIR PREFIX SECONDS
    A TLS 1.3 server with ALPN ntske/1 on 127.0.0.1:LISTEN_PORT that writes
    the plaintext NTS-KE request of each connection (up to End of Message)
    to OUT_DIR/PREFIX-N, then closes without answering.

Only 127.0.0.1 is ever bound or contacted.
"""

import os
import select
import signal
import socket
import ssl
import sys
import time

LOOPBACK = "127.0.0.1"
MAX_FILES = 16


def save(directory, name, data):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def udp(listen_port, upstream_port, req_dir, reply_dir, prefix, seconds):
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind((LOOPBACK, listen_port))
    # One upstream socket per client address, so replies find their way back.
    uplinks = {}
    counts = [0, 0]
    try:
        relay_loop(front, uplinks, upstream_port, req_dir, reply_dir, prefix, seconds, counts)
    finally:
        print(f"recorder udp {prefix}: {counts[0]} requests, {counts[1]} replies", file=sys.stderr)


def relay_loop(front, uplinks, upstream_port, req_dir, reply_dir, prefix, seconds, counts):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        socks = [front] + list(uplinks.values())
        ready, _, _ = select.select(socks, [], [], 0.1)
        for s in ready:
            if s is front:
                data, client = front.recvfrom(65535)
                if counts[0] < MAX_FILES:
                    save(req_dir, f"{prefix}-{counts[0]}", data)
                counts[0] += 1
                up = uplinks.get(client)
                if up is None:
                    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    up.bind((LOOPBACK, 0))
                    uplinks[client] = up
                up.sendto(data, (LOOPBACK, upstream_port))
            else:
                data, _ = s.recvfrom(65535)
                client = next(c for c, u in uplinks.items() if u is s)
                if counts[1] < MAX_FILES:
                    save(reply_dir, f"{prefix}-reply-{counts[1]}", data)
                counts[1] += 1
                front.sendto(data, client)


def read_request(conn):
    """Reads NTS-KE records until End of Message (type 0, critical or not)."""
    buf = b""
    at = 0
    while True:
        while len(buf) >= at + 4:
            rtype = int.from_bytes(buf[at : at + 2], "big") & 0x7FFF
            body = int.from_bytes(buf[at + 2 : at + 4], "big")
            if len(buf) < at + 4 + body:
                break
            at += 4 + body
            if rtype == 0:
                return buf[:at]
        chunk = conn.recv(4096)
        if not chunk:
            return buf
        buf += chunk


def ntske(listen_port, cert, key, out_dir, prefix, seconds):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["ntske/1"])
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOOPBACK, listen_port))
    srv.listen(8)
    srv.settimeout(0.2)
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and n < MAX_FILES:
        try:
            raw, _ = srv.accept()
        except socket.timeout:
            continue
        raw.settimeout(3)
        try:
            with ctx.wrap_socket(raw, server_side=True) as conn:
                data = read_request(conn)
                if data:
                    save(out_dir, f"{prefix}-{n}", data)
                    n += 1
        except (ssl.SSLError, OSError) as e:
            print(f"recorder ntske {prefix}: {e}", file=sys.stderr)
    print(f"recorder ntske {prefix}: {n} requests", file=sys.stderr)


def main():
    # capture.sh stops a recorder with SIGTERM: end like the timeout does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "udp":
        udp(int(args[0]), int(args[1]), args[2], args[3], args[4], float(args[5]))
    elif mode == "ntske":
        ntske(int(args[0]), args[1], args[2], args[3], args[4], float(args[5]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
