# SPDX-License-Identifier: GPL-2.0-only
"""The power-cut test, inside one guest of the pair (tests/powercut.py runs the host side).

    guest-run.sh node RESULTS -- python tests/vm/powercut_node.py RESULTS

Two resources replicate between the guests at once, on their own disks: r0 to a sync target
and r1 to an async target. RESULTS/plan.json (written by the host before each boot) gives
this node's name, how it starts (`primary`, `secondary`, or `rejoin` after its power was cut),
how many cuts happened before this boot and how many the test makes, the seed, and the disks
by serial: per resource data and metadata, and one ext4 disk for the daemon's state_dir (it
survives the power cut, as /var/lib/repctl would).

A node runs in a loop, and the two nodes take turns:

    primary     waits until both targets are in sync, then writes and prints, after each write
                that completed, `PC-ACK RES N` on the console. It never ends: the host cuts its
                power at a random moment.
                r0 (sync):  O_DIRECT|O_SYNC writes of unique 4 KiB blocks 0, 1, 2, ...
                r1 (async): ext4; O_DIRECT|O_SYNC appends of unique 4 KiB records to log-ROUND
                            (each a data write and a journaled size update), small files
                            created and deleted besides.
    secondary   waits until its copies are UpToDate, then until the primary is gone (TCP
                keepalives notice a dead peer), promotes both resources with `repctl promote`
                as a cluster manager would, checks r1 (the mount replays the journal,
                `e2fsck -fn` must be clean, the log must be a prefix of intact records), writes
                changes of its own to both, prints `PC-PROMOTED {json}` with its changed chunks,
                waits until the old primary is back and resynced, prints `PC-RESYNCED {json}`
                with the bytes sent, and becomes the writing primary. After the last cut it
                stops cleanly instead (`PC-FINAL`), so that the host can compare the images.
    rejoin      prints `PC-REJOIN {json}` with the chunks it changed that its peer may lack
                (read before its daemon starts), starts its daemon, which comes back as the
                new primary's secondary, and goes on as a secondary.

The host checks the acknowledged writes on the survivor's image files, the resync against
the union of both sides' changes, and at the end the images byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from repctl import metadata
from repctl.control import ControlClient
from repctl.daemon.base import local_changes
from replfix import find_disk

REPO = Path(__file__).resolve().parents[2]
REPCTL = str(REPO / ".venv" / "bin" / "repctl")
ROOT = Path("/tmp/rp")
STATE = ROOT / "state"       # the state disk's mount point: state_dir
FS = ROOT / "fs"             # r1's ext4
CFG = ROOT / "repctl.yaml"
SOCK = ROOT / "repctl.sock"
CHUNK = 4096
NODES = {"alpha": "10.79.0.1", "beta": "10.79.0.2"}
RESOURCES = {"r0": ("sync", 7789), "r1": ("async", 7790)}
WRITES = 4096                # r0: blocks [0, 4096) at most (16 MiB); r1: at most as many records
OWN_BLOCKS = range(6000, 6100)   # r0: the new primary's own writes after its promotion


def say(msg: str) -> None:
    print(f"== powercut: {msg}", flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def wait_for(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (OSError, KeyError, IndexError) as e:  # the daemon not up yet, or restarting
            last = repr(e)
        else:
            if last:
                return last
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def block(seed: int, tag: str, i: int) -> bytes:
    """The unique 4 KiB content of write i tagged `tag` (e.g. 'r0-3': r0's writes of round 3)."""
    return hashlib.sha256(f"{seed}-{tag}-{i}".encode()).digest() * (CHUNK // 32)


def emit(marker: str, obj: dict) -> None:
    print(f"{marker} {json.dumps(obj, sort_keys=True)}", flush=True)


class Node:
    def __init__(self, results: Path) -> None:
        self.results = results
        plan = json.loads((results / "plan.json").read_text())
        self.name: str = plan["name"]
        self.peer = next(n for n in NODES if n != self.name)
        self.start: str = plan["start"]
        self.cuts_before: int = plan["cuts_before"]
        self.cuts: int = plan["cuts"]
        self.seed = int(plan["seed"])
        self.disks = {key: find_disk(serial) for key, serial in plan["serials"].items()}
        self.nr = {r: metadata.device_bytes(self.disks[f"{r}-data"]) // CHUNK for r in RESOURCES}
        self.daemon: subprocess.Popen[bytes] | None = None
        self.gen_at_boot: dict[str, int] = {}
        ROOT.mkdir(parents=True, exist_ok=True)
        STATE.mkdir(exist_ok=True)
        FS.mkdir(exist_ok=True)
        sh("mount", "-o", "sync", self.disks["state"], str(STATE))
        self._write_config()

    def _write_config(self) -> None:
        secret = ROOT / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"powercut-secret-0123456789abcdef")
        os.close(fd)
        lines = ["global:", f"  control_socket: {SOCK}", f"  state_dir: {STATE}",
                 f"  secret_file: {secret}", "resources:"]
        for r, (mode, port) in RESOURCES.items():
            # the async resource's ring absorbs the file churn's bursts: an async target that
            # falls behind is resynced from the bitmap, and while it is, it is Inconsistent and
            # cannot be promoted (docs/failover.md), which this test does not model yet
            ring = "32MiB" if mode == "async" else "8MiB"
            lines += [f"  {r}:", f"    port: {port}", "    chunk_size: 4KiB",
                      f"    ring_size: {ring}", "    sync_timeout: 5s", "    source: alpha",
                      "    nodes:"]
            # Both guests have their own disks with the same serials, so the same paths.
            for n, addr in NODES.items():
                lines += [f"      {n}:", f"        address: {addr}",
                          f"        device: {self.disks[f'{r}-data']}",
                          f"        metadata: {self.disks[f'{r}-meta']}"]
            lines += ["    targets:", f"      beta: {{mode: {mode}}}"]
        CFG.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ the daemon

    def start_daemon(self) -> None:
        SOCK.unlink(missing_ok=True)
        log = open(self.results / "daemon.log", "a")
        self.daemon = subprocess.Popen([REPCTL, "-c", str(CFG), "daemon", "--node", self.name],
                                       stdout=log, stderr=subprocess.STDOUT)
        wait_for(SOCK.exists, 180, "the daemon's control socket")

    def stop_daemon(self) -> None:
        sh("umount", str(FS), check=False)
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(120)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(30)
            self.daemon = None
        for r in RESOURCES:
            if os.path.exists(f"/dev/mapper/{r}"):
                sh("dmsetup", "remove", "--retry", r, check=False)
        sh("sync")

    def status(self) -> dict[str, dict]:
        st = ControlClient(SOCK, timeout=30).call("status")["resources"]
        return {s["name"]: s for s in st}

    def all_(self, pred) -> bool:
        st = self.status()
        return all(pred(st[r]) for r in RESOURCES)

    @staticmethod
    def converged(st: dict) -> bool:
        """The primary, with its one target streaming and nothing owed."""
        k = st.get("kernel") or {}
        return st["role"] == "primary" and k.get("acked", -1) >= k.get("published", 0) and \
            bool(st["targets"]) and all(t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                                        and t["lag_records"] == 0 for t in st["targets"])

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        if self.start == "primary":
            for r in RESOURCES:
                metadata.format_metadata(self.disks[f"{r}-meta"], self.nr[r] * CHUNK // 512,
                                         CHUNK // 512, force=True)
            self.start_daemon()
            self.primary(self.cuts_before + 1, fresh=True)  # never returns
        if self.start == "rejoin":
            # the generation this node wrote as the primary: a resync replaces it
            self.gen_at_boot = {r: json.loads((STATE / r / "generation.json").read_text())
                                ["current"] for r in RESOURCES}
            emit("PC-REJOIN", {r: local_changes(STATE / r, Path(self.disks[f"{r}-meta"]),
                                                self.peer, self.nr[r]).hex()
                               for r in RESOURCES})
            self.start_daemon()
            wait_for(lambda: self.all_(lambda s: s["role"] == "secondary"), 300,
                     "back as the new primary's secondary")
        else:
            self.start_daemon()
        self.secondary()

    def secondary(self) -> None:
        cut = self.cuts_before + 1  # the cut this node will see: its peer's
        if cut > self.cuts:
            self.last_secondary()
            return
        wait_for(lambda: self.all_(lambda s: s["disk"] == "UpToDate"), 900, "in sync", 1)
        say("in sync with the primary")
        print("PC-SYNCED", flush=True)
        wait_for(lambda: self.all_(lambda s: s["disk"] != "UpToDate"), 3600, "the primary gone",
                 interval=1)
        gone = time.monotonic()
        say(f"the primary is gone (cut {cut}); promoting")
        for r in RESOURCES:
            p = sh(REPCTL, "-c", str(CFG), "promote", r, check=False)
            if p.returncode:
                why = ""
                if "Inconsistent" in p.stderr and RESOURCES[r][0] == "async":
                    why = ("; the async copy was being resynced (its target fell behind) when "
                           "the power went: refused as designed, a case this test does not "
                           "model yet")
                raise RuntimeError(f"repctl promote {r} failed ({p.returncode}): "
                                   f"{p.stderr.strip()}{why}")
        out: dict = {"promote_s": round(time.monotonic() - gone, 1)}
        out.update(self.check_fs(cut))
        self.own_writes(cut)
        out["changes"] = {r: local_changes(STATE / r, Path(self.disks[f"{r}-meta"]), self.peer,
                                           self.nr[r]).hex() for r in RESOURCES}
        sent0 = {r: s["targets"][0]["resync_bytes"] for r, s in self.status().items()}
        emit("PC-PROMOTED", out)
        wait_for(lambda: self.all_(self.converged), 900, "the old primary back and resynced", 1)
        st = self.status()
        emit("PC-RESYNCED", {r: st[r]["targets"][0]["resync_bytes"] - sent0[r] for r in RESOURCES})
        if cut == self.cuts:
            self.stop_daemon()
            print("PC-FINAL", flush=True)
            return
        self.primary(cut + 1, fresh=False)

    def last_secondary(self) -> None:
        """After the last cut: resynced by the new primary, which then stops (no more writes),
        perhaps before this node's poll saw it UpToDate. Done when every resource holds the
        primary's generation, consistent, and the primary has gone."""
        gen0 = self.gen_at_boot
        wait_for(lambda: self.all_(lambda s: int(s["generation"], 16) != gen0[s["name"]] and
                                   s["consistent"] and s["connection"] != "connected"), 1800,
                 "resynced by the new primary, which then stopped", 1)
        say("resynced, and the primary stopped after the last cut: stopping too")
        self.stop_daemon()
        print("PC-FINAL", flush=True)

    def check_fs(self, cut: int) -> dict:
        """r1 after the cut: the mount replays the journal; then the file system must be clean
        and log-CUT a prefix of the records written in that round, each intact."""
        dev = "/dev/mapper/r1"
        sh("mount", dev, str(FS))
        log = FS / f"log-{cut}"
        data = log.read_bytes() if log.exists() else b""
        sh("umount", str(FS))
        fsck = sh("e2fsck", "-fn", dev, check=False)
        intact = 0
        while intact * CHUNK < len(data) and \
                data[intact * CHUNK:(intact + 1) * CHUNK] == block(self.seed, f"r1-{cut}", intact):
            intact += 1
        say(f"r1: log-{cut} {len(data)} bytes, {intact} intact records in a row; e2fsck -fn "
            f"exit {fsck.returncode}")
        return {"log_bytes": len(data), "records_intact": intact, "fsck_rc": fsck.returncode,
                "fsck_out": (fsck.stdout + fsck.stderr)[-2000:]}

    def own_writes(self, cut: int) -> None:
        buf = mmap.mmap(-1, CHUNK)
        fd = os.open("/dev/mapper/r0", os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        for i in OWN_BLOCKS:
            buf[:] = block(self.seed, f"r0-own-{cut}", i)
            os.pwrite(fd, buf, i * CHUNK)
        os.close(fd)
        sh("mount", "/dev/mapper/r1", str(FS))
        (FS / f"own-{cut}").write_bytes(block(self.seed, f"r1-own-{cut}", 0) * 64)
        sh("umount", str(FS))

    def primary(self, rnd: int, fresh: bool) -> None:
        """Round `rnd`'s writes, until the power is cut."""
        wait_for(lambda: self.all_(lambda s: os.path.exists(f"/dev/mapper/{s['name']}")), 120,
                 "the devices")
        wait_for(lambda: self.all_(self.converged), 900, "the targets in sync", 1)
        if fresh:
            sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
               "/dev/mapper/r1")
            # the file system on the async target too before the round: a copy that holds only
            # a prefix of mkfs's writes has no file system to mount (mke2fs writes its
            # superblocks last), and that is not what the round tests
            wait_for(lambda: self.all_(self.converged), 900, "the new file system on the targets",
                     1)
        sh("mount", "/dev/mapper/r1", str(FS))
        fd0 = os.open("/dev/mapper/r0", os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        fd1 = os.open(FS / f"log-{rnd}", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DIRECT
                      | os.O_SYNC)
        dirfd = os.open(FS, os.O_RDONLY)
        os.fsync(dirfd)  # the log's directory entry is durable before its first record
        say(f"round {rnd}: writing")
        print("PC-WRITING", flush=True)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def ack(res: str, i: int) -> None:
            with lock:
                print(f"PC-ACK {res} {i}", flush=True)

        def sync_writer() -> None:
            buf = mmap.mmap(-1, CHUNK)
            for i in range(WRITES):
                buf[:] = block(self.seed, f"r0-{rnd}", i)
                os.pwrite(fd0, buf, i * CHUNK)
                ack("r0", i)

        def async_writer() -> None:
            buf = mmap.mmap(-1, CHUNK)
            for i in range(WRITES):
                buf[:] = block(self.seed, f"r1-{rnd}", i)
                os.write(fd1, buf)
                ack("r1", i)
                if i % 64 == 63:  # metadata churn besides the appends
                    (FS / f"f{rnd}-{i}").write_bytes(os.urandom(3000))
                    if i % 128 == 127:
                        (FS / f"f{rnd}-{i - 64}").unlink()

        def guard(fn) -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=guard, args=(fn,), daemon=True)
                   for fn in (sync_writer, async_writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"a writer failed: {errors[0]!r}")
        say("FAILED: the writers finished before the power cut")
        time.sleep(600)
        raise RuntimeError("still running 600 s after the writes ended: no power cut came")


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: powercut_node.py RESULTS", file=sys.stderr)
        return 2
    if os.environ.get("REPCTL_IN_VM") != "1":
        print("powercut_node.py: runs only inside a test VM (tests/powercut.py)", file=sys.stderr)
        return 2
    node = Node(Path(sys.argv[1]))
    try:
        node.run()
    except Exception as e:
        say(f"FAILED: {type(e).__name__}: {e}")
        return 1
    finally:
        node.stop_daemon()
        sh("umount", str(STATE), check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
