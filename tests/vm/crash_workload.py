# SPDX-License-Identifier: GPL-2.0-only
"""Crash test, first boot: replicate a random-write workload, then reset the guest abruptly.

Runs INSIDE the test VM only (guest-run.sh crash-write RESULTS), on three disks that
tests/vmrun.py created on the host and attached by serial number (described in
RESULTS/../plan.json):

    data     the repl target's data device
    meta     its metadata device (dirty bitmap)
    replica  the copy a consumer keeps by replaying the ring

It formats the metadata, creates the repl device, starts a consumer that applies every
ring record to the replica and, every CLEAN_INTERVAL seconds, does mark -> (applies
everything before the mark) -> fdatasync the replica -> clean(mark), so that bits really
get cleared. Then it runs fio (direct I/O, mixed sizes, fsyncs) and, after a random 2-5 s,
crashes, as plan.json says:

    sysrq  reset the guest with sysrq `b`: no sync, no unmount, no device-mapper suspend;
           QEMU runs with -no-reboot (virtme-ng) and exits;
    kill   print plan.json's kill_marker on the console, on which the host SIGKILLs QEMU
           (a power cut) while the workload goes on.

The disk images stay on the host for the second boot (crash_check.py).

Written to RESULTS: setup.json (everything the second boot needs to re-create the device)
before the workload starts, crash.json (counters at the moment of the crash) just before
the reset. Exit status: it does not return when it works; 1 when something failed first.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from repctl import dm, metadata
from repctl.ring import Consumer
from repctl.store import open_store
from replfix import SECTOR, ReplDev, find_disk, repl_table

DEV_NAME = "crash0"
CHUNK_SECTORS = 8            # 4 KiB chunks, the default
CLEAN_INTERVAL = 0.5         # seconds between mark/clean rounds of the consumer
CRASH_AFTER = (2.0, 5.0)     # seconds of workload before the reset (uniform)
MIN_CLEANED = 1              # chunks the consumer must have cleared before the reset
FIO_RUNTIME = 60             # seconds; far longer than the crash delay: the reset is mid-workload


def say(msg: str) -> None:
    print(f"== crash-write: {msg}", flush=True)


def read_plan(results: Path) -> dict:
    """What the host wrote for this crash test (tests/vmrun.py make_crash_disks)."""
    return json.loads((results.parent / "plan.json").read_text())


def find_disks(results: Path) -> dict[str, str]:
    """{"data": "/dev/vdX", "meta": ..., "replica": ...} from plan.json, checked by size."""
    found = {}
    for role, d in read_plan(results)["disks"].items():
        path = find_disk(d["serial"])
        size = metadata.device_bytes(path)
        if size != d["bytes"]:
            raise RuntimeError(f"{role} disk {path} (serial {d['serial']}) holds {size} bytes, "
                               f"expected {d['bytes']}")
        found[role] = path
    return found


def write_json(path: Path, obj: object) -> None:
    """Write and fsync: the file must be on the host before the reset."""
    with path.open("w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class CleaningReplayer(threading.Thread):
    """Applies every ring record to the replica, in order, and clears bits it may clear.

    A clean with mark m is only issued once every record before m is applied and the replica
    is fdatasync'ed: what the bitmap stops covering is then durably identical on both sides.
    Records are applied with buffered writes, so whatever was applied since the last sync is
    in the guest's page cache only and is lost at the reset: the bitmap must cover it.
    """

    def __init__(self, dev: ReplDev, replica: str):
        super().__init__(daemon=True)
        self.consumer = Consumer(dev.path)
        self.store = open_store(replica)
        self.applied = 0
        self.cleans = 0
        self.cleared = 0
        self.fell_behind: str | None = None
        self.error: BaseException | None = None
        self.stop_evt = threading.Event()
        self.start_mark = self.consumer.start_stream()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the main thread
            self.error = e

    def _run(self) -> None:
        c = self.consumer
        last = self.start_mark - 1
        pending: int | None = None
        next_round = time.monotonic() + CLEAN_INTERVAL
        while not self.stop_evt.is_set():
            st = c.state()
            if not st.streaming:
                # Records after this point are not in the ring: the replica cannot catch
                # up from it, so no more cleans (a real daemon would resync).
                self.fell_behind = f"{st.mode}/{st.reason}"
                return
            seqs = st.readable()
            for seq in seqs:
                r = c.record(seq)
                self.store.apply(r.op, r.sector, r.length, r.data, r.fua)
                self.applied += 1
                last = seq
            if len(seqs):
                c.ack(last)
            now = time.monotonic()
            if pending is None and now >= next_round:
                pending = c.mark()  # every write before it is on the data device
            if pending is not None and last >= pending - 1:
                self.store.flush()  # fdatasync: the replica has everything before the mark
                self.cleared += c.clean(pending)
                self.cleans += 1
                pending = None
                next_round = time.monotonic() + CLEAN_INTERVAL
            if not len(seqs):
                c.wait(last, 100)


def fio_command(dev: str, seed: int) -> list[str]:
    common = ["--ioengine=psync", "--direct=1", "--time_based", f"--runtime={FIO_RUNTIME}",
              f"--randseed={seed}", f"--filename={dev}"]
    return [
        "fio", "--output-format=terse", "--group_reporting",
        # mixed sizes, with an fsync every 8 writes
        "--name=mixed", *common, "--rw=randwrite",
        "--bssplit=4k/50:16k/20:64k/20:256k/5:1m/5", "--fsync=8",
        # many small writes in flight at once
        "--name=small", "--ioengine=libaio", "--direct=1", "--time_based",
        f"--runtime={FIO_RUNTIME}", f"--randseed={seed + 1}", f"--filename={dev}",
        "--rw=randwrite", "--bs=4k", "--iodepth=8",
    ]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: crash_workload.py RESULTS", file=sys.stderr)
        return 2
    if os.environ.get("REPCTL_IN_VM") != "1":
        print("crash_workload.py: runs only inside the test VM (guest-run.sh crash-write)",
              file=sys.stderr)
        return 2
    results = Path(sys.argv[1])
    plan = read_plan(results)
    method = plan.get("method", "sysrq")
    if method not in ("sysrq", "kill"):
        print(f"crash_workload.py: unknown crash method {method!r}", file=sys.stderr)
        return 2
    seed = int(plan.get("seed") or 0) or random.SystemRandom().randrange(1, 2**31)
    rng = random.Random(seed)
    crash_after = rng.uniform(*CRASH_AFTER)

    disks = find_disks(results)
    sectors = metadata.device_bytes(disks["data"]) // SECTOR
    say(f"disks {disks}; seed {seed}; crash ({method}) after {crash_after:.2f} s of workload")
    metadata.format_metadata(disks["meta"], sectors, CHUNK_SECTORS)
    target = repl_table(disks["data"], disks["meta"], sectors, CHUNK_SECTORS)
    info = dm.create_device(DEV_NAME, [target])
    dev = ReplDev(DEV_NAME, info.path, disks["data"], disks["meta"], sectors, CHUNK_SECTORS)
    write_json(results / "setup.json", {
        "disks": disks, "sectors": sectors, "chunk_sectors": CHUNK_SECTORS,
        "table": target.params, "name": DEV_NAME, "seed": seed,
        "crash_after": round(crash_after, 3), "clean_interval": CLEAN_INTERVAL, "method": method,
        "fio": fio_command(dev.path, seed),
    })

    rep = CleaningReplayer(dev, disks["replica"])
    rep.start()
    fio = subprocess.Popen(fio_command(dev.path, seed), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    # Count the workload from its first write (fio takes a while to start under emulation).
    deadline = time.monotonic() + 60
    while (rep.applied == 0 and fio.poll() is None and rep.is_alive()
           and time.monotonic() < deadline):
        time.sleep(0.05)
    t0 = time.monotonic()
    time.sleep(crash_after)
    # The test means nothing unless the consumer got to clear bits: wait a little longer
    # for that on a very slow machine (the workload keeps running).
    deadline = t0 + 30
    while rep.cleared < MIN_CLEANED and rep.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)

    problems = []
    if fio.poll() is not None:
        problems.append(f"fio ended before the reset (exit {fio.returncode}): "
                        f"{(fio.stderr.read() if fio.stderr else '').strip()[-2000:]}")
    if rep.error is not None:
        problems.append(f"the consumer failed: {rep.error!r}")
    if rep.cleared < MIN_CLEANED:
        problems.append(f"the consumer cleared {rep.cleared} chunks in {rep.cleans} cleans "
                        f"(fell behind: {rep.fell_behind}): the test would mean nothing")
    if problems:
        for p in problems:
            say(f"FAILED: {p}")
        fio.kill()
        fio.wait()
        rep.stop_evt.set()
        rep.join(10)
        rep.consumer.close()
        rep.store.close()
        dm.remove_device(DEV_NAME)  # so that rmmod still tells whether anything leaked
        return 1

    st = dev.status_fields()
    write_json(results / "crash.json", {
        "workload_seconds": round(time.monotonic() - t0, 3), "applied": rep.applied,
        "cleans": rep.cleans, "cleared": rep.cleared, "fell_behind": rep.fell_behind,
        "status": st,
    })
    say(f"{rep.applied} records applied, {rep.cleans} cleans cleared {rep.cleared} chunks, "
        f"dirty {st['dirty']}, writes {st['writes']}, consumer fell behind: {rep.fell_behind}")
    if method == "kill":
        say("asking the host to kill QEMU now; the workload goes on")
        print(plan["kill_marker"], flush=True)
        time.sleep(30)
        say("FAILED: still running 30 s after asking the host to kill QEMU")
    else:
        say("resetting the guest now (sysrq b)")
        Path("/proc/sys/kernel/sysrq").write_text("1\n")
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("b")
        time.sleep(10)
        say("FAILED: still running 10 s after sysrq b")
    return 1


if __name__ == "__main__":
    sys.exit(main())
