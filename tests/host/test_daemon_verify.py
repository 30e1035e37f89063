"""The daemon's verify reports its progress in `status` while it runs.

A real SourceResource over a sparse file (no device-mapper: `start` is never called), with a
fake consumer and a fake connection to the target that answers checksum requests one at a time,
when the test lets it.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from repctl import protocol as P
from repctl.config import load_config
from repctl.daemon import Daemon, SourceResource
from repctl.daemon.state import LinkState
from repctl.errors import ReplError
from repctl.hooks import Executor, HookEvent

CHUNK = 4096
NR_CHUNKS = 2 * 4096 + 100  # three checksum requests of at most 4096 chunks
BAD = {5, 4200, 8200}  # chunks that differ on the target


class FakeTarget:
    """The connection to the target: answers PING at once and each CSUM_REQUEST when allowed."""

    codec = P.Codec.NONE  # as a FramedConnection that negotiated no compression

    def __init__(self, link: Any) -> None:
        self.link = link
        self.allow: queue.Queue[None] = queue.Queue()
        self.requests: list[P.CsumRequest] = []
        self.zero = P.DigestAlgorithm.BLAKE2B_256.digest(bytes(CHUNK))
        self.other = P.DigestAlgorithm.BLAKE2B_256.digest(b"x" * CHUNK)

    def send_message(self, msg: Any) -> None:
        if isinstance(msg, P.Ping):
            self.link.pongs.pop(msg.token).set()
        elif isinstance(msg, P.CsumRequest):
            self.requests.append(msg)
            self.allow.get(timeout=10)
            chunks = range(msg.first, msg.first + msg.count)
            digests = tuple(self.other if c in BAD else self.zero for c in chunks)
            self.link.csum_replies.put(P.CsumReply(msg.first, digests, msg.algorithm))


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[SourceResource, FakeTarget]]:
    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.truncate(NR_CHUNKS * CHUNK)
    secret = tmp_path / "secret"
    secret.write_text("test-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    cfg = tmp_path / "repctl.yaml"
    cfg.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp_path / "s.sock"), "state_dir": str(tmp_path / "st"),
                   "secret_file": str(secret)},
        "resources": {"r0": {
            "port": 7789, "source": "alpha",
            "nodes": {"alpha": {"address": "10.0.0.1", "device": str(data),
                                "metadata": str(tmp_path / "md.img")},
                      "beta": {"address": "10.0.0.2", "device": "/dev/vg0/r0"}},
            "targets": {"beta": {"mode": "sync"}},
        }},
    }))
    config = load_config(cfg)
    res = SourceResource(Daemon(config, "alpha"), config.resource("r0"))
    res.consumer = SimpleNamespace(state=lambda: SimpleNamespace(published=0, events=0))  # type: ignore[assignment]
    res.read_fd = os.open(data, os.O_RDONLY)
    link = res.link("beta")
    target = FakeTarget(link)
    link.conn, link.state = target, LinkState.STREAMING  # type: ignore[assignment]
    try:
        yield res, target
    finally:
        os.close(res.read_fd)


def verify_of(res: SourceResource) -> Any:
    (beta,) = res.status()["targets"]
    return beta["verify"]


def wait_until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_verify_progress_is_in_status_while_it_runs(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    res, target = source
    assert verify_of(res) is None
    (beta,) = res.status()["targets"]
    assert beta["admin"] == "up"
    started = time.time()
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(res.verify("beta")), daemon=True)
    worker.start()

    wait_until(lambda: len(target.requests) == 1, "the first checksum request")
    v = verify_of(res)
    assert v["pass"] == 1 and v["done_chunks"] == 0 and v["total_chunks"] == NR_CHUNKS
    assert v["chunk_size"] == CHUNK and v["differing_chunks"] == 0
    assert started - 1 <= v["started"] <= time.time()
    assert v["rate_cps"] == 0.0 and v["eta_s"] is None  # nothing compared yet: no estimate

    target.allow.put(None)
    wait_until(lambda: len(target.requests) == 2, "the second checksum request")
    v = verify_of(res)
    assert v["done_chunks"] == 4096 and v["differing_chunks"] == 1
    assert v["rate_cps"] > 0 and v["eta_s"] == pytest.approx(
        (NR_CHUNKS - 4096) / v["rate_cps"], rel=0.5)

    target.allow.put(None)
    wait_until(lambda: len(target.requests) == 3, "the third checksum request")
    assert verify_of(res)["done_chunks"] == 8192

    target.allow.put(None)  # the last of pass 1; pass 2 re-checks the 3 differing chunks
    wait_until(lambda: len(target.requests) == 4, "pass 2")
    v = verify_of(res)
    assert v["pass"] == 2 and v["total_chunks"] == len(BAD) and v["done_chunks"] == 0
    for _ in BAD:  # one request per run of consecutive chunks: none are adjacent
        target.allow.put(None)
    worker.join(10)
    assert not worker.is_alive()
    assert result["differing"] == sorted(BAD) and result["chunks"] == NR_CHUNKS
    assert verify_of(res) is None  # done: no verify object any more


def test_a_second_verify_of_the_same_target_is_refused(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    res, target = source
    worker = threading.Thread(target=res.verify, args=("beta",), daemon=True)
    worker.start()
    wait_until(lambda: target.requests, "the first checksum request")
    with pytest.raises(ReplError, match="r0/beta: a verify is already running"):
        res.verify("beta")
    assert verify_of(res)["pass"] == 1  # the running one is untouched
    for _ in range(3 + len(BAD)):
        target.allow.put(None)
    worker.join(10)
    assert not worker.is_alive() and verify_of(res) is None


def test_a_failed_verify_leaves_no_progress_behind(
    source: tuple[SourceResource, FakeTarget], monkeypatch: pytest.MonkeyPatch,
) -> None:
    res, _ = source

    def broken(run: range, buf: Any = None) -> bytes:
        raise ReplError("/dev/mapper/r0: short read at 0")

    monkeypatch.setattr(res, "read_chunks", broken)
    target = res.link("beta").conn
    threading.Thread(target=lambda: target.allow.put(None), daemon=True).start()
    with pytest.raises(ReplError, match="short read"):
        res.verify("beta")
    assert verify_of(res) is None


def test_a_stale_checksum_reply_is_not_taken_for_ours(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    res, target = source
    link = res.link("beta")
    # an earlier verify gave up waiting; its reply ("all of 0..4095 identical") came later
    link.csum_replies.put(P.CsumReply(0, (target.zero,) * 4096, P.DigestAlgorithm.BLAKE2B_256))
    # and one arrives during this verify, for chunks nobody asked for now
    orig = target.send_message

    def with_stale(msg: Any) -> None:
        if isinstance(msg, P.CsumRequest) and msg.first == 4096:
            link.csum_replies.put(P.CsumReply(7, (target.zero,), P.DigestAlgorithm.BLAKE2B_256))
        orig(msg)

    target.send_message = with_stale  # type: ignore[method-assign]
    for _ in range(3 + len(BAD)):
        target.allow.put(None)
    result = res.verify("beta")
    assert result["differing"] == sorted(BAD)


def test_a_short_checksum_reply_fails_the_verify(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    res, target = source
    link = res.link("beta")

    def short(msg: Any) -> None:
        if isinstance(msg, P.Ping):
            link.pongs.pop(msg.token).set()
        elif isinstance(msg, P.CsumRequest):  # one digest fewer than asked: chunk 4095 unchecked
            link.csum_replies.put(P.CsumReply(msg.first, (target.zero,) * (msg.count - 1), msg.algorithm))

    target.send_message = short  # type: ignore[method-assign]
    with pytest.raises(ReplError, match=r"checksum reply for chunks 0\+4096 has 4095 digests"):
        res.verify("beta")
    assert verify_of(res) is None


def test_differing_chunks_run_the_out_of_sync_hook(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    res, target = source
    res.cfg = dataclasses.replace(res.cfg, hooks={HookEvent.OUT_OF_SYNC: (("/usr/bin/notify",),)})
    res.daemon.executor = Executor(dry_run=True)
    for _ in range(6):  # three requests in pass 1, three in pass 2 (the chunks are not adjacent)
        target.allow.put(None)
    assert res.verify("beta")["differing"] == sorted(BAD)
    (step,) = res.daemon.executor.planned
    assert str(step) == "r0: out-of-sync hook: /usr/bin/notify"
    assert step.env["REPCTL_OUT_OF_SYNC_CHUNKS"] == "3" and step.env["REPCTL_PEER"] == "beta"


def test_a_resync_by_checksums_sends_only_the_differing_chunks(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    """A target that holds our data but not the generation the bitmap was kept against (a node
    that followed another primary): every chunk is compared, only BAD ones travel, each run of
    adjacent differing chunks in one frame."""
    res, target = source
    link = res.link("beta")
    sent: list[P.Message] = []
    real = target.send_message

    def send(msg: Any) -> None:
        sent.append(msg)
        if isinstance(msg, P.CsumRequest):
            target.allow.put(None)
        real(msg)

    target.send_message = send  # type: ignore[method-assign]
    buf = res.resync_buffer()
    compared = 0
    for run in [range(0, 256), range(4096, 4352), range(8192, NR_CHUNKS)]:
        compared += link._send_differing(target, run, buf)  # type: ignore[arg-type]
    chunks = [m for m in sent if isinstance(m, P.ResyncChunk)]
    assert [(m.chunk, len(m.data)) for m in chunks] == [(5, CHUNK), (4200, CHUNK), (8200, CHUNK)]
    assert compared == (256 + 256 + NR_CHUNKS - 8192) * CHUNK
    assert link.bytes_sent == 3 * CHUNK


def test_cancel_stops_the_verify_at_the_next_chunk_boundary(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    """`repctl verify` on Ctrl-C sends cancel_verify: the daemon takes the answer to the request
    in flight (nothing stale is left for the next verify), sends no other, runs no hook, and
    answers once the verify has stopped."""
    res, target = source
    res.cfg = dataclasses.replace(res.cfg, hooks={HookEvent.OUT_OF_SYNC: (("/usr/bin/notify",),)})
    res.daemon.executor = Executor(dry_run=True)
    daemon = res.daemon
    daemon.resources["r0"] = res  # as if up: the control socket's path goes through the Daemon
    outcome: dict[str, Any] = {}

    def verify() -> None:
        try:
            outcome["result"] = daemon.verify("r0", "beta")
        except ReplError as e:
            outcome["error"] = e

    worker = threading.Thread(target=verify, daemon=True)
    worker.start()
    wait_until(lambda: len(target.requests) == 1, "the first checksum request")
    answer: dict[str, str] = {}
    canceller = threading.Thread(
        target=lambda: answer.update(text=daemon.cancel_verify("r0", "beta")), daemon=True)
    canceller.start()
    wait_until(lambda: res.verifying["beta"].cancelled.is_set(), "the cancel request")
    time.sleep(0.1)
    assert canceller.is_alive(), "the answer waits until the verify has stopped"
    assert verify_of(res) is not None
    target.allow.put(None)  # the answer to the request in flight (it has chunk 5, differing)
    canceller.join(10)
    worker.join(10)
    assert not worker.is_alive() and not canceller.is_alive()
    assert answer["text"] == "r0/beta: verify cancelled"
    assert str(outcome["error"]) == "r0/beta: verify cancelled" and "result" not in outcome
    assert len(target.requests) == 1, "no request after the cancel"
    assert res.link("beta").csum_replies.empty()
    assert verify_of(res) is None
    assert res.daemon.executor.planned == [], "a cancelled verify runs no out-of-sync hook"
    with pytest.raises(ReplError, match=r"^r0/beta: no verify is running$"):
        daemon.cancel_verify("r0", "beta")
    with pytest.raises(ReplError, match=r"has no target 'delta' \(targets: beta\)"):
        daemon.cancel_verify("r0", "delta")
    # and the next verify runs whole
    for _ in range(3 + len(BAD)):
        target.allow.put(None)
    assert daemon.verify("r0", "beta")["differing"] == sorted(BAD)


def test_a_cancel_during_the_pause_between_passes(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    res, target = source
    for _ in range(3):  # pass 1 only
        target.allow.put(None)
    outcome: dict[str, Any] = {}

    def verify() -> None:
        try:
            outcome["result"] = res.verify("beta")
        except ReplError as e:
            outcome["error"] = e

    worker = threading.Thread(target=verify, daemon=True)
    worker.start()
    wait_until(lambda: len(target.requests) == 3 and verify_of(res)["done_chunks"] == NR_CHUNKS,
               "the end of pass 1")
    started = time.monotonic()
    assert res.cancel_verify("beta") == "r0/beta: verify cancelled"
    assert time.monotonic() - started < 0.4, "the pause between the passes is cut short"
    worker.join(10)
    assert str(outcome["error"]) == "r0/beta: verify cancelled"
    assert len(target.requests) == 3, "pass 2 never started"


def test_the_status_document_is_versioned_and_an_unknown_resource_explained(
    source: tuple[SourceResource, FakeTarget],
) -> None:
    res, _ = source
    daemon = res.daemon
    assert daemon.status() == {"version": 1, "node": "alpha", "resources": []}
    daemon.resources["r0"] = res
    doc = daemon.status()
    assert doc["version"] == 1 and [r["name"] for r in doc["resources"]] == ["r0"]
    with pytest.raises(ReplError) as exc:
        daemon.pause("nope")
    assert str(exc.value) == (f"unknown resource 'nope': {daemon.config.file} has r0; check "
                              "the name (`repctl status` lists those up on this node)")
