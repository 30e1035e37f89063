"""A target's persistent out-of-sync bitmap, kept by the source's daemon.

One bit per chunk: set means the target may lack the chunk's current data. The file holds the
raw bits and nothing else (chunk n is bit n % 8 of byte n // 8): 32 MiB per TiB of 4 KiB chunks.

How it is written. The first ``save()`` of a file that is missing, or has the wrong size, or is
not the file this object holds open, replaces it atomically (repctl.statefile: a temporary file
of its own, fsync, rename, fsync of the folder). From then on ``save()`` writes in place only the
4 KiB pages of the bitmap that changed since the last save (``pwrite``), then ``fdatasync``, and
returns only after that: an absorb that found a few dirty chunks writes a few pages, not 32 MiB.

Why writing in place keeps P2 across a crash. A save that a crash interrupts may leave any mix of
old and new pages on disk, and a torn page any mix of old and new sectors; the device is trusted
to leave each sector old or new, never garbage, the assumption md's write-intent bitmap makes
(drivers/md/md-bitmap.c rewrites its bitmap pages in place, with no copy and no checksum), and
dm-repl's own bitmap blocks too. So every bit of the file is its old or its new value, and
either is safe:

* a bit going from set to clear: ``clear()`` is called only for chunks the target holds
  durably, so the new value is true, and the old one resyncs the chunk once more: harmless;
* a bit going from clear to set: the chunk is still recorded where it came from until
  ``save()`` returned, so after a crash it is set again. The engine CLEANs the kernel's bits
  only after the save of each absorb; a peer reports its own changes (``absorb_masked``) at
  every connection until a resync finished; ``set_all`` is decided again from the same facts.

Saves run in order (``save_lock``); each writes every page that was changed before it was
called, as it is when the save copies it (1 MiB at a time, under ``lock``). A failed write drops
the descriptor: the next save replaces the whole file atomically, as a missing file.

Memory: the bitmap, one byte per 4 KiB page of it for the changed pages (8 KiB per TiB), and
at most 1 MiB copied at a time while saving. ``absorb`` skips the all-zero pages of the kernel's
bitmap (most of them), ``count()`` is kept as the bits change, ``runs()`` skips clear pages.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

from repctl.statefile import StateError, atomic_write_open

PAGE = 4096                  # bytes of bitmap per page: the unit of in-place writes
PAGE_CHUNKS = PAGE * 8       # chunks per page
SAVE_PIECE = 256             # pages a save copies (under the lock) and writes at once: 1 MiB
_ZERO = bytes(PAGE)
_ONES = b"\xff" * PAGE


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
        self._dirty = bytearray(-(-len(self._bits) // PAGE))  # 1: page changed since saved
        self._count = 0  # set bits, kept as they change
        self._fd = -1    # the file, open once it was read or written: saves go in place
        self._closer: weakref.finalize[[int], OOSBitmap] | None = None
        self.epoch = 0  # bumped by every absorb(): clears computed before it are void
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            self.existed = False
            return
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # read; the first save replaces it
            writable = False
        self.existed = True
        try:
            size = os.fstat(fd).st_size
            if size != len(self._bits):
                raise StateError(path, f"holds {size} bytes, a bitmap of {nr_chunks} chunks "
                                 f"has {len(self._bits)}", action)
            got = _read_all(fd, self._bits)
            if got != size:
                raise StateError(path, f"holds {got} bytes, a bitmap of {nr_chunks} chunks "
                                 f"has {len(self._bits)}", action)
        except BaseException:
            os.close(fd)
            raise
        if writable:
            self._adopt(fd)
        else:
            os.close(fd)
        tail = nr_chunks % 8
        if tail and self._bits[-1] >> tail:  # bits past the last chunk are no chunks
            self._bits[-1] &= (1 << tail) - 1
            self._dirty[-1] = 1
        self._count = sum(int.from_bytes(self._bits[lo:lo + PAGE], "little").bit_count()
                          for lo in range(0, len(self._bits), PAGE)
                          if not self._bits.startswith(_ZERO[:len(self._bits) - lo], lo))

    # -- reading ----------------------------------------------------------
    def count(self) -> int:
        """How many chunks are set."""
        with self.lock:
            return self._count

    @property
    def nbytes(self) -> int:
        """The bitmap's size in bytes (the file's, and an OUT_OF_SYNC report's)."""
        return len(self._bits)

    def runs(self, max_chunks: int, start: int = 0) -> Iterator[range]:
        """Runs of consecutive set chunks, at most ``max_chunks`` long, from ``start`` on.

        Each run is read as the bits are when it is looked for: chunks set meanwhile by an
        absorb may be in later runs, and the caller's clears are void anyway (the epoch)."""
        i = start
        while True:
            with self.lock:
                first = self._find(i, True, self.nr_chunks)
                if first >= self.nr_chunks:
                    return
                end = self._find(first, False, min(first + max_chunks, self.nr_chunks))
            yield range(first, end)
            i = end

    def _find(self, i: int, value: bool, limit: int) -> int:
        """The first chunk from `i` on whose bit is `value`, or `limit` if none is before it.
        Whole bytes, then whole pages, that hold none are skipped at C speed. Under `lock`."""
        bits = self._bits
        if i >= limit:
            return limit
        k = i >> 3
        b = (bits[k] if value else ~bits[k] & 0xFF) >> (i & 7)
        if b:
            return min(i + (b & -b).bit_length() - 1, limit)
        k += 1
        skip, empty = (b"\x00", _ZERO) if value else (b"\xff", _ONES)
        end_byte = min(-(-limit // 8), len(bits))
        while k < end_byte:
            stop = min((k // PAGE + 1) * PAGE, end_byte)
            if stop - k == PAGE and bits.startswith(empty, k):
                k = stop  # a whole page without one: no copy
                continue
            rest = len(bits[k:stop].lstrip(skip))
            if rest:
                k = stop - rest
                b = bits[k] if value else ~bits[k] & 0xFF
                return min((k << 3) + (b & -b).bit_length() - 1, limit)
            k = stop
        return limit

    # -- changing ---------------------------------------------------------
    def set_all(self) -> None:
        """Set every chunk (a full resync)."""
        with self.lock:
            full, rest = divmod(self.nr_chunks, 8)
            for p in range(len(self._dirty)):
                lo = p * PAGE
                hi = min(lo + PAGE, len(self._bits))
                want = _ONES[:min(hi, full) - lo] if lo < full else b""
                if hi > full and rest:
                    want += bytes([(1 << rest) - 1])
                if not self._bits.startswith(want, lo):
                    self._bits[lo:hi] = want
                    self._dirty[p] = 1
            self._count = self.nr_chunks
            self.epoch += 1

    def absorb(self, kernel_bitmap: bytes) -> None:
        """OR the kernel's dirty bitmap (same layout) into this one; bits past the last chunk
        are no chunks and are ignored."""
        theirs = _bytes(kernel_bitmap)
        with self.lock:
            self._or(theirs)
            self.epoch += 1

    def absorb_masked(self, bits: bytes) -> int:
        """OR a bitmap of this size from elsewhere (a peer's report) into this one, ignoring
        bits past the last chunk; how many chunks it set that were clear."""
        if len(bits) != len(self._bits):
            raise ValueError(f"a bitmap of {len(bits)} bytes, this one has {len(self._bits)}")
        theirs = _bytes(bits)
        with self.lock:
            added = self._or(theirs)
            if added:
                self.epoch += 1
            return added

    def _or(self, theirs: bytes | bytearray) -> int:
        """OR `theirs` into the bits page by page, skipping its all-zero pages; mark the pages
        that changed; how many bits it set. Under `lock`."""
        n = min(len(theirs), len(self._bits))
        added = 0
        for lo in range(0, n, PAGE):
            hi = min(lo + PAGE, n)
            if theirs.startswith(_ZERO if hi - lo == PAGE else _ZERO[:hi - lo], lo):
                continue
            other = int.from_bytes(theirs[lo:hi], "little")
            if (hi << 3) > self.nr_chunks:  # the last page: only real chunks
                other &= (1 << (self.nr_chunks - (lo << 3))) - 1
            mine = int.from_bytes(self._bits[lo:hi], "little")
            new = other & ~mine
            if new:
                self._bits[lo:hi] = (mine | other).to_bytes(hi - lo, "little")
                self._dirty[lo // PAGE] = 1
                added += new.bit_count()
        self._count += added
        return added

    def mark(self, chunks: Iterable[int]) -> int:
        """Set `chunks` (found to differ by a verify); how many were clear. Chunks past the
        last are ignored. Like an absorb, a change voids the clears computed before it: a
        resync pass in flight sends these chunks too."""
        with self.lock:
            added = 0
            for c in chunks:
                if 0 <= c < self.nr_chunks and not self._bits[c >> 3] & (1 << (c & 7)):
                    self._bits[c >> 3] |= 1 << (c & 7)
                    self._dirty[c // PAGE_CHUNKS] = 1
                    added += 1
            self._count += added
            if added:
                self.epoch += 1
            return added

    def clear(self, chunks: Iterable[int], epoch: int) -> bool:
        """Clear chunks that were sent and made durable, unless an absorb came since ``epoch``."""
        with self.lock:
            if epoch != self.epoch:
                return False
            if isinstance(chunks, range) and chunks.step == 1:
                self._clear_range(max(chunks.start, 0), min(chunks.stop, self.nr_chunks))
            else:
                for c in chunks:
                    if 0 <= c < self.nr_chunks:
                        self._clear_range(c, c + 1)
            return True

    def _clear_range(self, a: int, b: int) -> None:
        """Clear chunks [a, b), page by page, marking the pages that changed. Under `lock`."""
        while a < b:
            e = min(b, (a // PAGE_CHUNKS + 1) * PAGE_CHUNKS)
            lo, hi = a >> 3, ((e - 1) >> 3) + 1
            seg = int.from_bytes(self._bits[lo:hi], "little")
            mask = ((1 << (e - a)) - 1) << (a - (lo << 3))
            gone = seg & mask
            if gone:
                self._bits[lo:hi] = (seg & ~mask).to_bytes(hi - lo, "little")
                self._count -= gone.bit_count()
                self._dirty[a // PAGE_CHUNKS] = 1
            a = e

    # -- the file ---------------------------------------------------------
    def save(self) -> None:
        """Make the bits as they are now durable (threads may call it concurrently)."""
        with self.save_lock:
            self._save()

    def close(self) -> None:
        """Let go of the file (a later ``save()`` replaces it whole, atomically)."""
        with self.save_lock:
            self._drop()

    def _save(self) -> None:
        if self._fd >= 0 and not self._holds_file():
            self._drop()
        if self._fd < 0:
            with self.lock:
                data = bytes(self._bits)
                self._dirty[:] = bytes(len(self._dirty))
            self._adopt(atomic_write_open(self.path, data))
            return
        npages, wrote, p = len(self._dirty), False, 0
        try:
            while True:
                with self.lock:
                    p = self._dirty.find(1, p)
                    if p < 0:
                        break
                    q = self._dirty.find(0, p, min(p + SAVE_PIECE, npages))
                    q = min(p + SAVE_PIECE, npages) if q < 0 else q
                    piece = self._bits[p * PAGE:q * PAGE]
                    self._dirty[p:q] = bytes(q - p)
                _pwrite_all(self._fd, piece, p * PAGE)
                wrote, p = True, q
            if wrote:
                os.fdatasync(self._fd)
        except BaseException:
            self._drop()  # what reached the file is unknown: the next save rewrites it whole
            raise

    def _holds_file(self) -> bool:
        """Whether `path` is still the file open as `_fd`, of the right size."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return ((st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
                and mine.st_size == len(self._bits))

    def _adopt(self, fd: int) -> None:
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)

    def _drop(self) -> None:
        if self._closer is not None:
            self._closer()
        self._fd, self._closer = -1, None


def _bytes(bits: bytes | bytearray | memoryview) -> bytes | bytearray:
    return bits if isinstance(bits, (bytes, bytearray)) else bytes(bits)


def _read_all(fd: int, buf: bytearray) -> int:
    """Fill `buf` from the start of the file; how many bytes it had (fewer at its end)."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            break
        got += n
    return got


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
