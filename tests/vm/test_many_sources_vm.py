"""Many sources onto one backup node, on the real module (docs/config.md, "A backup node for
many sources").

Four source nodes, each a network namespace (rp-m0..rp-m3) with its own daemon process and its
own dm-repl device (r0..r3: the VM has one kernel, so four devices on loop devices, each with its
metadata), replicate onto one backup node, `vault` (namespace rp-mv), whose one daemon keeps an
image file per resource. The namespaces are joined by a bridge in vault's namespace, one veth
pair per source: vault has one address, each resource its own port and its own secret. r0 and
r2 are sync targets, r1 and r3 async. After the four initial syncs, fio (dd where fio is
missing) writes on the four devices at once, while vault's status shows the four sessions up
together; at the end every image equals its source's device byte for byte.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml
from cluster import ROOT, wait_for, write_secret
from repctl import metadata
from repctl.control import ControlClient
from replfix import sha256_of

REPO = Path(__file__).resolve().parents[2]
REPCTL = [str(REPO / ".venv" / "bin" / "repctl")]
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
SIZE_MB = 32
SIZE = SIZE_MB << 20
CHUNK = 4096
N = 4
HERE = ROOT / "many"
VAULT_NS, BRIDGE, VAULT_ADDR = "rp-mv", "br-m", "10.78.6.10"
MODES = ("sync", "async", "sync", "async")
PORT = 7790  # r<i> listens on PORT + i on vault


def sh(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def source_ns(i: int) -> str:
    return f"rp-m{i}"


def source_addr(i: int) -> str:
    return f"10.78.6.{11 + i}"


def bridge(cleanup) -> None:
    """vault's namespace with a bridge holding its address; each source's namespace joined to it
    by a veth pair (m<i> in the source, mb<i> on the bridge)."""
    for ns in (VAULT_NS, *(source_ns(i) for i in range(N))):
        sh("ip", "netns", "add", ns)
        cleanup.netns(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", VAULT_NS, "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "-n", VAULT_NS, "addr", "add", f"{VAULT_ADDR}/24", "dev", BRIDGE)
    sh("ip", "-n", VAULT_NS, "link", "set", BRIDGE, "up")
    for i in range(N):
        sh("ip", "link", "add", f"m{i}", "netns", source_ns(i), "type", "veth",
           "peer", "name", f"mb{i}", "netns", VAULT_NS)
        sh("ip", "-n", VAULT_NS, "link", "set", f"mb{i}", "master", BRIDGE)
        sh("ip", "-n", VAULT_NS, "link", "set", f"mb{i}", "up")
        sh("ip", "-n", source_ns(i), "addr", "add", f"{source_addr(i)}/24", "dev", f"m{i}")
        sh("ip", "-n", source_ns(i), "link", "set", f"m{i}", "up")


class Backup:
    """vault and its four sources: devices, one configuration file per node (the same resources,
    the node's own state folder and control socket), the daemon processes."""

    def __init__(self, cleanup, loopdev) -> None:
        sh("rm", "-rf", str(HERE))
        (HERE / "vault").mkdir(parents=True)
        bridge(cleanup)
        self.data = [loopdev(SIZE_MB) for _ in range(N)]
        self.images = [HERE / "vault" / f"r{i}.img" for i in range(N)]
        resources = {}
        for i in range(N):
            meta = loopdev(2)
            metadata.format_metadata(meta, SIZE // 512, CHUNK // 512, force=True)
            with open(self.images[i], "wb") as f:
                f.truncate(SIZE)
            resources[f"r{i}"] = {
                "port": PORT + i, "source": f"src{i}", "chunk_size": "4KiB",
                "ring_size": "16MiB", "sync_timeout": "5s",
                "secret_file": str(write_secret(HERE / f"r{i}.secret")),
                "nodes": {f"src{i}": {"address": source_addr(i), "device": self.data[i],
                                      "metadata": meta},
                          "vault": {"address": VAULT_ADDR, "device": str(self.images[i])}},
                "targets": {"vault": {"mode": MODES[i]}},
            }
        self.ns = {"vault": VAULT_NS, **{f"src{i}": source_ns(i) for i in range(N)}}
        for node in self.ns:
            (HERE / node).mkdir(exist_ok=True)
            (HERE / node / "repctl.yaml").write_text(yaml.safe_dump({
                "global": {"control_socket": str(HERE / node / "repctl.sock"),
                           "state_dir": str(HERE / node / "state"),
                           "secret_file": str(write_secret(HERE / "secret"))},
                "resources": resources}))
        self.procs: dict[str, subprocess.Popen] = {}
        for i in range(N):
            cleanup.add(f"r{i}", lambda i=i: sh("dmsetup", "remove", "--retry", f"r{i}",
                                                check=False))
        cleanup.add("daemons", self.stop_all)

    def start(self, nodes: list[str]) -> None:
        """Start the daemons of `nodes` together (each takes a while to start under emulation),
        then wait for their control sockets."""
        for node in nodes:
            sock = HERE / node / "repctl.sock"
            sock.unlink(missing_ok=True)
            with open(RESULTS / f"daemon-many-{node}.log", "a") as log:
                self.procs[node] = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns[node], *REPCTL, "-c",
                     str(HERE / node / "repctl.yaml"), "daemon", "--node", node],
                    stdout=log, stderr=subprocess.STDOUT)
        for node in nodes:
            wait_for((HERE / node / "repctl.sock").exists, 180, f"{node}'s control socket")

    def stop_all(self) -> None:
        for node in list(self.procs):
            p = self.procs.pop(node)
            p.send_signal(signal.SIGTERM)
            p.wait(60)

    def status(self, node: str) -> list[dict]:
        return ControlClient(HERE / node / "repctl.sock").call("status")["resources"]

    def target(self, i: int) -> dict:
        return self.status(f"src{i}")[0]["targets"][0]

    def converged(self, i: int) -> bool:
        t = self.target(i)
        return (t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                and t["lag_records"] == 0)

    def all_converged(self) -> bool:
        """Every source's link to vault is in sync."""
        return all(self.converged(i) for i in range(N))


def workload(i: int) -> list[str]:
    """Writes on /dev/mapper/r<i>, past the page cache: fio's random writes of mixed sizes with
    an fsync now and then, or dd's sequential 1 MiB writes where fio is missing."""
    dev = f"/dev/mapper/r{i}"
    if shutil.which("fio"):
        return ["fio", "--output-format=terse", f"--name=r{i}", f"--filename={dev}",
                "--ioengine=psync", "--direct=1", "--rw=randwrite",
                "--bssplit=4k/50:64k/30:1m/20", f"--size={SIZE}", "--io_size=16M",
                f"--randseed={i + 1}", "--fsync=16"]
    return ["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=16", f"seek={4 * i}",
            "oflag=direct", "status=none"]


def _digest(dev: str) -> str:
    """The device's digest, read past its page cache (see test_tls_vm._digest)."""
    sh("blockdev", "--flushbufs", dev)
    return sha256_of(dev, SIZE)


def test_four_sources_write_at_once_onto_one_backup_node(cleanup, loopdev):
    c = Backup(cleanup, loopdev)
    c.start(["vault"])
    c.start([f"src{i}" for i in range(N)])
    for i in range(N):
        wait_for(lambda i=i: os.path.exists(f"/dev/mapper/r{i}"), 120, f"src{i}'s device")
    wait_for(c.all_converged, 600, "the four initial syncs", interval=1)

    procs = [subprocess.Popen(workload(i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(N)]
    together = False  # vault served the four sessions at one instant while they wrote
    deadline = time.monotonic() + 900
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "the writes did not end within 15 minutes"
        mine = c.status("vault")
        together = together or (len(mine) == N and all(
            r["connection"] == "connected" for r in mine))
        time.sleep(0.5)
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"{' '.join(workload(i))}: {p.stderr.read() if p.stderr else ''}"
    assert together, "vault never had the four sessions up at once"

    wait_for(c.all_converged, 600, "vault to hold every write of the four", interval=1)
    for r in c.status("vault"):
        assert (r["state"], r["disk"], r["last_error"]) == ("streaming", "UpToDate", None), r
    c.stop_all()
    for i in range(N):
        assert _digest(c.data[i]) == sha256_of(str(c.images[i]), SIZE), f"r{i} differs"
