#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""What the per-frame MAC costs: frames over a socket, tagged (as the stream is) against crc only.

One process sends WRITE frames through repctl.protocol.FramedConnection, another receives and
validates them, over a Unix socketpair: the same code as the replication stream, without the
devices, so that the difference between the two rows is the MAC and nothing else. Printed side
by side in one run, for 1 MiB frames (streaming large writes, resync chunks) and 4 KiB frames
(small random writes):

    frames   crc only        MAC (Poly1305)   MAC / crc
    1 MiB    812.3 MiB/s     640.1 MiB/s      78.8 %

Runs anywhere (no root, no devices); `make bench` runs it in the test VM beside the other
benchmarks. Figures from there are in docs/benchmarks-replication.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pyctl"))

from repctl import protocol as P  # noqa: E402

KEY_S, KEY_T = b"s" * 32, b"t" * 32


def _receiver(sock: socket.socket, mac: bool, frames: int, out: mp.SimpleQueue) -> None:
    conn = P.FramedConnection(sock)
    if mac:
        conn.authenticate(KEY_T, KEY_S)
    buf = bytearray(P.MAX_PAYLOAD)
    for _ in range(frames):
        frame = conn.recv(buf)
        P.decode(frame.type, frame.payload)
    out.put(time.monotonic())


def run(size: int, total: int, mac: bool) -> float:
    """MiB/s of `total` bytes in WRITE frames of `size` bytes, sender to validated receiver."""
    frames = max(1, total // size)
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    out: mp.SimpleQueue = mp.SimpleQueue()
    proc = mp.get_context("fork").Process(target=_receiver, args=(b, mac, frames, out))
    proc.start()
    b.close()
    conn = P.FramedConnection(a)
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
    args = ap.parse_args(argv)
    print("== frame bench: WRITE frames over a socketpair, sender and receiver in two processes")
    print(f"{'frames':8} {'crc only':>14} {'MAC (Poly1305)':>16} {'MAC / crc':>10}")
    for size, label in ((1 << 20, "1 MiB"), (4096, "4 KiB")):
        total = args.mib << 20 if size >= 65536 else min(args.mib, 32) << 20
        crc = max(run(size, total, False) for _ in range(args.repeat))
        tagged = max(run(size, total, True) for _ in range(args.repeat))
        print(f"{label:8} {crc:9.1f} MiB/s {tagged:11.1f} MiB/s {100 * tagged / crc:9.1f} %",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
