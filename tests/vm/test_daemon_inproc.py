"""The daemon's engine and links, all nodes in one process on loopback."""

from __future__ import annotations

import subprocess

from cluster import InProcessCluster, wait_for
from replfix import sha256_of


def _fio(dev: str, *args: str) -> None:
    subprocess.run(["fio", "--name=w", "--ioengine=psync", "--direct=1", f"--filename={dev}",
                    "--output-format=terse", *args], check=True, capture_output=True, timeout=300)


def test_initial_sync_then_streaming(cleanup, loopdev):
    c = InProcessCluster(cleanup, loopdev, size_mb=32)
    _fio(c.devices["alpha"], "--size=8M", "--rw=write", "--bs=1m")  # data before replication
    for n in ("beta", "gamma"):
        c.start(n)
    c.start("alpha")
    wait_for(lambda: set(c.target_states().values()) == {"streaming"}, 120,
             "both targets streaming")
    dev = c.source_status()["device"]
    _fio(dev, "--size=16M", "--rw=randwrite", "--bs=4k", "--fsync=16", "--number_ios=2000")

    def converged():
        st = c.source_status()
        k = st["kernel"]
        return k["acked"] >= k["published"] and all(t["lag_records"] == 0 for t in st["targets"])
    wait_for(converged, 60, "targets caught up")
    size = 32 << 20
    src = sha256_of(dev, size)
    for n in ("beta", "gamma"):
        assert sha256_of(c.devices[n], size) == src, n
    v = c.daemons["alpha"].verify("r0", "beta")
    assert v["differing"] == []
