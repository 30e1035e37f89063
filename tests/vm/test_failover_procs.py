"""Failover with real daemon processes in network namespaces (issue 11): the primary's daemon
killed with SIGKILL mid-write, its device removed by force and its link cut; `repctl promote`
on the secondary (a hook that times out refuses it first, changing nothing); every acknowledged
write on the new primary; the old primary's daemon restarted, back as a secondary that receives
exactly the union of both sides' changed chunks, counted on the wire.

alpha lives in namespace rp-fa, beta in rp-fb, joined by one veth pair. The kernel (and so the
one /dev/mapper/r0) is shared, as in every VM test: the crash removes alpha's device before
beta's promotion creates its own.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from cluster import ROOT, config_text, veth_pair, wait_for, write_secret
from repctl import metadata
from repctl.control import ControlClient
from repctl.daemon.base import local_changes
from replfix import sha256_of

REPO = Path(__file__).resolve().parents[2]
REPCTL = [str(REPO / ".venv" / "bin" / "repctl")]
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
SIZE_MB = 32
SIZE = SIZE_MB << 20
CHUNK = 4096
NS = {"alpha": "rp-fa", "beta": "rp-fb"}
VETH = {"alpha": ("fa0", "10.78.1.1"), "beta": ("fb0", "10.78.1.2")}
SLOW = ROOT / "slow-promote"  # while it exists, the before-promote hook outlasts hook_timeout


def sh(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


class Nodes:
    def __init__(self, cleanup, loopdev):
        for d in ("alpha", "beta"):
            sh("rm", "-rf", str(ROOT / d))
        veth_pair(cleanup, NS, VETH)
        self.data = {n: loopdev(SIZE_MB) for n in NS}
        self.meta = {n: loopdev(2) for n in NS}
        metadata.format_metadata(self.meta["alpha"], SIZE // 512, CHUNK // 512, force=True)
        nodes = {n: {"address": VETH[n][1], "device": self.data[n], "metadata": self.meta[n]}
                 for n in NS}
        SLOW.unlink(missing_ok=True)
        extra = "\n".join([
            "hook_timeout: 2s",
            "hooks:",
            f"  before-promote: \"/bin/sh -c 'if test -e {SLOW}; then sleep 30; fi'\"",
        ])
        secret = write_secret(ROOT / "secret")
        self.cfg = {}
        for n in NS:
            (ROOT / n).mkdir(parents=True, exist_ok=True)
            self.cfg[n] = ROOT / n / "repctl.yaml"
            self.cfg[n].write_text(config_text(n, nodes, {"beta": "sync"}, secret=secret,
                                               extra=extra, sync_timeout="5s"))
        self.procs: dict[str, subprocess.Popen] = {}
        cleanup.add("r0", lambda: sh("dmsetup", "remove", "--retry", "r0", check=False))
        cleanup.add("daemons", self.stop_all)

    def repctl(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", NS[node], *REPCTL, "-c", str(self.cfg[node]), *args,
                  check=check)

    def start(self, node: str) -> None:
        sock = ROOT / node / "repctl.sock"
        sock.unlink(missing_ok=True)
        log = open(RESULTS / f"daemon-failover-{node}.log", "a")
        self.procs[node] = subprocess.Popen(
            ["ip", "netns", "exec", NS[node], *REPCTL, "-c", str(self.cfg[node]), "daemon",
             "--node", node], stdout=log, stderr=subprocess.STDOUT)
        wait_for(sock.exists, 120, f"{node}'s control socket")

    def kill9(self, node: str) -> None:
        p = self.procs.pop(node)
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    def stop_all(self) -> None:
        for node in list(self.procs):
            p = self.procs.pop(node)
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)

    def status(self, node: str) -> dict:
        """Over the control socket (the CLI starts slowly on the emulated CPU)."""
        client = ControlClient(ROOT / node / "repctl.sock")
        return client.call("status")["resources"][0]

    def converged(self, primary: str) -> bool:
        st = self.status(primary)
        k = st.get("kernel") or {}
        return k.get("acked", -1) >= k.get("published", 0) and all(
            t["state"] == "streaming" and t["out_of_sync_bytes"] == 0 and t["lag_records"] == 0
            for t in st["targets"])

    def tx_bytes(self, node: str) -> int:
        dev = VETH[node][0]
        return int(sh("ip", "netns", "exec", NS[node], "cat",
                      f"/sys/class/net/{dev}/statistics/tx_bytes").stdout)


def _block(i: int) -> bytes:
    return hashlib.sha256(f"block-{i}".encode()).digest() * (CHUNK // 32)


def _writer(stop: threading.Event, acked: dict[int, float], first: int, count: int) -> None:
    """O_DIRECT|O_SYNC writes of unique 4 KiB blocks to /dev/mapper/r0; each acknowledged one
    is logged with the time it was."""
    buf = mmap.mmap(-1, CHUNK)
    try:
        fd = os.open("/dev/mapper/r0", os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    except OSError:
        return
    try:
        for block in range(first, first + count):
            if stop.is_set():
                return
            buf[:] = _block(block)
            try:
                os.pwrite(fd, buf, block * CHUNK)
            except OSError:
                return  # the device went away under it: this write was not acknowledged
            acked[block] = time.monotonic()
    finally:
        os.close(fd)


def test_kill9_failover_promote_and_the_old_primary_returns(cleanup, loopdev):
    c = Nodes(cleanup, loopdev)
    c.start("beta")
    c.start("alpha")
    wait_for(lambda: os.path.exists("/dev/mapper/r0"), 60, "alpha's device")
    wait_for(lambda: c.converged("alpha"), 180, "beta in sync", interval=0.5)

    acked: dict[int, float] = {}
    stop = threading.Event()
    w = threading.Thread(target=_writer, args=(stop, acked, 0, 6000))
    w.start()
    wait_for(lambda: len(acked) > 300, 120, "some sync writes acknowledged")
    # the crash: the daemon killed, the device removed by force under the writer, the link cut.
    # One kernel serves both nodes here, so alpha's kernel completes the writes in flight after
    # its daemon died (sync_timeout); a real crash would not have acknowledged them: only what
    # was acknowledged before the kill must be on beta.
    crashed = time.monotonic()
    c.kill9("alpha")
    sh("dmsetup", "remove", "--force", "r0", check=False)
    sh("ip", "-n", NS["alpha"], "link", "set", VETH["alpha"][0], "down")
    stop.set()
    w.join(60)
    sh("dmsetup", "remove", "--retry", "r0", check=False)  # the erroring table, once unheld
    assert not os.path.exists("/dev/mapper/r0")
    before = {b for b, when in acked.items() if when < crashed}
    assert len(before) > 300

    # a before-promote hook that outlasts hook_timeout refuses the promotion: nothing changed
    wait_for(lambda: c.status("beta")["disk"] != "UpToDate", 60, "beta sees alpha gone")
    SLOW.touch()
    refused = c.repctl("beta", "promote", "r0", check=False)
    assert refused.returncode != 0
    assert "before-promote" in refused.stderr and "timed out" in refused.stderr, refused.stderr
    assert c.status("beta")["role"] == "secondary"
    assert not os.path.exists("/dev/mapper/r0")
    role = ROOT / "beta" / "state" / "r0" / "role.json"  # written at the first role change
    assert not role.exists() or json.loads(role.read_text())["role"] == "secondary"
    SLOW.unlink()

    c.repctl("beta", "promote", "r0")
    assert c.status("beta")["role"] == "primary"
    with open("/dev/mapper/r0", "rb", buffering=0) as f:
        for block in sorted(before):
            f.seek(block * CHUNK)
            assert f.read(CHUNK) == _block(block), f"acknowledged block {block} lost"

    beta_blocks = set(range(7000, 7100))
    _writer(threading.Event(), {}, 7000, 100)
    nr = SIZE // CHUNK
    mine = local_changes(ROOT / "alpha" / "state" / "r0", Path(c.meta["alpha"]), "beta", nr)
    union = (int.from_bytes(mine, "little") | sum(1 << b for b in beta_blocks)).bit_count()

    sent_before = c.status("beta")["targets"][0]["resync_bytes"]
    tx_before = c.tx_bytes("beta")
    sh("ip", "-n", NS["alpha"], "link", "set", VETH["alpha"][0], "up")
    c.start("alpha")
    wait_for(lambda: c.status("alpha")["role"] == "secondary", 60, "alpha back as secondary")
    wait_for(lambda: c.converged("beta"), 180, "alpha resynced from beta", interval=0.5)
    sent = c.status("beta")["targets"][0]["resync_bytes"] - sent_before
    assert sent == union * CHUNK, (sent, union)
    wire = c.tx_bytes("beta") - tx_before
    # the chunks plus framing, MACs, the handshake and TCP/IP headers: never a full sync
    assert union * CHUNK <= wire < union * CHUNK * 1.25 + (256 << 10), (wire, union)
    assert sha256_of("/dev/mapper/r0", SIZE) == sha256_of(c.data["alpha"], SIZE)
