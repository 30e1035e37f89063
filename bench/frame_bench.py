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

A second table: the same authenticated WRITE frames with compression (`compression: lz4 |
zstd`), each codec beside none, on three kinds of data: text (words, as logs and documents),
half-zero blocks (4 KiB blocks, half random, half zero, as sparse database pages) and random
(encrypted or already compressed data, sent as it is once it does not compress to 7/8). Each
cell is the rate of data written (MiB/s, sender compressing and receiver decompressing in two
processes) and the ratio of the bytes on the wire to it:

    data       frames                  none                 lz4              zstd-1   ...
    text       1 MiB      795.3 MiB/s  1.00   208.6 MiB/s  0.44   185.3 MiB/s  0.26   ...

then the codecs alone on one core (MiB/s compressing / decompressing 1 MiB blocks), for sizing a
link's CPU.

Runs anywhere (no root, no devices); `make bench` runs it in the test VM beside the other
benchmarks. Figures from there are in docs/benchmarks-replication.md.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pyctl"))
sys.path.insert(0, str(REPO / "tests" / "host"))  # tlspki: the test certificates

from repctl import protocol as P  # noqa: E402
from repctl import tls as T
from repctl.compress import Codec, Compressor, Decompressor
from repctl.config import TLSFiles

KEY_S, KEY_T = b"s" * 32, b"t" * 32


def make_tls(folder: Path) -> tuple[T.TLS, T.TLS]:
    """TLS for a sender (node alpha) and a receiver (node beta), certificates made now."""
    from tlspki import make_ca, make_node

    make_ca(folder)
    a, b = make_node(folder, "alpha"), make_node(folder, "beta")
    return (T.TLS(TLSFiles(a.cert, a.key, a.ca), "alpha", "global.tls", "bench"),
            T.TLS(TLSFiles(b.cert, b.key, b.ca), "beta", "global.tls", "bench"))


WORDS = (b"replication block device target source resync chunk bitmap journal write flush "
         b"the of and a to in is it that for on with as was at by be this from or").split()


def text_like(n: int) -> bytes:
    """`n` bytes of words and newlines."""
    rnd = random.Random(1)
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(WORDS) + (b"\n" if rnd.random() < 0.1 else b" ")
    return bytes(out[:n])


DATA = {
    "text": text_like,
    "half-zero": lambda n: b"".join(os.urandom(2048) + bytes(2048) for _ in range(n // 4096)),
    "random": os.urandom,
}
CODECS = (("none", Codec.NONE, 0), ("lz4", Codec.LZ4, 0), ("zstd-1", Codec.ZSTD, 1),
          ("zstd-3", Codec.ZSTD, 3))


def _receiver(sock: socket.socket, mac: bool, frames: int, out: mp.SimpleQueue,
              tls: T.TLS | None, codec: Codec = Codec.NONE) -> None:
    stream: P.Stream = sock if tls is None else tls.server(sock, ("socketpair", 0))
    conn = P.FramedConnection(stream)
    if mac:
        conn.authenticate(KEY_T, KEY_S)
    conn.set_compression(codec)
    buf = bytearray(P.MAX_PAYLOAD)
    for _ in range(frames):
        frame = conn.recv(buf)
        P.decode(frame.type, frame.payload)
    out.put(time.monotonic())


def run(size: int, total: int, mac: bool, tls: tuple[T.TLS, T.TLS] | None = None) -> float:
    """MiB/s of `total` bytes in WRITE frames of `size` bytes, sender to validated receiver
    (inside TLS if `tls` gives the sender's and the receiver's)."""
    return run_data(os.urandom(size), total, mac, tls)[0]


def run_data(block: bytes, total: int, mac: bool, tls: tuple[T.TLS, T.TLS] | None = None,
             codec: Codec = Codec.NONE, level: int = 0) -> tuple[float, float]:
    """MiB/s of `total` bytes of data in WRITE frames of `block`, and the ratio of the data's
    bytes on the wire to it (1.0 without compression)."""
    size = len(block)
    frames = max(1, total // size)
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    out: mp.SimpleQueue = mp.SimpleQueue()
    proc = mp.get_context("fork").Process(target=_receiver,
                                          args=(b, mac, frames, out, tls and tls[1], codec))
    proc.start()
    b.close()
    stream: P.Stream = a if tls is None else tls[0].client(a, "beta", ("socketpair", 0))
    conn = P.FramedConnection(stream)
    if mac:
        conn.authenticate(KEY_S, KEY_T)
    conn.set_compression(codec, level)
    data = memoryview(block)
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
    stats = conn.compression_stats
    ratio = stats.wire_bytes / stats.raw_bytes if stats.raw_bytes else 1.0
    return frames * size / (1 << 20) / (end - t0), ratio


def compression_table(mib: int, repeat: int) -> None:
    """Each codec beside none, per kind of data and frame size, in one run."""
    print("\n== compression: authenticated WRITE frames; MiB/s of data written, and the bytes "
          "on the wire per byte of it")
    print(f"{'data':10} {'frames':8}" + "".join(f" {name:>19}" for name, _, _ in CODECS))
    for kind, make in DATA.items():
        for size, label in ((1 << 20, "1 MiB"), (64 << 10, "64 KiB"), (4096, "4 KiB")):
            block = make(size)
            total = mib << 20 if size >= 65536 else min(mib, 16) << 20
            line = f"{kind:10} {label:8}"
            for _, codec, level in CODECS:
                rate, ratio = max(run_data(block, total, True, None, codec, level)
                                  for _ in range(repeat))
                line += f" {rate:7.1f} MiB/s {ratio:5.2f}"
            print(line, flush=True)
    print("\n== the codecs alone, one core, 1 MiB blocks: MiB/s compressing / decompressing")
    print(f"{'data':10}" + "".join(f" {name:>17}" for name, codec, _ in CODECS if codec))
    for kind, make in DATA.items():
        block = make(1 << 20)
        line = f"{kind:10}"
        for _, codec, level in CODECS:
            if codec is Codec.NONE:
                continue
            comp, dec = Compressor(codec, level), Decompressor(codec, len(block))
            packed = comp.compress(block)

            def inflate(dec: Decompressor = dec, packed: bytes = packed,
                        block: bytes = block) -> bytes:
                return dec.decompress(packed, len(block), "bench")

            line += (f" {_rate(functools.partial(comp.compress, block)):7.0f} /"
                     f" {_rate(inflate):7.0f}")
        print(line, flush=True)


def _rate(step: Callable[[], object], seconds: float = 0.3) -> float:
    """MiB/s of `step` on 1 MiB, the best of three tries of `seconds` each."""
    best = 0.0
    for _ in range(3):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            step()
            n += 1
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB sent per measurement (default 256)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each row; the best is shown")
    ap.add_argument("--no-tls", action="store_true", help="leave the TLS column out")
    ap.add_argument("--zmib", type=int, default=64,
                    help="MiB sent per measurement of the compression table (default 64)")
    ap.add_argument("--no-compression", action="store_true", help="leave that table out")
    ap.add_argument("--compression-only", action="store_true", help="only that table")
    args = ap.parse_args(argv)
    if args.compression_only:
        compression_table(args.zmib, args.repeat)
        return 0
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
    if not args.no_compression:
        compression_table(args.zmib, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
