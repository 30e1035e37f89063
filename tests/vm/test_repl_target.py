"""The repl target on the real kernel: tables, metadata, status, messages, a filesystem."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from repctl import dm, metadata
from replfix import make_repl, repl_table

SECTOR = 512


def _no_device(name: str) -> bool:
    with dm.DMControl() as ctl:
        return all(d.name != name for d in ctl.list_devices())


def _remove_if_present(name: str) -> None:
    if not _no_device(name):
        dm.remove_device(name)


@pytest.fixture
def unexpected(cleanup):
    """Register names whose creation should fail, so that a wrong success leaks nothing."""
    def register(name: str) -> str:
        cleanup.add(f"dm device {name}", lambda: _remove_if_present(name))
        return name
    return register


def test_filesystem_on_repl_and_counters(cleanup, loopdev, run):
    dev = make_repl(cleanup, loopdev, "fs0", size_mb=128)
    assert dev.status_fields()["mode"] == "tracking"
    run(["mkfs.ext4", "-q", "-F", dev.path])
    mnt = Path("/tmp/repl-mnt-fs0")
    mnt.mkdir(exist_ok=True)
    run(["mount", dev.path, str(mnt)])
    cleanup.add(f"umount {mnt}", lambda: run(["umount", str(mnt)], check=False))
    payload = os.urandom(3 << 20)
    (mnt / "a.bin").write_bytes(payload)
    (mnt / "dir").mkdir()
    for i in range(50):
        (mnt / "dir" / f"f{i}").write_text(f"file {i}\n" * (i + 1))
    run(["sync"])
    run(["umount", str(mnt)])
    run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
    run(["mount", dev.path, str(mnt)])
    assert (mnt / "a.bin").read_bytes() == payload
    assert (mnt / "dir" / "f49").read_text() == "file 49\n" * 50
    run(["umount", str(mnt)])
    run(["fsck.ext4", "-n", "-f", dev.path])

    f = dev.status_fields()
    assert int(f["writes"]) > 50
    assert int(f["write_bytes"]) >= len(payload)
    assert int(f["reads"]) > 0
    dirty, chunks = map(int, f["dirty"].split("/"))
    assert chunks == dev.sectors // 8
    assert dirty > (3 << 20) // 4096  # no consumer: every written chunk stays marked


def test_table_status_repeats_the_table(cleanup, loopdev):
    dev = make_repl(cleanup, loopdev, "tb0", features="4 ring_mb 8 sync_timeout_ms 1500")
    with dm.DMControl() as ctl:
        params = ctl.table("tb0")[0].params
    assert params == f"{dev.data} {dev.meta} 8 4 ring_mb 8 sync_timeout_ms 1500"


def test_dirty_bits_persist_across_reload(cleanup, loopdev):
    dev = make_repl(cleanup, loopdev, "pb0")
    fd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT)
    m = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    m.write(b"x" * 4096)
    for chunk in (0, 7, 1000, 16000):
        os.pwritev(fd, [m], chunk * 4096)
    os.close(fd)
    assert dev.status_fields()["dirty"].startswith("4/")
    with dm.DMControl() as ctl:
        dm.remove_device("pb0", ctl=ctl)
        sb, bm = metadata.read_bitmap(dev.meta)
        assert sb.clean
        info = dm.create_device("pb0", [repl_table(dev.data, dev.meta, dev.sectors)], ctl=ctl)
    assert info.name == "pb0"
    assert dev.status_fields()["dirty"].startswith("4/")
    bits = {i for i in range(sb.nr_chunks) if bm[i // 8] >> (i % 8) & 1}
    assert bits == {0, 7, 1000, 16000}
    sb = metadata.read_superblock(dev.meta)
    assert not sb.clean  # in use: an unclean shutdown would be visible


@pytest.mark.parametrize("params,error", [
    ("", "Not enough arguments"),
    ("{data}", "Not enough arguments"),
    ("{data} {meta}", "Not enough arguments"),
    ("/dev/nonexistent {meta} 8", "Error opening data device"),
    ("{data} /dev/nonexistent 8", "Error opening metadata device"),
    ("{data} {meta} 12", "Invalid chunk size"),
    ("{data} {meta} 8x", "Invalid chunk size"),
    ("{data} {meta} 4", "Invalid chunk size"),
    ("{data} {meta} 4096", "Invalid chunk size"),
    ("{data} {meta} 16", "another chunk size"),
    ("{data} {meta} 8 2 ring_mb", "Invalid number of feature arguments"),
    ("{data} {meta} 8 2 ring_mb 0", "Invalid ring_mb"),
    ("{data} {meta} 8 2 ring_mb 8z", "Invalid ring_mb"),
    ("{data} {meta} 8 2 colour blue", "Unknown feature argument"),
    ("{data} {meta} 8 1 ring_mb", "lacks its value"),
    ("{data} {meta} 8 2 ring_mb 8 extra", "Too many arguments"),
    ("{data} {data} 8", "must differ"),
])
def test_malformed_tables_are_refused(cleanup, loopdev, unexpected, params, error):
    unexpected("bad0")
    data = loopdev(16)
    sectors = metadata.device_bytes(data) // SECTOR
    meta = loopdev(1)
    metadata.format_metadata(meta, sectors, 8)
    target = dm.Target(0, sectors, "repl", params.format(data=data, meta=meta))
    with pytest.raises(dm.DMError) as e:
        dm.create_device("bad0", [target])
    assert error in str(e.value)
    assert _no_device("bad0")


def _pwrite_sync(path: str, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _bad_metadata(meta: str, kind: str, sectors: int) -> None:
    if kind == "unformatted":
        return
    if kind == "foreign":
        _pwrite_sync(meta, os.urandom(4096), 0)
        return
    if kind == "size":
        metadata.format_metadata(meta, sectors - 8, 8)
        return
    metadata.format_metadata(meta, sectors, 8)
    _pwrite_sync(meta, b"\x01", 100)  # inside the checksummed area


@pytest.mark.parametrize("kind,error", [
    ("unformatted", "not formatted"),
    ("foreign", "bad magic"),
    ("corrupt", "checksum mismatch"),
    ("size", "another size"),
])
def test_bad_metadata_is_refused(cleanup, loopdev, unexpected, kind, error):
    unexpected("bad1")
    data = loopdev(16)
    sectors = metadata.device_bytes(data) // SECTOR
    meta = loopdev(1)
    _bad_metadata(meta, kind, sectors)
    with pytest.raises(dm.DMError) as e:
        dm.create_device("bad1", [repl_table(data, meta, sectors)])
    assert error in str(e.value)
    assert _no_device("bad1")


def test_metadata_too_small_is_refused(cleanup, loopdev, unexpected):
    unexpected("bad2")
    data = loopdev(40 * 1024)  # sparse: 40 GiB needs 1281 bitmap blocks, 1 MiB holds 255
    sectors = metadata.device_bytes(data) // SECTOR
    meta = loopdev(1)
    with pytest.raises(metadata.MetadataError, match="needs"):
        metadata.format_metadata(meta, sectors, 8)
    _pwrite_sync(meta, metadata.build_superblock(sectors, 8), 0)  # valid, but too small a device
    with pytest.raises(dm.DMError, match="too small"):
        dm.create_device("bad2", [repl_table(data, meta, sectors)])
    assert _no_device("bad2")


def test_format_refuses_existing_metadata(cleanup, loopdev):
    meta = loopdev(1)
    metadata.format_metadata(meta, 8192, 8)
    with pytest.raises(metadata.MetadataError, match="already holds dm-repl metadata"):
        metadata.format_metadata(meta, 8192, 8)
    metadata.format_metadata(meta, 8192, 8, force=True)


def test_messages(cleanup, loopdev):
    dev = make_repl(cleanup, loopdev, "msg0", size_mb=16)
    with pytest.raises(dm.DMError):
        dev.message("frobnicate")
    for bad in ("mark_dirty", "mark_dirty 1", "mark_dirty x 1", "mark_dirty 0 0",
                "mark_dirty 4095 2", "mark_dirty 4096 1", "mark_dirty 1 1 1"):
        with pytest.raises(dm.DMError):
            dev.message(bad)
    assert dev.status_fields()["dirty"] == "0/4096"
    dev.message("mark_dirty 10 5")
    assert dev.status_fields()["dirty"] == "5/4096"
    _, bm = metadata.read_bitmap(dev.meta)
    assert bm[1] == 0b01111100  # chunks 10..14, durable at once
    dev.message("fall_behind")
    f = dev.status_fields()
    assert (f["mode"], f["reason"]) == ("tracking", "message")
    # still usable
    with open(dev.path, "r+b", buffering=0) as fh:
        fh.write(b"y" * 4096)
        fh.seek(0)
        assert fh.read(4096) == b"y" * 4096


def test_remove_with_open_fd_is_refused_then_works(cleanup, loopdev, unexpected):
    dev = make_repl(cleanup, loopdev, unexpected("rm0"), size_mb=16, register=False)
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(dm.DMError):
            dm.remove_device("rm0", retries=0)
    finally:
        os.close(fd)
    dm.remove_device("rm0")
    assert _no_device("rm0")
