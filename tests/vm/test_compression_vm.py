"""Compression (zstd) between two real daemon processes on the real module (docs/wan.md,
"Compression"; docs/protocol.md, "Compression").

alpha (source, namespace rp-za) replicates r0 to beta (sync target, rp-zb) over a veth pair,
with `compression: zstd` for beta. On alpha's device: ext4, a file of text and a file of 4 KiB
blocks half random, half zero, written and synced. The two copies end equal byte for byte, the
status of the target on alpha (and beta's own) shows fewer bytes on the wire than written, and
alpha's side of the veth sent fewer bytes than the data written (its tx_bytes: what the link
really carried, frames, tags and TCP/IP included).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

from cluster import ROOT, config_text, veth_pair, wait_for, write_secret
from repctl import metadata
from repctl.control import ControlClient
from replfix import sha256_of

REPO = Path(__file__).resolve().parents[2]
REPCTL = [str(REPO / ".venv" / "bin" / "repctl")]
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
SIZE_MB = 64
SIZE = SIZE_MB << 20
CHUNK = 4096
NS = {"alpha": "rp-za", "beta": "rp-zb"}
VETH = {"alpha": ("za0", "10.78.5.1"), "beta": ("zb0", "10.78.5.2")}
HERE = ROOT / "compression"
MNT = HERE / "mnt"
TEXT_MB = 12   # a file of text lines: zstd takes it to about a quarter
SPARSE_MB = 8  # a file of 4 KiB blocks, half random, half zero: about a half
WORDS = ["replication", "block", "device", "target", "source", "resync", "chunk", "bitmap",
         "journal", "write", "flush", "the", "of", "and", "a", "to", "in", "is", "it", "that",
         "for", "on", "with", "as", "was", "at", "by", "be", "this", "from", "or"]


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
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
        nodes = {"alpha": {"address": VETH["alpha"][1], "device": self.data["alpha"],
                           "metadata": meta},
                 "beta": {"address": VETH["beta"][1], "device": self.data["beta"]}}
        secret = write_secret(HERE / "secret")
        for n in NS:
            (HERE / n).mkdir(exist_ok=True)
            (HERE / n / "repctl.yaml").write_text(
                config_text(n, nodes, {"beta": "sync, compression: zstd"}, root=HERE,
                            secret=secret, sync_timeout="5s"))
        self.procs: dict[str, subprocess.Popen] = {}
        cleanup.add("r0", lambda: sh("dmsetup", "remove", "--retry", "r0", check=False))
        cleanup.add("daemons", self.stop_all)
        cleanup.add("mount", lambda: sh("umount", str(MNT), check=False))

    def start(self, node: str) -> None:
        sock = HERE / node / "repctl.sock"
        sock.unlink(missing_ok=True)
        with open(RESULTS / f"daemon-compression-{node}.log", "a") as log:
            self.procs[node] = subprocess.Popen(
                ["ip", "netns", "exec", NS[node], *REPCTL, "-c",
                 str(HERE / node / "repctl.yaml"), "daemon", "--node", node],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(sock.exists, 120, f"{node}'s control socket")

    def stop_all(self) -> None:
        for node in list(self.procs):
            p = self.procs.pop(node)
            p.send_signal(signal.SIGTERM)
            p.wait(60)

    def status(self, node: str) -> dict:
        return ControlClient(HERE / node / "repctl.sock").call("status")["resources"][0]

    def target(self) -> dict:
        return self.status("alpha")["targets"][0]

    def converged(self) -> bool:
        t = self.target()
        return (t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                and t["lag_records"] == 0)

    def tx_bytes(self) -> int:
        dev = VETH["alpha"][0]
        return int(sh("ip", "netns", "exec", NS["alpha"], "cat",
                      f"/sys/class/net/{dev}/statistics/tx_bytes").stdout)


def _text(n: int) -> bytes:
    """`n` bytes of lines of words, drawn from 4096 distinct lines (quick under emulation)."""
    rnd = random.Random(7)
    lines = [" ".join(rnd.choices(WORDS, k=rnd.randint(4, 14))) + "\n" for _ in range(4096)]
    out = "".join(rnd.choices(lines, k=n // 40 + 1)).encode()
    return out[:n]


def _half_zero(n: int) -> bytes:
    return b"".join(os.urandom(2048) + bytes(2048) for _ in range(n // 4096))


def test_zstd_to_a_sync_target_sends_less_than_it_writes(cleanup, loopdev):
    c = Pair(cleanup, loopdev)
    c.start("beta")
    c.start("alpha")
    wait_for(lambda: os.path.exists("/dev/mapper/r0"), 60, "alpha's device")
    wait_for(c.converged, 180, "beta in sync (its full sync, compressed)", interval=0.5)
    t = c.target()
    assert t["compression"] == "zstd", t
    # the full sync of a device of zeros: almost nothing on the wire
    assert t["compression_raw_bytes"] >= SIZE and t["compression_wire_bytes"] < SIZE // 20, t

    sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "/dev/mapper/r0")
    MNT.mkdir(exist_ok=True)
    sh("mount", "/dev/mapper/r0", str(MNT))
    wait_for(c.converged, 120, "beta to hold the new file system", interval=0.5)
    before, tx_before = c.target(), c.tx_bytes()
    text, sparse = _text(TEXT_MB << 20), _half_zero(SPARSE_MB << 20)
    (MNT / "log.txt").write_bytes(text)
    (MNT / "pages.db").write_bytes(sparse)
    sh("sync", "-f", str(MNT / "log.txt"))
    sh("umount", str(MNT))  # everything on the device, then on beta (a sync target)
    wait_for(c.converged, 180, "beta to hold the files", interval=0.5)
    t, wire = c.target(), c.tx_bytes() - tx_before

    raw = t["compression_raw_bytes"] - before["compression_raw_bytes"]
    packed = t["compression_wire_bytes"] - before["compression_wire_bytes"]
    written = len(text) + len(sparse)
    assert raw >= written, (raw, written)  # the files, and ext4's metadata and journal
    assert packed < raw * 0.6, (packed, raw)  # text to about 1/4, the half-zero blocks to 1/2
    # bytes_sent counts data as written; a RECORDS frame compresses its 24-byte record heads too
    heads = raw - (t["bytes_sent"] - before["bytes_sent"])
    assert heads % 24 == 0 and 0 < heads <= raw // 512 * 24, (heads, raw)
    # what the veth carried: all of it, frames and TCP included, well below what was written
    assert wire < written * 0.7, (wire, written)
    # beta counted the same data, received
    b = c.status("beta")
    assert b["compression"] == "zstd"
    assert b["compression_wire_bytes"] < b["compression_raw_bytes"], b

    c.stop_all()
    assert sha256_of(c.data["alpha"], SIZE) == sha256_of(c.data["beta"], SIZE)
