"""The source's view of one target: its connection, its place in the stream, its OOS bitmap.

A link is two threads: the sender (`Link._run`) connects, authenticates, streams ring records in
order and interleaves resync chunks read from the device; the receiver takes the target's ACK,
PONG and CSUM_REPLY. The engine (source.py) decides when a link joins the stream and at which
ring position; the link never acknowledges anything to the kernel itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import secrets
import socket
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from repctl import protocol as P
from repctl.compress import Codec, CompressionStats, available
from repctl.config import Node, SplitBrainPolicy, Target, TargetMode
from repctl.daemon.base import set_aside, tune
from repctl.daemon.resyncrate import ResyncRate, run_bytes
from repctl.daemon.state import Admin, Connection, Event, LinkState, split_brain_refusal
from repctl.errors import HandshakeRefused, ProtocolError, ReplError
from repctl.oos import OOSBitmap
from repctl.statefile import StateError, load_json, save_json

if TYPE_CHECKING:
    from repctl.daemon.source import SourceResource

log = logging.getLogger("repctl.daemon")

__all__ = ["Link"]

RESYNC_RUN = 256         # chunks per RESYNC_CHUNK frame at most (1 MiB at 4 KiB)
RESYNC_WINDOW = 16 << 20  # resync bytes per PONG barrier (two windows in flight)
ASYNC_BATCH = 64         # an async link is woken per this many records ...
ASYNC_WAIT_MS = 20       # ... or after this long (the kernel wakes it sooner if the ring fills)
ASYNC_NICE = 10          # CPU priority of an async link's thread: the applications come first
RECONNECT_DELAY = 1.0
SHORT_SESSION = 10.0      # seconds: a session that ended sooner delays the next one ...
SESSION_RETRY_MAX = 10.0  # ... by 1 s, doubling while they keep ending so, up to this
SPLIT_BRAIN_RETRY = 5.0  # seconds between tries while a split brain refuses (each reads a report)
FAILED_RETRY = 5.0       # seconds before a link that hit an internal error tries again
RECORDS_BYTES = 1 << 20  # a RECORDS frame holds records up to this size (one more if larger) ...
COPY_MAX = 16 << 10      # ... and copies a WRITE's data up to this size from the ring into one
                         # buffer: the tag and sendmsg then take a few buffers, not two a record
RING_OPS = {op.name.lower(): op for op in P.RecordOp}  # a ring record's op name -> the wire's
UNACKED_MAX = 4096       # sent batches a sync link times until their durable ack, at most
PROGRESS_INTERVAL = 1.0  # seconds between a resync's progress events, at least

# refusals that mean a split brain: our data and the peer's diverged, or both are primary
SPLIT_REASONS = frozenset({P.RefuseReason.SPLIT_BRAIN, P.RefuseReason.ROLE_CONFLICT})

LINK_STATE_ACTION = "the target is taken as up (not paused); check it with `repctl status`"
OOS_ACTION = ("every chunk is taken as out of sync for this target: it gets a full resync; "
              "the corrupt file is kept beside it for inspection")


class Link:
    """The source's view of one target: connection, stream position, OOS bitmap."""

    def __init__(self, res: SourceResource, target: Target, node: Node):
        self.res = res
        self.name = target.name
        self.mode = target.mode
        self.max_lag = target.max_lag or 0  # async: the backlog past which it falls behind
        # why it last left the stream for its bitmap: "max_lag" (its own backlog), or the
        # kernel's reason when the whole ring stopped ("ring_full", "sync_timeout", ...)
        self.behind_reason: str | None = None
        self.compression = Codec[target.compression.name]  # offered at each handshake
        self.compression_level = target.compression_level or 0
        self.compression_stats = CompressionStats()  # of every connection, since the start
        self.resync_settings = target.resync  # how its resyncs are paced (resyncrate.py)
        self.slot_key = (res.name, self.name)  # its resyncs in the daemon's scheduler
        self.queued_at: float | None = None  # since when its resync waits for a slot
        self.pacer: ResyncRate | None = None  # the running resync's controller
        self.node = node
        self.address = (node.address, res.cfg.port)
        self.state_path = res.state_dir / f"{self.name}.json"
        self.last_error: str | None = None
        self.refusal: HandshakeRefused | None = None  # the last handshake's, until one succeeds
        self.retry = 0.0  # seconds to wait before the next session (_pace), after short ones
        try:
            self.saved = load_json(self.state_path, {"admin": Admin.UP}, action=LINK_STATE_ACTION,
                                   check=_check_link_state)
        except StateError as e:
            self._state_error(e)
            set_aside(self.state_path)
            self.saved = {"admin": Admin.UP}
            save_json(self.state_path, self.saved)
        self.saved["admin"] = Admin(self.saved["admin"])  # checked by _check_link_state
        oos_path = res.state_dir / f"{self.name}.oos"
        try:
            self.oos = OOSBitmap(oos_path, res.nr_chunks, action=OOS_ACTION)
        except StateError as e:
            self._state_error(e)
            set_aside(oos_path)
            self.oos = OOSBitmap(oos_path, res.nr_chunks)  # missing now: all dirty, below
        if not self.oos.existed:
            self.oos.set_all()  # a new target: everything must be sent once
            self.oos.save()
        self.cond = threading.Condition()
        self.state = (LinkState.CONNECTING if self.admin is Admin.UP
                      else LinkState.of_admin(self.admin))
        self.conn: P.FramedConnection | None = None
        self.joined = False
        self.join_wanted = False
        self.join_gen = 0        # bumped by the engine at each admission
        self.join_pos = 0        # first ring seq of the current admission
        self.pos = 0             # next ring seq to send (the sender's own)
        self.ack = 0             # highest seq applied on the target
        self.durable = 0         # highest seq durable on the target
        self.pongs: dict[int, threading.Event] = {}
        self.csum_replies: queue.Queue[P.CsumReply] = queue.Queue()
        self.sent_max = 0        # highest ring seq sent on the current connection
        self.by_checksum = False  # this session resyncs by comparing checksums (_take_report)
        self.bytes_sent = 0
        self.resync_bytes = 0    # of bytes_sent, the chunk data sent by resyncs
        # a sync target: how long it takes to hold records durable (the metrics' sync-ack
        # latency); the sender appends (last seq of a batch, when sent), the receiver pops
        self.latency = (res.daemon.stats.latency(res.name, self.name)
                        if self.mode is TargetMode.SYNC else None)
        self.unacked: deque[tuple[int, float]] = deque(maxlen=UNACKED_MAX)
        self.sync_total = 0
        self.sync_done = 0
        self.sync_started = 0.0
        self.progress_at = 0.0   # when the last progress event of this resync was emitted
        self.words_lock = threading.Lock()  # orders the connection events of several threads
        self.connection = self._connection()  # as the last `connection` event said
        self.wake = threading.Event()
        self.repair_wanted = threading.Event()  # `verify --repair` marked chunks (mark_out_of_sync)
        # held while ring records are read and sent: the engine takes it before
        # it lets the kernel reuse ring space this link may still be sending
        self.send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"link-{res.name}-{self.name}", daemon=True)

    # -- state ---------------------------------------------------------
    def _state_error(self, e: StateError) -> None:
        self.last_error = str(e)
        log.error("%s/%s: %s", self.res.name, self.name, e)
        self.res.events.emit(resource=self.res.name, target=self.name, what=Event.ERROR,
                             text=str(e))

    def set_state(self, state: LinkState, why: str = "") -> None:
        if state is not self.state:
            old, self.state = self.state, state
            self.res.events.emit(resource=self.res.name, target=self.name, what=Event.STATE,
                                 old=old, new=state, text=why)

    def set_in_session(self, on: bool) -> None:
        """Record, durably, whether the target receives every write now (docs/failover.md: a
        primary that crashed while its peer was in session rejoins it by itself)."""
        if bool(self.saved.get("in_session")) is not on:
            self.saved["in_session"] = on
            save_json(self.state_path, self.saved)

    @property
    def admin(self) -> Admin:
        return self.saved["admin"]  # type: ignore[no-any-return]

    def set_admin(self, admin: Admin) -> None:
        self.saved["admin"] = admin
        save_json(self.state_path, self.saved)
        if admin is Admin.UP:
            self.refusal = None  # an old refusal is not this try's: `--wait` fails fast on one
        self._connection_changed(f"{admin} by the administrator" if admin is not Admin.UP
                                 else "the administrator asked to connect")
        self.wake.set()  # the sender stops at a record boundary (_pause)

    def _connection_changed(self, why: str) -> None:
        """Emit a `connection` event if this target's connection (as `status` says it) is not
        what the last one said."""
        with self.words_lock:
            new = self._connection()
            if new == self.connection:
                return
            old, self.connection = self.connection, new
            self.res.events.emit(resource=self.res.name, target=self.name,
                                 what=Event.CONNECTION, old=old, new=new, text=why)

    def sync_progress(self) -> dict[str, Any]:
        """How far the resync is: bytes done of the bytes it has to send, the average rate since
        it started (bytes per second) and the seconds left at that rate (None before a rate)."""
        elapsed = max(time.monotonic() - self.sync_started, 1e-6)
        rate = self.sync_done / elapsed
        left = max(self.sync_total - self.sync_done, 0)
        return {"done_bytes": self.sync_done, "total_bytes": self.sync_total,
                "rate_bps": rate, "eta_s": (left / rate) if rate > 0 else None}

    def _progress(self, *, final: bool = False) -> None:
        """Emit a `progress` event of the resync: at most every PROGRESS_INTERVAL, and at its
        end (`final`: 100 %, done_bytes == total_bytes)."""
        now = time.monotonic()
        if not final and now - self.progress_at < PROGRESS_INTERVAL:
            return
        self.progress_at = now
        p = self.sync_progress()
        if final:  # the last chunk may be short, another pass may have added chunks
            p["done_bytes"] = p["total_bytes"] = max(p["done_bytes"], p["total_bytes"])
            p["eta_s"] = 0.0
        total = p["total_bytes"]
        percent = min(100.0, 100.0 * p["done_bytes"] / total) if total else 100.0
        eta = p["eta_s"]
        self.res.events.emit(resource=self.res.name, target=self.name, what=Event.PROGRESS,
                             done_bytes=p["done_bytes"], total_bytes=total,
                             percent=round(percent, 1), rate_bps=round(p["rate_bps"], 1),
                             eta_s=None if eta is None else round(eta, 1))

    def _connection(self) -> str:
        """The `connection` of this target in `status`."""
        if self.conn is not None:
            return Connection.CONNECTED
        if self.refusal is not None:
            reason = getattr(self.refusal.reason, "name", self.refusal.reason)
            return f"{Connection.REFUSED}: {reason}"  # the text is in last_error
        return Connection.CONNECTING if self.admin is Admin.UP else Connection.DOWN

    def status(self) -> dict[str, Any]:
        st = self.res.kstate
        oos = self.oos.count() * self.res.chunk_bytes
        sync = self.sync_progress() if self.state is LinkState.SYNCING else None
        lag = max(st.published - self.ack, 0) if st is not None and self.joined else 0
        return {"name": self.name, "mode": str(self.mode), "state": self.state,
                "connection": self._connection(),
                "address": f"{self.address[0]}:{self.address[1]}",
                "out_of_sync_bytes": oos, "bytes_sent": self.bytes_sent,
                "resync_bytes": self.resync_bytes, "lag_records": lag,
                **self._compression_status(),
                "lag_bytes": st.ring_used if lag and st is not None else 0, "sync": sync,
                **self._resync_status(), "last_error": self.last_error,
                "behind_reason": self.behind_reason if self.state is LinkState.BEHIND else None}

    def _resync_status(self) -> dict[str, Any]:
        """The scheduler's fields of `status`: the resync's place in the queue for a slot (1:
        next; null: not waiting), and the rate its controller allows now (null: no resync)."""
        resyncing = self.state in (LinkState.SYNCING, LinkState.BEHIND)
        queued = (self.res.daemon.scheduler.position(self.slot_key)
                  if resyncing and self.queued_at is not None else None)
        pacer = self.pacer if resyncing and queued is None else None
        return {"resync_queued": queued,
                "resync_rate_bps": pacer.status()["rate_bps"] if pacer is not None else None,
                "resync_app_busy": bool(pacer.busy) if pacer is not None else False}

    def _compression_status(self) -> dict[str, Any]:
        """The compression fields of `status`: the codec of the session (null without one)."""
        conn, stats = self.conn, self.compression_stats
        return {"compression": conn.codec.word if conn is not None else None,
                "compression_raw_bytes": stats.raw_bytes,
                "compression_wire_bytes": stats.wire_bytes,
                "compression_skipped_bytes": stats.skipped_bytes}

    # -- connection ----------------------------------------------------
    def _connect(self) -> P.FramedConnection:
        res = self.res
        sock = socket.create_connection(self.address, timeout=5)
        try:
            tune(sock)
            # TLS (when configured): the target's certificate must be issued for this target
            stream = res.transport.client(sock, self.name, self.address)
        except BaseException:
            sock.close()
            raise
        conn = P.FramedConnection(stream, compression_stats=self.compression_stats)
        local = P.HandshakeInfo(resource=res.name, node=res.node, role=P.Role.SOURCE,
                                device_size=res.size, chunk_size=res.chunk_bytes,
                                generations=res.generations(), compression=self.compression,
                                compression_level=self.compression_level)

        policy = res.cfg.after_split_brain

        def check(peer: P.PeerInfo) -> None:
            rel = P.compare_generations(local.generations, peer.generations)
            if rel in (P.GenerationRelation.EQUAL, P.GenerationRelation.LOCAL_AHEAD):
                return
            if rel in (P.GenerationRelation.PEER_AHEAD, P.GenerationRelation.DIVERGED) and (
                    policy is not SplitBrainPolicy.DISCONNECT):
                return  # a split brain the policy may settle once the target reports (_take_report)
            raise HandshakeRefused(P.RefuseReason.SPLIT_BRAIN,
                                   f"target {peer.node} holds generation {peer.generations.current:#x}, "
                                   f"which is not in this source's history ({rel.name.lower()}): "
                                   f"split brain; after_split_brain is {policy}: `repctl resolve "
                                   f"{res.name} --discard-local` on the node whose changes go")
        try:
            peer = P.handshake(conn, local, res.secret, P.Expect(frozenset({self.name}), check))
        except BaseException:
            conn.close()
            raise
        if peer.compression is not self.compression:
            log.warning("%s/%s: compression %s is configured, but the %s: sending uncompressed",
                        res.name, self.name, self.compression.word,
                        "target does not accept it" if available(self.compression)
                        else "codec's package is not installed on this node")
        try:
            sock.settimeout(60)  # a large report takes a while on a slow link
            self._take_report(conn, local.generations, peer.generations)
        except BaseException:
            conn.close()
            raise
        sock.settimeout(None)
        return conn

    def _take_report(self, conn: P.FramedConnection, mine: P.Generations,
                     theirs: P.Generations) -> None:
        """Decide what the target needs after the handshake: the OOS bitmap holds what it lacks
        if it holds our generation, or the one this link's bitmap was kept against (`peer_gen`:
        a former primary, or a target that was in sync when it left); anything else gets a full
        sync. Then OR in the chunks the target reports as its own changes (OUT_OF_SYNC). A
        target whose data diverged from ours is taken only as the split-brain policy says."""
        res = self.res
        self.by_checksum = False
        split = P.compare_generations(mine, theirs) not in (P.GenerationRelation.EQUAL,
                                                           P.GenerationRelation.LOCAL_AHEAD)
        if not split and theirs.current not in (mine.current, self.saved.get("peer_gen")):
            # data of ours, but we cannot tell which chunks it lacks (a node that followed
            # another primary): compare every chunk's checksum, send only what differs
            self.by_checksum = theirs.current != 0
            log.info("%s/%s: target holds no data this bitmap was kept against: full sync%s",
                     res.name, self.name, " by checksums" if self.by_checksum else "")
            self.oos.set_all()
        bits = P.receive_out_of_sync(conn, self.oos.nbytes)
        if split:
            self._settle_split_brain(conn, mine, theirs, bits)  # raises unless settled
        changed = self.oos.absorb_masked(bits)
        if changed:
            log.info("%s/%s: the target reports %d chunks of its own that may differ: resynced too",
                     res.name, self.name, changed)
        self.oos.save()

    def _settle_split_brain(self, conn: P.FramedConnection, mine: P.Generations,
                            theirs: P.Generations, bits: bytes) -> None:
        """The target's data diverged from ours and the policy (`after_split_brain`) is not
        disconnect: return if the policy discards the target's changes (`bits`, its report),
        which the caller then resyncs with ours, the union; else refuse, nothing changed on
        either side. This link's bitmap counts our changes only if it was kept against a
        generation the target's data descends from; if not, nothing can be counted: refused."""
        res = self.res
        peer_gen = self.saved.get("peer_gen")
        basis = next((g for g in (mine.current, peer_gen) if g and g in theirs.history), None)
        ours = self.oos.count()
        their = int.from_bytes(bits, "little").bit_count()
        policy = res.cfg.after_split_brain
        if basis is None:
            why: str | None = (f"no generation in common that this node's bitmap for {self.name} "
                               "was kept against: the changes cannot be counted")
        else:
            younger = True if mine.current in theirs.history else (
                False if theirs.current in mine.history else None)
            why = split_brain_refusal(policy, mine=ours, theirs=their, younger=younger)
        if why is not None:
            text = (f"target {self.name} holds generation {theirs.current:#x}, diverged from this "
                    f"primary's data: split brain, not settled: {why}")
            with contextlib.suppress(OSError, ReplError):
                conn.send_message(P.Error(P.ErrorCode.SPLIT_BRAIN, text))
            raise HandshakeRefused(P.RefuseReason.SPLIT_BRAIN, text)
        text = (f"split brain with {self.name} settled by {policy}: its {their} changed chunks "
                f"are discarded (this node changed {ours}); the union is resynced")
        res.split_brain(self.name, text, settled=True)  # its hook first: a failure refuses

    def _drop(self, why: str, quiet: bool = False) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self.res.unjoin(self)
        self._connection_changed(why)
        if not self.res.stopping.is_set():
            # out of session while the device serves writes; a stop (down, demote, a crash)
            # leaves the record as it was: no write came after it
            self.set_in_session(False)
        if not quiet:
            self.last_error = why
            log.warning("%s/%s: %s", self.res.name, self.name, why)

    def _receiver(self, conn: P.FramedConnection) -> None:
        try:
            while True:
                msg = conn.recv_message()
                if isinstance(msg, P.Ack):
                    if msg.ring_seq > self.sent_max:
                        # P2: an ack for records this connection never sent (an earlier
                        # connection's, or an earlier boot's) must not release a writer
                        raise ProtocolError(f"target acknowledged record {msg.ring_seq}, but this "
                                            f"connection sent records only up to {self.sent_max}")
                    with self.cond:
                        self.ack = max(self.ack, msg.ring_seq)
                        if msg.durable:
                            self.durable = max(self.durable, msg.ring_seq)
                        self.cond.notify_all()
                    if msg.durable and self.mode is TargetMode.SYNC:
                        with contextlib.suppress(ReplError):  # the engine's cycle tries again
                            self.res.release_sync()
                    self.res.engine_wake.set()  # the ACK of ring space is the engine's
                    if msg.durable and self.latency is not None:
                        self._timed(msg.ring_seq)
                elif isinstance(msg, P.Pong):
                    ev = self.pongs.pop(msg.token, None)
                    if ev:
                        ev.set()
                elif isinstance(msg, P.CsumReply):
                    self.csum_replies.put(msg)
                elif isinstance(msg, P.Error):
                    raise ProtocolError(f"target reported: {msg.text}")
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} from the target")
        except Exception as e:
            if not isinstance(e, (OSError, ReplError)):
                log.exception("%s/%s: receiver: internal error", self.res.name, self.name)
            if self.conn is conn:
                self._drop(f"connection lost: {e}")
            self.wake.set()
            for ev in list(self.pongs.values()):
                ev.set()

    def _timed(self, seq: int) -> None:
        """Record the sync-ack latency of every batch sent up to `seq`, now durable."""
        assert self.latency is not None
        now = time.monotonic()
        unacked = self.unacked
        try:
            while unacked and unacked[0][0] <= seq:
                self.latency.observe(now - unacked.popleft()[1])
        except IndexError:  # emptied by a new connection meanwhile
            pass

    def _run(self) -> None:
        """The link's thread: a bug in it fails this target (state `failed`, retried every
        FAILED_RETRY seconds), never the other targets or the daemon."""
        while not self.res.stopping.is_set():
            try:
                self._loop()
            except Exception as e:
                log.exception("%s/%s: link: internal error", self.res.name, self.name)
                if self.conn is not None:
                    self._drop(f"internal error: {e!r}")
                self.last_error = f"internal error: {e!r} (retried in {FAILED_RETRY:g} s)"
                self.set_state(LinkState.FAILED, self.last_error)
                self.res.stopping.wait(FAILED_RETRY)

    def _loop(self) -> None:
        if self.mode is TargetMode.ASYNC:
            # P4: an async target never slows the primary, nor does the CPU that feeds it
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ASYNC_NICE)
            except OSError as e:
                log.warning("%s/%s: cannot lower the link's CPU priority: %s", self.res.name, self.name, e)
        while not self.res.stopping.is_set():
            if self.admin is not Admin.UP:
                self.set_state(LinkState.of_admin(self.admin))
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            self.set_state(LinkState.CONNECTING)
            try:
                conn = self._connect()
            except (OSError, ReplError) as e:
                self.last_error = str(e)
                refusal = e if isinstance(e, HandshakeRefused) else None
                if refusal is not None:
                    self.res.daemon.stats.refusal(self.res.name, refusal)
                if refusal is not None and refusal.reason in SPLIT_REASONS and (
                        self.refusal is None or self.refusal.reason != refusal.reason):
                    self.res.split_brain(self.name, str(refusal))
                self.refusal = refusal
                self._connection_changed(str(e))
                log.warning("%s/%s: cannot connect to %s:%s: %s", self.res.name, self.name,
                            *self.address, e)
                split = refusal is not None and refusal.reason in SPLIT_REASONS
                self.wake.wait(SPLIT_BRAIN_RETRY if split else RECONNECT_DELAY)
                self.wake.clear()
                continue
            self.last_error = None
            self.refusal = None
            self.sent_max = 0
            self.unacked.clear()
            self.conn = conn
            self._connection_changed(f"connected to {self.address[0]}:{self.address[1]}")
            threading.Thread(target=self._receiver, args=(conn,), daemon=True,
                             name=f"recv-{self.res.name}-{self.name}").start()
            started = time.monotonic()
            try:
                self._serve(conn)
            except (OSError, ReplError) as e:
                if self.conn is conn:
                    self._drop(f"connection lost: {e}")
            if self.conn is conn:
                self._drop("closed", quiet=True)
            self._pace(time.monotonic() - started)

    def _pace(self, lasted: float) -> None:
        """After a session that ended within SHORT_SESSION of its start, wait before the next
        one: RECONNECT_DELAY, doubling while sessions keep ending so, up to SESSION_RETRY_MAX.
        A target that fails every session at once (its image file's file system full, an error
        it reports as soon as data comes) costs a handshake and a report every few seconds,
        not a loop that takes the CPU of both nodes, and of the target node's other resources.
        After a longer session (a network blip) the link reconnects at once, as before."""
        if lasted >= SHORT_SESSION:
            self.retry = 0.0
            return
        self.retry = min(max(2 * self.retry, RECONNECT_DELAY), SESSION_RETRY_MAX)
        deadline = time.monotonic() + self.retry
        while self.admin is Admin.UP and (left := deadline - time.monotonic()) > 0:
            if self.res.stopping.wait(min(left, 0.5)):
                return  # an administrator's pause or disconnect is seen within half a second

    def _send_ping(self, conn: P.FramedConnection) -> threading.Event:
        """A barrier: the event is set once the target has everything sent before it durable."""
        token = secrets.randbits(63)
        ev = threading.Event()
        self.pongs[token] = ev
        conn.send_message(P.Ping(token, time.monotonic_ns()))
        return ev

    def _ping(self, conn: P.FramedConnection, timeout: float = 60) -> bool:
        return self._send_ping(conn).wait(timeout) and self.conn is conn

    def _serve(self, conn: P.FramedConnection) -> None:
        """The session: turn after turn of ordered checks (`_turn`) until it ends."""
        self.res.join(self)
        # a resync run is at most a quarter of the fill target (resyncrate.run_bytes)
        run = max(1, run_bytes(self.resync_settings, RESYNC_RUN * self.res.chunk_bytes)
                  // self.res.chunk_bytes)
        session = _Session(self.res.resync_buffer(), run)
        try:
            while self.conn is conn and not self.res.stopping.is_set():
                if self._turn(conn, session) is _ENDED:
                    return
        finally:
            self._release_slot()  # the session ended: its resync (if any) too

    def _turn(self, conn: P.FramedConnection, s: _Session) -> str:
        """One turn of the session, as ordered checks; says what it did. The order matters:
        the administrator first (a pause stops at a record boundary), then the stream (records
        before resync chunks, so that the resync never holds the stream back), then idling."""
        if self.admin is not Admin.UP:
            self._pause(conn)
            return _ENDED
        if not self.joined:
            self.wake.wait(0.1)
            self.wake.clear()
            return "waiting to be admitted to the stream"
        if s.gen != self.join_gen:
            self._admitted(conn, s)
        if self.repair_wanted.is_set():
            self._repair(s)
        sent = self._send_records(conn, s.gen)
        resynced = None
        s.hold = 0.0
        if self.state in (LinkState.SYNCING, LinkState.BEHIND):
            resynced = self._resync_step(conn, s)
            if resynced is _ENDED:
                return _ENDED
        if (sent and (resynced is not None or self.mode is TargetMode.ASYNC)
                or (resynced is not None and not s.hold)):
            return resynced or "sent records"
        # nothing sent, or a sync stream's records: wait for records (at once if more are
        # published; a sync writer waits for its record, so the next turn's GET_STATE would
        # most often find none), at most until the held resync may go on
        wait_ms = ASYNC_WAIT_MS if self.mode is TargetMode.ASYNC else 100
        if s.hold:
            wait_ms = max(1, min(wait_ms, round(s.hold * 1000)))
        if self.mode is TargetMode.ASYNC:
            self.res.consumer.wait(max(self.pos - 1, 0), wait_ms, batch=ASYNC_BATCH)
        else:
            self.res.consumer.wait(max(self.pos - 1, 0), wait_ms)
        return resynced or ("sent records" if sent else "idle")

    def _admitted(self, conn: P.FramedConnection, s: _Session) -> None:
        """Admitted (again) by the engine: stream from the admission's mark, resync the OOS."""
        s.gen, self.pos = self.join_gen, self.join_pos
        s.restart(self.oos)
        self.set_in_session(True)
        pending = self.oos.count()
        self.sync_total, self.sync_done = pending * self.res.chunk_bytes, 0
        self.sync_started = self.progress_at = time.monotonic()
        if pending:
            behind = self.state is LinkState.STREAMING
            why = f"{pending} chunks to resync"
            if behind and self.behind_reason:
                why += f"; fell behind: {self.behind_reason}"
            self.set_state(LinkState.BEHIND if behind else LinkState.SYNCING, why)
        else:
            self._resync_done(conn, "nothing to resync")

    def mark_out_of_sync(self, chunks: list[int]) -> int:
        """Mark `chunks` out of sync for this target (`verify --repair`: they differ) and have
        the sender resync them from this node's device. Returns once the bits are durable in
        this target's OOS file, so that a crash from then on resyncs them after the restart;
        how many chunks were not marked already."""
        added = self.oos.mark(chunks)
        self.oos.save()
        self.repair_wanted.set()
        self.wake.set()
        return added

    def _repair(self, s: _Session) -> None:
        """The sender's side of `mark_out_of_sync`: a target that streams starts a resync of
        its bitmap, as after an admission; one that resyncs already sends the new chunks in its
        next pass (the marks voided the clears of the windows in flight)."""
        self.repair_wanted.clear()
        pending = self.oos.count()
        if self.state is not LinkState.STREAMING or not pending:
            return
        s.restart(self.oos)
        self.sync_total, self.sync_done = pending * self.res.chunk_bytes, 0
        self.sync_started = self.progress_at = time.monotonic()
        self.set_state(LinkState.SYNCING, f"{pending} chunks to resync (verify --repair)")

    def _resync_done(self, conn: P.FramedConnection, why: str) -> None:
        """The target holds our data but for the records in flight: it takes our generation,
        and this link's bitmap is kept against it from now on."""
        self._release_slot()
        conn.send_message(P.ResyncDone(0))
        if self.sync_total:
            self._progress(final=True)
        self.by_checksum = False  # the target holds our data: its bitmap is known from now on
        gen = self.res.generations().current
        if self.saved.get("peer_gen") != gen:
            self.saved["peer_gen"] = gen
            save_json(self.state_path, self.saved)
        self.set_state(LinkState.STREAMING, why)

    def _resync_step(self, conn: P.FramedConnection, s: _Session) -> str | None:
        """Send the next run of out-of-sync chunks, ping each full window, and clear the chunks
        of a window once the target has it durable. None when there was nothing to send."""
        if s.next_run is None:
            s.next_run = next(s.resync, None)
        run = s.next_run
        if run is not None:
            held = self._resync_held(conn, s)
            if held is not None:
                return held  # s.hold says for how long at most
            s.next_run = None
            if self.by_checksum:
                nbytes = self._send_differing(conn, run, s.buf)
            else:
                data = self.res.read_chunks(run, s.buf)
                conn.send_message(P.ResyncChunk(run.start, data))  # sent: buf is free again
                self.bytes_sent += len(data)
                self.resync_bytes += len(data)
                nbytes = len(data)
            s.inflight.append(run)
            s.inflight_bytes += nbytes
            now = time.monotonic()
            assert self.pacer is not None  # set by _resync_held
            self.pacer.sent(nbytes, now)
            self.res.daemon.scheduler.peer_take(self.name, nbytes, now)
        if s.inflight and (run is None or s.inflight_bytes >= RESYNC_WINDOW):
            # ping the window and go on sending: the link never idles waiting
            s.unconfirmed.append((self._send_ping(conn), s.inflight, s.inflight_bytes))
            s.inflight, s.inflight_bytes = [], 0
        while s.unconfirmed and (len(s.unconfirmed) > 1 or run is None):
            pong, runs, nbytes = s.unconfirmed.pop(0)
            if not pong.wait(60) or self.conn is not conn:
                return _ENDED
            for r in runs:
                self.oos.clear(r, s.epoch)
            self.sync_done += nbytes
            self.oos.save()
            self._progress()
        if run is not None:
            return "sent a resync run"
        if s.inflight or s.unconfirmed:
            return None
        if self.oos.count():
            s.restart(self.oos)  # an absorb added chunks meanwhile: another pass
            return "another resync pass"
        self._resync_done(conn, "resync finished")
        return None

    def _resync_held(self, conn: P.FramedConnection, s: _Session) -> str | None:
        """Why the next resync run may not be sent now, or None when it may: it waits for a
        slot of the daemon's scheduler (FIFO), or its controller (resyncrate.py) or the peer's
        byte budget paces it. `s.hold`: the seconds to wait at most before asking again."""
        sched = self.res.daemon.scheduler
        now = time.monotonic()
        if not sched.acquire(self.slot_key, self.name, now, self.wake.set):
            s.hold = 0.1
            if self.queued_at is None:
                self.queued_at = now
                place = sched.position(self.slot_key)
                text = (f"resync waits for a slot ({place} in the queue, "
                        f"global.resync.concurrency {sched.concurrency})")
                log.info("%s/%s: %s", self.res.name, self.name, text)
                self.res.events.emit(resource=self.res.name, target=self.name,
                                     what=Event.RESYNC_QUEUED, position=place, text=text)
            return "waiting for a resync slot"
        if self.queued_at is not None:
            waited, self.queued_at = now - self.queued_at, None
            self.sync_started = self.progress_at = now  # its rate counts from here
            text = f"resync got a slot after waiting {waited:.1f} s"
            log.info("%s/%s: %s", self.res.name, self.name, text)
            self.res.events.emit(resource=self.res.name, target=self.name,
                                 what=Event.RESYNC_STARTED, waited_s=round(waited, 1), text=text)
        if self.pacer is None:
            self.pacer = ResyncRate(self.resync_settings, now)
        pacer = self.pacer
        if pacer.due(now):
            app_bps, app_latency, app_waiting = self.res.app_load()
            pacer.update(now, fill=_queued_bytes(conn), app_bps=app_bps,
                         app_latency=app_latency, app_waiting=app_waiting)
        s.hold = max(pacer.delay(now), sched.peer_delay(self.name, now))
        return "resync paced" if s.hold > 0 else None

    def _release_slot(self) -> None:
        """Give the resync's slot (or its place in the queue) back to the scheduler."""
        self.res.daemon.scheduler.release(self.slot_key)
        self.queued_at = None
        self.pacer = None

    def _send_differing(self, conn: P.FramedConnection, run: range, buf: Any) -> int:
        """Resync `run` by checksums: ask the target for its digests, send only the chunks
        whose data differs. The local read comes after the records already sent, as in a plain
        resync. The bytes compared."""
        algo = P.DigestAlgorithm.BLAKE2B_256
        conn.send_message(P.CsumRequest(run.start, len(run), algo))
        reply = self.res.csum_reply(self, run.start, algo)
        if len(reply.digests) != len(run):
            raise ReplError(f"{self.res.name}/{self.name}: checksum reply for chunks "
                            f"{run.start}+{len(run)} has {len(reply.digests)} digests")
        data = self.res.read_chunks(run, buf)
        chunk = self.res.chunk_bytes
        differs = [algo.digest(data[k * chunk:(k + 1) * chunk]) != theirs
                   for k, theirs in enumerate(reply.digests)]
        k = 0
        while k < len(run):
            first = k
            while k < len(run) and differs[k]:
                k += 1
            if k > first:  # a run of differing chunks: one frame
                piece = data[first * chunk:k * chunk]
                conn.send_message(P.ResyncChunk(run.start + first, piece))
                self.bytes_sent += len(piece)
                self.resync_bytes += len(piece)
            k += 1
        return len(data)

    def _send_records(self, conn: P.FramedConnection, gen: int) -> int:
        with self.send_lock:
            if not self.joined or gen != self.join_gen:
                return 0  # left the stream, or readmitted at another position
            return self._send_records_locked(conn)

    def _send_records_locked(self, conn: P.FramedConnection) -> int:
        st = self.res.kernel_state()
        if self.pos < st.stream_start or not st.streaming and self.pos >= st.ring_end:
            return 0
        last = min(st.published, st.ring_end - 1)
        frames: list[tuple[int, list[Any]]] = []  # RECORDS frames: their parts
        parts: list[Any] = []  # of the frame being filled: buffers of heads and small data ...
        buf = bytearray()      # ... the one being filled
        batch = 0              # bytes in the frame being filled
        n = 0
        size = 0
        seq = self.pos
        pack, head = P.RECORD.pack, P.RECORD.size
        while seq <= last and n < 512 and size < (8 << 20):
            r = self.res.consumer.record(seq)
            flags = P.RecordFlags.FUA if r.fua else P.NO_FLAGS
            if r.op in ("flush", "noop"):
                # a flush has no range on the wire, whatever the kernel's record holds; a
                # refused (unsupported) discard changed nothing: as a flush it keeps its seq
                rec = pack(seq, 0, 0, P.RecordOp.FLUSH, flags)
            else:
                rec = pack(seq, r.sector, r.length, RING_OPS[r.op], flags)
            data = r.data if r.op == "write" else b""
            if batch and batch + head + len(data) > RECORDS_BYTES:
                frames.append((P.FrameType.RECORDS, [*parts, buf]))
                parts, buf, batch = [], bytearray(), 0
            buf += rec
            if len(data) <= COPY_MAX:
                buf += data
            else:
                parts += (buf, data)
                buf = bytearray()
            batch += head + len(data)
            size += len(data)
            n += 1
            seq += 1
        if batch:
            frames.append((P.FrameType.RECORDS, [*parts, buf]))
        if frames:
            self.sent_max = seq - 1  # before: the target may ack the first frames at once
            if self.latency is not None:
                self.unacked.append((seq - 1, time.monotonic()))
            conn.send_batch(frames)
            self.bytes_sent += size
            self.pos = seq
        return n

    def _pause(self, conn: P.FramedConnection) -> None:
        """Stop at a record boundary with everything sent durable: a consistent copy."""
        conn.send_message(P.Pause())
        self._ping(conn, timeout=30)
        self._drop(f"{self.admin} by the administrator", quiet=True)



_ENDED = "session ended"


class _Session:
    """What one session of a link tracks of its resync: the pass over the OOS bitmap, the runs
    sent and not yet pinged, and the pinged windows not yet confirmed durable."""

    def __init__(self, buf: Any, run: int = RESYNC_RUN) -> None:
        self.buf = buf          # the resync read buffer of this link
        self.run = run          # chunks per resync run at most
        self.gen = -1           # the admission this session streams for
        self.epoch = 0
        self.resync: Iterator[range] = iter(())
        self.next_run: range | None = None  # taken from `resync`, not sent yet (held)
        self.hold = 0.0         # this turn's resync is held for at most this many seconds
        self.inflight: list[range] = []
        self.inflight_bytes = 0
        # windows sent and pinged, not yet confirmed durable: (pong, runs, bytes)
        self.unconfirmed: list[tuple[threading.Event, list[range], int]] = []

    def restart(self, oos: OOSBitmap) -> None:
        """A new pass over the bitmap, with nothing in flight."""
        self.epoch = oos.epoch
        self.resync = oos.runs(self.run)
        self.next_run = None
        self.inflight, self.inflight_bytes, self.unconfirmed = [], 0, []


def _queued_bytes(conn: P.FramedConnection) -> int:
    """The bytes queued in the connection's socket toward the peer, not sent or not yet
    acknowledged by its TCP (SIOCOUTQ); 0 if it cannot be told."""
    try:
        got = fcntl.ioctl(conn.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        return int(struct.unpack("i", got)[0])
    except (OSError, ValueError, AttributeError):
        return 0


def _check_link_state(data: dict[str, Any]) -> str | None:
    if data.get("admin") in set(Admin):
        return None
    return f"admin {data.get('admin')!r} is none of {', '.join(Admin)}"
