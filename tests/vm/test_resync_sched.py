"""The daemon's resync scheduler on the real module: two resources of one primary resync to one
target daemon with `global.resync.concurrency: 1` while fio writes to both; one waits while
the other runs, and both end byte for byte identical to their source (sha256).

Both daemons run in this process on loopback addresses (as tests/vm/test_daemon_inproc.py),
each resource on its own loop devices.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

from cluster import ROOT, wait_for, write_secret
from repctl import metadata
from repctl.config import parse_config
from repctl.daemon import Daemon
from replfix import sha256_of

SIZE_MB = 8
RESOURCES = ("r0", "r1")


def _config(node: str, devices: dict[str, dict[str, str]]) -> str:
    secret = write_secret(ROOT / "secret")
    lines = ["global:",
             f"  control_socket: {ROOT / node / 'repctl.sock'}",
             f"  state_dir: {ROOT / node / 'state'}",
             f"  secret_file: {secret}",
             "  resync: {concurrency: 1}",
             "resources:"]
    for i, res in enumerate(RESOURCES):
        d = devices[res]
        lines += [f"  {res}:", f"    port: {7789 + i}", "    chunk_size: 4KiB",
                  "    ring_size: 16MiB", "    source: alpha", "    nodes:",
                  f"      alpha: {{address: 127.0.0.1, device: {d['alpha']}, "
                  f"metadata: {d['meta']}}}",
                  f"      beta: {{address: 127.0.0.2, device: {d['beta']}}}",
                  "    targets:",
                  # paced, so that the first resync lasts long enough to see the second wait
                  "      beta: {mode: async, resync: {min_rate: 4MiB, max_rate: 8MiB}}"]
    return "\n".join(lines) + "\n"


def _fio(dev: str, seed: int) -> None:
    subprocess.run(["fio", "--name=w", "--ioengine=psync", "--direct=1", f"--filename={dev}",
                    "--rw=randwrite", "--bs=4k", f"--size={SIZE_MB}M", "--number_ios=400",
                    f"--randseed={seed}", "--output-format=terse"],
                   check=True, capture_output=True, timeout=120)


def test_two_resyncs_one_slot_while_fio_writes(cleanup, loopdev):
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    devices: dict[str, dict[str, str]] = {}
    for res in RESOURCES:
        data = loopdev(SIZE_MB)
        meta = loopdev(2)
        metadata.format_metadata(meta, metadata.device_bytes(data) // 512, 8, force=True)
        # data before replication, different per resource: the full sync has to move it
        subprocess.run(["dd", "if=/dev/urandom", f"of={data}", "bs=1M", f"count={SIZE_MB}",
                        "oflag=direct", "status=none"], check=True)
        devices[res] = {"alpha": data, "meta": meta, "beta": loopdev(SIZE_MB)}
    os.system(f"rm -rf {ROOT / 'alpha'} {ROOT / 'beta'}")
    configs = {n: parse_config(_config(n, devices), f"<{n}>") for n in ("alpha", "beta")}
    daemons: dict[str, Daemon] = {}

    def stop() -> None:
        for n in ("alpha", "beta"):
            d = daemons.pop(n, None)
            if d is not None:
                for res in d.resources.values():
                    res.stop(remove=(n == "alpha"))
                d.resources.clear()
    cleanup.add("the daemons", stop)

    beta = daemons["beta"] = Daemon(configs["beta"], "beta")
    beta.start()
    alpha = daemons["alpha"] = Daemon(configs["alpha"], "alpha")
    alpha.start()
    assert not alpha.failed and not beta.failed, (alpha.failed, beta.failed)
    marks["daemons up"] = time.monotonic() - t0

    # watch the status while the resyncs run: the limit, and who waited
    seen: dict = {"max_running": 0, "queued": set()}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for r in alpha.status()["resources"]:
                if r["targets"][0]["resync_queued"]:
                    seen["queued"].add(r["name"])
            seen["max_running"] = max(seen["max_running"], len(alpha.scheduler.running()))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    writers = [threading.Thread(target=_fio, args=(f"/dev/mapper/{res}", i + 1))
               for i, res in enumerate(RESOURCES)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)

    def converged() -> bool:
        for r in alpha.status()["resources"]:
            k, t = r["kernel"], r["targets"][0]
            if not (k and k["acked"] >= k["published"] and t["state"] == "streaming"
                    and t["lag_records"] == 0 and t["out_of_sync_bytes"] == 0):
                return False
        return True
    marks["fio done"] = time.monotonic() - t0
    wait_for(converged, 90, "both targets streaming and caught up", interval=0.2)
    marks["converged"] = time.monotonic() - t0
    done.set()
    watcher.join(5)

    assert seen["max_running"] == 1, seen
    assert len(seen["queued"]) >= 1, f"status never showed a resync waiting: {seen}"
    size = SIZE_MB << 20
    for res in RESOURCES:
        src = sha256_of(f"/dev/mapper/{res}", size)
        assert sha256_of(devices[res]["beta"], size) == src, res
    marks["compared"] = time.monotonic() - t0
    print(f"two resyncs, one slot: queued {sorted(seen['queued'])}; at "
          + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()))
