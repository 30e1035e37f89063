"""Issue 10: the data-safety defects of the daemon, each shown on the real daemon code.

The target side runs for real: a TargetResource listening on a loopback address over an image
file, and the test plays the source with the protocol module (a genuine handshake, then frames).
The source side (which needs device-mapper for `start`) is a real SourceResource over a sparse
file with its kernel consumer replaced by a fake, as in test_daemon_verify.py.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from repctl import daemon as D
from repctl.daemon import base as B
from repctl.daemon import source as S
from repctl.daemon import target as T
from repctl.daemon.state import Admin, LinkState
from repctl import protocol as P
from repctl import statefile
from repctl.config import load_config
from repctl.errors import HandshakeRefused, ProtocolError, ReplError
from repctl.oos import OOSBitmap

CHUNK = 4096
SIZE = 4 << 20
SECRET = "test-secret-0123456789abcdef"
SRC_ADDR, TGT_ADDR = "127.0.0.2", "127.0.0.3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((TGT_ADDR, 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, *, data_size: int = SIZE, target_size: int = SIZE,
                 chunk: int = CHUNK, target: dict[str, Any] | None = None,
                 beta_metadata: bool = False, resource: dict[str, Any] | None = None) -> Any:
    data, image = tmp / "data.img", tmp / "replica.img"
    for path, size in ((data, data_size), (image, target_size)):
        with open(path, "wb") as f:
            f.truncate(size)
    secret = tmp / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    cfg = tmp / "repctl.yaml"
    cfg.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp / "s.sock"), "state_dir": str(tmp / "st"),
                   "secret_file": str(secret)},
        "resources": {"r0": {
            "port": free_port(), "source": "alpha", "chunk_size": chunk,
            "nodes": {"alpha": {"address": SRC_ADDR, "device": str(data),
                                "metadata": str(tmp / "md.img")},
                      "beta": {"address": TGT_ADDR, "device": str(image),
                               **({"metadata": str(tmp / "beta-md.img")} if beta_metadata
                                  else {})}},
            "targets": {"beta": target or {"mode": "sync"}},
            **(resource or {}),
        }},
    }))
    return load_config(cfg)


# ---------------------------------------------------------------------------- the target side


class Target:
    """A running TargetResource and a way to connect to it as its source."""

    def __init__(self, tmp: Path, **kw: Any) -> None:
        self.config = write_config(tmp, **kw)
        self.cfg = self.config.resource("r0")
        self.res = D.TargetResource(D.Daemon(self.config, "beta"), self.cfg)
        self.res.start()

    def connect(self, *, gens: P.Generations = P.Generations(7)) -> P.FramedConnection:
        sock = socket.create_connection((TGT_ADDR, self.cfg.port), timeout=5)
        conn = P.FramedConnection(sock)
        local = P.HandshakeInfo("r0", "alpha", P.Role.SOURCE, SIZE, self.cfg.chunk_size, gens)
        P.handshake(conn, local, SECRET.encode(), P.Expect(frozenset({"beta"})), timeout=5)
        self.report = P.receive_out_of_sync(conn, SIZE // self.cfg.chunk_size // 8)
        return conn

    def stop(self) -> None:
        self.res.stop()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(tmp_path)
    yield t
    t.stop()


def until(cond: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_an_ack_never_speaks_of_an_earlier_connection(target: Target) -> None:
    """Item 1: after a reconnect (the source's kernel restarts its sequence at 1 after
    down/up or a reboot), a PAUSE used to be answered with Ack(last seq of the old connection,
    durable), which released writers and cleared bits for writes the target never got."""
    conn = target.connect()
    for seq in (1, 2, 3):
        conn.send_message(P.write_record(seq, seq * 8, b"d" * 4096))
    while conn.recv_message() != P.Ack(3, durable=True):
        pass  # the target has records 1-3 durable, and says so
    conn.close()
    until(lambda: target.res.conn is None, "the target to see the first connection end")

    conn = target.connect()
    conn.send_message(P.Pause())
    conn.send_message(P.Ping(2))
    after = []
    while not isinstance(m := conn.recv_message(), P.Pong):
        after.append(m)
    assert not [m for m in after if isinstance(m, P.Ack)], after
    conn.close()


def test_a_ping_says_that_records_acked_before_are_durable_now(target: Target) -> None:
    """Records acknowledged as not yet durable (more frames were waiting), then a PING: the
    target flushes for the PING, so it must also acknowledge those records as durable. It used
    to answer with the PONG only: a sync writer waited for the next record's flush, or for its
    sync_timeout when none came."""
    conn = target.connect()
    # records and the PING in one go (corked): while frames wait, the target defers its flush
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    for seq in (1, 2, 3):
        conn.send_message(P.write_record(seq, seq * 8, b"d" * 4096))
    conn.send_message(P.Ping(5))
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    before = []
    while not isinstance(m := conn.recv_message(), P.Pong):
        before.append(m)
    assert P.Ack(3, durable=True) in before, before
    conn.close()


def test_records_out_of_order_end_the_connection(target: Target) -> None:
    conn = target.connect()
    conn.send_message(P.write_record(5, 0, b"a" * 512))
    conn.send_message(P.write_record(5, 8, b"b" * 512))
    with pytest.raises((ProtocolError, OSError)):
        for _ in range(3):
            conn.recv_message()
    until(lambda: target.res.conn is None, "the connection to end")
    assert "ring order" in str(target.res.last_error)


def test_a_trickling_client_does_not_lock_out_the_source(target: Target) -> None:
    """Item 4: a client sending a byte every 0.5 s held the accept thread (the handshake ran in
    it, with a per-recv timeout): the source could not connect."""
    slow = socket.create_connection((TGT_ADDR, target.cfg.port))
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            try:
                slow.send(b"R")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        conn = target.connect()  # within its 5 s handshake timeout
        assert time.monotonic() - t0 < 4
        conn.close()
    finally:
        stop.set()
        slow.close()


def test_a_second_source_connection_is_refused_busy(target: Target) -> None:
    first = target.connect()
    until(lambda: target.res.conn is not None, "the first connection to be served")
    with pytest.raises(HandshakeRefused) as err:
        target.connect()
    assert err.value.reason == P.RefuseReason.BUSY and err.value.remote
    assert "already connected to its primary alpha" in err.value.text
    first.send_message(P.Ping(9))
    assert first.recv_message() == P.Pong(9, 0)  # the first one is untouched
    first.close()


def test_a_flood_of_unauthenticated_connections_is_shed(target: Target) -> None:
    socks = [socket.create_connection((TGT_ADDR, target.cfg.port)) for _ in range(20)]
    try:
        until(lambda: target.res.listener.pending <= B.MAX_PENDING_HANDSHAKES, "pending handshakes capped")
        assert target.res.listener.pending <= B.MAX_PENDING_HANDSHAKES
    finally:
        for s in socks:
            s.close()
    until(lambda: target.res.listener.pending == 0, "the shed and closed connections to be gone")
    target.connect().close()


def test_a_huge_checksum_request_is_refused_and_the_target_goes_on(tmp_path: Path) -> None:
    """Item 5: CSUM_REQUEST for 524287 chunks of 1 MiB asked the target to read 512 GiB at
    once; the MemoryError killed the listener thread, and the target never accepted again."""
    t = Target(tmp_path, target_size=1 << 40, chunk=1 << 20)  # a sparse 1 TiB image
    try:
        conn = t.connect()
        conn.send_message(P.CsumRequest(0, P.MAX_CSUM_CHUNKS))
        with pytest.raises((ProtocolError, OSError)):
            conn.recv_message()
        until(lambda: t.res.conn is None, "the connection to end")
        assert "at most 67108864 bytes per request" in str(t.res.last_error)
        conn = t.connect()  # the target still accepts
        conn.send_message(P.CsumRequest(0, 64))  # 64 MiB: the most one request may ask
        reply = conn.recv_message()
        assert isinstance(reply, P.CsumReply) and len(reply.digests) == 64
        assert set(reply.digests) == {P.DigestAlgorithm.BLAKE2B_256.digest(bytes(1 << 20))}
        conn.close()
    finally:
        t.stop()


def test_an_internal_error_ends_one_connection_not_the_listener(target: Target,
                                                                 monkeypatch: Any) -> None:
    assert target.res.store is not None
    calls = []

    def broken_apply(*args: Any) -> None:
        calls.append(args)
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(target.res.store, "apply", broken_apply)
    conn = target.connect()
    conn.send_message(P.write_record(1, 0, b"a" * 512))
    msg = conn.recv_message()
    assert isinstance(msg, P.Error) and msg.code == P.ErrorCode.INTERNAL
    until(lambda: target.res.conn is None, "the connection to end")
    assert "internal error" in str(target.res.last_error)
    monkeypatch.undo()
    conn = target.connect()
    conn.send_message(P.write_record(1, 0, b"a" * 512))
    conn.send_message(P.Ping(3))
    while not isinstance(conn.recv_message(), P.Pong):
        pass
    conn.close()


def test_a_corrupt_target_state_means_a_full_resync(tmp_path: Path) -> None:
    """Item 6: a corrupt target.json crashed the daemon at start (systemd restart loop)."""
    config = write_config(tmp_path)
    folder = tmp_path / "st" / "r0"
    folder.mkdir(parents=True)
    (folder / "target.json").write_bytes(b"\x00\x01 not json")
    res = D.TargetResource(D.Daemon(config, "beta"), config.resource("r0"))
    assert res.saved == {"current": 0, "history": [], "consistent": False}
    assert f"{folder / 'target.json'}: not valid JSON" in str(res.last_error)
    assert "resyncs it whole" in str(res.last_error)
    assert json.loads((folder / "target.json").read_text())["consistent"] is False
    assert list(folder.glob("target.json.corrupt-*"))  # kept for the administrator


# ---------------------------------------------------------------------------- the source side


class FakeConsumer:
    def __init__(self) -> None:
        self.closed = False
        self.cleaned: list[int] = []
        self.released: list[int] = []
        self.st = SimpleNamespace(published=10, streaming=True, dirty_chunks=5, ring_used=0,
                                  ring_bytes=1 << 20, acked=0, stream_start=1, reason="",
                                  ring_end=11, events=1)

    def state(self) -> Any:
        return self.st

    def mark(self) -> int:
        return 11

    def bitmap(self) -> bytes:
        return bytes(SIZE // CHUNK // 8)

    def clean(self, mark: int) -> None:
        self.cleaned.append(mark)

    def close(self) -> None:
        self.closed = True

    def set_sync(self, on: bool) -> None:
        pass

    def ack(self, seq: int) -> None:
        self.st.acked = seq

    def release(self, seq: int) -> None:
        self.released.append(seq)


def make_source(tmp: Path, **kw: Any) -> D.SourceResource:
    config = kw.pop("config", None) or write_config(tmp, **kw)
    res = D.SourceResource(D.Daemon(config, "alpha"), config.resource("r0"))
    res.consumer = FakeConsumer()  # type: ignore[assignment]
    return res


class ScriptedConn:
    """What the receiver thread reads: the given messages, then a closed connection."""

    def __init__(self, msgs: list[P.Message]) -> None:
        self.msgs = list(msgs)
        self.closed = False

    def recv_message(self) -> P.Message:
        if self.msgs:
            return self.msgs.pop(0)
        raise ProtocolError("closed")

    def close(self) -> None:
        self.closed = True


def test_the_source_refuses_an_ack_beyond_what_it_sent(tmp_path: Path) -> None:
    """Item 1, the source's half: an ACK is capped by what this connection sent, not only by
    what the kernel published."""
    res = make_source(tmp_path)
    link = res.link("beta")
    conn = ScriptedConn([P.Ack(500, durable=True)])
    link.conn, link.sent_max, link.durable = conn, 3, 2  # type: ignore[assignment]
    link._receiver(conn)  # type: ignore[arg-type]
    assert link.durable == 2 and link.ack == 0
    assert conn.closed and link.conn is None
    assert "acknowledged record 500, but this connection sent records only up to 3" in str(
        link.last_error)


def test_acks_within_what_was_sent_are_taken(tmp_path: Path) -> None:
    res = make_source(tmp_path)
    link = res.link("beta")
    conn = ScriptedConn([P.Ack(2), P.Ack(3, durable=True)])
    link.conn, link.sent_max = conn, 3  # type: ignore[assignment]
    link._receiver(conn)  # type: ignore[arg-type]
    assert (link.ack, link.durable) == (3, 3)


def test_a_durable_ack_releases_the_sync_writers_from_the_receiver(tmp_path: Path) -> None:
    """A sync writer completes on its target's durable ack, without waiting for the engine to
    wake (which, here, never runs); a plain ack releases nothing (P2)."""
    res = make_source(tmp_path)
    link = res.link("beta")
    conn = ScriptedConn([P.Ack(2), P.Ack(3, durable=True)])
    link.conn, link.sent_max, link.joined = conn, 3, True  # type: ignore[assignment]
    link._receiver(conn)  # type: ignore[arg-type]
    assert res.consumer.released == [3]  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode, joined", [("async", True), ("sync", False)])
def test_only_a_joined_sync_target_releases_writers(tmp_path: Path, mode: str,
                                                    joined: bool) -> None:
    """An async target never delays nor releases a sync writer; a target out of the stream
    (fell behind, disconnected) neither."""
    res = make_source(tmp_path, target={"mode": mode})
    link = res.link("beta")
    conn = ScriptedConn([P.Ack(3, durable=True)])
    link.conn, link.sent_max, link.joined = conn, 3, joined  # type: ignore[assignment]
    link._receiver(conn)  # type: ignore[arg-type]
    assert link.durable == 3
    assert res.consumer.released == []  # type: ignore[attr-defined]


def test_state_files_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Item 2: `<t>.json` and `<t>.oos` were both written through `<t>.tmp`: concurrent saves
    left the bitmap file holding JSON and the JSON file holding bitmap bytes."""
    res = make_source(tmp_path)
    link = res.link("beta")
    errors: list[BaseException] = []

    def loop(fn: Any) -> None:
        try:
            for _ in range(300):
                fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(link.oos.save,)),
               threading.Thread(target=loop, args=(lambda: link.set_admin(Admin.UP),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    folder = tmp_path / "st" / "r0"
    assert json.loads((folder / "beta.json").read_text()) == {"admin": "up"}
    assert len((folder / "beta.oos").read_bytes()) == SIZE // CHUNK // 8
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


def test_every_state_file_write_syncs_its_folder(tmp_path: Path, monkeypatch: Any) -> None:
    """Item 2: generation.json skipped the folder's fsync and could vanish on power loss."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folder = tmp_path / "st"
    folder.mkdir()
    statefile.save_json(folder / "generation.json", {"current": 5})
    assert synced[-1] == str(folder)
    assert json.loads((folder / "generation.json").read_text()) == {"current": 5}


def test_a_wrong_size_bitmap_means_all_dirty_never_clean(tmp_path: Path) -> None:
    """Item 6: a wrong-size OOS file crashed Daemon.start; the safe fallback is all dirty."""
    folder = tmp_path / "st" / "r0"
    folder.mkdir(parents=True)
    (folder / "beta.oos").write_bytes(b"\x00" * 7)
    (folder / "beta.json").write_text("[1, 2]")
    res = make_source(tmp_path)
    link = res.link("beta")
    assert link.oos.count() == SIZE // CHUNK
    assert f"{folder / 'beta.oos'}: holds 7 bytes" in str(link.last_error)
    assert len((folder / "beta.oos").read_bytes()) == SIZE // CHUNK // 8
    assert OOSBitmap(folder / "beta.oos", SIZE // CHUNK).count() == SIZE // CHUNK
    assert list(folder.glob("beta.oos.corrupt-*")) and list(folder.glob("beta.json.corrupt-*"))


def test_a_corrupt_generation_keeps_the_resource_down_with_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    folder = tmp_path / "st" / "r0"
    folder.mkdir(parents=True)
    (folder / "generation.json").write_text('{"current": "x"}')
    with pytest.raises(statefile.StateError, match="generation.json: no valid generations"):
        D.SourceResource(D.Daemon(config, "alpha"), config.resource("r0"))
    daemon = D.Daemon(config, "alpha")
    daemon.start()  # logs, does not raise: other resources would go on
    (r0,) = daemon.status()["resources"]
    assert r0["state"] == "failed" and "generation.json" in r0["last_error"]
    assert "resource stays down" in r0["last_error"]


def test_a_bug_in_the_engine_fails_the_resource_visibly(tmp_path: Path) -> None:
    """Item 6: an unexpected exception ended the engine thread silently, with the consumer
    attached and replication stopped."""
    res = make_source(tmp_path)
    events = res.events.subscribe()

    def broken() -> bool:
        raise KeyError("a bug")

    res._cycle = broken  # type: ignore[method-assign]
    res.engine.start()
    res.engine.join(5)
    assert not res.engine.is_alive()
    assert res.consumer.closed  # type: ignore[attr-defined]
    status = res.status()
    assert status["state"] == "failed" and "engine: internal error: KeyError" in status["last_error"]
    seen = [events.get(timeout=1) for _ in range(events.qsize())]
    assert any(e["what"] == "failed" for e in seen)


def test_a_stuck_sender_is_cut_not_waited_for(tmp_path: Path) -> None:
    """Item 7: the engine waited on a link's send lock while its sender was blocked on a
    target that stopped reading: every other target stalled with it."""
    res = make_source(tmp_path)
    link = res.link("beta")
    a, b = socket.socketpair()  # b never reads
    conn = P.FramedConnection(a)
    link.conn = conn
    started = threading.Event()

    def sender() -> None:
        with link.send_lock:
            started.set()
            try:
                conn.send(P.FrameType.WRITE, b"x" * (8 << 20))
            except (OSError, ReplError):
                pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    started.wait(5)
    time.sleep(0.2)
    t0 = time.monotonic()
    res._quiesce(link)
    assert time.monotonic() - t0 < S.LOCK_WAIT + 2
    t.join(2)
    assert not t.is_alive()
    b.close()


def test_tune_sets_a_send_timeout() -> None:
    with socket.socket() as s:
        B.tune(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == B.SEND_TIMEOUT_MS


def test_a_slow_target_delays_the_clean_but_never_the_engine(tmp_path: Path) -> None:
    res = make_source(tmp_path)
    link = res.link("beta")
    link.joined, link.durable = True, 3
    res.kstate = res.consumer.state()
    t0 = time.monotonic()
    res._clean_cycle([link])
    assert time.monotonic() - t0 < 0.5
    assert res.consumer.cleaned == []  # type: ignore[attr-defined]
    link.durable = 10  # everything before the mark (11) is durable now
    res._clean_cycle([link])
    assert res.consumer.cleaned == [11]  # type: ignore[attr-defined]


def test_verify_requests_stay_bounded_at_large_chunks(tmp_path: Path) -> None:
    """Item 8: at 1 MiB chunks a verify asked for 4096 chunks (4 GiB) per request and read them
    in one pread, which comes back short."""
    res = make_source(tmp_path, data_size=256 << 20, chunk=1 << 20)
    res.read_fd = os.open(tmp_path / "data.img", os.O_RDONLY)
    link = res.link("beta")
    zero = P.DigestAlgorithm.BLAKE2B_256.digest(bytes(1 << 20))
    asked: list[P.CsumRequest] = []

    class Conn:
        def send_message(self, msg: Any) -> None:
            if isinstance(msg, P.Ping):
                link.pongs.pop(msg.token).set()
            elif isinstance(msg, P.CsumRequest):
                asked.append(msg)
                link.csum_replies.put(P.CsumReply(msg.first, (zero,) * msg.count, msg.algorithm))

    link.conn, link.state = Conn(), LinkState.STREAMING  # type: ignore[assignment]
    try:
        result = res.verify("beta")
    finally:
        os.close(res.read_fd)
    assert result["differing"] == []
    assert asked and all(r.count * (1 << 20) <= P.MAX_CSUM_BYTES for r in asked)
    assert sum(r.count for r in asked) == 256


def test_reads_go_on_after_a_short_read(tmp_path: Path, monkeypatch: Any) -> None:
    res = make_source(tmp_path)
    path = tmp_path / "data.img"
    with open(path, "r+b") as f:
        f.write(bytes(range(256)) * (SIZE // 256))
    res.read_fd = os.open(path, os.O_RDONLY)
    real = os.preadv

    def short(fd: int, bufs: list[memoryview], off: int) -> int:
        return real(fd, [bufs[0][:1000]], off)  # never more than 1000 bytes

    monkeypatch.setattr(os, "preadv", short)
    try:
        data = res.read_chunks(range(0, 4))
    finally:
        os.close(res.read_fd)
    assert bytes(data) == path.read_bytes()[:4 * CHUNK]


def test_new_metadata_starts_a_new_generation_and_a_full_sync(tmp_path: Path) -> None:
    """Item 9: a replaced or restored data disk (create-md formats its metadata anew) kept the
    old generation; the targets resynced only bitmap chunks and diverged."""
    config = write_config(tmp_path)
    res = make_source(tmp_path, config=config)
    res._bind_generation("11111111-1111-1111-1111-111111111111")
    first = dict(res.gen)
    link = res.link("beta")
    link.oos.clear(range(SIZE // CHUNK), link.oos.epoch)  # in sync
    link.oos.save()

    again = make_source(tmp_path, config=config)  # a restart, same metadata: nothing changes
    again._bind_generation("11111111-1111-1111-1111-111111111111")
    assert again.gen == first and again.link("beta").oos.count() == 0

    replaced = make_source(tmp_path, config=config)
    events = replaced.events.subscribe()
    replaced._bind_generation("22222222-2222-2222-2222-222222222222")
    assert replaced.gen["current"] != first["current"]
    assert replaced.gen["history"][0] == first["current"]
    assert replaced.gen["md_uuid"] == "22222222-2222-2222-2222-222222222222"
    assert replaced.link("beta").oos.count() == SIZE // CHUNK
    assert events.get(timeout=1)["what"] == "new_generation"
    # and it is durable
    saved = json.loads((tmp_path / "st" / "r0" / "generation.json").read_text())
    assert saved["current"] == replaced.gen["current"]


@pytest.mark.parametrize("ring_used, behind", [(64 << 10, False), ((64 << 10) + 1, True)])
def test_an_async_target_past_max_lag_falls_behind(tmp_path: Path, ring_used: int,
                                                    behind: bool) -> None:
    """Item 10: max_lag was parsed but unused. An async target whose backlog (the ring bytes it
    holds back) passes max_lag leaves the stream and is readmitted from a new mark, its backlog
    absorbed into its out-of-sync bitmap; at max_lag or under it stays in the stream."""
    res = make_source(tmp_path, target={"mode": "async", "max_lag": "64KiB"})
    link = res.link("beta")
    assert link.max_lag == 64 << 10
    link.joined, link.ack, link.sent_max = True, 4, 4
    res.consumer.st.ring_used = ring_used  # type: ignore[attr-defined]
    res.last_clean = time.monotonic()  # no MARK/CLEAN cycle in this step
    res._cycle()
    assert link.joined is not behind
    assert link.join_wanted is behind
    assert link.behind_reason == ("max_lag" if behind else None)  # status says which
    if behind:
        res._cycle()  # the next step readmits it from a new mark: a resync of its bitmap
        assert link.joined and link.join_pos == 11 and link.ack == 10


def test_status_says_why_a_target_fell_behind() -> None:
    """An async target in `behind` says whether its own backlog passed max_lag or the kernel's
    whole ring stopped (status --json `behind_reason`, and the detail line)."""
    from repctl import render

    status = {"resources": [{"name": "r0", "role": "primary", "disk": "UpToDate", "targets": [
        {"name": "beta", "mode": "async", "state": "behind", "behind_reason": "max_lag"},
        {"name": "gamma", "mode": "async", "state": "behind", "behind_reason": "ring_full"},
        {"name": "delta", "mode": "async", "state": "streaming", "behind_reason": None}]}]}
    details = "\n".join(render.status_details(status))
    assert "r0 -> beta: fell behind: its backlog passed max_lag" in details
    assert "r0 -> gamma: fell behind: the kernel's ring filled (ring_size)" in details
    assert "delta: fell" not in details and "behind_reason" not in details


def test_connection_says_refused_only_for_a_refused_handshake(tmp_path: Path) -> None:
    """The refused state was found by the substring "refused" in last_error, so a plain TCP
    "Connection refused" (nothing listening yet) read as a refusal by the peer."""
    link = make_source(tmp_path).link("beta")
    link.last_error = "[Errno 111] Connection refused"
    assert link.status()["connection"] == "connecting"
    link.refusal = HandshakeRefused(P.RefuseReason.SPLIT_BRAIN, "split brain", remote=True)
    link.last_error = str(link.refusal)
    assert link.status()["connection"] == "refused: SPLIT_BRAIN"
    link.set_admin(Admin.PAUSED)
    link.refusal = None
    assert link.status()["connection"] == "down"
