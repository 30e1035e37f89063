"""Helpers for VM tests of the repl target: devices, a replaying consumer, digests."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from repctl import dm, metadata
from repctl.ring import Consumer
from repctl.store import open_store

SECTOR = 512


@dataclass
class ReplDev:
    name: str
    path: str
    data: str
    meta: str
    sectors: int
    chunk_sectors: int

    def status(self) -> str:
        with dm.DMControl() as ctl:
            return ctl.status(self.name)[0].text

    def status_fields(self) -> dict[str, str]:
        f = self.status().split()
        keys = ["meta", "mode", "reason", "chunk", "dirty", "writes", "write_bytes", "reads",
                "read_bytes", "ring", "published", "acked", "consumer", "sync", "start"]
        return dict(zip(keys, f))

    def message(self, text: str) -> str:
        with dm.DMControl() as ctl:
            return ctl.message(self.name, 0, text)


def repl_table(data: str, meta: str, sectors: int, chunk_sectors: int = 8, features: str = "") -> dm.Target:
    params = f"{data} {meta} {chunk_sectors}" + (f" {features}" if features else "")
    return dm.Target(0, sectors, "repl", params)


def make_repl(cleanup, loopdev, name: str = "r0", size_mb: int = 64, chunk_sectors: int = 8,
              features: str = "", data: str | None = None, format_md: bool = True,
              register: bool = True) -> ReplDev:
    """A repl device over a fresh loop device with freshly formatted metadata."""
    data = data or loopdev(size_mb)
    sectors = metadata.device_bytes(data) // SECTOR
    meta = loopdev(max(1, metadata.metadata_bytes(sectors, chunk_sectors) // (1 << 20) + 1))
    if format_md:
        metadata.format_metadata(meta, sectors, chunk_sectors)
    info = dm.create_device(name, [repl_table(data, meta, sectors, chunk_sectors, features)])
    if register:
        cleanup.dm(name)
    return ReplDev(name, info.path, data, meta, sectors, chunk_sectors)


def direct_write(path: str, offset: int, data: bytes, flags: int = 0) -> None:
    """Write `data` at `offset` past the page cache (O_DIRECT, plus `flags`, e.g. O_SYNC)."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | flags)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def direct_read(path: str, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, read past the page cache (O_DIRECT)."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf)


def sha256_of(path: str, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        remaining = length
        while remaining is None or remaining > 0:
            block = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()


def differing_chunks(a: str, b: str, chunk_bytes: int, size: int) -> set[int]:
    out = set()
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        for i in range(size // chunk_bytes):
            if fa.read(chunk_bytes) != fb.read(chunk_bytes):
                out.add(i)
    return out


def copy_chunks(src: str, dst: str, chunks, chunk_bytes: int) -> None:
    store = open_store(dst)
    with open(src, "rb", buffering=0) as f:
        for c in sorted(chunks):
            f.seek(c * chunk_bytes)
            store.write(c * chunk_bytes, f.read(chunk_bytes))
    store.flush()
    store.close()


class Replayer(threading.Thread):
    """A consumer that applies every record, in order, to a replica device.

    ``hold`` delays each acknowledgement (to observe sync mode); ``stop()``
    detaches like a dying daemon.
    """

    def __init__(self, dev: ReplDev, replica: str, *, sync: bool = False, hold: float = 0.0):
        super().__init__(daemon=True)
        self.consumer = Consumer(dev.path, sync=sync)
        self.store = open_store(replica)
        self.hold = hold
        self.applied = 0
        self.error: BaseException | None = None
        self._stop_evt = threading.Event()
        self.mark = self.consumer.start_stream()

    def run(self) -> None:
        try:
            last = self.mark - 1
            while not self._stop_evt.is_set():
                st = self.consumer.state()
                if not st.streaming:
                    break
                seqs = st.readable()
                if not len(seqs):
                    self.consumer.wait(last, 200)
                    continue
                for seq in seqs:
                    r = self.consumer.record(seq)
                    self.store.apply(r.op, r.sector, r.length, r.data, r.fua)
                    self.applied += 1
                    last = seq
                if self.hold:
                    time.sleep(self.hold)
                self.consumer.ack(last)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def drain(self, timeout: float = 30) -> None:
        """Wait until every write issued so far is applied and acked."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.consumer.state()
            if st.acked >= st.next_seq - 1 or self.error:
                break
            time.sleep(0.05)
        if self.error:
            raise self.error
        st = self.consumer.state()
        assert st.acked >= st.next_seq - 1, f"replay did not catch up: {st}"

    def stop(self, close: bool = True) -> None:
        self._stop_evt.set()
        self.join(10)
        if close:
            self.consumer.close()
            self.store.close()
        if self.error:
            raise self.error


def find_disk(serial: str) -> str:
    """/dev/vdX of the virtio-blk disk with this serial (the host sets it with -device serial=)."""
    for block in sorted(Path("/sys/block").iterdir()):
        try:
            if (block / "serial").read_text().strip() == serial:
                return f"/dev/{block.name}"
        except OSError:
            continue
    raise FileNotFoundError(f"no disk with serial {serial!r} in /sys/block")
