#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""What the per-frame MAC and TLS cost: frames over a socket, tagged (as the stream is) against
crc only, and tagged inside TLS 1.3 (repctl.tls, as with `tls` configured).

One process sends WRITE frames through repctl.protocol.FramedConnection, another receives and
validates them, over a Unix socketpair: the same code as the replication stream, without the
devices, so that the difference between the columns is the MAC, then TLS, and nothing else.
Printed side by side in one run, for 1 MiB frames (streaming large writes, resync chunks) and
4 KiB frames (small random writes):

    frames   crc only        MAC (Poly1305)   MAC / crc   MAC + TLS 1.3    TLS / MAC
    1 MiB    812.3 MiB/s     640.1 MiB/s      78.8 %      401.2 MiB/s      62.7 %

The TLS column needs the `openssl` command (it makes a throwaway CA and two node certificates,
as docs/wan.md says); without it the column is left out.

Runs anywhere (no root, no devices); `make bench` runs it in the test VM beside the other
benchmarks. Figures from there are in docs/benchmarks-replication.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pyctl"))
sys.path.insert(0, str(REPO / "tests" / "host"))  # tlspki: the test certificates

from repctl import protocol as P  # noqa: E402
from repctl import tls as T
from repctl.config import TLSFiles

KEY_S, KEY_T = b"s" * 32, b"t" * 32


def make_tls(folder: Path) -> tuple[T.TLS, T.TLS]:
    """TLS for a sender (node alpha) and a receiver (node beta), certificates made now."""
    from tlspki import make_ca, make_node

    make_ca(folder)
    a, b = make_node(folder, "alpha"), make_node(folder, "beta")
    return (T.TLS(TLSFiles(a.cert, a.key, a.ca), "alpha", "global.tls", "bench"),
            T.TLS(TLSFiles(b.cert, b.key, b.ca), "beta", "global.tls", "bench"))


def _receiver(sock: socket.socket, mac: bool, frames: int, out: mp.SimpleQueue,
              tls: T.TLS | None) -> None:
    stream: P.Stream = sock if tls is None else tls.server(sock, ("socketpair", 0))
    conn = P.FramedConnection(stream)
    if mac:
        conn.authenticate(KEY_T, KEY_S)
    buf = bytearray(P.MAX_PAYLOAD)
    for _ in range(frames):
        frame = conn.recv(buf)
        P.decode(frame.type, frame.payload)
    out.put(time.monotonic())


def run(size: int, total: int, mac: bool, tls: tuple[T.TLS, T.TLS] | None = None) -> float:
    """MiB/s of `total` bytes in WRITE frames of `size` bytes, sender to validated receiver
    (inside TLS if `tls` gives the sender's and the receiver's)."""
    frames = max(1, total // size)
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    out: mp.SimpleQueue = mp.SimpleQueue()
    proc = mp.get_context("fork").Process(target=_receiver,
                                          args=(b, mac, frames, out, tls and tls[1]))
    proc.start()
    b.close()
    stream: P.Stream = a if tls is None else tls[0].client(a, "beta", ("socketpair", 0))
    conn = P.FramedConnection(stream)
    if mac:
        conn.authenticate(KEY_S, KEY_T)
    data = memoryview(os.urandom(size))
    batch = max(1, min(512, (8 << 20) // size))  # as the link sends: up to 512 records or 8 MiB
    t0 = time.monotonic()
    seq = 0
    while seq < frames:
        n = min(batch, frames - seq)
        conn.send_batch([(P.FrameType.WRITE, P.write_record(seq + i + 1, 0, data).encode())
                         for i in range(n)])
        seq += n
    end = out.get()
    proc.join()
    a.close()
    return frames * size / (1 << 20) / (end - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB sent per measurement (default 256)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each row; the best is shown")
    ap.add_argument("--no-tls", action="store_true", help="leave the TLS column out")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="frame-bench-") as tmp:
        tls = None
        if not args.no_tls and shutil.which("openssl"):
            try:
                tls = make_tls(Path(tmp))
            except (ImportError, OSError, subprocess.SubprocessError) as e:
                print(f"(no TLS column: cannot make the certificates: {e})")
        print("== frame bench: WRITE frames over a socketpair, sender and receiver in two "
              "processes")
        head = f"{'frames':8} {'crc only':>14} {'MAC (Poly1305)':>16} {'MAC / crc':>10}"
        print(head + (f" {'MAC + TLS 1.3':>16} {'TLS / MAC':>10}" if tls else ""))
        for size, label in ((1 << 20, "1 MiB"), (4096, "4 KiB")):
            total = args.mib << 20 if size >= 65536 else min(args.mib, 32) << 20
            crc = max(run(size, total, False) for _ in range(args.repeat))
            tagged = max(run(size, total, True) for _ in range(args.repeat))
            line = (f"{label:8} {crc:9.1f} MiB/s {tagged:11.1f} MiB/s "
                    f"{100 * tagged / crc:9.1f} %")
            if tls:
                wrapped = max(run(size, total, True, tls) for _ in range(args.repeat))
                line += f" {wrapped:11.1f} MiB/s {100 * wrapped / tagged:9.1f} %"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
