"""Many sources onto one backup node (docs/config.md, "A backup node for many sources").

One live target daemon, `vault`, in this process, keeps an image file per resource; each
resource r0..r3 has its own source, a live daemon of its own (`src0`..`src3`) whose kernel
consumer is the in-memory ring of fakering.py, with a dirty bitmap kept as the kernel keeps it.
All of them on loopback addresses (127.0.0.x), each daemon with a state folder of its own, as on
separate machines. The test writes on the four sources at once and checks that the backup node
serves them at once, that every image ends equal to its source byte for byte, that a hung source
(connected and silent, or stopped in the middle of a frame) holds up no other resource, and that
a full file system under one image fails that resource only, with the reason in `status` on
both sides, and heals by itself once there is room again.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from fakering import start_without_device_mapper
from repctl import protocol as P
from repctl import store as store_module
from repctl.config import Config, load_config
from repctl.daemon import Daemon, SourceResource, TargetResource
from repctl.daemon.base import MAX_PENDING_HANDSHAKES
from repctl.daemon.state import LinkState
from repctl.errors import HandshakeRefused

CHUNK = 4096
SIZE = 4 << 20
SECRET = "test-secret-0123456789abcdef"
VAULT = "127.0.0.10"  # the backup node
MODES = ("sync", "async", "sync", "async")  # r0..r3: either mode, side by side


def src_address(i: int) -> str:
    return f"127.0.0.{11 + i}"


def free_ports(host: str, n: int) -> list[int]:
    """`n` distinct ports free on `host` now (held open together, so never the same twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def until(cond: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def write_config(tmp: Path, n: int) -> Path:
    """Resources r0..r{n-1}, each from its own source src<i> onto the one backup node, an image
    file per resource there, a port per resource."""
    secret = tmp / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    (tmp / "vault").mkdir()
    resources = {}
    for i, port in enumerate(free_ports(VAULT, n)):
        with open(tmp / "vault" / f"r{i}.img", "wb") as f:
            f.truncate(SIZE)
        resources[f"r{i}"] = {
            "port": port, "source": f"src{i}", "chunk_size": CHUNK,
            "nodes": {f"src{i}": {"address": src_address(i), "device": str(tmp / f"src{i}.img"),
                                  "metadata": str(tmp / f"src{i}-md.img")},
                      "vault": {"address": VAULT, "device": str(tmp / "vault" / f"r{i}.img")}},
            "targets": {"vault": {"mode": MODES[i % len(MODES)]}},
        }
    path = tmp / "repctl.yaml"
    path.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp / "s.sock"), "state_dir": str(tmp / "st"),
                   "secret_file": str(secret)},
        "resources": resources}))
    return path


def own_state(config: Config, folder: Path) -> Config:
    """`config` with a state folder of its own: each node as if on its own machine."""
    return dataclasses.replace(config, global_=dataclasses.replace(config.global_,
                                                                   state_dir=folder))


class Backup:
    """The backup node and its sources: `vault` (a Daemon), and per resource i its source
    daemon, SourceResource, link to vault, ring, source data file and image on vault."""

    def __init__(self, tmp: Path, *, real: int = 4, played: int = 0) -> None:
        self.tmp = tmp
        n = real + played
        self.config = load_config(write_config(tmp, n))
        self.names = [f"r{i}" for i in range(n)]
        self.data = [tmp / f"src{i}.img" for i in range(n)]
        self.images = [tmp / "vault" / f"r{i}.img" for i in range(n)]
        self.ports = [self.config.resource(r).port for r in self.names]
        for path in self.data:
            path.write_bytes(os.urandom(SIZE))  # a full sync of random data for each
        self.vault = Daemon(own_state(self.config, tmp / "st-vault"), "vault")
        self.sources: list[Daemon] = []
        self.vault.start()
        assert not self.vault.failed, self.vault.failed
        for i in range(real):
            d = Daemon(own_state(self.config, tmp / f"st-src{i}"), f"src{i}")
            self.sources.append(d)
            d.start()
            assert not d.failed, d.failed
            self.ring(i).track_dirty(CHUNK)

    def source(self, i: int) -> SourceResource:
        res = self.sources[i].resources[self.names[i]]
        assert isinstance(res, SourceResource)
        return res

    def ring(self, i: int) -> Any:
        return self.source(i).consumer

    def link(self, i: int) -> Any:
        return self.source(i).link("vault")

    def replica(self, i: int) -> TargetResource:
        res = self.vault.resources[self.names[i]]
        assert isinstance(res, TargetResource)
        return res

    def vault_status(self, i: int) -> dict[str, Any]:
        return next(r for r in self.vault.status()["resources"] if r["name"] == self.names[i])

    def converged(self, i: int) -> bool:
        """Source i's link streams, holds nothing out of sync and has every record durable."""
        link, ring = self.link(i), self.ring(i)
        return (link.state is LinkState.STREAMING and link.oos.count() == 0
                and link.durable >= ring.next_seq - 1)

    def equal(self, i: int) -> bool:
        return self.images[i].read_bytes() == self.data[i].read_bytes()

    def write_at_once(self, which: list[int], seconds: float) -> list[list[int]]:
        """Write on the sources `which` at once, each from its own thread, for `seconds`: runs
        of 1 to 16 blocks of random data at random places. Meanwhile sample vault's bytes
        received per resource every 0.1 s; return the samples."""
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer(i: int) -> None:
            rnd = random.Random(i)
            ring = self.ring(i)
            try:
                while not stop.is_set():
                    blocks = rnd.randint(1, 16)
                    first = rnd.randrange(SIZE // CHUNK - blocks)
                    ring.write(first * CHUNK // 512, rnd.randbytes(blocks * CHUNK))
                    time.sleep(0.002)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in which]
        for t in threads:
            t.start()
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append([self.replica(i).bytes_received for i in range(len(self.names))])
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        return samples

    def stop(self) -> None:
        for d in self.sources:
            d.stop()
        self.vault.stop()


@pytest.fixture
def backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Backup]]:
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    made: list[Backup] = []

    def make(**kw: Any) -> Backup:
        b = Backup(tmp_path, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


def all_converge(b: Backup, which: list[int], timeout: float = 60) -> None:
    for i in which:
        until(lambda i=i: b.converged(i), f"r{i} to hold every write durable", timeout)
        assert b.equal(i), f"the image of r{i} differs from its source"


def test_four_sources_stream_onto_one_backup_node_at_once(backup: Callable[..., Backup]) -> None:
    b = backup()
    four = [0, 1, 2, 3]
    all_converge(b, four)  # four full syncs, side by side
    # the four sessions are up together, each in its own thread
    assert [r["connection"] for r in b.vault.status()["resources"]] == ["connected"] * 4
    threads = {t.name for t in threading.enumerate()}
    for i in four:
        assert any(n.startswith(f"conn-r{i}-") for n in threads), threads

    samples = b.write_at_once(four, 3.0)
    # served at once: in some tenth of a second, every resource received bytes
    grew = [[now[i] > before[i] for i in four] for before, now in itertools.pairwise(samples)]
    assert any(all(g) for g in grew), grew
    all_converge(b, four)
    for i in four:
        st = b.vault_status(i)
        assert (st["state"], st["disk"], st["source"], st["last_error"]) == (
            "streaming", "UpToDate", f"src{i}", None), st
        assert st["bytes_received"] > SIZE  # the full sync, and the writes after it
        assert b.link(i).status()["last_error"] is None


def test_a_hung_source_holds_up_no_other_resource(backup: Callable[..., Backup]) -> None:
    """r0..r3 have live sources; r4's source is this test: it handshakes, sends one resync
    chunk and the first bytes of a frame, then nothing. Every port also gets connections that
    never say anything, up to the handshake bound on r0's."""
    b = backup(played=1)
    four = [0, 1, 2, 3]
    all_converge(b, four)

    hung = socket.create_connection((VAULT, b.ports[4]), timeout=5)
    conn = P.FramedConnection(hung)
    me = P.HandshakeInfo("r4", "src4", P.Role.SOURCE, SIZE, CHUNK, P.Generations(7))
    P.handshake(conn, me, SECRET.encode(), P.Expect(frozenset({"vault"})), timeout=5)
    P.receive_out_of_sync(conn, SIZE // CHUNK // 8)
    conn.send_message(P.ResyncChunk(0, os.urandom(CHUNK)))
    hung.sendall(b"RPL1\x00")  # a frame begun, never finished
    silent = [socket.create_connection((VAULT, port)) for port in b.ports]
    silent += [socket.create_connection((VAULT, b.ports[0]))
               for _ in range(MAX_PENDING_HANDSHAKES)]  # r0's handshakes: all taken, and more
    opened = time.monotonic()
    try:
        until(lambda: b.vault_status(4)["state"] == "syncing", "r4 to be in its resync")
        b.write_at_once(four, 2.0)
        all_converge(b, four)  # while r4 hangs and every port holds a silent connection

        st = b.vault_status(4)
        assert (st["connection"], st["state"], st["source"]) == ("connected", "syncing", "src4")
        # the rule per resource stands: one source session at a time, a second one is BUSY
        with (socket.create_connection((VAULT, b.ports[4]), timeout=5) as s2,
              pytest.raises(HandshakeRefused) as refused):
            P.handshake(P.FramedConnection(s2), me, SECRET.encode(),
                        P.Expect(frozenset({"vault"})), timeout=5)
        assert refused.value.reason == P.RefuseReason.BUSY

        # the silent ones are closed at the handshake's deadline, not before, and not never
        for s in silent:
            s.settimeout(max(P.HANDSHAKE_TIMEOUT + 10 - (time.monotonic() - opened), 0.1))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - opened >= P.HANDSHAKE_TIMEOUT - 1
        until(lambda: all(b.replica(i).listener.pending == 0 for i in range(5)),
              "every pending handshake to be over")
        assert all(b.converged(i) for i in four)
    finally:
        for s in silent:
            s.close()
        conn.close()
    until(lambda: b.vault_status(4)["connection"] == "waiting", "r4's session to end")


class FullFileSystem:
    """`os` as repctl.store sees it, with the file system under one image full: a pwrite to
    that file fails with ENOSPC, as on a real one (a sparse image takes blocks as it is
    written). Every other call, and every other file, is the real `os`."""

    def __init__(self, real: ModuleType, fd: int) -> None:
        self._real, self.fd, self.full = real, fd, True

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self.full and fd == self.fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return int(self._real.pwrite(fd, data, offset))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_full_image_fails_its_resource_only_and_heals(
        backup: Callable[..., Backup], monkeypatch: pytest.MonkeyPatch) -> None:
    b = backup()
    four, others = [0, 1, 2, 3], [0, 1, 3]
    all_converge(b, four)
    store = b.replica(2).store
    assert store is not None
    fs = FullFileSystem(os, store.fd)
    monkeypatch.setattr(store_module, "os", fs)
    events = b.vault.subscribe()

    b.write_at_once(four, 2.0)
    until(lambda: b.vault_status(2)["state"] == "failed", "r2 to fail on vault")
    failed_at = time.monotonic()
    all_converge(b, others)  # the three others go on, and converge

    st = b.vault_status(2)
    assert "No space left on device" in st["last_error"], st
    assert str(b.images[2]) in st["last_error"], st
    for i in others:
        st = b.vault_status(i)
        assert (st["state"], st["last_error"]) == ("streaming", None), st
    # the source says why too: the target reported it before it closed the session
    until(lambda: "No space left on device" in (b.link(2).last_error or ""),
          "r2's source to say why its session ended")
    assert not b.converged(2)
    # the source tries again, later each time: a few sessions, not a loop as fast as they fail
    time.sleep(3)
    tries = 0
    while not events.empty():
        e = events.get_nowait()
        tries += (e["resource"], e["what"], e.get("new")) == ("r2", "connection", "connected")
    assert 1 <= tries <= time.monotonic() - failed_at + 1, tries
    b.vault.unsubscribe(events)

    fs.full = False  # room again: the source's next session resyncs what vault lacks
    all_converge(b, four)
    st = b.vault_status(2)
    assert (st["state"], st["disk"], st["last_error"]) == ("streaming", "UpToDate", None), st
    assert b.link(2).status()["last_error"] is None
