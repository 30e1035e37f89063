"""`repctl verify --repair`: the chunks a verify finds different are marked out of sync for that
target only, durably before the answer, and resynced from the source (docs/cli.md).

Live daemons in this process, as in test_metrics.py and test_compression.py: alpha, the primary,
a real `Daemon` and `SourceResource` whose kernel consumer is an in-memory ring (fakering), and
beta (sync) and gamma (async), real target daemons writing into image files. The targets' images
are corrupted behind their daemons' backs; the checksums over the wire find it. Traffic only on
loopback addresses.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from repctl import cli
from repctl.config import load_config
from repctl.daemon import Daemon, SourceResource
from repctl.daemon.link import Link
from repctl.daemon.state import Event, LinkState
from repctl.errors import ReplError
from repctl.oos import OOSBitmap
from test_metrics import ALPHA, BETA, CHUNK, SIZE, start_without_device_mapper, until
from typer.testing import CliRunner

SECRET = "test-secret-0123456789abcdef"
GAMMA = "127.0.0.4"
NR_CHUNKS = SIZE // CHUNK
BAD = [3, 4, 5, 200, NR_CHUNKS - 1]  # a run of three, one alone, the last chunk


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path) -> Path:
    secret = tmp / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    data = bytearray(os.urandom(SIZE))
    (tmp / "data.img").write_bytes(data)
    for name in ("beta.img", "gamma.img"):
        with open(tmp / name, "wb") as f:
            f.truncate(SIZE)
    path = tmp / "repctl.yaml"
    path.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp / "s.sock"), "state_dir": str(tmp / "st"),
                   "secret_file": str(secret)},
        "resources": {"r0": {
            "port": free_port(BETA), "source": "alpha", "chunk_size": CHUNK,
            "nodes": {"alpha": {"address": ALPHA, "device": str(tmp / "data.img"),
                                "metadata": str(tmp / "md.img")},
                      "beta": {"address": BETA, "device": str(tmp / "beta.img")},
                      "gamma": {"address": GAMMA, "device": str(tmp / "gamma.img")}},
            "targets": {"beta": {"mode": "sync"}, "gamma": {"mode": "async"}},
        }},
    }))
    return path


class Cluster:
    """alpha and its two targets, live; `restart_alpha` stands for a new daemon process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = load_config(write_config(tmp))
        self.targets = {n: Daemon(self.config, n) for n in ("beta", "gamma")}
        for d in self.targets.values():
            d.start()
        self.alpha: Daemon | None = None
        self.start_alpha()

    def start_alpha(self) -> None:
        self.alpha = Daemon(self.config, "alpha")
        self.alpha.start()
        assert not self.alpha.failed, self.alpha.failed
        self.src = self.alpha.resources["r0"]
        assert isinstance(self.src, SourceResource)
        self.ring = self.src.consumer
        for name in ("beta", "gamma"):
            link = self.src.link(name)
            until(lambda link=link: link.state is LinkState.STREAMING, f"{name} to stream")

    def stop_alpha(self) -> None:
        assert self.alpha is not None
        self.alpha.stop()
        self.alpha = None

    def stop(self) -> None:
        if self.alpha is not None:
            self.alpha.stop()
        for d in self.targets.values():
            d.stop()

    def image(self, name: str) -> bytes:
        return (self.tmp / f"{name}.img").read_bytes()

    def corrupt(self, name: str, chunks: list[int]) -> None:
        """Overwrite `chunks` of the target's image behind its daemon's back."""
        with open(self.tmp / f"{name}.img", "r+b") as f:
            for c in chunks:
                f.seek(c * CHUNK)
                f.write(bytes([0xA5 ^ (c & 0xFF)]) * CHUNK)

    def chunks_differing(self, name: str) -> list[int]:
        mine, theirs = self.image("data"), self.image(name)
        return [c for c in range(NR_CHUNKS)
                if mine[c * CHUNK:(c + 1) * CHUNK] != theirs[c * CHUNK:(c + 1) * CHUNK]]

    def oos_on_disk(self, name: str) -> list[int]:
        """The chunks set in the target's OOS file as it is on disk now."""
        bits = (self.tmp / "st" / "r0" / f"{name}.oos").read_bytes()
        return [c for c in range(NR_CHUNKS) if bits[c >> 3] >> (c & 7) & 1]


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def write_some(c: Cluster) -> None:
    """A few records through the ring, held durable by both targets."""
    for i in range(8):
        c.ring.write(i * 24, os.urandom(2 * CHUNK))
    for name in ("beta", "gamma"):
        link = c.src.link(name)
        until(lambda link=link: link.durable >= c.ring.next_seq - 1, f"{name} to hold the writes")


def test_repair_resyncs_only_the_differing_chunks_of_that_target(cluster: Cluster) -> None:
    c = cluster
    write_some(c)
    assert c.image("beta") == c.image("data") == c.image("gamma")
    c.corrupt("beta", BAD)
    c.corrupt("gamma", [7])
    beta, gamma = c.src.link("beta"), c.src.link("gamma")
    events = c.alpha.events.subscribe()  # type: ignore[union-attr]
    before = {n: c.src.link(n).resync_bytes for n in ("beta", "gamma")}
    data = c.image("data")

    result = c.src.verify("beta", repair=True)
    assert result["differing"] == BAD and result["marked_out_of_sync"] == len(BAD)
    until(lambda: beta.state is LinkState.STREAMING and beta.oos.count() == 0,
          "beta's repair to end")
    assert c.image("beta") == data, "beta was repaired"
    assert c.image("data") == data, "the source is untouched"
    # only the differing chunks travelled, and only to beta
    assert beta.resync_bytes - before["beta"] == len(BAD) * CHUNK
    assert gamma.resync_bytes == before["gamma"] and gamma.oos.count() == 0
    assert c.chunks_differing("gamma") == [7], "gamma keeps its difference: not verified"
    # the resync showed as any resync: syncing, its progress to 100 %, streaming again
    seen = []
    while True:
        try:
            seen.append(events.get_nowait())
        except queue.Empty:
            break
    mine = [e for e in seen if e.get("target") == "beta"]
    states = [(e["old"], e["new"]) for e in mine if e["what"] == Event.STATE]
    assert states == [("streaming", "syncing"), ("syncing", "streaming")], states
    assert "verify --repair" in next(e["text"] for e in mine if e["what"] == Event.STATE)
    final = [e for e in mine if e["what"] == Event.PROGRESS][-1]
    assert final["percent"] == 100.0 and final["done_bytes"] == len(BAD) * CHUNK
    # a second verify finds nothing
    again = c.src.verify("beta")
    assert again["differing"] == [] and "marked_out_of_sync" not in again
    # nor does the same with --repair: nothing to mark, no resync
    assert c.src.verify("beta", repair=True)["marked_out_of_sync"] == 0
    assert beta.state is LinkState.STREAMING
    assert beta.resync_bytes - before["beta"] == len(BAD) * CHUNK


def test_without_repair_nothing_changes_on_either_side(cluster: Cluster) -> None:
    c = cluster
    write_some(c)
    c.corrupt("beta", BAD)
    beta = c.src.link("beta")
    data, corrupt = c.image("data"), c.image("beta")
    sent = beta.bytes_sent
    result = c.src.verify("beta")
    assert result["differing"] == BAD and "marked_out_of_sync" not in result
    assert beta.oos.count() == 0 and c.oos_on_disk("beta") == []
    assert beta.state is LinkState.STREAMING and beta.bytes_sent == sent
    assert c.image("beta") == corrupt and c.image("data") == data
    assert c.src.verify("beta")["differing"] == BAD  # still there: reported, not repaired


def test_the_marks_are_durable_before_the_answer_and_survive_a_restart(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender never gets to the repair (it stands for a daemon killed right after the
    answer): the OOS file on disk has the chunks, and the next daemon resyncs them."""
    c = cluster
    write_some(c)
    c.corrupt("beta", BAD)
    monkeypatch.setattr(Link, "_repair", lambda self, s: None)
    result = c.src.verify("beta", repair=True)
    assert result["marked_out_of_sync"] == len(BAD)
    assert c.oos_on_disk("beta") == BAD  # on disk when the answer came
    assert c.oos_on_disk("gamma") == []  # for that target only
    assert c.chunks_differing("beta") == BAD
    c.stop_alpha()
    # a file that a crash left: as it was at the answer (stop saved it again, the same bits)
    assert OOSBitmap(c.tmp / "st" / "r0" / "beta.oos", NR_CHUNKS).count() == len(BAD)
    monkeypatch.undo()
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    c.start_alpha()  # beta's resync of the marked chunks comes with its admission
    beta = c.src.link("beta")
    until(lambda: beta.oos.count() == 0, "beta's resync after the restart")
    assert beta.resync_bytes == len(BAD) * CHUNK  # a new daemon counts from 0
    assert c.chunks_differing("beta") == []
    assert c.src.verify("beta")["differing"] == []


def test_repair_refuses_what_it_cannot_do_and_changes_nothing(cluster: Cluster) -> None:
    c = cluster
    write_some(c)
    c.corrupt("beta", BAD)
    beta = c.src.link("beta")
    with pytest.raises(ReplError, match="resource r0 has no target 'delta'"):
        c.src.verify("delta", repair=True)
    c.alpha.pause("r0", "beta")  # type: ignore[union-attr]
    until(lambda: beta.state is LinkState.PAUSED, "beta paused")
    with pytest.raises(ReplError, match=r"r0/beta: not streaming \(paused\): cannot verify "
                                         "and repair now"):
        c.src.verify("beta", repair=True)
    assert beta.oos.count() == 0 and c.oos_on_disk("beta") == []
    assert c.chunks_differing("beta") == BAD


def test_repair_while_a_verify_runs_is_refused(cluster: Cluster,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster
    write_some(c)
    c.corrupt("beta", BAD)
    beta = c.src.link("beta")
    first_read, go = threading.Event(), threading.Event()
    real = c.src.read_chunks

    def slow(run: range, buf: Any = None) -> Any:
        first_read.set()
        go.wait(10)
        return real(run, buf)

    monkeypatch.setattr(c.src, "read_chunks", slow)
    out: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: out.update(c.src.verify("beta")), daemon=True)
    worker.start()
    assert first_read.wait(10)
    with pytest.raises(ReplError, match="r0/beta: a verify is already running"):
        c.src.verify("beta", repair=True)
    go.set()
    worker.join(20)
    assert out["differing"] == BAD
    assert beta.oos.count() == 0 and c.chunks_differing("beta") == BAD


def test_the_cli_repairs_and_waits(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """`repctl verify --repair --wait` over the control socket of the live daemon."""
    from repctl.control import ControlServer

    c = cluster
    write_some(c)
    c.corrupt("beta", BAD)
    monkeypatch.setattr(cli, "POLL_INTERVAL", 0.05)
    server = ControlServer(c.config.global_.control_socket, c.alpha)
    server.start()
    try:
        runner = CliRunner()
        args = ["-c", str(c.tmp / "repctl.yaml"), "verify", "r0", "beta", "--repair"]
        result = runner.invoke(cli.app, [*args, "--wait", "--timeout", "60"])
        assert result.exit_code == cli.EXIT_DIFFERS, result.output
        lines = result.stdout.splitlines()
        assert lines[0] == f"r0/beta: {len(BAD)} of {NR_CHUNKS} chunks differ"
        assert lines[-2:] == [f"r0/beta: {len(BAD)} chunks marked out of sync: repairing",
                              "r0/beta: repaired, streaming"], result.stdout
        assert c.chunks_differing("beta") == []
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"r0/beta: identical ({NR_CHUNKS} chunks compared)\n"
    finally:
        server.stop()


def test_the_bitmap_marks_chunks_and_voids_clears_in_flight(tmp_path: Path) -> None:
    oos = OOSBitmap(tmp_path / "b.oos", 100)
    epoch = oos.epoch
    assert oos.mark([1, 2, 99, 100, -1]) == 3  # past the end: no chunks
    assert oos.count() == 3 and oos.epoch == epoch + 1
    assert not oos.clear(range(0, 100), epoch), "a clear computed before the marks is void"
    assert oos.mark([1, 2]) == 0 and oos.epoch == epoch + 1  # nothing new: nothing voided
    oos.save()
    again = OOSBitmap(tmp_path / "b.oos", 100)
    assert list(again.runs(100)) == [range(1, 3), range(99, 100)]


def test_a_bitmap_that_cannot_be_saved_fails_the_repair_clearly(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster
    write_some(c)
    c.corrupt("beta", BAD)
    beta = c.src.link("beta")

    def broken() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(beta.oos, "save", broken)
    with pytest.raises(ReplError, match=r"r0/beta: 5 chunks differ, but marking them out of "
                                        r"sync failed: .*Input/output error"):
        c.src.verify("beta", repair=True)
    assert c.src.status()["targets"][0]["verify"] is None  # no verify left running
    monkeypatch.undo()  # the daemon's stop saves the bitmap
