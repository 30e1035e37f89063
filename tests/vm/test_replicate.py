"""End to end: three nodes in network namespaces, real daemons, real sockets, the repctl CLI.

alpha (source) -> beta (sync, block device), gamma (async, image file).  Each
node is a network namespace joined to alpha by its own veth pair; the daemons
are separate processes started with `repctl daemon`.  Bytes on the wire are
read from alpha's veth counters.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import ROOT, config_text, wait_for, write_secret
from repctl.errors import ReplError
from replfix import direct_read, direct_write, sha256_of

REPO = Path(__file__).resolve().parents[2]
REPCTL = [str(REPO / ".venv" / "bin" / "repctl")]
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
SIZE_MB = 64
CHUNK = 4096
METRICS = 9942  # every daemon serves its metrics on 127.0.0.1:9942 of its own namespace

NODES = {
    "alpha": ("rp-alpha", None),
    "beta": ("rp-beta", ("ab0", "ba0", "10.77.1.1", "10.77.1.2")),
    "gamma": ("rp-gamma", ("ag0", "ga0", "10.77.2.1", "10.77.2.2")),
}


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def _loopdev_factory(cleanup):
    import uuid
    def make(size_mb: int) -> str:
        ROOT.mkdir(parents=True, exist_ok=True)
        backing = ROOT / f"loop-{uuid.uuid4().hex[:8]}.img"
        with open(backing, "wb") as f:
            f.truncate(size_mb << 20)
        cleanup.file(backing)
        dev = sh("losetup", "--show", "-f", str(backing)).stdout.strip()
        cleanup.loop(dev)
        wait_for(lambda: Path(dev).exists(), 10, dev)
        return dev
    return make


class Cluster:
    def __init__(self, cleanup, loopdev):
        self.cleanup = cleanup
        self.procs: dict[str, subprocess.Popen] = {}
        for d in ("alpha", "beta", "gamma", "secret"):
            os.system(f"rm -rf {ROOT / d}")
        for node, (ns, link) in NODES.items():
            sh("ip", "netns", "add", ns)
            cleanup.netns(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for node, (ns, link) in NODES.items():
            if link:
                a, b, ip_a, ip_b = link
                sh("ip", "link", "add", a, "netns", "rp-alpha", "type", "veth", "peer", "name", b,
                   "netns", ns)
                sh("ip", "-n", "rp-alpha", "addr", "add", f"{ip_a}/24", "dev", a)
                sh("ip", "-n", ns, "addr", "add", f"{ip_b}/24", "dev", b)
                sh("ip", "-n", "rp-alpha", "link", "set", a, "up")
                sh("ip", "-n", ns, "link", "set", b, "up")
        self.data = loopdev(SIZE_MB)
        self.meta = loopdev(2)
        self.beta_dev = loopdev(SIZE_MB)
        self.gamma_img = ROOT / "gamma" / "r0.img"
        self.gamma_img.parent.mkdir(parents=True, exist_ok=True)
        with open(self.gamma_img, "wb") as f:
            f.truncate(SIZE_MB << 20)
        self.nodes = {
            "alpha": {"address": "10.77.1.1", "device": self.data, "metadata": self.meta},
            "beta": {"address": "10.77.1.2", "device": self.beta_dev},
            "gamma": {"address": "10.77.2.2", "device": str(self.gamma_img)},
        }
        self.secret = write_secret(ROOT / "secret")
        self.cfg = {}
        for node in NODES:
            (ROOT / node).mkdir(parents=True, exist_ok=True)
            path = ROOT / node / "repctl.yaml"
            path.write_text(config_text(node, self.nodes, {"beta": "sync", "gamma": "async"},
                                        secret=self.secret, metrics=METRICS))
            self.cfg[node] = path
        self.dev = "/dev/mapper/r0"
        cleanup.add("daemons", self.stop_all)

    def repctl(self, node: str, *args: str, check: bool = True, timeout: float = 300):
        return sh(*REPCTL, "-c", str(self.cfg[node]), *args, check=check, timeout=timeout)

    def start(self, node: str) -> None:
        ns = NODES[node][0]
        log = open(RESULTS / f"daemon-{node}.log", "a")
        self.procs[node] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *REPCTL, "-c", str(self.cfg[node]), "daemon", "--node", node],
            stdout=log, stderr=subprocess.STDOUT)
        sock = ROOT / node / "repctl.sock"
        wait_for(lambda: sock.exists(), 120, f"{node}'s control socket")

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(node)
        p.send_signal(sig)
        p.wait(30)
        if sig == signal.SIGKILL:
            (ROOT / node / "repctl.sock").unlink(missing_ok=True)

    def stop_all(self) -> None:
        for node in list(self.procs):
            try:
                self.kill(node, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill(node)
        if Path(self.dev).exists():
            sh("dmsetup", "remove", "--retry", "r0", check=False)

    def status(self) -> dict:
        """alpha's status of r0, from its control socket: `repctl status --json` would cost
        seconds of interpreter start per poll under emulation (test_refused_peers_write_nothing
        reads gamma's through the CLI)."""
        from repctl.control import ControlClient
        return ControlClient(ROOT / "alpha" / "repctl.sock").call("status")["resources"][0]

    def states(self) -> dict[str, str]:
        return {t["name"]: t["state"] for t in self.status()["targets"]}

    def converged(self) -> bool:
        try:
            st = self.status()
        except (ReplError, OSError):  # the daemon is restarting
            return False
        k = st["kernel"] or {}
        return (k.get("acked", -1) >= k.get("published", 0)
                and all(t["state"] in ("streaming", "paused") and t["out_of_sync_bytes"] == 0
                        and t["lag_records"] == 0 for t in st["targets"]))

    def wait_converged(self, timeout: float = 180) -> None:
        wait_for(self.converged, timeout, "all targets caught up", interval=0.5)

    def tx(self, target: str) -> tuple[int, int]:
        dev = NODES[target][1][0]
        base = f"/sys/class/net/{dev}/statistics"
        out = sh("ip", "netns", "exec", "rp-alpha", "cat", f"{base}/tx_bytes", f"{base}/tx_packets")
        b, p = out.stdout.split()
        return int(b), int(p)

    def digests(self) -> dict[str, str]:
        size = SIZE_MB << 20
        return {"alpha": sha256_of(self.dev, size), "beta": sha256_of(self.beta_dev, size),
                "gamma": sha256_of(str(self.gamma_img), size)}


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module (each start costs three daemons): tests leave it converged."""
    from conftest import Cleanup
    cleanup = Cleanup()
    try:
        c = Cluster(cleanup, _loopdev_factory(cleanup))
        c.repctl("alpha", "create-md", "r0", "--node", "alpha")
        for node in ("beta", "gamma", "alpha"):
            c.start(node)
        wait_for(lambda: Path(c.dev).exists(), 60, "the replicated device")
        c.wait_converged()
        yield c
    finally:
        errors = cleanup.run_all()
        assert not errors, errors


def fio(dev: str, *args: str, timeout: float = 300) -> None:
    sh("fio", "--name=w", "--output-format=terse", f"--filename={dev}", *args, timeout=timeout)


def test_three_nodes_ext4_fio_and_verify(cluster):
    c = cluster
    sh("mkfs.ext4", "-q", "-F", c.dev)
    mnt = Path("/tmp/rp-mnt")
    mnt.mkdir(exist_ok=True)
    sh("mount", c.dev, str(mnt))
    c.cleanup.add("umount", lambda: sh("umount", str(mnt), check=False))
    fio(str(mnt / "v"), "--size=12M", "--rw=randwrite", "--bssplit=4k/50:64k/30:256k/20",
        "--fsync=8", "--verify=crc32c", "--do_verify=1", "--ioengine=psync")
    for i in range(100):
        (mnt / f"f{i}").write_bytes(os.urandom(512 * (i % 31 + 1)))
    for i in range(0, 100, 4):
        (mnt / f"f{i}").unlink()
    sh("sync")
    sh("umount", str(mnt))
    c.wait_converged()
    d = c.digests()
    assert d["alpha"] == d["beta"] == d["gamma"], d
    for t in ("beta", "gamma"):
        out = c.repctl("alpha", "verify", "r0", t, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    st = c.status()
    assert {t["name"]: t["mode"] for t in st["targets"]} == {"beta": "sync", "gamma": "async"}
    sh("fsck.ext4", "-n", "-f", c.beta_dev)


def test_pause_resume_sends_only_changed_chunks(cluster):
    c = cluster
    c.repctl("alpha", "pause", "r0", "gamma")
    wait_for(lambda: c.states()["gamma"] == "paused", 30, "gamma paused")
    before = c.tx("gamma")
    rng = random.Random(7)
    chunks = sorted(rng.sample(range((SIZE_MB << 20) // CHUNK), 300))
    for ch in chunks:
        direct_write(c.dev, ch * CHUNK, rng.randbytes(CHUNK))
    # the engine takes the kernel's dirty bits into gamma's bitmap each CLEAN_INTERVAL (1 s)
    wait_for(lambda: {t["name"]: t for t in c.status()["targets"]}["gamma"]["out_of_sync_bytes"]
             >= len(chunks) * CHUNK, 30, "gamma's bitmap to hold the 300 chunks")
    assert c.digests()["gamma"] != c.digests()["alpha"]
    # --wait returns once gamma streams again, with no progress bar when not on a terminal
    out = c.repctl("alpha", "resume", "r0", "gamma", "--wait", "--timeout", "180")
    assert out.stdout.splitlines() == ["resumed", "r0/gamma: streaming"], out.stdout + out.stderr
    assert out.stderr == "", out.stderr
    assert c.states()["gamma"] == "streaming"
    c.wait_converged()
    after = c.tx("gamma")
    sent, packets = after[0] - before[0], after[1] - before[1]
    changed = len(chunks) * CHUNK
    payload = sent - 66 * packets  # Ethernet + IPv4 + TCP with timestamps per packet
    framing = 48 * len(chunks) + 4096  # frame headers, handshake, pings
    print(f"resync: {len(chunks)} chunks, {changed} bytes changed, {sent} bytes on the wire "
          f"in {packets} packets, {payload} bytes of TCP payload")
    assert payload <= 1.1 * changed + framing, (payload, changed)
    d = c.digests()
    assert d["alpha"] == d["gamma"] == d["beta"]


def test_paused_idle_target_is_a_consistent_filesystem(cluster):
    c = cluster
    sh("mkfs.ext4", "-q", "-F", c.dev)
    mnt = Path("/tmp/rp-mnt2")
    mnt.mkdir(exist_ok=True)
    sh("mount", c.dev, str(mnt))
    c.cleanup.add("umount", lambda: sh("umount", str(mnt), check=False))
    for i in range(40):
        (mnt / f"a{i}").write_bytes(os.urandom(8192))
    # idle: frozen, ext4 has checkpointed its journal (what a backup script does)
    sh("fsfreeze", "-f", str(mnt))
    try:
        c.wait_converged()
        c.repctl("alpha", "pause", "r0", "gamma")
        wait_for(lambda: c.states()["gamma"] == "paused", 60, "gamma paused")
    finally:
        sh("fsfreeze", "-u", str(mnt))
    for i in range(40):  # the primary goes on
        (mnt / f"b{i}").write_bytes(os.urandom(8192))
    sh("sync")
    sh("fsck.ext4", "-n", "-f", str(c.gamma_img))
    c.repctl("alpha", "resume", "r0", "gamma")
    sh("umount", str(mnt))
    c.wait_converged()
    d = c.digests()
    assert d["alpha"] == d["gamma"]


def test_sync_target_has_the_write_when_it_completes(cluster):
    c = cluster
    for i in range(20):
        data = os.urandom(CHUNK)
        off = (i * 37 + 5) * CHUNK
        direct_write(c.dev, off, data)
        assert direct_read(c.beta_dev, off, CHUNK) == data, f"write {i} not on beta at completion"


def test_verify_repair_fixes_corrupted_chunks(cluster):
    """Chunks of beta's device (a loop device) changed behind its daemon's back: `repctl verify
    --repair --wait` resyncs them (only them), a second verify finds nothing, the copies are
    equal. (That a verify without --repair changes nothing, and the refusals, are host tests:
    tests/host/test_verify_repair.py.) The daemon is asked over its socket where the CLI is not
    under test: each `repctl` costs seconds under emulation."""
    from repctl.control import ControlClient

    c = cluster
    alpha = ControlClient(ROOT / "alpha" / "repctl.sock", timeout=None)

    def resynced() -> dict[str, int]:
        st = alpha.call("status")["resources"][0]
        return {t["name"]: t["resync_bytes"] for t in st["targets"]}

    wait_for(c.converged, 180, "all targets caught up", interval=0.5)
    rng = random.Random(13)
    bad = [17, 18, 4000]
    for ch in bad:
        direct_write(c.beta_dev, ch * CHUNK, rng.randbytes(CHUNK))
    before = resynced()
    out = c.repctl("alpha", "verify", "r0", "beta", "--repair", "--wait", "--timeout", "120",
                   check=False)
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"r0/beta: 3 of {(SIZE_MB << 20) // CHUNK} chunks differ" in out.stdout, out.stdout
    assert out.stdout.splitlines()[-2:] == ["r0/beta: 3 chunks marked out of sync: repairing",
                                            "r0/beta: repaired, streaming"], out.stdout
    after = resynced()
    assert {n: after[n] - before[n] for n in after} == {"beta": 3 * CHUNK, "gamma": 0}
    assert alpha.call("verify", resource="r0", target="beta")["differing"] == []
    d = c.digests()
    assert d["alpha"] == d["beta"] == d["gamma"], d


def test_events_follow_a_pause_and_a_resume(cluster):
    """alpha's events over its control socket (what `repctl events` prints), on the real module:
    gamma paused, 8 MiB written, gamma resumed: its connection and state changes, and its
    resync's progress up to 100 %, as they happen."""
    import itertools
    import socket
    import threading

    from repctl.control import ControlClient, encode

    c = cluster
    c.wait_converged()
    path = ROOT / "alpha" / "repctl.sock"
    events: list[dict] = []
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    conn.sendall(encode({"cmd": "events", "args": {}}))

    def follow() -> None:
        with conn.makefile("rb") as lines:
            for line in lines:
                msg = json.loads(line)
                if "event" in msg:
                    events.append(msg["event"])

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(1)  # the daemon subscribes us when it reads the request
    client = ControlClient(path)

    def gamma(what: str) -> list[dict]:
        return [e for e in list(events) if e["what"] == what and e.get("target") == "gamma"]

    def changes(what: str) -> list[tuple[str, str]]:
        return [(e["old"], e["new"]) for e in gamma(what)]

    written = 8 << 20
    try:
        client.call("pause", resource="r0", target="gamma")
        wait_for(lambda: ("streaming", "paused") in changes("state"), 30, "gamma's pause")
        rng = random.Random(11)
        for i in range(written >> 20):
            direct_write(c.dev, (8 + 3 * i) << 20, rng.randbytes(1 << 20))
        client.call("resume", resource="r0", target="gamma")
        wait_for(lambda: any(e["percent"] == 100.0 for e in gamma("progress")), 60,
                 "gamma's resync to end")
        wait_for(lambda: ("syncing", "streaming") in changes("state"), 30, "gamma to stream")
    finally:
        conn.shutdown(socket.SHUT_RDWR)
        reader.join(10)
        conn.close()
    print("\n".join(json.dumps(e) for e in events))

    def in_order(seen: list[tuple[str, str]], wanted: list[tuple[str, str]]) -> bool:
        it = iter(seen)
        return all(w in it for w in wanted)  # a subsequence

    assert in_order(changes("state"), [("streaming", "paused"), ("paused", "connecting"),
                                       ("connecting", "syncing"), ("syncing", "streaming")])
    assert in_order(changes("connection"), [("connected", "down"), ("down", "connecting"),
                                            ("connecting", "connected")])
    progress = gamma("progress")
    last = progress[-1]
    assert last["percent"] == 100.0 and last["eta_s"] == 0.0
    assert last["done_bytes"] == last["total_bytes"] >= written
    percents = [e["percent"] for e in progress]
    assert percents == sorted(percents)
    times = [e["time"] for e in progress]
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times[:-1])), times  # 1 a second
    c.wait_converged()


def scrape(node: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The metrics `node`'s daemon serves, read from inside its namespace: (name, labels) ->
    value."""
    from prometheus_client.parser import text_string_to_metric_families

    code = ("import sys, urllib.request\n"
            f"url = 'http://127.0.0.1:{METRICS}/metrics'\n"
            "sys.stdout.write(urllib.request.urlopen(url, timeout=60).read().decode())\n")
    text = sh("ip", "netns", "exec", NODES[node][0], sys.executable, "-c", code).stdout
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           default: float | None = None, **labels: str) -> float:
    """The one sample `name` whose labels include `labels` (`default` if there is none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    if not found and default is not None:
        return default
    assert len(found) == 1, (name, labels, len(found))
    return found[0]


def test_metrics_of_the_live_daemons(cluster):
    """docs/metrics.md on the real module and daemon processes: the primary's per-target series
    agree with `repctl status`, a sync write is timed and counted, a forged peer is counted as
    refused on the node that refused it."""
    c = cluster
    c.wait_converged()
    status = {t["name"]: t for t in c.status()["targets"]}
    m = scrape("alpha")
    res = {"node": "alpha", "resource": "r0"}
    assert metric(m, "repctl_resource_role", **res, role="primary") == 1
    assert metric(m, "repctl_resource_failed", **res) == 0
    assert metric(m, "repctl_resource_kernel_mode", **res, mode="streaming") == 1
    assert metric(m, "repctl_resource_size_bytes", **res) == SIZE_MB << 20
    assert metric(m, "repctl_resource_ring_size_bytes", **res) == 16 << 20
    assert set(status) == {"beta", "gamma"}
    for name, t in status.items():
        lt = {**res, "target": name}
        states = {dict(ls)["state"]: v for (n, ls), v in m.items()
                  if n == "repctl_target_state" and set(lt.items()) <= ls}
        assert states[t["state"]] == 1 and sum(states.values()) == 1, (name, states)
        assert metric(m, "repctl_target_info", **lt, mode=t["mode"]) == 1
        assert metric(m, "repctl_target_connected", **lt) == (t["connection"] == "connected")
        assert metric(m, "repctl_target_out_of_sync_bytes", **lt) == 0
        assert metric(m, "repctl_target_lag_records", **lt) == 0
        assert metric(m, "repctl_target_sent_bytes_total", **lt) >= t["bytes_sent"] > 0
        assert metric(m, "repctl_target_resync_sent_bytes_total", **lt) >= t["resync_bytes"]
    assert not [k for k in m if k[0].startswith("repctl_target_sync_ack_latency")
                and ("target", "gamma") in k[1]], "an async target has no sync-ack latency"
    beta = {**res, "target": "beta"}
    acks = metric(m, "repctl_target_sync_ack_latency_seconds_count", **beta)

    # sync writes: each completes once beta has it durable, and is timed
    for i in range(16):
        direct_write(c.dev, (i * 53 + 11) * CHUNK, os.urandom(16 * CHUNK))
    c.wait_converged()
    after = scrape("alpha")
    streaming = [n for n, t in status.items() if t["state"] == "streaming"]
    assert "beta" in streaming, status
    for name in streaming:
        lt = {**res, "target": name}
        assert (metric(after, "repctl_target_sent_bytes_total", **lt)
                - metric(m, "repctl_target_sent_bytes_total", **lt)) >= 16 * 16 * CHUNK, name
    assert metric(after, "repctl_target_sync_ack_latency_seconds_count", **beta) > acks
    latency = (metric(after, "repctl_target_sync_ack_latency_seconds_sum", **beta)
               - metric(m, "repctl_target_sync_ack_latency_seconds_sum", **beta))
    assert 0 < latency < 16 * 3.0, latency  # under sync_timeout (3s) each
    assert metric(after, "repctl_target_sync_ack_latency_seconds_bucket", **beta, le="+Inf") \
        == metric(after, "repctl_target_sync_ack_latency_seconds_count", **beta)

    # beta, a secondary: what it received; gamma counts a forged peer it refused
    b = scrape("beta")
    assert metric(b, "repctl_resource_role", node="beta", role="secondary") == 1
    assert metric(b, "repctl_resource_replica_state", node="beta", state="streaming") == 1
    assert metric(b, "repctl_resource_connected", node="beta") == 1
    assert metric(b, "repctl_resource_received_bytes_total", node="beta") >= 16 * 16 * CHUNK
    refused = {"node": "gamma", "reason": "auth_failed", "by": "local"}
    before = metric(scrape("gamma"), "repctl_resource_refusals_total", 0.0, **refused)
    code = ("import socket\n"
            "from repctl import protocol as P\n"
            "s = socket.create_connection(('10.77.2.2', 7789), timeout=10)\n"
            f"info = P.HandshakeInfo('r0', 'alpha', P.Role.SOURCE, {SIZE_MB << 20}, {CHUNK}, "
            "P.Generations(12345))\n"
            "try:\n"
            "    P.handshake(P.FramedConnection(s), info, b'forged-secret-0123456789',\n"
            "                P.Expect(frozenset({'gamma'})))\n"
            "    print('ACCEPTED')\n"
            "except Exception as e:\n"
            "    print('REFUSED', type(e).__name__)\n")
    out = sh("ip", "netns", "exec", "rp-alpha", sys.executable, "-c", code).stdout
    assert "REFUSED AuthError" in out, out
    wait_for(lambda: metric(scrape("gamma"), "repctl_resource_refusals_total", 0.0, **refused)
             == before + 1, 30, "gamma to count the forged peer")
    c.wait_converged()


def test_kill9_daemons_and_converge(cluster):
    c = cluster
    rng = random.Random(9)
    written = 48  # MiB: fio writes only there; a full resync would send all SIZE_MB
    alpha_log = RESULTS / "daemon-alpha.log"
    for victim in ("alpha", "beta", "gamma"):
        writer = subprocess.Popen(["fio", "--name=w", "--output-format=terse", f"--filename={c.dev}",
                                   f"--size={written}M", "--rw=randwrite", "--bssplit=4k/70:64k/30",
                                   "--direct=1", "--time_based", "--runtime=5", "--fsync=32"],
                                  stdout=subprocess.DEVNULL)
        c.cleanup.process(writer)
        log_from = alpha_log.stat().st_size
        time.sleep(rng.uniform(0.5, 2.0))
        c.kill(victim)  # mid-stream (and, for a target, mid-resync of what it missed)
        time.sleep(rng.uniform(0.2, 1.0))
        c.start(victim)
        writer.wait(120)
        c.wait_converged(240)
        d = c.digests()
        assert d["alpha"] == d["beta"] == d["gamma"], (victim, d)
        # No full resync: the bitmaps survived the kill. Every resync that alpha started (after
        # an admission, or after falling behind) covers fio's chunks only. The bytes resynced
        # are no bound: a slow machine falls behind again and again under fio, and a chunk
        # rewritten during its resync is sent again, as it must be.
        with open(alpha_log, "rb") as f:
            f.seek(log_from)
            starts = [int(n) for n in re.findall(rb"new=\w+ text=(\d+) chunks to resync", f.read())]
        if victim != "alpha":  # a restarted source may find every write still in the ring
            assert starts, (victim, "no resync started: the test proved nothing")
        assert max(starts) <= (written << 20) // CHUNK, (victim, starts)


def test_refused_peers_write_nothing(cluster):
    c = cluster
    c.repctl("alpha", "disconnect", "r0", "gamma")
    wait_for(lambda: c.states()["gamma"] == "disconnected", 30, "gamma disconnected")
    before = sha256_of(str(c.gamma_img))

    def attempt(secret: bytes, resource: str = "r0", node: str = "alpha", size: int = SIZE_MB << 20):
        code = (
            "import socket,sys\n"
            "from repctl import protocol as P\n"
            "s=socket.create_connection(('10.77.2.2',7789),timeout=10)\n"
            "c=P.FramedConnection(s)\n"
            f"info=P.HandshakeInfo({resource!r},{node!r},P.Role.SOURCE,{size},4096,P.Generations(12345))\n"
            "try:\n"
            f"    P.handshake(c,info,{secret!r},P.Expect(frozenset({{'gamma'}})))\n"
            "    c.send_message(P.write_record(99, 0, b'X'*4096))\n"
            "    print('ACCEPTED')\n"
            "except Exception as e:\n"
            "    print('REFUSED', type(e).__name__, e)\n")
        return sh("ip", "netns", "exec", "rp-alpha", sys.executable, "-c", code).stdout

    assert "REFUSED AuthError" in attempt(b"wrong-secret-0123456789")
    assert "REFUSED" in attempt(b"test-secret-0123456789abcdef", resource="r9")
    assert "REFUSED" in attempt(b"test-secret-0123456789abcdef", node="mallory")
    # a forged frame and a truncated one on a raw socket
    code = ("import socket\n"
            "s=socket.create_connection(('10.77.2.2',7789),timeout=10)\n"
            "s.sendall(b'RPL1' + b'\\x01\\x00\\x10\\x00' + b'\\xff'*40)\n"
            "s.close()\n"
            "s=socket.create_connection(('10.77.2.2',7789),timeout=10)\n"
            "s.sendall(b'RPL1\\x01\\x00')\n"
            "s.close()\n")
    sh("ip", "netns", "exec", "rp-alpha", sys.executable, "-c", code)
    time.sleep(1)
    assert sha256_of(str(c.gamma_img)) == before, "a refused peer changed the target"
    gamma = json.loads(c.repctl("gamma", "status", "--json").stdout)["resources"][0]
    assert gamma["last_error"], gamma
    c.repctl("alpha", "connect", "r0", "gamma")
    c.wait_converged()

def test_smaller_target_is_refused(cluster, loopdev):
    c = cluster
    small = loopdev(SIZE_MB // 2)
    before = sha256_of(small)
    c.kill("beta", signal.SIGTERM)
    nodes = {n: dict(v) for n, v in c.nodes.items()}
    nodes["beta"]["device"] = small
    c.cfg["beta"].write_text(config_text("beta", nodes, {"beta": "sync", "gamma": "async"},
                                         secret=c.secret, metrics=METRICS))
    c.start("beta")
    wait_for(lambda: "smaller" in (({t["name"]: t for t in c.status()["targets"]}["beta"]
                                    .get("last_error") or "")), 60, "beta refused as too small")
    assert c.states()["beta"] in ("connecting", "disconnected")
    assert sha256_of(small) == before
    # back to its own device: it catches up with what it missed, no full sync
    c.kill("beta", signal.SIGTERM)
    c.cfg["beta"].write_text(config_text("beta", c.nodes, {"beta": "sync", "gamma": "async"},
                                         secret=c.secret, metrics=METRICS))
    c.start("beta")
    c.wait_converged()
    d = c.digests()
    assert d["alpha"] == d["beta"] == d["gamma"]
