# SPDX-License-Identifier: GPL-2.0-only
"""Crash test, second boot: after an abrupt reset, the bitmap covers every difference.

Runs INSIDE the test VM only, in the boot that follows crash_workload.py's reset, on the
same three disks (guest-run.sh crash-check RESULTS runs `pytest tests/vm/crash_check.py`;
the file is not named test_*.py so that the ordinary VM run does not collect it). It reads
RESULTS/../boot1/setup.json for the table of the first boot.

The property (the issue's wording): on the next boot the bitmap covers every chunk where
the data device differs from the replayed copy. Also checked: the superblock says the
device was not shut down cleanly and the target reports `unclean`; the kernel loads exactly
the on-disk bitmap; the consumer had cleared bits before the crash (otherwise an all-dirty
bitmap would pass trivially); resyncing the marked chunks makes the copies byte-identical,
and removing the device leaves a clean superblock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from repctl import dm, metadata
from repctl.ring import Consumer, iter_bits

from crash_workload import find_disks
from replfix import ReplDev, copy_chunks, repl_table, sha256_of

RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp/repctl-vm-results"))
BOOT1 = RESULTS.parent / "boot1"


def read_all(path: str, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        data = f.read(size)
    assert len(data) == size, f"{path}: short read"
    return data


def compare(data: bytes, replica: bytes, chunk_bytes: int) -> tuple[set[int], set[int]]:
    """(chunks where data and replica differ, chunks of data that are not all zeros)."""
    zero = bytes(chunk_bytes)
    differ, written = set(), set()
    for i, off in enumerate(range(0, len(data), chunk_bytes)):
        chunk = data[off:off + chunk_bytes]
        if chunk != replica[off:off + chunk_bytes]:
            differ.add(i)
        if chunk != zero:
            written.add(i)
    return differ, written


def _remove_if_present(name: str) -> None:
    with dm.DMControl() as ctl:
        if any(d.name == name for d in ctl.list_devices()):
            dm.remove_device(name, ctl=ctl)


def test_bitmap_after_crash_covers_every_difference(cleanup) -> None:
    setup = json.loads((BOOT1 / "setup.json").read_text())
    before = json.loads((BOOT1 / "crash.json").read_text())
    disks = find_disks(RESULTS)  # by serial: their /dev names may differ from boot 1's
    data, meta, replica = disks["data"], disks["meta"], disks["replica"]
    sectors, chunk_sectors = setup["sectors"], setup["chunk_sectors"]
    size, chunk_bytes = sectors * 512, chunk_sectors * 512

    # What is on the disks, before the kernel touches them.
    sb, bm = metadata.read_bitmap(meta)
    assert not sb.clean, "the superblock says clean after an abrupt reset"
    on_disk = set(iter_bits(bm))
    # both disks started as zeros: a chunk of data that is not is one the workload wrote
    diff, written = compare(read_all(data, size), read_all(replica, size), chunk_bytes)

    summary = {
        "chunks_total": sb.nr_chunks, "chunks_differing": len(diff), "chunks_dirty": len(on_disk),
        "chunks_written": len(written), "chunks_written_clean": len(written - on_disk),
        "missed": sorted(diff - on_disk)[:100], "missed_count": len(diff - on_disk),
        "cleared_before_crash": before["cleared"], "cleans_before_crash": before["cleans"],
        "records_applied_before_crash": before["applied"],
        "workload_seconds": before["workload_seconds"], "seed": setup["seed"],
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"crash: chunks differing {len(diff)}, dirty {len(on_disk)}, total {sb.nr_chunks}; "
          f"written {len(written)}, of which clean {len(written - on_disk)}")

    # The property. A chunk that differs and is not marked would never be resynchronised.
    assert diff <= on_disk, (
        f"{len(diff - on_disk)} chunk(s) differ between data and replica but are not marked "
        f"dirty after the crash: {sorted(diff - on_disk)[:40]} (seed {setup['seed']}; "
        f"the disk images are kept on the host)")
    # Meaningful: the reset came mid-workload, and the consumer had cleared bits.
    assert diff, "no chunk differs: the reset did not happen mid-workload"
    assert before["cleared"] > 0
    assert written - on_disk, ("every written chunk is dirty: the consumer's cleans left no "
                               "trace on disk, so the check above proved nothing")

    # The kernel loads that bitmap at resume and says the last shutdown was not clean.
    target = repl_table(data, meta, sectors, chunk_sectors)
    assert target.params.split()[2:] == setup["table"].split()[2:], "not boot 1's table"
    info = dm.create_device(setup["name"], [target])
    cleanup.add(f"dm device {setup['name']}", lambda: _remove_if_present(setup["name"]))
    dev = ReplDev(setup["name"], info.path, data, meta, sectors, chunk_sectors)
    st = dev.status_fields()
    assert st["start"] == "unclean", dev.status()
    assert st["dirty"] == f"{len(on_disk)}/{sb.nr_chunks}", dev.status()

    # Resynchronise the marked chunks the way a daemon does, then clean them.
    with Consumer(dev.path) as c:
        assert set(c.dirty_chunks()) == on_disk
        mark = c.mark()
        copy_chunks(dev.path, replica, on_disk, chunk_bytes)
        assert c.clean(mark) == len(on_disk)
        assert c.state().dirty_chunks == 0
    assert sha256_of(dev.path, size) == sha256_of(replica, size)

    dm.remove_device(setup["name"])
    sb = metadata.read_superblock(meta)
    assert sb is not None and sb.clean, "removing the device did not leave a clean superblock"
    _, bm = metadata.read_bitmap(meta)
    assert not any(bm)
