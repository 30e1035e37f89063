"""The daemon's engine and links, all nodes in one process on loopback."""

from __future__ import annotations

import subprocess

from cluster import InProcessCluster, wait_for
from repctl import metadata
from replfix import sha256_of


def _fio(dev: str, *args: str) -> None:
    subprocess.run(["fio", "--name=w", "--ioengine=psync", "--direct=1", f"--filename={dev}",
                    "--output-format=terse", *args], check=True, capture_output=True, timeout=300)


def _converged(c: InProcessCluster) -> bool:
    st = c.source_status()
    k = st.get("kernel")
    return bool(k) and k["acked"] >= k["published"] and all(
        t["state"] == "streaming" and t["lag_records"] == 0 and t["out_of_sync_bytes"] == 0
        for t in st["targets"])


def test_source_restart_and_new_metadata_keep_the_copy_identical(cleanup, loopdev):
    """Issue 10, items 1 and 9, on the real module and devices.

    A restart of the source (`down`/`up`: the kernel numbers records from 1 again) with a pause
    at once must leave the target identical. And a data device written outside dm-repl (a
    restore) whose metadata is then formatted anew must get a full sync: before, the source kept
    its generation and resynced only the (new, clean) bitmap's chunks, and the copy diverged.
    """
    c = InProcessCluster(cleanup, loopdev, size_mb=16, targets={"beta": "sync"})
    size = 16 << 20
    c.start("beta")
    c.start("alpha")
    wait_for(lambda: _converged(c), 120, "beta streaming")
    dev = c.source_status()["device"]
    _fio(dev, "--size=16M", "--rw=randwrite", "--bs=4k", "--number_ios=500", "--randseed=1")
    wait_for(lambda: _converged(c), 60, "beta caught up")

    # 1: down/up of the source, pause at once, write, resume
    c.stop("alpha")
    d = c.start("alpha")
    d.pause("r0", "beta")
    _fio(dev, "--size=16M", "--rw=randwrite", "--bs=4k", "--number_ios=500", "--randseed=2")
    d.resume("r0", "beta")
    wait_for(lambda: _converged(c), 120, "beta caught up after the restart")
    assert sha256_of(c.devices["beta"], size) == sha256_of(dev, size)

    # 9: a restore onto the data device behind dm-repl's back, then new metadata
    c.stop("alpha")
    data = c.devices["alpha"]
    _fio(data, "--size=16M", "--rw=randwrite", "--bs=64k", "--number_ios=64", "--randseed=3")
    meta = str(c.configs["alpha"].resource("r0").nodes["alpha"].metadata)
    old_uuid = metadata.read_superblock(meta).uuid
    metadata.format_metadata(meta, size // 512, 8, force=True)
    assert metadata.read_superblock(meta).uuid != old_uuid
    d = c.start("alpha")
    wait_for(lambda: _converged(c), 180, "beta resynced after the new metadata")
    assert sha256_of(c.devices["beta"], size) == sha256_of(c.source_status()["device"], size)
    assert d.verify("r0", "beta")["differing"] == []
