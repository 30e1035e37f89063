"""TLS 1.3 between two real daemon processes on the real module (docs/wan.md, docs/protocol.md).

alpha (source, namespace rp-ta) replicates r0 to beta (sync target, rp-tb) over a veth pair,
both with certificates of one CA made by tests/host/tlspki.py (the openssl commands of
docs/wan.md): the initial sync and O_DIRECT writes arrive byte for byte, and the link's bytes on
the wire (captured on beta's side of the veth) never carry the written data in clear. Then beta comes back with a certificate of
another CA: alpha refuses it with the documented reason, and nothing alpha writes meanwhile
reaches beta's disk. With its right certificate again, beta resyncs and both compare equal.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

from cluster import ROOT, config_text, veth_pair, wait_for, write_secret
from repctl import metadata
from repctl.control import ControlClient
from replfix import sha256_of

REPO = Path(__file__).resolve().parents[2]
REPCTL = [str(REPO / ".venv" / "bin" / "repctl")]
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
SIZE_MB = 16
SIZE = SIZE_MB << 20
CHUNK = 4096
NS = {"alpha": "rp-ta", "beta": "rp-tb"}
VETH = {"alpha": ("ta0", "10.78.4.1"), "beta": ("tb0", "10.78.4.2")}
HERE = ROOT / "tls"

_spec = importlib.util.spec_from_file_location("tlspki", REPO / "tests" / "host" / "tlspki.py")
assert _spec and _spec.loader
tlspki = sys.modules["tlspki"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tlspki)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


class Pair:
    def __init__(self, cleanup, loopdev) -> None:
        sh("rm", "-rf", str(HERE))
        HERE.mkdir(parents=True)
        veth_pair(cleanup, NS, VETH)
        self.data = {n: loopdev(SIZE_MB) for n in NS}
        meta = loopdev(2)
        metadata.format_metadata(meta, SIZE // 512, CHUNK // 512, force=True)
        pki = HERE / "pki"
        tlspki.make_ca(pki)
        tlspki.make_ca(pki, "other")
        self.tls = {n: tlspki.make_node(pki, n) for n in NS}
        self.wrong = tlspki.make_node(pki, "beta", ca="other", file="beta-other")
        self.nodes = {"alpha": {"address": VETH["alpha"][1], "device": self.data["alpha"],
                                "metadata": meta},
                      "beta": {"address": VETH["beta"][1], "device": self.data["beta"]}}
        self.secret = write_secret(HERE / "secret")
        self.procs: dict[str, subprocess.Popen] = {}
        for n in NS:
            self.configure(n, self.tls[n])
        cleanup.add("r0", lambda: sh("dmsetup", "remove", "--retry", "r0", check=False))
        cleanup.add("daemons", self.stop_all)

    def configure(self, node: str, files) -> None:
        # every node of a resource has TLS or none does; a node reads only its own files
        tls = "{" + ", ".join(f"{k}: {v}" for k, v in files.config().items()) + "}"
        nodes = {n: {**spec, "tls": tls} for n, spec in self.nodes.items()}
        (HERE / node).mkdir(exist_ok=True)
        (HERE / node / "repctl.yaml").write_text(
            config_text(node, nodes, {"beta": "sync"}, root=HERE, secret=self.secret,
                        sync_timeout="5s"))

    def start(self, node: str) -> None:
        sock = HERE / node / "repctl.sock"
        sock.unlink(missing_ok=True)
        log = open(RESULTS / f"daemon-tls-{node}.log", "a")
        self.procs[node] = subprocess.Popen(
            ["ip", "netns", "exec", NS[node], *REPCTL, "-c", str(HERE / node / "repctl.yaml"),
             "daemon", "--node", node], stdout=log, stderr=subprocess.STDOUT)
        wait_for(sock.exists, 120, f"{node}'s control socket")

    def stop(self, node: str) -> None:
        p = self.procs.pop(node)
        p.send_signal(signal.SIGTERM)
        p.wait(60)

    def stop_all(self) -> None:
        for node in list(self.procs):
            self.stop(node)

    def target(self) -> dict:
        return ControlClient(HERE / "alpha" / "repctl.sock").call("status")["resources"][0][
            "targets"][0]

    def converged(self) -> bool:
        t = self.target()
        return (t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                and t["lag_records"] == 0)


# Every frame on a device, raw, into a file, until a stop file appears: run in a namespace.
CAPTURE = """
import os, socket, sys, time
dev, out, stop = sys.argv[1:4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((dev, 0))
s.settimeout(0.2)
end = time.monotonic() + 300
with open(out, "wb") as f:
    print("capturing", flush=True)
    while not os.path.exists(stop) and time.monotonic() < end:
        try:
            f.write(s.recv(65536))
        except TimeoutError:
            pass
"""


def _digest(dev: str) -> str:
    """The device's digest, read past its page cache: the writes through /dev/mapper/r0 reach
    the loop device underneath as bios, which do not invalidate what an earlier read of the loop
    device left in its cache."""
    sh("blockdev", "--flushbufs", dev)
    return sha256_of(dev, SIZE)


def _write(marker: bytes, first: int, count: int) -> None:
    """O_DIRECT writes of 4 KiB blocks made of `marker` repeated (a sync target: each one
    completes once beta holds it)."""
    block = (marker * (CHUNK // len(marker) + 1))[:CHUNK]
    buf = mmap.mmap(-1, CHUNK)
    buf[:] = block
    fd = os.open("/dev/mapper/r0", os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(first, first + count):
            os.pwrite(fd, buf, i * CHUNK)
    finally:
        os.close(fd)


def test_replication_over_tls_and_a_certificate_of_another_ca(cleanup, loopdev):
    c = Pair(cleanup, loopdev)
    c.start("beta")
    c.start("alpha")
    wait_for(lambda: os.path.exists("/dev/mapper/r0"), 60, "alpha's device")
    wait_for(c.converged, 180, "beta in sync over TLS", interval=0.5)

    # what travels is encrypted: a marker written 256 times is never on the wire in clear
    marker = b"REPCTL-TLS-CLEARTEXT-MARKER-0123"
    wire, stop = HERE / "wire.bin", HERE / "capture.stop"
    capture = subprocess.Popen(["ip", "netns", "exec", NS["beta"], sys.executable, "-c", CAPTURE,
                                VETH["beta"][0], str(wire), str(stop)],
                               stdout=subprocess.PIPE, text=True)
    assert capture.stdout and capture.stdout.readline().strip() == "capturing"
    _write(marker, 100, 256)
    wait_for(c.converged, 60, "the writes on beta")
    stop.touch()
    assert capture.wait(30) == 0
    seen = wire.read_bytes()
    assert len(seen) >= 256 * CHUNK, f"the capture holds only {len(seen)} bytes"
    assert marker not in seen, "written data on the wire in clear"
    assert _digest(c.data["alpha"]) == _digest(c.data["beta"])

    # beta with a certificate of another CA: refused, nothing written on its disk
    c.stop("beta")
    c.configure("beta", c.wrong)
    c.start("beta")
    wait_for(lambda: "certificate" in (c.target().get("last_error") or ""), 120,
             "alpha to refuse beta's certificate")
    err = c.target()["last_error"]
    assert "tls.ca" in err or "CA" in err, err
    before = _digest(c.data["beta"])
    _write(b"NOT-FOR-BETA-", 2000, 64)  # beta is out of session: the writes complete at once
    assert c.target()["state"] != "streaming"
    assert _digest(c.data["beta"]) == before, "a refused peer's disk changed"

    # its own certificate again: it resyncs what it missed, and both are equal
    resynced = c.target()["resync_bytes"]
    c.stop("beta")
    c.configure("beta", c.tls["beta"])
    c.start("beta")
    wait_for(c.converged, 180, "beta resynced over TLS", interval=0.5)
    assert c.target()["resync_bytes"] - resynced >= 64 * CHUNK
    c.stop_all()
    assert _digest(c.data["alpha"]) == _digest(c.data["beta"])
