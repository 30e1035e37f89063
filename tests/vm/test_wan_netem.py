"""A WAN that delays, loses and throttles, then a partition of the DR site, on the real module.

alpha (the primary) replicates to beta (sync) and gamma (async, an image file: the DR copy).
Each node is a network namespace with its own daemon process; alpha reaches each target over a
veth pair of its own. netem (`sch_netem`) impairs both links in the direction of the data:
delay, loss and a rate limit; then gamma's link drops every packet (a partition) for
PARTITION_S seconds while beta's stays impaired. Meanwhile an ext4 on /dev/mapper/r0 takes fio
jobs that verify what they wrote, and a prober writes with O_DIRECT | O_SYNC past the end of
the file system and reads each write back from beta's device as soon as it completed.

What must hold (docs/wan.md, "What happens on a partition"):

- every sync write is on beta when it completes, impaired or not (P4): sync_timeout is 30 s
  here, far beyond what the impairment costs, so beta never falls out of the session;
- the primary does not wait for gamma: fio jobs and probes complete during the partition;
- gamma's copy, frozen mid-partition (its daemon stopped with SIGSTOP while the image is
  copied), is a consistent file system (P1): after its journal's replay, `e2fsck -fn` is clean;
- once the network heals, both copies converge by themselves and equal the primary's device.

Nothing here times the replication: the phases have fixed lengths and every wait has a
generous deadline, so a slow emulated machine passes too. Traffic only inside the namespaces.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster import ROOT, config_text, wait_for, write_secret
from conftest import run
from replfix import direct_read, direct_write, sha256_of

REPO = Path(__file__).resolve().parents[2]
REPCTL = [str(REPO / ".venv" / "bin" / "repctl")]
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
WROOT = ROOT / "wan"
SIZE_MB = 64
FS_MB = 48            # ext4 on the first 48 MiB; the prober writes in the 16 MiB after it
CHUNK = 4096
IMPAIR_S = 20         # delay, loss and rate on both links
PARTITION_S = 60      # then gamma's link drops everything (beta's stays impaired)
SNAPSHOT_AT_S = 30    # into the partition: gamma's copy is taken

NS = {"alpha": "wn-alpha", "beta": "wn-beta", "gamma": "wn-gamma"}
# target -> (alpha's device, the target's device, alpha's address, the target's address)
LINKS = {"beta": ("wb0", "wb1", "10.78.1.1", "10.78.1.2"),
         "gamma": ("wg0", "wg1", "10.78.2.1", "10.78.2.2")}
# netem on each link, data direction (alpha's side) and acks (the target's side): a LAN-ish
# metro link to the standby, a longer one to the DR site; 1 % loss both ways of the data
NETEM = {"beta": (["delay", "50ms", "loss", "1%", "rate", "20mbit"], ["delay", "5ms"]),
         "gamma": (["delay", "100ms", "loss", "1%", "rate", "20mbit"], ["delay", "5ms"])}
CUT = ["loss", "100%"]


def ip(*args: str) -> None:
    run(["ip", *args])


def tc(node: str, verb: str, dev: str, params: list[str]) -> None:
    # a large limit: at 20 Mbit/s and 100 ms the queue holds more than netem's default 1000
    run(["tc", "-n", NS[node], "qdisc", verb, "dev", dev, "root", "netem", "limit", "100000",
         *params])


def impair(verb: str, *, cut_gamma: bool = False) -> None:
    for t, (dev_a, dev_t, _, _) in LINKS.items():
        data, acks = NETEM[t]
        cut = cut_gamma and t == "gamma"
        tc("alpha", verb, dev_a, CUT if cut else data)
        tc(t, verb, dev_t, CUT if cut else acks)


def heal() -> None:
    for t, (dev_a, dev_t, _, _) in LINKS.items():
        run(["tc", "-n", NS["alpha"], "qdisc", "del", "dev", dev_a, "root"])
        run(["tc", "-n", NS[t], "qdisc", "del", "dev", dev_t, "root"])


class Wan:
    """The three nodes: namespaces, devices, configuration files, daemon processes."""

    def __init__(self, cleanup, loopdev) -> None:
        from repctl import metadata

        self.cleanup = cleanup
        shutil.rmtree(WROOT, ignore_errors=True)
        WROOT.mkdir(parents=True)
        cleanup.add("the nodes' folders", lambda: shutil.rmtree(WROOT, ignore_errors=True))
        for ns in NS.values():
            ip("netns", "add", ns)
            cleanup.netns(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for t, (dev_a, dev_t, addr_a, addr_t) in LINKS.items():
            ip("link", "add", dev_a, "netns", NS["alpha"], "type", "veth", "peer", "name", dev_t,
               "netns", NS[t])
            ip("-n", NS["alpha"], "addr", "add", f"{addr_a}/24", "dev", dev_a)
            ip("-n", NS[t], "addr", "add", f"{addr_t}/24", "dev", dev_t)
            ip("-n", NS["alpha"], "link", "set", dev_a, "up")
            ip("-n", NS[t], "link", "set", dev_t, "up")
        self.data = loopdev(SIZE_MB)
        meta = loopdev(2)
        metadata.format_metadata(meta, (SIZE_MB << 20) // 512, CHUNK // 512, force=True)
        self.beta_dev = loopdev(SIZE_MB)
        self.gamma_img = WROOT / "gamma" / "r0.img"
        self.gamma_img.parent.mkdir(parents=True)
        with open(self.gamma_img, "wb") as f:
            f.truncate(SIZE_MB << 20)
        nodes = {"alpha": {"address": LINKS["beta"][2], "device": self.data, "metadata": meta},
                 "beta": {"address": LINKS["beta"][3], "device": self.beta_dev},
                 "gamma": {"address": LINKS["gamma"][3], "device": str(self.gamma_img)}}
        secret = write_secret(WROOT / "secret")
        self.cfg = {}
        for node in NS:
            (WROOT / node).mkdir(parents=True, exist_ok=True)
            text = config_text(node, nodes, {"beta": "sync", "gamma": "async"}, root=WROOT,
                               secret=secret, sync_timeout="30s")
            # a ring that holds gamma's backlog of the impaired phase with room to spare: it
            # falls behind (max_lag, 3/4 of the ring) only once the partition cuts it off
            text = text.replace("ring_size: 16MiB", "ring_size: 64MiB")
            path = WROOT / node / "repctl.yaml"
            path.write_text(text)
            self.cfg[node] = path
        self.dev = "/dev/mapper/r0"
        # after the daemons (cleanups run last-registered first): the primary's device
        cleanup.add("dm device r0", lambda: Path(self.dev).exists()
                    and run(["dmsetup", "remove", "--retry", "r0"]))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for node in ("beta", "gamma", "alpha"):
            log = open(RESULTS / f"wan-daemon-{node}.log", "a")
            self.procs[node] = self.cleanup.process(subprocess.Popen(
                ["ip", "netns", "exec", NS[node], *REPCTL, "-c", str(self.cfg[node]), "daemon",
                 "--node", node], stdout=log, stderr=subprocess.STDOUT))
            log.close()
        for node in NS:
            sock = WROOT / node / "repctl.sock"
            wait_for(sock.exists, 120, f"{node}'s control socket")
        wait_for(lambda: Path(self.dev).exists(), 60, "the replicated device")

    def status(self, node: str = "alpha") -> dict:
        from repctl.control import ControlClient

        return ControlClient(WROOT / node / "repctl.sock", 60).call("status")["resources"][0]

    def targets(self) -> dict[str, dict]:
        return {t["name"]: t for t in self.status()["targets"]}

    def converged(self) -> bool:
        st = self.status()
        k = st["kernel"] or {}
        return (k.get("mode") == "streaming" and k.get("acked", -1) >= k.get("published", 0)
                and all(t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                        and t["lag_records"] == 0 for t in st["targets"]))

    def wait_converged(self, timeout: float = 300) -> None:
        wait_for(self.converged, timeout, "every target caught up", interval=0.5)

    def gamma_consistent(self) -> bool:
        """gamma's own word on its copy (its state file: whole, not mid-resync)."""
        saved = json.loads((WROOT / "gamma" / "state" / "r0" / "target.json").read_text())
        return bool(saved["consistent"])


class Workload:
    """fio jobs on the file system, one after the other, and the sync prober, in threads,
    until `stop`; each counts what it completed per phase and keeps every failure."""

    def __init__(self, wan: Wan, mnt: Path) -> None:
        self.wan, self.mnt = wan, mnt
        self.phase = "impaired"
        self.done: dict[str, dict[str, int]] = {"fio": {}, "probe": {}}
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                        for f in (self._fio, self._probe)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(600)
            assert not t.is_alive(), f"{t.name} did not stop"

    def _count(self, what: str) -> None:
        self.done[what][self.phase] = self.done[what].get(self.phase, 0) + 1

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.failures.append(f"{fn.__name__}: {e!r}")

    def _fio(self) -> None:
        i = 0
        while not self.stopping.is_set():
            # direct writes into preallocated extents (the journal records each conversion),
            # then every block read back and checked; a file is rewritten every third job
            p = subprocess.run(
                ["fio", f"--name=v{i % 3}", f"--filename={self.mnt / f'v{i % 3}'}", "--size=4M",
                 "--rw=randwrite", "--bssplit=4k/40:16k/30:64k/30", "--direct=1",
                 "--ioengine=libaio", "--iodepth=8", "--verify=crc32c", "--do_verify=1",
                 "--verify_fatal=1", "--output-format=terse"],
                capture_output=True, text=True, timeout=900)
            if p.returncode:
                self.failures.append(f"fio job {i} ({self.phase}) exited {p.returncode}: "
                                     f"{p.stdout[-1500:]} {p.stderr[-1500:]}")
                return
            self._count("fio")
            i += 1

    def _probe(self) -> None:
        """P4: an O_DIRECT | O_SYNC write that completed is on beta's device at that moment."""
        rng = random.Random(1313)
        area = ((SIZE_MB - FS_MB) << 20) // (16 * 1024)
        while not self.stopping.is_set():
            off = (FS_MB << 20) + rng.randrange(area) * 16 * 1024
            data = rng.randbytes(16 * 1024)
            direct_write(self.wan.dev, off, data, os.O_SYNC)
            phase = self.phase
            if direct_read(self.wan.beta_dev, off, len(data)) != data:
                self.failures.append(f"probe at {off} ({phase}): completed on the primary, "
                                     f"not on beta; beta: {self.wan.targets()['beta']}")
                return
            self._count("probe")
            self.stopping.wait(0.2)


def test_wan_impairment_then_partition_converges(cleanup, loopdev):
    if run(["modprobe", "sch_netem"], check=False).returncode:
        pytest.skip("this kernel has no sch_netem (netem): the WAN test needs it")
    t0 = time.monotonic()
    wan = Wan(cleanup, loopdev)
    wan.start()
    wan.wait_converged()  # the initial full sync, unimpaired
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
         wan.dev, str(FS_MB << 8)])
    mnt = Path("/tmp/wn-mnt")
    mnt.mkdir(exist_ok=True)
    run(["mount", wan.dev, str(mnt)])
    cleanup.add(f"umount {mnt}", lambda: run(["umount", str(mnt)], check=False))  # if still
    wan.wait_converged()
    setup_s = time.monotonic() - t0

    work = Workload(wan, mnt)
    impair("add")
    work.start()
    try:
        time.sleep(IMPAIR_S)
        work.phase = "partitioned"
        impair("change", cut_gamma=True)
        time.sleep(SNAPSHOT_AT_S)
        # gamma's copy mid-partition: its daemon stopped, the image copied, the daemon on
        snap = WROOT / "gamma-snapshot.img"
        gamma = wan.procs["gamma"]
        gamma.send_signal(signal.SIGSTOP)
        try:
            consistent = wan.gamma_consistent()
            shutil.copyfile(wan.gamma_img, snap)
        finally:
            gamma.send_signal(signal.SIGCONT)
        during = wan.targets()
        time.sleep(PARTITION_S - SNAPSHOT_AT_S)
        work.phase = "healed"
        heal()
    finally:
        work.stop()
    print(f"setup {setup_s:.0f} s; completed: {work.done}; alpha's view of gamma at the "
          f"snapshot: {during['gamma']}")
    assert not work.failures, work.failures
    # the primary went on, impaired and cut off from gamma: it never waits for an async
    # target (P4). A fio job may outlast the 20 s of the impaired phase on a slow machine
    # (a job counts in the phase it ends in); the prober's writes take a round trip each
    for what, phases in (("probe", ("impaired", "partitioned")), ("fio", ("partitioned",))):
        for phase in phases:
            assert work.done[what].get(phase, 0) >= 1, (what, phase, work.done)

    # gamma, frozen mid-partition, was streaming when it was cut off: a crash-consistent copy
    assert consistent, "gamma was mid-resync when the partition came (a slower link than planned?)"
    fsck = run(["e2fsck", "-E", "journal_only", "-y", str(snap)], check=False)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: the journal replayed
    fsck = run(["e2fsck", "-fn", str(snap)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    snap.unlink()

    # healed: both copies catch up by themselves and equal the primary
    run(["umount", str(mnt)])
    wan.wait_converged()
    for dev in (wan.dev, wan.data, wan.beta_dev):
        run(["blockdev", "--flushbufs", dev])  # no page cache older than the device
    size = SIZE_MB << 20
    digests = {"alpha": sha256_of(wan.dev, size), "beta": sha256_of(wan.beta_dev, size),
               "gamma": sha256_of(str(wan.gamma_img), size)}
    assert digests["alpha"] == digests["beta"] == digests["gamma"], digests
    run(["e2fsck", "-fn", wan.dev])
    print(f"guest time {time.monotonic() - t0:.0f} s")
