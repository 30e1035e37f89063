"""Faults under the repl target: writes the data device fails, and bitmap work on huge devices.

The data device of each repl device here is a dm device of the test's own ("lower") over a
loop device: dm-linear while it works, reloaded to dm-flakey with error_writes (every write
and flush fails, reads still work) to make the data device fail. What a consumer sees is
read exactly the way the daemon sends it (pyctl/repctl/daemon/link.py, _send_records_locked):
every record from stream_start up to min(published, ring_end - 1), whatever the mode.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

from repctl import dm, metadata
from repctl.ring import Consumer
from replfix import SECTOR, make_repl

CHUNK = 4096


@pytest.fixture(scope="module", autouse=True)
def _modules():
    subprocess.run(["modprobe", "-a", "dm-flakey"], check=True, capture_output=True)


def _lower(cleanup, loopdev, name: str, size_mb: int = 16) -> tuple[str, str, int]:
    """A dm-linear device over a new loop device: (its path, the loop device, sectors)."""
    loop = loopdev(size_mb)
    sectors = size_mb << 11
    info = dm.create_device(name, [dm.Target(0, sectors, "linear", f"{loop} 0")])
    cleanup.dm(name)
    return info.path, loop, sectors


def _swap(name: str, loop: str, sectors: int, failing: bool) -> None:
    """Make the lower device fail every write (flakey, always down) or work again (linear)."""
    target = (dm.Target(0, sectors, "flakey", f"{loop} 0 0 1 1 error_writes") if failing
              else dm.Target(0, sectors, "linear", f"{loop} 0"))
    with dm.DMControl() as ctl:
        ctl.load_table(name, [target])
        ctl.suspend(name)
        ctl.resume(name)


def _pattern(tag: int, size: int) -> bytes:
    return (b"%08d" % tag) * (size // 8)


def _pwrite(path: str, offset: int, data: bytes) -> None:
    """One O_DIRECT write of data at offset; raises OSError as the writer sees it."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)
        buf.close()


def _pread(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(size)


def _daemon_view(c: Consumer) -> list[tuple[int, str, int, bytes]]:
    """(seq, op, sector, data) of every record the daemon would send now."""
    st = c.state()
    last = min(st.published, st.ring_end - 1)
    out = []
    for seq in range(st.stream_start, last + 1):
        r = c.record(seq)
        out.append((seq, r.op, r.sector, bytes(r.data)))
    return out


def _streaming(cleanup, dev) -> Consumer:
    c = Consumer(dev.path)
    cleanup.add(f"consumer {dev.path}", c.close)
    c.start_stream()
    assert c.state().mode == "streaming"
    return c


def _check_ring(c: Consumer, before: list[tuple[int, int, bytes]], failed: set[int],
                bad: set[bytes]) -> None:
    """The writes before the failure are readable, in order, with their data; nothing
    after them is readable; no failed seq or failed data shows up as a WRITE."""
    seen = _daemon_view(c)
    got = [(op, sector, data) for _, op, sector, data in seen]
    assert got[:len(before)] == [("write", s, d) for s, _, d in before], \
        "the writes before the failure are not in the ring, in order"
    for seq, op, sector, data in seen:
        assert not (op == "write" and (seq in failed or data in bad)), \
            f"a failed write is readable as a WRITE with data: seq {seq} sector {sector}"
    assert len(seen) == len(before), \
        f"records after the failed write are readable: {[r[:3] for r in seen[len(before):]]}"


def _dirty(c: Consumer) -> set[int]:
    return set(c.dirty_chunks())


# 4 KiB is copied into the ring in map; 1 MiB by the copy workqueue, which may still be
# copying when the data device fails the write (end_io then waits for the copy)
@pytest.mark.parametrize("size", [CHUNK, 1 << 20], ids=["copied-in-map", "copy-offloaded"])
def test_failed_write_never_reaches_the_ring_as_a_write(cleanup, loopdev, size):
    lower, loop, sectors = _lower(cleanup, loopdev, f"flt-lo-{size}")
    dev = make_repl(cleanup, loopdev, f"flt-{size}", data=lower)
    c = _streaming(cleanup, dev)

    # writes that work: records in the ring, in order
    before = []
    for i, off in enumerate((0, 4 * size, 2 * size)):
        data = _pattern(i, size)
        _pwrite(dev.path, off, data)
        before.append((off // SECTOR, off, data))
    assert [r[1:3] for r in _daemon_view(c)] == [("write", s) for s, _, _ in before]

    # the data device fails the next write: the writer sees EIO
    _swap(f"flt-lo-{size}", loop, sectors, failing=True)
    failed_off = 8 * size
    bad = _pattern(99, size)
    seq = c.state().next_seq
    with pytest.raises(OSError) as e:
        _pwrite(dev.path, failed_off, bad)
    assert e.value.errno == errno.EIO

    st = c.state()
    assert (st.mode, st.reason) == ("tracking", "io_error")
    _check_ring(c, before, {seq}, {bad})
    first = failed_off // CHUNK
    assert set(range(first, first + size // CHUNK)) <= _dirty(c), \
        "the failed write's chunks are clean"
    assert dev.status_fields()["mode"] == "tracking"

    # the device keeps serving (P5): reads now, writes once the data device works again
    for _, off, data in before:
        assert _pread(dev.path, off, size) == data
    _swap(f"flt-lo-{size}", loop, sectors, failing=False)
    _pwrite(dev.path, failed_off, _pattern(7, size))
    assert _pread(dev.path, failed_off, size) == _pattern(7, size)
    c.start_stream()
    _pwrite(dev.path, 0, _pattern(8, size))
    assert [(op, s, d) for _, op, s, d in _daemon_view(c)] == [("write", 0, _pattern(8, size))]
    assert c.state().mode == "streaming"


def test_failed_write_in_flight_when_the_stream_stopped(cleanup, loopdev):
    """A write in the ring that fails after the target fell behind for another reason:
    its record is still not readable, though the ring stopped growing before it failed."""
    lower, loop, sectors = _lower(cleanup, loopdev, "flt-lo-q")
    dev = make_repl(cleanup, loopdev, "flt-q", data=lower)
    c = _streaming(cleanup, dev)
    _pwrite(dev.path, 0, _pattern(1, CHUNK))
    before = [(0, 0, _pattern(1, CHUNK))]

    # hold the next write in the suspended data device, stop the stream, then fail it
    with dm.DMControl() as ctl:
        ctl.suspend("flt-lo-q")
    seq = c.state().next_seq
    bad = _pattern(99, CHUNK)
    result: list[BaseException | None] = []

    def write() -> None:
        try:
            _pwrite(dev.path, 16 * CHUNK, bad)
            result.append(None)
        except OSError as e:
            result.append(e)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + 10
    while c.state().next_seq == seq:
        assert time.monotonic() < deadline, "the write did not reach the target"
        time.sleep(0.02)
    assert c.state().ring_end == seq + 1, "the write is not in the ring"
    dev.message("fall_behind")
    assert c.state().reason == "message"
    with dm.DMControl() as ctl:
        ctl.load_table("flt-lo-q",
                       [dm.Target(0, sectors, "flakey", f"{loop} 0 0 1 1 error_writes")])
        ctl.resume("flt-lo-q")
    writer.join(10)
    assert result and isinstance(result[0], OSError) and result[0].errno == errno.EIO, result

    st = c.state()
    assert st.published >= seq
    _check_ring(c, before, {seq}, {bad})
    assert (st.mode, st.reason) == ("tracking", "io_error")
    assert 16 in _dirty(c)


def test_failed_write_while_tracking_leaves_its_chunk_dirty(cleanup, loopdev):
    lower, loop, sectors = _lower(cleanup, loopdev, "flt-lo-t")
    dev = make_repl(cleanup, loopdev, "flt-t", data=lower)
    _pwrite(dev.path, 0, _pattern(1, 4 * CHUNK))
    with Consumer(dev.path) as c:  # in sync: clean everything
        mark = c.mark()
        assert c.clean(mark) == 4
    assert dev.status_fields()["dirty"] == f"0/{sectors // 8}"

    _swap("flt-lo-t", loop, sectors, failing=True)
    with pytest.raises(OSError) as e:
        _pwrite(dev.path, 5 * CHUNK, _pattern(2, CHUNK))  # no consumer: not in the ring
    assert e.value.errno == errno.EIO
    f = dev.status_fields()
    assert (f["meta"], f["mode"], f["dirty"]) == ("rw", "tracking", f"1/{sectors // 8}")
    _, bm = metadata.read_bitmap(dev.meta)
    assert bm[0] == 1 << 5 and not any(bm[1:]), "the failed write's chunk is not dirty on disk"

    _swap("flt-lo-t", loop, sectors, failing=False)
    _pwrite(dev.path, 5 * CHUNK, _pattern(3, CHUNK))
    want = _pattern(1, 4 * CHUNK) + bytes(CHUNK) + _pattern(3, CHUNK)
    assert _pread(dev.path, 0, 6 * CHUNK) == want


PROBE = """
import os, select, sys, time
os.sched_setaffinity(0, {0})
print("ready", flush=True)
worst = 0.0
while True:
    t = time.monotonic()
    done = select.select([sys.stdin], [], [], 0.005)[0]
    worst = max(worst, time.monotonic() - t)
    if done:
        break
print(worst, flush=True)
"""


def _on_cpu0_with_a_probe(fn) -> tuple[float, float]:
    """Run fn pinned to CPU 0 beside a process that sleeps 5 ms at a time on the same CPU:
    return how long fn took and the longest the probe waited for one of its sleeps, which
    is how long CPU 0 ran fn's kernel code without letting anything else run."""
    probe = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    mask = os.sched_getaffinity(0)
    try:
        assert probe.stdout.readline().strip() == "ready"
        os.sched_setaffinity(0, {0})
        time.sleep(0.1)
        t0 = time.monotonic()
        fn()
        took = time.monotonic() - t0
    finally:
        os.sched_setaffinity(0, mask)
        probe.stdin.close()
    stall = float(probe.stdout.readline())
    probe.wait(10)
    return took, stall


def _all_ones(bm: bytes, nbits: int) -> bool:
    full, rest = divmod(nbits, 8)
    return bm[:full] == b"\xff" * full and (not rest or bm[full] == (1 << rest) - 1)


def test_mark_dirty_of_a_huge_device(cleanup, loopdev):
    """mark_dirty over 2^28 chunks (1 TiB in 4 KiB chunks, a sparse loop device) marks
    every chunk, counts right for ranges that cross words and blocks, and never holds its
    CPU for long: a probe on the same CPU measures the longest stall (4.6 s in the test VM
    with the chunk-by-chunk loop under the spinlock that it replaced, 0.01 s now), well
    before the kernel's soft-lockup and RCU-stall reports, on which vmrun.py fails the run."""
    size_mb = 1 << 20
    dev = make_repl(cleanup, loopdev, "huge0", size_mb=size_mb)
    nr = dev.sectors // dev.chunk_sectors
    assert nr == 1 << 28
    block = 32768  # chunks per metadata block

    first, count = 3 * block - 5, 2 * block + 10  # parts of four blocks
    dev.message(f"mark_dirty {first} {count}")
    assert dev.status_fields()["dirty"] == f"{count}/{nr}"
    with Consumer(dev.path) as c:
        bm = c.bitmap(2 * block, 4 * block)
        want = sum(1 << i for i in range(first - 2 * block, first - 2 * block + count))
        assert int.from_bytes(bm, "little") == want
    # a write marks its chunks the same way: one new chunk, one already dirty
    _pwrite(dev.path, (first - 1) * CHUNK, _pattern(1, 2 * CHUNK))
    assert dev.status_fields()["dirty"] == f"{count + 1}/{nr}"

    took, stall = _on_cpu0_with_a_probe(lambda: dev.message(f"mark_dirty 0 {nr}"))
    print(f"mark_dirty of {nr} chunks took {took:.2f} s; the longest stall of CPU 0 "
          f"was {stall:.2f} s")
    assert stall < 0.5, f"mark_dirty kept CPU 0 from scheduling for {stall:.2f} s"
    assert dev.status_fields()["dirty"] == f"{nr}/{nr}"
    with Consumer(dev.path) as c:
        step = 1 << 26
        for at in range(0, nr, step):
            assert _all_ones(c.bitmap(at, step), step), f"chunks from {at} not all dirty"
        assert c.state().dirty_chunks == nr
    _, bm = metadata.read_bitmap(dev.meta)
    assert _all_ones(bm, nr), "the bitmap on disk is not all dirty"
    # marking again finds nothing new
    dev.message(f"mark_dirty {first} {count}")
    assert dev.status_fields()["dirty"] == f"{nr}/{nr}"
