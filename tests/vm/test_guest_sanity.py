# SPDX-License-Identifier: GPL-2.0-only
"""The VM tier's own checks: the guest has device-mapper, dm-repl.ko and loop devices."""

from __future__ import annotations

import mmap
import os
from pathlib import Path


def test_device_mapper_control_exists() -> None:
    assert Path("/dev/mapper/control").exists()


def test_dm_repl_module_is_loaded() -> None:
    # guest-run.sh insmods kmod/dm-repl.ko before pytest starts.
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    assert "dm_repl" in loaded


def test_repl_target_is_registered(run) -> None:
    targets = {line.split()[0] for line in run("dmsetup targets").stdout.splitlines()}
    assert "repl" in targets


def test_loop_device_can_be_written_and_read_back(loopdev) -> None:
    dev = loopdev(16)
    pattern = os.urandom(1024 * 1024)
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    # Read back through a fresh open, bypassing the page cache.
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(pattern))  # page-aligned, as O_DIRECT needs
        os.preadv(fd, [buf], 4096)
        assert bytes(buf) == pattern
    finally:
        os.close(fd)
