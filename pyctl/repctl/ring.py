"""The consumer side of a dm-repl target: ring records, acks and the bitmap.

A thin typed wrapper over /dev/dm-repl (see dm-repl-uapi.h and
docs/dm-repl.rst).  One Consumer per target at a time; closing it (or the
process dying) detaches, and the target falls behind into tracking mode.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from repctl import uapi
from repctl.errors import ReplError

ffi = uapi.ffi
CONTROL = Path("/dev") / uapi.REPL_MISC_NAME


class RingError(ReplError):
    """An ioctl on the dm-repl control device failed."""

    def __init__(self, op: str, err: OSError):
        self.errno = err.errno
        self.op = op
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        super().__init__(f"dm-repl {op}: {os.strerror(err.errno or 0)} ({name})")


@dataclass(frozen=True)
class State:
    """A snapshot of the target as the kernel reports it (struct repl_state)."""

    mode: str
    reason: str
    meta_failed: bool
    sync: bool
    stream_start: int
    ring_end: int
    published: int
    acked: int
    next_seq: int
    events: int
    dirty_chunks: int
    ring_used: int
    ring_bytes: int
    writes: int
    write_bytes: int
    reads: int
    read_bytes: int
    mark: int

    @property
    def streaming(self) -> bool:
        return self.mode == "streaming"

    def readable(self) -> range:
        """Sequence numbers of the records that can be read now."""
        first = max(self.acked + 1, self.stream_start)
        return range(first, min(self.published + 1, self.ring_end))


class Record(NamedTuple):
    """One ring record.  ``data`` is a read-only view into the ring, valid until acked.
    (A named tuple: the source's sender makes one per record it streams.)"""

    seq: int
    sector: int
    length: int
    op: str
    fua: bool
    data: memoryview


# struct repl_rec up to data_len, in one unpack where cffi reads a field at a time (the sender
# reads every record so): the layout is checked against the UAPI header's at import
_REC_FIELDS = ("seq", "sector", "len", "op", "flags", "data_off", "data_len")
_REC = struct.Struct("=QQIHHQI")
assert [(f.offset, ffi.sizeof(f.type)) for n, f in ffi.typeof("struct repl_rec").fields
        if n in _REC_FIELDS] == [(0, 8), (8, 8), (16, 4), (20, 2), (22, 2), (24, 8), (32, 4)], \
    "struct repl_rec changed: update _REC"
_REC_SIZE = ffi.sizeof("struct repl_rec")


def _device_numbers(device: str | Path) -> tuple[int, int]:
    st = os.stat(device)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


class Consumer:
    """Attach to the repl device ``device`` (a path or (major, minor)) as its consumer."""

    def __init__(self, device: str | Path | tuple[int, int], *, sync: bool = False,
                 control: Path = CONTROL):
        major, minor = device if isinstance(device, tuple) else _device_numbers(device)
        self.fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
        try:
            a = ffi.new("struct repl_attach *", {"major": major, "minor": minor,
                                                  "flags": uapi.REPL_F_SYNC if sync else 0})
            self._ioctl("attach", uapi.REPL_IOC_ATTACH, a)
            self.desc_count = a.desc_count
            self.desc_bytes = a.desc_bytes
            self.data_bytes = a.data_bytes
            self.data_sectors = a.data_sectors
            self.nr_chunks = a.nr_chunks
            self.chunk_sectors = a.chunk_sectors
            self.sync_timeout_ms = a.sync_timeout_ms
            self._map = mmap.mmap(self.fd, self.desc_bytes + self.data_bytes,
                                  mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self._map)

    # -- plumbing ------------------------------------------------------
    def _ioctl(self, op: str, cmd: int, arg) -> None:
        try:
            fcntl.ioctl(self.fd, cmd, ffi.buffer(arg))
        except OSError as e:
            raise RingError(op, e) from None

    def close(self) -> None:
        """Detach: the target falls behind into tracking mode."""
        if self.fd < 0:
            return
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a Record's view is still alive; the mapping goes with the process
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fd

    # -- state and records ---------------------------------------------
    def state(self) -> State:
        s = ffi.new("struct repl_state *")
        self._ioctl("get state", uapi.REPL_IOC_GET_STATE, s)
        return State(
            mode=uapi.MODE_NAMES.get(s.mode, str(s.mode)),
            reason=uapi.REASON_NAMES.get(s.reason, str(s.reason)),
            meta_failed=s.meta_mode == uapi.REPL_META_FAIL, sync=bool(s.flags & uapi.REPL_F_SYNC),
            stream_start=s.stream_start, ring_end=s.ring_end, published=s.published, acked=s.acked,
            next_seq=s.next_seq, events=s.events, dirty_chunks=s.dirty_chunks, ring_used=s.ring_used,
            ring_bytes=s.ring_bytes, writes=s.writes, write_bytes=s.write_bytes, reads=s.reads,
            read_bytes=s.read_bytes, mark=s.mark)

    def wait(self, after: int, timeout_ms: int = 1000, batch: int = 1) -> None:
        """Block until ``batch`` records after ``after`` are published, the mode changes or the timeout passes.

        The target wakes the consumer earlier when a quarter of the ring is in use, and for
        every record in synchronous mode.
        """
        w = ffi.new("struct repl_wait *", {"after": after, "timeout_ms": timeout_ms, "batch": batch})
        self._ioctl("wait", uapi.REPL_IOC_WAIT, w)

    def record(self, seq: int) -> Record:
        """The record ``seq``; only valid for a seq in ``State.readable()``."""
        held, sector, length, op, flags, data_off, data_len = _REC.unpack_from(
            self._view, (seq % self.desc_count) * _REC_SIZE)
        if held != seq:
            raise ReplError(f"ring slot for seq {seq} holds seq {held}: not readable")
        start = self.desc_bytes + data_off
        return Record(seq, sector, length, uapi.OP_NAMES.get(op, str(op)),
                      bool(flags & uapi.REPL_REC_FUA), self._view[start:start + data_len])

    def records(self, state: State | None = None) -> Iterator[Record]:
        """The readable records, in order."""
        state = state or self.state()
        for seq in state.readable():
            yield self.record(seq)

    def ack(self, seq: int) -> None:
        """Every record up to ``seq`` is consumed (and, in sync mode, durable on the targets)."""
        self._ioctl("ack", uapi.REPL_IOC_ACK, ffi.new("struct repl_ack *", {"seq": seq}))

    def release(self, seq: int) -> None:
        """Synchronous writers up to ``seq`` may complete; the records stay in the ring."""
        self._ioctl("release", uapi.REPL_IOC_RELEASE, ffi.new("struct repl_ack *", {"seq": seq}))

    def set_sync(self, sync: bool) -> None:
        self._ioctl("set flags", uapi.REPL_IOC_SET_FLAGS,
                    ffi.new("struct repl_flags *", {"flags": uapi.REPL_F_SYNC if sync else 0}))

    # -- streaming, marks and the bitmap -------------------------------
    def start_stream(self) -> int:
        """Start a new, empty ring; return the mark (first seq in it).

        Every earlier write is on the data device when this returns; dirty
        chunks must be resynchronised, then cleaned with this mark.
        """
        m = ffi.new("struct repl_mark *")
        self._ioctl("start stream", uapi.REPL_IOC_START_STREAM, m)
        return m.seq

    def mark(self) -> int:
        """Start remembering writes for clean(); every earlier write is on disk on return."""
        m = ffi.new("struct repl_mark *")
        self._ioctl("mark", uapi.REPL_IOC_MARK, m)
        return m.seq

    def clean(self, mark: int, first: int = 0, count: int | None = None) -> int:
        """Clear the dirty bits of chunks not written since ``mark``; return how many were cleared."""
        c = ffi.new("struct repl_clean *", {"mark": mark, "first": first,
                                             "count": self.nr_chunks - first if count is None else count})
        self._ioctl("clean", uapi.REPL_IOC_CLEAN, c)
        return c.cleared

    def bitmap(self, first: int = 0, count: int | None = None) -> bytes:
        """The dirty bitmap of chunks [first, first+count): bit n of byte k is chunk first+8k+n."""
        count = self.nr_chunks - first if count is None else count
        buf = bytearray(-(-count // 8))
        cbuf = ffi.from_buffer(buf)
        b = ffi.new("struct repl_bitmap *", {"first": first, "count": count,
                                              "addr": int(ffi.cast("uintptr_t", cbuf))})
        self._ioctl("get bitmap", uapi.REPL_IOC_GET_BITMAP, b)
        return bytes(buf)

    def dirty_chunks(self) -> list[int]:
        """Indices of every dirty chunk."""
        out: list[int] = []
        step = 1 << 24
        for first in range(0, self.nr_chunks, step):
            bm = self.bitmap(first, min(step, self.nr_chunks - first))
            out.extend(first + i for i in iter_bits(bm))
        return out


def iter_bits(bm: bytes) -> Iterator[int]:
    """Indices of the set bits of a little-endian bitmap."""
    for i, byte in enumerate(bm):
        if byte:
            for bit in range(8):
                if byte >> bit & 1:
                    yield i * 8 + bit
