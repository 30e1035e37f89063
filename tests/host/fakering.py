"""The kernel consumer of a repl device, in memory, for a live `SourceResource` on the host.

`FakeRing` stands for `repctl.ring.Consumer` (no device-mapper on the host): the records the
test writes (also written into the data file, as the device would), acks, a fall into
tracking, and the file's poll() as docs/dm-repl.rst says it: POLLPRI while the `events`
counter differs from the last GET_STATE, POLLIN while a record was published since it. So the
engine under test sleeps and wakes in its real code. A test whose targets leave the stream
with records they never made durable (and must get them again by resync) asks the ring to keep
a dirty bitmap too (`track_dirty`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

from repctl.daemon import SourceResource


class PollableFd:
    """A descriptor whose poll() readiness is set by hand: POLLPRI is a TCP urgent byte waiting
    on a loopback connection, POLLIN an ordinary byte. `set` takes back what is there (the
    urgent byte first: TCP reads stop at the urgent mark) and sends what is wanted."""

    def __init__(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self._tx = socket.create_connection(listener.getsockname())
            self._rx, _ = listener.accept()
        self._tx.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._rx.setblocking(False)
        self._pri = self._in = False

    def fileno(self) -> int:
        return self._rx.fileno()

    def set(self, pri: bool, readable: bool) -> None:
        if (pri, readable) == (self._pri, self._in):
            return
        if self._pri:
            self._take(socket.MSG_OOB)
        if self._in:
            self._take(0)
        if readable:
            self._tx.send(b"i")
        if pri:
            self._tx.send(b"!", socket.MSG_OOB)
        self._pri, self._in = pri, readable

    def _take(self, flags: int) -> None:
        """Read back one byte sent earlier (loopback delivers it soon, not always at once)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                if self._rx.recv(1, flags):
                    return
            except OSError:  # EAGAIN, or EINVAL: the urgent byte is not there yet
                pass
            assert time.monotonic() < deadline, "the fake ring's poll byte never arrived"
            time.sleep(0.001)

    def close(self) -> None:
        self._tx.close()
        self._rx.close()


class FakeRing:
    """The kernel consumer of /dev/mapper/r0, in memory (see the module's docstring).
    `gets` counts GET_STATE by thread name: the engine's is `engine-r0`."""

    def __init__(self, nr_chunks: int, data_dev: str) -> None:
        self.cond = threading.Condition()
        self.data_dev = data_dev
        self.nbytes = -(-nr_chunks // 8)
        self.records: dict[int, SimpleNamespace] = {}
        self.next_seq = 1
        self.stream_start = 0  # never streamed yet
        self.ring_end = 0
        self.acked = 0
        self.streaming = False
        self.reason = "no_consumer"
        self.events = 0  # raised by every change of mode or reason
        self.seen_events = self.seen_published = 0  # of the last GET_STATE, for poll and WAIT
        self.fd = PollableFd()
        self.gets: Counter[str] = Counter()
        # the dirty bitmap, kept only when a test asks (`track_dirty`): chunk -> seq of its
        # last write; without it the bitmap is empty, as every write is in the ring
        self.chunk_bytes = 0
        self.dirty: dict[int, int] = {}

    def _poll_state(self) -> None:
        """cond held: the file's readiness, as the kernel's repl_poll computes it."""
        self.fd.set(self.events != self.seen_events, self.next_seq - 1 > self.seen_published)

    def track_dirty(self, chunk_bytes: int) -> None:
        """Keep a dirty bitmap from now on, as the kernel does: a write marks its chunks,
        `clean(mark)` clears those not written since `mark`. So a target that leaves the
        stream with records it never made durable finds them in its OOS bitmap again."""
        with self.cond:
            self.chunk_bytes = chunk_bytes

    # -- what the test does, as the kernel would
    def write(self, sector: int, data: bytes) -> int:
        with open(self.data_dev, "r+b") as f:
            f.seek(sector * 512)
            f.write(data)
        with self.cond:
            seq = self.next_seq
            if self.chunk_bytes:
                first = sector * 512 // self.chunk_bytes
                last = (sector * 512 + len(data) - 1) // self.chunk_bytes
                self.dirty.update(dict.fromkeys(range(first, last + 1), seq))
            self.records[seq] = SimpleNamespace(seq=seq, sector=sector, length=len(data),
                                                op="write", fua=False, data=memoryview(data))
            self.next_seq += 1
            self.ring_end = self.next_seq
            self._poll_state()
            self.cond.notify_all()
            return seq

    def record_op(self, op: str, sector: int = 0, length: int = 0) -> int:
        """A record without data ("flush", "discard", "write_zeroes", "noop"), with the range
        the kernel's record holds (a flush's may be non-zero: the bio's sector)."""
        with self.cond:
            seq = self.next_seq
            self.records[seq] = SimpleNamespace(seq=seq, sector=sector, length=length, op=op,
                                                fua=False, data=memoryview(b""))
            self.next_seq += 1
            self.ring_end = self.next_seq
            self._poll_state()
            self.cond.notify_all()
            return seq

    def fall_behind(self, reason: str) -> None:
        with self.cond:
            self.streaming, self.reason = False, reason
            self.events += 1
            self._poll_state()
            self.cond.notify_all()

    # -- the Consumer's interface (repctl.ring)
    def fileno(self) -> int:
        return self.fd.fileno()

    def state(self) -> Any:
        with self.cond:
            self.gets[threading.current_thread().name] += 1
            self.seen_events, self.seen_published = self.events, self.next_seq - 1
            self._poll_state()
            used = sum(r.length for s, r in self.records.items() if s > self.acked)
            return SimpleNamespace(
                mode="streaming" if self.streaming else "tracking", reason=self.reason,
                streaming=self.streaming, stream_start=self.stream_start,
                ring_end=self.ring_end, published=self.next_seq - 1, acked=self.acked,
                events=self.events, dirty_chunks=len(self.dirty), ring_used=used, ring_bytes=32 << 20)

    def start_stream(self) -> int:
        with self.cond:
            self.stream_start = self.ring_end = self.next_seq
            self.acked = self.next_seq - 1
            self.records.clear()
            self.streaming, self.reason = True, "started"
            self.events += 1
            self._poll_state()
            return self.next_seq

    def mark(self) -> int:
        return self.next_seq

    def bitmap(self) -> bytes:
        with self.cond:
            bits = sum(1 << c for c in self.dirty)  # none unless track_dirty: all in the ring
        return bits.to_bytes(self.nbytes, "little")

    def clean(self, mark: int) -> None:
        with self.cond:
            for c in [c for c, seq in self.dirty.items() if seq < mark]:
                del self.dirty[c]

    def ack(self, seq: int) -> None:
        with self.cond:
            self.acked = max(self.acked, seq)
            for s in [s for s in self.records if s <= seq]:
                del self.records[s]

    def release(self, seq: int) -> None:
        pass

    def set_sync(self, on: bool) -> None:
        pass

    def wait(self, after: int, timeout_ms: int = 1000, batch: int = 1) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.next_seq - 1 > after or not self.streaming
                               or self.events != self.seen_events, timeout_ms / 1000)

    def record(self, seq: int) -> Any:
        with self.cond:
            return self.records[seq]

    def close(self) -> None:
        self.fd.close()


def start_without_device_mapper(self: SourceResource) -> None:
    """SourceResource.start with the FakeRing in place of the device and its consumer."""
    self._bind_generation("11111111-1111-1111-1111-111111111111")
    self.consumer = FakeRing(self.nr_chunks, self.data_dev)  # type: ignore[assignment]
    self.read_fd = os.open(self.data_dev, os.O_RDONLY | os.O_CLOEXEC)
    self.engine.start()
    for link in self.links.values():
        link.thread.start()
    self.listener.start()
