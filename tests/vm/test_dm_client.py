"""repctl.dm against the real device-mapper, with the built-in linear, zero, error and striped
targets over loop devices. Runs only in the test VM (see conftest.py).

Every dm device is registered with conftest's `cleanup` before it is created, so that it is
removed even when the test fails half-way.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from repctl import dm
from repctl.dm import DMControl, DMError, Target

SECTOR = 512


@pytest.fixture
def ctl() -> Iterator[DMControl]:
    with DMControl() as c:
        yield c


@pytest.fixture
def dmname(cleanup: Any) -> Callable[..., str]:
    """Factory: dmname(suffix="") -> a fresh device name, registered for removal (if it
    exists) after the test."""
    def make(suffix: str = "") -> str:
        name = f"repctl-dmt-{uuid.uuid4().hex[:8]}{suffix}"

        def remove_if_present() -> None:
            try:
                dm.remove_device(name)
            except DMError as e:
                if e.errno != errno.ENXIO:
                    raise

        cleanup.add(f"dm device {name}", remove_if_present)
        return name

    return make


def sectors(dev: str) -> int:
    with open(dev, "rb") as f:
        return f.seek(0, os.SEEK_END) // SECTOR


def devno(dev: str) -> tuple[int, int]:
    rdev = os.stat(dev).st_rdev
    return os.major(rdev), os.minor(rdev)


def names(ctl: DMControl) -> set[str]:
    return {d.name for d in ctl.list_devices()}


# --- Basics -------------------------------------------------------------------------------------


def test_version_and_target_types(ctl: DMControl, dmname: Callable[..., str]) -> None:
    major, minor, _ = ctl.version()
    assert major == 4 and minor >= 27
    types = {v.name: v.version for v in ctl.target_versions()}
    assert {"linear", "striped", "error"} <= types.keys()  # built into dm-mod
    assert all(len(v) == 3 for v in types.values())
    # Only registered types are listed: "zero" (dm-zero.ko) after its first use.
    dm.create_device(dmname(), [Target(0, 8, "zero", "")], ctl=ctl)
    assert "zero" in {v.name for v in ctl.target_versions()}


def test_lifecycle_of_a_linear_device(ctl: DMControl, loopdev: Callable[[int], str],
                                      dmname: Callable[..., str]) -> None:
    loop = loopdev(16)
    lmaj, lmin = devno(loop)
    size = sectors(loop)
    name, uid = dmname(), f"REPCTL-TEST-{uuid.uuid4().hex}"

    created = ctl.create(name, uid)
    assert (created.name, created.uuid) == (name, uid)
    assert not created.active_table and not created.inactive_table
    assert ctl.table(name) == [] and ctl.status(name) == []

    loaded = ctl.load_table(name, [Target(0, size, "linear", f"{loop} 0")])
    assert loaded.inactive_table and not loaded.active_table

    event_nr = ctl.resume(name)
    info = ctl.info(name)
    assert info.event_nr == event_nr
    assert info.active_table and not info.inactive_table and not info.suspended
    assert not info.readonly
    assert (info.name, info.uuid, info.target_count, info.open_count) == (name, uid, 1, 0)
    assert info.major > 0

    listed = {d.name: d for d in ctl.list_devices()}
    assert (listed[name].major, listed[name].minor) == (info.major, info.minor)
    assert listed[name].uuid == uid

    # The table as the target prints it: the device as major:minor.
    assert ctl.table(name) == [Target(0, size, "linear", f"{lmaj}:{lmin} 0")]
    assert ctl.status(name) == [dm.TargetStatus(0, size, "linear", "")]

    ctl.suspend(name)
    assert ctl.info(name).suspended
    ctl.resume(name)
    assert not ctl.info(name).suspended

    if shutil.which("dmsetup"):  # an independent reader of the same kernel state
        out = subprocess.run(["dmsetup", "table", name], capture_output=True, text=True,
                             check=True).stdout
        assert out.split() == ["0", str(size), "linear", f"{lmaj}:{lmin}", "0"]

    ctl.remove(name)
    assert name not in names(ctl)
    with pytest.raises(DMError) as err:
        ctl.info(name)
    assert err.value.errno == errno.ENXIO


def test_create_device_with_several_targets(ctl: DMControl, loopdev: Callable[[int], str],
                                            dmname: Callable[..., str]) -> None:
    loop = loopdev(16)
    name = dmname()
    targets = [Target(0, 2048, "linear", f"{loop} 0"),
               Target(2048, 2048, "zero", ""),
               Target(4096, 2048, "error", "")]
    with open(loop, "r+b") as f:
        f.write(b"repctl" * 100)
        f.flush()
        os.fsync(f.fileno())

    info = dm.create_device(name, targets, readonly=True, ctl=ctl)
    assert info.readonly and info.target_count == 3 and info.active_table
    st = os.stat(info.path)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(info.major, info.minor)
    assert [t.target_type for t in ctl.table(name)] == ["linear", "zero", "error"]
    assert [(s.start, s.length) for s in ctl.status(name)] == [(0, 2048), (2048, 2048),
                                                                (4096, 2048)]

    with open(info.path, "rb") as f:
        assert f.read(600) == b"repctl" * 100
        f.seek(2048 * SECTOR)
        assert f.read(4096) == b"\0" * 4096
    assert read_direct(info.path, 4096 * SECTOR) == errno.EIO

    dm.remove_device(name, ctl=ctl)
    assert name not in names(ctl)
    assert not os.path.lexists(info.path)


def read_direct(path: str, offset: int) -> int:
    """errno of a 4 KiB O_DIRECT read at `offset`, 0 if it succeeds (no readahead, no cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], offset)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


def test_buffers_grow_when_replies_do_not_fit(loopdev: Callable[[int], str],
                                              dmname: Callable[..., str]) -> None:
    """A reply bigger than the buffer (DM_BUFFER_FULL_FLAG) is asked for again, bigger."""
    long_names = [dmname("-" + "x" * 100) for _ in range(3)]
    big = dmname("-big")
    with DMControl(buffer_size=dm.HEADER_SIZE + 64) as small:
        for name in long_names:
            dm.create_device(name, [Target(0, 8, "zero", "")], ctl=small)
        assert set(long_names) <= names(small)
        assert len(small.target_versions()) >= 4
        loop = loopdev(1)
        n = 64  # 64 linear targets of 8 sectors: a table of ~3 KiB
        table = [Target(i * 8, 8, "linear", f"{loop} {i * 8}") for i in range(n)]
        dm.create_device(big, table, ctl=small)
        lmaj, lmin = devno(loop)
        assert small.table(big) == [
            Target(t.start, t.length, "linear", f"{lmaj}:{lmin} {t.start}") for t in table]
    for name in [*long_names, big]:
        dm.remove_device(name)


# --- Failures carry the kernel's words ----------------------------------------------------------


@pytest.mark.parametrize("target, text", [
    (Target(0, 8, "linear", "/dev/repctl-no-such-device 0"), "linear: Device lookup failed"),
    (Target(0, 8, "linear", "/dev/null"), "linear: Invalid argument count"),
    (Target(0, 8, "repctl-no-such", ""), "repctl-no-such: unknown target type"),
])
def test_malformed_table_raises_kernel_text_and_leaves_nothing(
        ctl: DMControl, dmname: Callable[..., str], target: Target, text: str) -> None:
    name = dmname()
    with pytest.raises(DMError) as err:
        dm.create_device(name, [target], ctl=ctl)
    e = err.value
    assert (e.op, e.device) == ("load table", name)
    assert e.errno in (errno.EINVAL, errno.ENODEV, errno.ENOENT, errno.ENXIO)
    assert e.kernel_text == text, str(e)
    assert str(e).startswith(f"load table for '{name}' failed: {text} (")
    assert name not in names(ctl)
    assert not os.path.lexists(f"/dev/mapper/{name}")


def test_message_to_a_target_without_messages(ctl: DMControl, dmname: Callable[..., str]) -> None:
    name = dmname()
    dm.create_device(name, [Target(0, 8, "zero", "")], ctl=ctl)
    with pytest.raises(DMError) as err:
        ctl.message(name, 0, "hello")
    assert err.value.errno == errno.EINVAL
    assert err.value.op == "message"
    assert "does not support messages" in err.value.kernel_text
    assert ctl.info(name).active_table  # the device is untouched


def test_message_reply_comes_back(ctl: DMControl, dmname: Callable[..., str]) -> None:
    """dm core answers '@stats_*' messages itself, through the data area (DM_DATA_OUT_FLAG)."""
    name = dmname()
    dm.create_device(name, [Target(0, 1024, "zero", "")], ctl=ctl)
    region = ctl.message(name, 0, "@stats_create - /1").strip()
    assert region.isdigit()
    assert ctl.message(name, 0, "@stats_list").startswith(f"{region}: 0+1024 1024")
    assert ctl.message(name, 0, f"@stats_delete {region}") == ""


def test_remove_nonexistent_device_is_enxio(ctl: DMControl) -> None:
    with pytest.raises(DMError) as err:
        ctl.remove("repctl-dmt-does-not-exist")
    assert err.value.errno == errno.ENXIO
    assert str(err.value) == ("remove for 'repctl-dmt-does-not-exist' failed: "
                              "No such device or address (ENXIO)")


def test_create_existing_name_is_ebusy(ctl: DMControl, dmname: Callable[..., str]) -> None:
    name = dmname()
    dm.create_device(name, [Target(0, 8, "zero", "")], ctl=ctl)
    with pytest.raises(DMError) as err:
        dm.create_device(name, [Target(0, 8, "zero", "")], ctl=ctl)
    assert err.value.errno == errno.EBUSY and err.value.op == "create"
    assert ctl.info(name).active_table  # the failed create removed nothing of the first


# --- Events -------------------------------------------------------------------------------------


class Waiter(threading.Thread):
    """wait_event() in a thread: the ioctl blocks with the GIL released."""

    def __init__(self, ctl: DMControl, name: str, event_nr: int) -> None:
        super().__init__(daemon=True)
        self.args_ = (ctl, name, event_nr)
        self.result: dm.DeviceInfo | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        ctl, name, event_nr = self.args_
        try:
            self.result = ctl.wait_event(name, event_nr)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e


def test_wait_event_returns_at_once_for_a_stale_number(ctl: DMControl,
                                                       dmname: Callable[..., str]) -> None:
    name = dmname()
    info = dm.create_device(name, [Target(0, 8, "zero", "")], ctl=ctl)
    w = Waiter(ctl, name, info.event_nr + 1)
    w.start()
    w.join(10)
    assert not w.is_alive() and w.error is None
    assert w.result is not None and w.result.event_nr == info.event_nr


def test_wait_event_wakes_on_a_table_event(ctl: DMControl, dmname: Callable[..., str]) -> None:
    """striped raises dm_table_event() when I/O to a stripe fails: stripe over an error device."""
    bad, top = dmname(), dmname()
    bad_info = dm.create_device(bad, [Target(0, 2048, "error", "")], ctl=ctl)
    top_info = dm.create_device(
        top, [Target(0, 2048, "striped", f"1 8 {bad_info.major}:{bad_info.minor} 0")], ctl=ctl)

    w = Waiter(ctl, top, top_info.event_nr)
    w.start()
    time.sleep(0.5)
    assert w.is_alive(), f"wait_event returned without an event: {w.result} {w.error}"
    assert read_direct(top_info.path, 0) == errno.EIO
    w.join(10)
    assert not w.is_alive(), "wait_event did not wake on the table event"
    assert w.error is None
    assert w.result is not None and w.result.event_nr > top_info.event_nr
    assert ctl.info(top).event_nr == w.result.event_nr


def test_wait_event_wakes_when_the_device_is_removed(ctl: DMControl,
                                                     dmname: Callable[..., str]) -> None:
    name = dmname()
    info = dm.create_device(name, [Target(0, 8, "zero", "")], ctl=ctl)
    w = Waiter(ctl, name, info.event_nr)
    w.start()
    time.sleep(0.3)
    assert w.is_alive()
    dm.remove_device(name, ctl=ctl)
    w.join(10)
    assert not w.is_alive(), "removing the device did not wake its waiter"


def test_resume_with_a_new_table(ctl: DMControl, dmname: Callable[..., str]) -> None:
    """Load + resume swaps the table. It raises no event: the number stays (a waiter sleeps on).
    """
    name = dmname()
    before = dm.create_device(name, [Target(0, 8, "zero", "")], ctl=ctl).event_nr
    ctl.load_table(name, [Target(0, 16, "error", "")])
    assert ctl.info(name).inactive_table
    assert ctl.table(name) == [Target(0, 8, "zero", "")]  # still the live one
    event_nr = ctl.resume(name)
    assert event_nr == ctl.info(name).event_nr == before
    assert ctl.table(name) == [Target(0, 16, "error", "")]


# --- A real filesystem --------------------------------------------------------------------------


def test_ext4_on_a_linear_device(ctl: DMControl, loopdev: Callable[[int], str],
                                 dmname: Callable[..., str], cleanup: Any,
                                 run: Callable[..., subprocess.CompletedProcess[str]],
                                 tmp_path: Path) -> None:
    loop = loopdev(64)
    name = dmname()
    info = dm.create_device(name, [Target(0, sectors(loop), "linear", f"{loop} 0")], ctl=ctl)
    run(["mkfs.ext4", "-q", "-F", info.path])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    payload = os.urandom(1 << 20)

    run(["mount", "-t", "ext4", info.path, str(mnt)])
    cleanup.add(f"mount {mnt}", lambda: run(["umount", str(mnt)], check=False))
    with open(mnt / "data", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert ctl.info(name).open_count >= 1
    with pytest.raises(DMError) as err:  # a mounted device is busy
        dm.remove_device(name, retries=1, delay=0.05, ctl=ctl)
    assert err.value.errno == errno.EBUSY
    run(["umount", str(mnt)])

    run(["mount", "-t", "ext4", "-o", "ro", info.path, str(mnt)])
    assert (mnt / "data").read_bytes() == payload
    run(["umount", str(mnt)])
    assert ctl.info(name).open_count == 0
    dm.remove_device(name, ctl=ctl)
