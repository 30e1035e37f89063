#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""What keeping a 1 TiB target's out-of-sync bitmap costs: the whole file against changed pages.

A bitmap of 268,435,456 chunks (1 TiB of 4 KiB chunks: a 32 MiB file) absorbs a kernel dirty
bitmap and is saved, as the engine does every second for a paused or behind target. Two rows
per case, in one run:

    whole file   the previous repctl.oos: absorb and count through one Python int of the whole
                 bitmap, every save a new file (temporary file, fsync, rename, fsync of the
                 folder) of the whole 32 MiB
    pages        repctl.oos now: absorb page by page, skipping the kernel's all-zero pages,
                 the count kept as bits change, the changed 4 KiB pages written in place,
                 then fdatasync

Cases: an idle second (the kernel bitmap all zero), a sparse one (1,000 chunks scattered over
the device), a clustered one (a 64 MiB region written, plus 100 scattered chunks), and count()
and one resync pass over the runs of a sparse bitmap. Printed: milliseconds (median of
--repeat), bytes written to the file, and the peak memory that absorb + save allocate beyond
the bitmap itself (tracemalloc, a separate pass).

Runs anywhere (no root, no devices), in a temporary folder on --dir's file system (default:
the system's temporary folder): the fsync figures depend on that disk.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pyctl"))

from repctl.oos import OOSBitmap
from repctl.statefile import atomic_write

NR_CHUNKS = 1 << 28  # 1 TiB of 4 KiB chunks


class WholeFile:
    """The baseline: repctl.oos as it was before in-place saves (same bits, same file)."""

    def __init__(self, path: Path, nr_chunks: int):
        self.path = path
        self.nr_chunks = nr_chunks
        self.lock = threading.Lock()
        self.save_lock = threading.Lock()
        self._bits = bytearray(-(-nr_chunks // 8))
        self.epoch = 0
        if path.exists():
            self._bits[:] = path.read_bytes()

    def count(self) -> int:
        with self.lock:
            return int.from_bytes(self._bits, "little").bit_count()

    def absorb(self, kernel_bitmap: bytes) -> None:
        with self.lock:
            a = int.from_bytes(self._bits, "little") | int.from_bytes(kernel_bitmap, "little")
            self._bits[:] = a.to_bytes(len(self._bits), "little")
            self.epoch += 1

    def runs(self, max_chunks: int, start: int = 0) -> Iterator[range]:
        with self.lock:
            bits = bytes(self._bits)
        i = start
        n = self.nr_chunks
        while i < n:
            byte = bits[i >> 3]
            if byte == 0 and (i & 7) == 0:
                j = i >> 3
                while j < len(bits) and bits[j] == 0:
                    j += 1
                i = j << 3
                continue
            if not byte >> (i & 7) & 1:
                i += 1
                continue
            first = i
            while i < n and i - first < max_chunks and bits[i >> 3] >> (i & 7) & 1:
                i += 1
            yield range(first, i)

    def save(self) -> None:
        with self.save_lock:
            with self.lock:
                data = bytes(self._bits)
            atomic_write(self.path, data)


class Written:
    """Counts the bytes written through os.write and os.pwrite while active."""

    def __init__(self) -> None:
        self.bytes = 0
        self._write, self._pwrite = os.write, os.pwrite

    def __enter__(self) -> Self:
        def write(fd: int, data: Any) -> int:
            n = self._write(fd, data)
            self.bytes += n
            return n

        def pwrite(fd: int, data: Any, offset: int) -> int:
            n = self._pwrite(fd, data, offset)
            self.bytes += n
            return n

        os.write, os.pwrite = write, pwrite  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.write, os.pwrite = self._write, self._pwrite  # type: ignore[assignment]


def kernel_bitmap(chunks: list[int]) -> bytes:
    out = bytearray(NR_CHUNKS // 8)
    for c in chunks:
        out[c >> 3] |= 1 << (c & 7)
    return bytes(out)


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds of `fn`."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def peak(fn: Callable[[], object]) -> int:
    """The most bytes `fn` had allocated at once."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def fmt_bytes(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def cleared(bm: Any) -> None:
    """Clear every bit and save: the file all clear again."""
    if isinstance(bm, OOSBitmap):
        bm.clear(range(bm.nr_chunks), bm.epoch)
    else:
        bm._bits[:] = bytes(len(bm._bits))
    bm.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the files go (default: the system's temporary folder)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each timed step (median)")
    args = ap.parse_args(argv)
    rng = random.Random(1)
    region = rng.randrange(NR_CHUNKS - 16384)
    cases = {
        "idle": kernel_bitmap([]),
        "1,000 scattered": kernel_bitmap([rng.randrange(NR_CHUNKS) for _ in range(1000)]),
        "64 MiB + 100": kernel_bitmap(list(range(region, region + 16384))
                                      + [rng.randrange(NR_CHUNKS) for _ in range(100)]),
    }
    kinds: list[tuple[str, Any]] = [("whole file", WholeFile), ("pages", OOSBitmap)]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        folder = Path(d)
        print(f"== oos bench: a bitmap of {NR_CHUNKS:,} chunks (1 TiB of 4 KiB chunks, "
              f"{NR_CHUNKS // 8 >> 20} MiB), in {folder}")
        print(f"{'kernel bitmap':16} {'bitmap':11} {'absorb':>10} {'save':>10} {'written':>10} "
              f"{'extra memory':>13}")
        for name, kb in cases.items():
            for label, cls in kinds:
                path = folder / f"{cls.__name__}.oos"
                bm = cls(path, NR_CHUNKS)
                cleared(bm)  # the file exists and is all clear: the steady state
                absorbs, saves, written = [], [], 0
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    bm.absorb(kb)
                    absorbs.append((time.perf_counter() - t0) * 1000)
                    with Written() as w:
                        t0 = time.perf_counter()
                        bm.save()
                        saves.append((time.perf_counter() - t0) * 1000)
                    written = w.bytes
                    cleared(bm)
                mem = peak(lambda: (bm.absorb(kb), bm.save()))  # noqa: B023
                print(f"{name:16} {label:11} {statistics.median(absorbs):7.1f} ms "
                      f"{statistics.median(saves):7.1f} ms {fmt_bytes(written):>10} "
                      f"{fmt_bytes(mem):>13}", flush=True)
        sparse = cases["1,000 scattered"]
        print(f"\n{'1,000 chunks set':16} {'bitmap':11} {'time':>10}")
        for label, cls in kinds:
            bm = cls(folder / f"{cls.__name__}.oos", NR_CHUNKS)
            bm.absorb(sparse)
            print(f"{'count()':16} {label:11} {timed(bm.count, args.repeat):7.2f} ms", flush=True)
            runs = timed(lambda: sum(1 for _ in bm.runs(256)), 1)  # noqa: B023
            print(f"{'a runs() pass':16} {label:11} {runs:7.1f} ms", flush=True)
            t0 = time.perf_counter()
            cls(folder / f"{cls.__name__}.oos", NR_CHUNKS)
            print(f"{'load':16} {label:11} {(time.perf_counter() - t0) * 1000:7.1f} ms",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
