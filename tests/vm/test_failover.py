"""Failover on the real module (issue 11): switchover, failover with the old primary's return,
split brain, refusals.

Two nodes, alpha and beta, each with a loop device for data and one for metadata, their daemons
in this process on loopback addresses. The kernel is shared, so one /dev/mapper/r0 exists at a
time: exactly what a role change does (the old primary removes it, the new one creates it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cluster import ROOT, config_text, wait_for, write_secret
from repctl import metadata
from repctl.config import parse_config
from repctl.daemon import Daemon, SourceResource
from repctl.daemon.base import local_changes
from repctl.daemon.failover import load_role
from repctl.daemon.state import Role
from repctl.errors import ReplError
from replfix import sha256_of

SIZE_MB = 32
SIZE = SIZE_MB << 20
CHUNK = 4096
MNT = Path("/tmp/rp-failover-mnt")
FLOAT_IF = "rpfloat0"
FLOAT_IP = "10.99.0.100"
VETO = ROOT / "veto-promote"
FENCED = ROOT / "fenced"


class Pair:
    """alpha (primary at first, sync target beta), both promotable."""

    def __init__(self, cleanup, loopdev, *, fencing: bool = False, actions: bool = True,
                 gamma: bool = False, policy: str = "disconnect"):
        for n in ("alpha", "beta", "gamma"):
            subprocess.run(["rm", "-rf", str(ROOT / n)], check=True)
        self.data = {n: loopdev(SIZE_MB) for n in ("alpha", "beta")}
        self.meta = {n: loopdev(2) for n in ("alpha", "beta")}
        metadata.format_metadata(self.meta["alpha"], SIZE // 512, CHUNK // 512, force=True)
        nodes = {n: {"address": f"127.0.0.{i}", "device": self.data[n], "metadata": self.meta[n]}
                 for i, n in enumerate(("alpha", "beta"), start=1)}
        targets = {"beta": "sync"}
        if gamma:  # a third node, asynchronous, its copy in an image file: never promoted
            img = ROOT / "gamma.img"
            img.parent.mkdir(parents=True, exist_ok=True)
            with open(img, "wb") as f:
                f.truncate(SIZE)
            cleanup.file(img)
            self.data["gamma"] = str(img)
            nodes["gamma"] = {"address": "127.0.0.3", "device": str(img)}
            targets["gamma"] = "async"
        extra = "\n".join([
            "hook_timeout: 2s",
            f"fencing: {'resource-and-stonith' if fencing else 'none'}",
            f"after_split_brain: {policy}",
            "hooks:",
            f"  before-promote: \"/bin/sh -c 'test ! -e {VETO}'\"",
            f"  fence-peer: \"/bin/sh -c 'test ! -e {VETO} && echo $REPCTL_PEER >> {FENCED}'\"",
            *(["actions:",
               f"  - mount: {{mountpoint: {MNT}, fstype: ext4}}",
               f"  - address: {{ip: {FLOAT_IP}/24, interface: {FLOAT_IF}}}"] if actions else []),
        ])
        secret = write_secret(ROOT / "secret")
        # a sync timeout long enough that a loaded emulated VM never gives up on beta, short
        # enough that a "crash" (the device removed under a waiting write) does not take long
        self.configs = {n: parse_config(config_text(n, nodes, targets, secret=secret, extra=extra,
                                                    sync_timeout="10s"), f"<{n}>") for n in nodes}
        self.daemons: dict[str, Daemon] = {}
        MNT.mkdir(parents=True, exist_ok=True)
        for f in (VETO, FENCED):
            f.unlink(missing_ok=True)
        subprocess.run(["ip", "link", "add", FLOAT_IF, "type", "dummy"], check=True)
        cleanup.add("dummy link", lambda: _quiet("ip", "link", "del", FLOAT_IF))
        subprocess.run(["ip", "link", "set", FLOAT_IF, "up"], check=True)
        # undone in reverse: unmount, stop the daemons (a primary removes r0), remove what is left
        cleanup.add("r0", lambda: _quiet("dmsetup", "remove", "--retry", "r0"))
        cleanup.add("daemons", self.stop_all)
        cleanup.add("mount", lambda: _quiet("umount", str(MNT)))

    def start(self, node: str) -> Daemon:
        d = Daemon(self.configs[node], node)
        d.start()
        self.daemons[node] = d
        return d

    def crash(self, node: str) -> None:
        """The node dies: its daemon stops at once (it writes nothing more, as after kill -9)
        and its device goes away under the writers (within the sync timeout: no write is
        acknowledged without the sync target), nothing is cleaned up."""
        d = self.daemons.pop(node)
        for res in d.resources.values():
            res.stopping.set()
        subprocess.run(["dmsetup", "remove", "--force", "r0"], check=False, capture_output=True)
        for res in d.resources.values():
            try:
                res.stop()
            except Exception:  # the device is gone under it: as in a crash, nothing is tidy
                pass
        d.resources.clear()
        # --force left an erroring device while it was open: gone now that nothing holds it
        subprocess.run(["dmsetup", "remove", "r0"], check=False, capture_output=True)
        assert not os.path.exists("/dev/mapper/r0")

    def stop_all(self) -> None:
        for n in list(self.daemons):
            d = self.daemons.pop(n)
            for name, res in list(d.resources.items()):
                try:
                    res.stop(remove=isinstance(res, SourceResource))
                except Exception:
                    pass
            d.resources.clear()

    def status(self, node: str) -> dict:
        return self.daemons[node].status()["resources"][0]

    def primary(self) -> str:
        (p,) = [n for n, d in self.daemons.items()
                if d.resources and self.status(n)["role"] == "primary"]
        return p

    def converged(self) -> bool:
        st = self.status(self.primary())
        k = st.get("kernel")
        return bool(k) and k["acked"] >= k["published"] and all(
            t["state"] == "streaming" and t["out_of_sync_bytes"] == 0 and t["lag_records"] == 0
            for t in st["targets"])

    def wait_converged(self, what: str, timeout: float = 120) -> None:
        wait_for(self.converged, timeout, what)

    def bytes_sent(self, field: str = "bytes_sent") -> int:
        return sum(t[field] for t in self.status(self.primary())["targets"])


def _quiet(*cmd: str) -> None:
    """Undo something that the test may have undone already."""
    subprocess.run(cmd, check=False, capture_output=True)


def _addresses() -> str:
    return subprocess.run(["ip", "-o", "addr", "show", "dev", FLOAT_IF], capture_output=True,
                          text=True, check=True).stdout


def _mounted() -> bool:
    return os.path.ismount(MNT)


def _write_files(tag: str, n: int = 20) -> dict[str, str]:
    out = {}
    for i in range(n):
        data = hashlib.sha256(f"{tag}-{i}".encode()).digest() * 512  # 16 KiB each
        (MNT / f"{tag}-{i}").write_bytes(data)
        out[f"{tag}-{i}"] = hashlib.sha256(data).hexdigest()
    subprocess.run(["sync", "-f", str(MNT)], check=True)
    return out


def _check_files(files: dict[str, str]) -> None:
    for name, digest in files.items():
        assert hashlib.sha256((MNT / name).read_bytes()).hexdigest() == digest, name


def test_switchover_there_and_back(cleanup, loopdev):
    """Planned switchover with ext4 mounted by the mount action and the floating address moved:
    nothing lost, no full sync anywhere, all copies equal after each step; and the refusals on
    the way change nothing."""
    c = Pair(cleanup, loopdev, gamma=True)
    c.start("gamma")
    c.start("beta")
    alpha = c.start("alpha")
    c.wait_converged("beta and gamma streaming")
    subprocess.run(["mkfs.ext4", "-q", "-F", "/dev/mapper/r0"], check=True)
    subprocess.run(["mount", "/dev/mapper/r0", str(MNT)], check=True)
    files = _write_files("a")

    # refused: beta cannot be promoted while alpha is primary and reachable
    with pytest.raises(ReplError, match="alpha is connected as the primary"):
        c.daemons["beta"].promote("r0")
    # refused: a second mount of the device that no action owns
    other = Path("/tmp/rp-failover-other")
    other.mkdir(exist_ok=True)
    subprocess.run(["mount", "/dev/mapper/r0", str(other)], check=True)
    cleanup.add("other mount", lambda: _quiet("umount", str(other)))
    with pytest.raises(ReplError, match=f"in use \\(.*mounted on {other}"):
        alpha.demote("r0")
    assert _mounted() and c.status("alpha")["role"] == "primary"
    subprocess.run(["umount", str(other)], check=True)

    assert "is a secondary" in alpha.demote("r0")
    assert not _mounted() and not os.path.exists("/dev/mapper/r0")
    assert c.status("alpha")["role"] == "secondary"
    assert sha256_of(c.data["alpha"], SIZE) == sha256_of(c.data["beta"], SIZE)

    # refused: the before-promote hook says no; nothing changes
    VETO.touch()
    with pytest.raises(ReplError, match="before-promote hook"):
        c.daemons["beta"].promote("r0")
    assert c.status("beta")["role"] == "secondary" and not os.path.exists("/dev/mapper/r0")
    VETO.unlink()

    assert "beta is the primary" in c.daemons["beta"].promote("r0")
    assert _mounted() and FLOAT_IP in _addresses()
    _check_files(files)
    files |= _write_files("b")
    c.wait_converged("alpha and gamma streaming from beta")
    # only what beta wrote travelled, not the device: to alpha from its bitmap, to gamma (whose
    # bitmap beta cannot know) by checksums
    assert c.bytes_sent() < SIZE // 4, c.bytes_sent()
    st = c.status("alpha")
    assert (st["role"], st["disk"], st["source"]) == ("secondary", "UpToDate", "beta")

    c.daemons["beta"].demote("r0")
    assert not _mounted() and FLOAT_IP not in _addresses()
    assert sha256_of(c.data["alpha"], SIZE) == sha256_of(c.data["beta"], SIZE)
    wait_for(lambda: sha256_of(c.data["gamma"], SIZE) == sha256_of(c.data["beta"], SIZE), 60,
             "gamma to hold what beta held")
    assert "alpha is the primary" in alpha.promote("r0")
    _check_files(files)
    c.wait_converged("beta and gamma streaming from alpha again")
    assert c.bytes_sent() < SIZE // 4
    subprocess.run(["umount", str(MNT)], check=True)
    c.wait_converged("beta and gamma have the unmount")
    for n in ("beta", "gamma"):
        assert sha256_of("/dev/mapper/r0", SIZE) == sha256_of(c.data[n], SIZE), n


def _writer(dev: str, stop: threading.Event, acked: dict[int, tuple[bytes, float]], first: int,
            count: int) -> None:
    """O_DIRECT|O_SYNC writes of unique 4 KiB blocks; each one acknowledged is recorded with
    the time it was."""
    import mmap
    buf = mmap.mmap(-1, CHUNK)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    try:
        i = 0
        while not stop.is_set() and i < count:
            block = first + i
            data = hashlib.sha256(f"block-{block}-{i}".encode()).digest() * (CHUNK // 32)
            buf[:] = data
            try:
                os.pwrite(fd, buf, block * CHUNK)
            except OSError:
                return  # the device went away: that write was not acknowledged
            acked[block] = (data, time.monotonic())
            i += 1
    finally:
        os.close(fd)


def test_failover_and_the_old_primary_returns_with_only_the_union(cleanup, loopdev):
    """Sync writes on alpha, alpha dies mid-write, beta is promoted (the fence hook runs for the
    unreachable alpha): every acknowledged write is on beta. alpha comes back, becomes beta's
    secondary by itself and receives exactly the union of its own unreplicated chunks and
    beta's chunks since the promotion (bytes counted), and ends identical."""
    c = Pair(cleanup, loopdev, fencing=True, actions=False)
    c.start("beta")
    c.start("alpha")
    c.wait_converged("beta streaming")
    acked: dict[int, tuple[bytes, float]] = {}
    stop = threading.Event()
    w = threading.Thread(target=_writer, args=("/dev/mapper/r0", stop, acked, 0, 4000))
    w.start()
    wait_for(lambda: len(acked) > 300, 120, "some sync writes acknowledged")
    # The crash is at `crashed`. One kernel serves both nodes here, so alpha's kernel lives on
    # after it: it completes the writes in flight once its daemon is gone (P5: never blocked
    # forever on user space). A real crash would never have acknowledged them: only what was
    # acknowledged before the crash must be on beta.
    crashed = time.monotonic()
    c.crash("alpha")
    stop.set()
    w.join(30)

    beta = c.daemons["beta"]
    VETO.touch()  # the fence hook fails: no promotion
    with pytest.raises(ReplError, match="alpha is unreachable and fencing it failed"):
        beta.promote("r0")
    assert c.status("beta")["role"] == "secondary"
    VETO.unlink()
    beta.promote("r0")
    assert FENCED.read_text().split() == ["alpha"]
    before = {block: data for block, (data, when) in acked.items() if when < crashed}
    assert len(before) > 300
    with open("/dev/mapper/r0", "rb", buffering=0) as f:
        for block, data in before.items():
            f.seek(block * CHUNK)
            assert f.read(CHUNK) == data, f"acknowledged block {block} lost"

    # beta writes where alpha did not
    beta_blocks = list(range(6000, 6100)) + list(range(7000, 7010))
    _writer("/dev/mapper/r0", threading.Event(), {}, 6000, 100)
    _writer("/dev/mapper/r0", threading.Event(), {}, 7000, 10)

    # what alpha changed that beta may lack: its bitmap for beta and its dirty bitmap
    nr = SIZE // CHUNK
    mine = local_changes(ROOT / "alpha" / "state" / "r0", Path(c.meta["alpha"]), "beta", nr)
    union = int.from_bytes(mine, "little") | sum(1 << b for b in beta_blocks)
    sent_before = c.bytes_sent("resync_bytes")

    alpha = c.start("alpha")
    assert not alpha.failed, alpha.failed
    assert c.status("alpha")["role"] == "secondary"
    c.wait_converged("alpha resynced from beta")
    resynced = c.bytes_sent("resync_bytes") - sent_before
    assert resynced == union.bit_count() * CHUNK, (resynced, union.bit_count())
    assert sha256_of("/dev/mapper/r0", SIZE) == sha256_of(c.data["alpha"], SIZE)


def _blocks(first: int, n: int) -> set[int]:
    _writer("/dev/mapper/r0", threading.Event(), {}, first, n)
    return set(range(first, first + n))


def _apart(c: Pair, alpha_n: int) -> tuple[Daemon, set[int]]:
    """beta in sync with alpha, then disconnected; alpha writes `alpha_n` blocks apart from it
    and goes down; beta is promoted. Returns alpha's daemon and the blocks it wrote."""
    c.start("beta")
    alpha = c.start("alpha")
    c.wait_converged("beta streaming")
    alpha.disconnect("r0", "beta")
    wait_for(lambda: c.status("alpha")["targets"][0]["state"] == "disconnected", 30,
             "beta disconnected")
    blocks = _blocks(100, alpha_n)
    alpha.down("r0")
    c.daemons["beta"].promote("r0")
    return alpha, blocks


def test_split_brain_is_reported_and_changes_nothing_until_resolved(cleanup, loopdev):
    """alpha writes while beta is disconnected, then goes down; beta is promoted and writes too.
    alpha's `up` finds beta primary with changes of its own: a split brain, reported, the
    resource stays down on alpha and no byte changes anywhere. `resolve --discard-local` on
    alpha makes it beta's secondary and resyncs the union."""
    c = Pair(cleanup, loopdev, actions=False)
    alpha, _ = _apart(c, 50)
    _blocks(3000, 50)
    before = {n: sha256_of(c.data[n], SIZE) for n in ("alpha", "beta")}
    events = alpha.subscribe()

    with pytest.raises(ReplError, match="split brain.*repctl resolve r0 --discard-local"):
        alpha.up("r0")
    seen = [events.get(timeout=1) for _ in range(events.qsize())]
    assert any(e["what"] == "split_brain" for e in seen), seen
    assert {n: sha256_of(c.data[n], SIZE) for n in ("alpha", "beta")} == before
    assert load_role(ROOT / "alpha" / "state" / "r0", c.configs["alpha"].resource("r0"),
                     "alpha") is Role.PRIMARY

    sent_before = c.bytes_sent()
    assert "resyncs its changed chunks" in alpha.resolve("r0", discard_local=True)
    c.wait_converged("alpha resynced after the resolution")
    assert c.bytes_sent() - sent_before <= 100 * CHUNK + (1 << 20)  # the union, not the device
    assert sha256_of("/dev/mapper/r0", SIZE) == sha256_of(c.data["alpha"], SIZE)


def _sent_to(c: Pair, node: str) -> int:
    primary = c.status(c.primary())
    return sum(t["bytes_sent"] for t in primary["targets"] if t["name"] == node)


@pytest.mark.parametrize(("case", "policy", "alpha_n", "beta_n", "settled"), [
    # beta was promoted while alpha was down, wrote, was demoted; alpha comes back primary
    ("demoted", "discard-younger-primary", 50, 20, True),
    # (discard-zero-changes, the same resync with one side's changes empty, is host-tested:
    # tests/host/test_failover.py; each case here costs about 75 s of CI)
    ("demoted", "discard-least-changes", 20, 50, False),
    # alpha, primary apart from beta, returns while beta is still primary
    ("returning", "discard-least-changes", 20, 50, True),
])
def test_split_brain_policies(cleanup, loopdev, case, policy, alpha_n, beta_n, settled):
    """Both sides write apart. The primary's policy discards the secondary's changes (resyncing
    exactly the union of both sides' changed chunks) or refuses, and then no byte changes on
    either side until `resolve --discard-local` on the victim."""
    c = Pair(cleanup, loopdev, actions=False, policy=policy)
    alpha, alpha_blocks = _apart(c, alpha_n)
    beta = c.daemons["beta"]
    beta_blocks = _blocks(3000, beta_n)
    if case == "demoted":
        beta.demote("r0")
        primary, victim = "alpha", "beta"
    else:
        primary, victim = "beta", "alpha"
    events = c.daemons[primary].subscribe()
    before = sha256_of(c.data[victim], SIZE)
    if case == "demoted":
        # no primary anywhere: alpha serves again, beta holds changes of its own
        alpha.up("r0")
        sent_before = 0  # a new link
        alpha.connect("r0", "beta")
    else:
        # beta is primary: alpha waits as its secondary, the policy on beta decides
        sent_before = _sent_to(c, victim)
        alpha.up("r0")
        assert c.status("alpha")["role"] == "secondary"

    def said() -> list[str]:
        return [e["text"] for e in (events.get_nowait() for _ in range(events.qsize()))
                if e["what"] == "split_brain"]

    if settled:
        c.wait_converged(f"{victim} resynced by {policy}")
        assert _sent_to(c, victim) - sent_before == len(alpha_blocks | beta_blocks) * CHUNK
        assert sha256_of("/dev/mapper/r0", SIZE) == sha256_of(c.data[victim], SIZE)
        assert any(f"settled by {policy}" in t for t in said())
        return
    texts = wait_for(said, 30, "the split brain reported")
    assert any("not settled" in t and policy in t for t in texts), texts
    time.sleep(6)  # the link tries again after SPLIT_BRAIN_RETRY: still refused
    assert sha256_of(c.data[victim], SIZE) == before
    assert _sent_to(c, victim) == sent_before
    assert c.status(victim)["disk"] != "UpToDate"
    assert "resyncs its changed chunks" in c.daemons[victim].resolve("r0", discard_local=True)
    c.wait_converged(f"{victim} resynced after the resolution")
    assert _sent_to(c, victim) - sent_before == len(alpha_blocks | beta_blocks) * CHUNK
    assert sha256_of("/dev/mapper/r0", SIZE) == sha256_of(c.data[victim], SIZE)
