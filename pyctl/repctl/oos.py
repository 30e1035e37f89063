"""A target's persistent out-of-sync bitmap, kept by the source's daemon.

One bit per chunk: set means the target may lack the chunk's current data.
The file is replaced atomically (repctl.statefile: a temporary file of its
own, fsync, rename, fsync of the folder), so that after a crash it is either
the old or the new bitmap: P2 holds as long as bits are set here before the
kernel is allowed to forget them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from repctl.statefile import StateError, atomic_write


class OOSBitmap:
    """In-memory bitmap backed by a file; ``save()`` makes the current bits durable."""

    def __init__(self, path: Path, nr_chunks: int, *, action: str = "remove it to resync everything"):
        """Load the bitmap in `path` if it exists; StateError (with `action`) if it has not the
        size that `nr_chunks` needs."""
        self.path = path
        self.nr_chunks = nr_chunks
        self.lock = threading.Lock()
        self.save_lock = threading.Lock()  # saves in order: the last one has the newest bits
        self._bits = bytearray(-(-nr_chunks // 8))
        self.epoch = 0  # bumped by every absorb(): clears computed before it are void
        self.existed = path.exists()
        if self.existed:
            data = path.read_bytes()
            if len(data) != len(self._bits):
                raise StateError(path, f"holds {len(data)} bytes, a bitmap of {nr_chunks} chunks "
                                 f"has {len(self._bits)}", action)
            self._bits[:] = data

    def count(self) -> int:
        with self.lock:
            return int.from_bytes(self._bits, "little").bit_count()

    def set_all(self) -> None:
        with self.lock:
            full, rest = divmod(self.nr_chunks, 8)
            self._bits[:full] = b"\xff" * full
            if rest:
                self._bits[full] = (1 << rest) - 1
            self.epoch += 1

    def absorb(self, kernel_bitmap: bytes) -> None:
        """OR the kernel's dirty bitmap (same layout) into this one."""
        with self.lock:
            a = int.from_bytes(self._bits, "little") | int.from_bytes(kernel_bitmap, "little")
            self._bits[:] = a.to_bytes(len(self._bits), "little")
            self.epoch += 1

    @property
    def nbytes(self) -> int:
        """The bitmap's size in bytes (the file's, and an OUT_OF_SYNC report's)."""
        return len(self._bits)

    def absorb_masked(self, bits: bytes) -> int:
        """OR a bitmap of this size from elsewhere (a peer's report) into this one, ignoring
        bits past the last chunk; how many chunks it set that were clear."""
        if len(bits) != len(self._bits):
            raise ValueError(f"a bitmap of {len(bits)} bytes, this one has {len(self._bits)}")
        other = int.from_bytes(bits, "little") & ((1 << self.nr_chunks) - 1)
        with self.lock:
            mine = int.from_bytes(self._bits, "little")
            new = other & ~mine
            if new:
                self._bits[:] = (mine | other).to_bytes(len(self._bits), "little")
                self.epoch += 1
            return new.bit_count()

    def clear(self, chunks: range, epoch: int) -> bool:
        """Clear chunks that were sent and made durable, unless an absorb came since ``epoch``."""
        with self.lock:
            if epoch != self.epoch:
                return False
            for c in chunks:
                self._bits[c >> 3] &= ~(1 << (c & 7)) & 0xFF
            return True

    def runs(self, max_chunks: int, start: int = 0) -> Iterator[range]:
        """Runs of consecutive set chunks, at most ``max_chunks`` long, from ``start`` on."""
        with self.lock:
            bits = bytes(self._bits)
        i = start
        n = self.nr_chunks
        while i < n:
            byte = bits[i >> 3]
            if byte == 0 and (i & 7) == 0:
                # skip zero bytes quickly
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
        """Make the bits as they are now durable (threads may call it concurrently)."""
        with self.save_lock:
            self._save()

    def _save(self) -> None:
        with self.lock:
            data = bytes(self._bits)
        atomic_write(self.path, data)
