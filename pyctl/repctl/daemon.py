"""The node daemon: serves every resource of this node, as source or as target.

Source side (one ``SourceResource`` per resource whose source is this node):

* the **engine** thread owns the kernel consumer's control verbs: it starts
  the ring, lets targets join the stream, acknowledges records to the kernel
  (the minimum over the joined targets; durable acks for sync targets), and
  runs the MARK / CLEAN cycle that moves responsibility for changed chunks
  from the kernel's bitmap to each target's persistent out-of-sync bitmap;
* one **link** per target: a sender thread that connects, authenticates,
  streams ring records in order and interleaves resync chunks read from the
  device, and a receiver thread for the target's ACK, PONG and CSUM_REPLY.

The invariant behind P2: the kernel clears a chunk's bit (CLEAN at mark M)
only when every target either has durably acknowledged every record before M
or has absorbed a bitmap snapshot taken after M into its persistent OOS file.

Target side (one ``TargetResource`` per resource this node is a target of):
a listener that accepts the source, applies records and resync chunks in
order to the store, makes them durable and acknowledges.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import secrets
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

from repctl import dm, metadata, protocol as P
from repctl.config import Config, Node, Resource, Target, TargetMode
from repctl.errors import HandshakeRefused, ProtocolError, ReplError
from repctl.oos import OOSBitmap
from repctl.ring import Consumer, RingError
from repctl.statefile import StateError, load_json, remove_stale_temporaries, save_json
from repctl.store import Store, open_store

log = logging.getLogger("repctl.daemon")

SECTOR = 512
CLEAN_INTERVAL = 1.0     # seconds between MARK / CLEAN cycles
RESYNC_RUN = 256         # chunks per RESYNC_CHUNK frame at most (1 MiB at 4 KiB)
RESYNC_WINDOW = 16 << 20  # resync bytes per PONG barrier (two windows in flight)
ASYNC_BATCH = 64         # an async link is woken per this many records ...
ASYNC_WAIT_MS = 20       # ... or after this long (the kernel wakes it sooner if the ring fills)
ASYNC_NICE = 10          # CPU priority of an async link's thread: the applications come first
FLUSH_BYTES = 1 << 20    # a target makes its writes durable (and says so) at least this often
RECONNECT_DELAY = 1.0
FAILED_RETRY = 5.0       # seconds before a link that hit an internal error tries again
MAX_PENDING_HANDSHAKES = 8  # unauthenticated connections a target serves at once; more are shed
READ_PIECE = 16 << 20    # the most one read of a device or store asks for
SEND_TIMEOUT_MS = 30_000  # TCP_USER_TIMEOUT: a peer that takes nothing for this long is dropped
LOCK_WAIT = 1.0          # the engine waits this long for a link's sender before it cuts the link

TARGET_STATE_ACTION = ("the copy is treated as inconsistent and the source resyncs it whole; "
                       "the corrupt file is kept beside it for inspection")

STATES = ("connecting", "syncing", "streaming", "paused", "behind", "disconnected", "failed")
ADMIN = ("up", "paused", "disconnected")

LINK_STATE_ACTION = "the target is taken as up (not paused); check it with `repctl status`"
OOS_ACTION = ("every chunk is taken as out of sync for this target: it gets a full resync; "
              "the corrupt file is kept beside it for inspection")
GENERATION_ACTION = ("the resource stays down: restore the file from a backup of the state folder, "
                     "or see docs/architecture.md, \"State files\", to start a new generation")


class Events:
    """Fan-out of state-change events to subscribers (``repctl events``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[queue.Queue[dict[str, Any]]] = []

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10000)
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    def emit(self, **event: Any) -> None:
        event.setdefault("time", time.time())
        log.info("event: %s", " ".join(f"{k}={v}" for k, v in event.items() if k != "time"))
        with self._lock:
            for q in list(self._subs):
                try:
                    q.put_nowait(event)
                except queue.Full:
                    self._subs.remove(q)


# ------------------------------------------------------------------ source side


class Link:
    """The source's view of one target: connection, stream position, OOS bitmap."""

    def __init__(self, res: SourceResource, target: Target, node: Node):
        self.res = res
        self.name = target.name
        self.mode = target.mode
        self.max_lag = target.max_lag or 0  # async: the backlog past which it falls behind
        self.node = node
        self.address = (node.address, res.cfg.port)
        self.state_path = res.state_dir / f"{self.name}.json"
        self.last_error: str | None = None
        try:
            self.saved = load_json(self.state_path, {"admin": "up"}, action=LINK_STATE_ACTION,
                                   check=lambda d: None if d.get("admin") in ADMIN
                                   else f"admin {d.get('admin')!r} is none of {', '.join(ADMIN)}")
        except StateError as e:
            self._state_error(e)
            _set_aside(self.state_path)
            self.saved = {"admin": "up"}
            save_json(self.state_path, self.saved)
        oos_path = res.state_dir / f"{self.name}.oos"
        try:
            self.oos = OOSBitmap(oos_path, res.nr_chunks, action=OOS_ACTION)
        except StateError as e:
            self._state_error(e)
            _set_aside(oos_path)
            self.oos = OOSBitmap(oos_path, res.nr_chunks)  # missing now: all dirty, below
        if not self.oos.existed:
            self.oos.set_all()  # a new target: everything must be sent once
            self.oos.save()
        self.cond = threading.Condition()
        self.state = "connecting" if self.saved["admin"] == "up" else self.saved["admin"]
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
        self.bytes_sent = 0
        self.sync_total = 0
        self.sync_done = 0
        self.sync_started = 0.0
        self.wake = threading.Event()
        # held while ring records are read and sent: the engine takes it before
        # it lets the kernel reuse ring space this link may still be sending
        self.send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"link-{res.name}-{self.name}", daemon=True)

    # -- state ---------------------------------------------------------
    def _state_error(self, e: StateError) -> None:
        self.last_error = str(e)
        log.error("%s/%s: %s", self.res.name, self.name, e)
        self.res.events.emit(resource=self.res.name, target=self.name, what="error", text=str(e))

    def set_state(self, state: str, why: str = "") -> None:
        assert state in STATES, state
        if state != self.state:
            old, self.state = self.state, state
            self.res.events.emit(resource=self.res.name, target=self.name, what="state",
                                 old=old, new=state, text=why)

    @property
    def admin(self) -> str:
        return str(self.saved["admin"])

    def set_admin(self, admin: str) -> None:
        self.saved["admin"] = admin
        save_json(self.state_path, self.saved)
        self.wake.set()  # the sender stops at a record boundary (_pause)

    def status(self) -> dict[str, Any]:
        st = self.res.kstate
        oos = self.oos.count() * self.res.chunk_bytes
        sync = None
        if self.state == "syncing":
            elapsed = max(time.monotonic() - self.sync_started, 1e-6)
            rate = self.sync_done / elapsed
            left = max(self.sync_total - self.sync_done, 0)
            sync = {"done_bytes": self.sync_done, "total_bytes": self.sync_total,
                    "rate_bps": rate, "eta_s": (left / rate) if rate > 0 else None}
        lag = max(st.published - self.ack, 0) if st is not None and self.joined else 0
        return {"name": self.name, "mode": str(self.mode), "state": self.state,
                "connection": "connected" if self.conn is not None else
                ("refused: " + self.last_error if self.last_error and "refused" in self.last_error
                 else "connecting" if self.admin == "up" else "down"),
                "address": f"{self.address[0]}:{self.address[1]}",
                "out_of_sync_bytes": oos, "bytes_sent": self.bytes_sent, "lag_records": lag,
                "lag_bytes": st.ring_used if lag and st is not None else 0, "sync": sync,
                "last_error": self.last_error}

    # -- connection ----------------------------------------------------
    def _connect(self) -> P.FramedConnection:
        sock = socket.create_connection(self.address, timeout=5)
        _tune(sock)
        conn = P.FramedConnection(sock)
        res = self.res
        local = P.HandshakeInfo(resource=res.name, node=res.node, role=P.Role.SOURCE,
                                device_size=res.size, chunk_size=res.chunk_bytes,
                                generations=res.generations())

        def check(peer: P.PeerInfo) -> None:
            rel = P.compare_generations(local.generations, peer.generations)
            if rel in (P.GenerationRelation.EQUAL, P.GenerationRelation.LOCAL_AHEAD):
                return
            raise HandshakeRefused(P.RefuseReason.SPLIT_BRAIN,
                                   f"target {peer.node} holds generation {peer.generations.current:#x}, "
                                   f"which is not in this source's history ({rel.name.lower()}): "
                                   "split brain, resolve by hand")
        try:
            peer = P.handshake(conn, local, res.secret, P.Expect(frozenset({self.name}), check))
        except BaseException:
            conn.close()
            raise
        sock.settimeout(None)
        if P.compare_generations(local.generations, peer.generations) is not P.GenerationRelation.EQUAL:
            log.info("%s/%s: target holds no data of this generation: full sync", res.name, self.name)
            self.oos.set_all()
            self.oos.save()
        return conn

    def _drop(self, why: str, quiet: bool = False) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self.res.unjoin(self)
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
                    self.res.engine_wake.set()
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
                self.set_state("failed", self.last_error)
                self.res.stopping.wait(FAILED_RETRY)

    def _loop(self) -> None:
        if self.mode is TargetMode.ASYNC:
            # P4: an async target never slows the primary, nor does the CPU that feeds it
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ASYNC_NICE)
            except OSError as e:
                log.warning("%s/%s: cannot lower the link's CPU priority: %s", self.res.name, self.name, e)
        while not self.res.stopping.is_set():
            if self.admin != "up":
                self.set_state(self.admin if self.admin in STATES else "disconnected")
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            self.set_state("connecting")
            try:
                conn = self._connect()
            except (OSError, ReplError) as e:
                self.last_error = str(e)
                if isinstance(e, HandshakeRefused):
                    self.last_error = f"refused: {e}"
                log.warning("%s/%s: cannot connect to %s:%s: %s", self.res.name, self.name,
                            *self.address, e)
                self.wake.wait(RECONNECT_DELAY)
                self.wake.clear()
                continue
            self.last_error = None
            self.sent_max = 0
            self.conn = conn
            threading.Thread(target=self._receiver, args=(conn,), daemon=True,
                             name=f"recv-{self.res.name}-{self.name}").start()
            try:
                self._serve(conn)
            except (OSError, ReplError) as e:
                if self.conn is conn:
                    self._drop(f"connection lost: {e}")
            if self.conn is conn:
                self._drop("closed", quiet=True)

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
        res = self.res
        res.join(self)
        gen = -1
        resync = iter(())
        inflight: list[range] = []
        inflight_bytes = 0
        # windows sent and pinged, not yet confirmed durable: (pong, runs, bytes)
        unconfirmed: list[tuple[threading.Event, list[range], int]] = []
        buf = res.resync_buffer()
        epoch = 0
        while self.conn is conn and not res.stopping.is_set():
            if self.admin != "up":
                self._pause(conn)
                return
            if not self.joined:
                self.wake.wait(0.1)
                self.wake.clear()
                continue
            if gen != self.join_gen:
                # admitted (again): stream from the admission's mark, resync the OOS
                gen, self.pos = self.join_gen, self.join_pos
                epoch = self.oos.epoch
                resync = self.oos.runs(RESYNC_RUN)
                inflight, inflight_bytes, unconfirmed = [], 0, []
                pending = self.oos.count()
                self.sync_total, self.sync_done = pending * res.chunk_bytes, 0
                self.sync_started = time.monotonic()
                if pending:
                    self.set_state("syncing" if self.state != "streaming" else "behind",
                                   f"{pending} chunks to resync")
                else:
                    self.set_state("streaming")
            sent = self._send_records(conn, gen)
            run = None
            if self.state in ("syncing", "behind"):
                run = next(resync, None)
                if run is not None:
                    data = res.read_chunks(run, buf)
                    conn.send_message(P.ResyncChunk(run.start, data))  # sent: buf is free again
                    self.bytes_sent += len(data)
                    inflight.append(run)
                    inflight_bytes += len(data)
                if inflight and (run is None or inflight_bytes >= RESYNC_WINDOW):
                    # ping the window and go on sending: the link never idles waiting
                    unconfirmed.append((self._send_ping(conn), inflight, inflight_bytes))
                    inflight, inflight_bytes = [], 0
                while unconfirmed and (len(unconfirmed) > 1 or run is None):
                    pong, runs, nbytes = unconfirmed.pop(0)
                    if not pong.wait(60) or self.conn is not conn:
                        return
                    for r in runs:
                        self.oos.clear(r, epoch)
                    self.sync_done += nbytes
                    self.oos.save()
                if run is None and not inflight and not unconfirmed:
                    if self.oos.count():
                        # an absorb added chunks meanwhile: another pass
                        resync = self.oos.runs(RESYNC_RUN)
                        epoch = self.oos.epoch
                        continue
                    conn.send_message(P.ResyncDone(0))
                    self.set_state("streaming", "resync finished")
            if not sent and run is None:
                if self.mode is TargetMode.ASYNC:
                    res.consumer.wait(max(self.pos - 1, 0), ASYNC_WAIT_MS, batch=ASYNC_BATCH)
                else:
                    res.consumer.wait(max(self.pos - 1, 0), 100)

    def _send_records(self, conn: P.FramedConnection, gen: int) -> int:
        with self.send_lock:
            if not self.joined or gen != self.join_gen:
                return 0  # left the stream, or readmitted at another position
            return self._send_records_locked(conn)

    def _send_records_locked(self, conn: P.FramedConnection) -> int:
        st = self.res.consumer.state()
        if self.pos < st.stream_start or not st.streaming and self.pos >= st.ring_end:
            return 0
        last = min(st.published, st.ring_end - 1)
        frames = []
        n = 0
        size = 0
        seq = self.pos
        while seq <= last and n < 512 and size < (8 << 20):
            r = self.res.consumer.record(seq)
            # a refused (unsupported) discard changed nothing: a flush keeps its seq
            op = P.RecordOp.FLUSH if r.op == "noop" else P.RecordOp[r.op.upper()]
            rec = P.Record(op, seq, r.sector if op != P.RecordOp.FLUSH else 0,
                           r.length if op != P.RecordOp.FLUSH else 0,
                           P.RecordFlags.FUA if r.fua else P.NO_FLAGS,
                           r.data if op == P.RecordOp.WRITE else b"")
            frames.append((rec.frame_type, rec.encode()))
            size += len(r.data)
            n += 1
            seq += 1
        if frames:
            self.sent_max = seq - 1  # before: the target may ack the first frames at once
            conn.send_batch(frames)
            self.bytes_sent += size
            self.pos = seq
        return n

    def _pause(self, conn: P.FramedConnection) -> None:
        """Stop at a record boundary with everything sent durable: a consistent copy."""
        conn.send_message(P.Pause())
        self._ping(conn, timeout=30)
        self._drop(f"{self.admin} by the administrator", quiet=True)


class _Resource:
    """What a resource needs on either side: its config, secret, state folder and events."""

    def __init__(self, daemon: Daemon, cfg: Resource):
        self.daemon = daemon
        self.cfg = cfg
        self.name = cfg.name
        self.node = daemon.node
        self.events = daemon.events
        self.secret = daemon.config.read_secret(cfg.name)
        self.state_dir = daemon.state_dir / cfg.name
        self.state_dir.mkdir(parents=True, exist_ok=True)


class VerifyProgress:
    """How far a running `verify` has got; `status` shows it on the target (docs/cli.md).

    Pass 1 compares every chunk; pass 2, if any differed, re-checks only those.
    """

    def __init__(self, total: int, chunk_bytes: int):
        self._lock = threading.Lock()
        self.started = time.time()
        self.chunk_bytes = chunk_bytes
        self.begin(1, total)

    def begin(self, pass_no: int, total: int) -> None:
        with self._lock:
            self.pass_no, self.total, self.done, self.differing = pass_no, total, 0, 0
            self._t0 = time.monotonic()

    def advance(self, chunks: int, differing: int) -> None:
        with self._lock:
            self.done += chunks
            self.differing += differing

    def status(self) -> dict[str, Any]:
        with self._lock:
            elapsed = time.monotonic() - self._t0
            rate = self.done / elapsed if self.done and elapsed > 0 else 0.0
            left = max(self.total - self.done, 0)
            return {"pass": self.pass_no, "done_chunks": self.done, "total_chunks": self.total,
                    "differing_chunks": self.differing, "chunk_size": self.chunk_bytes,
                    "started": self.started, "rate_cps": rate,
                    "eta_s": left / rate if rate > 0 else None}


class SourceResource(_Resource):
    """A resource whose source is this node."""

    def __init__(self, daemon: Daemon, cfg: Resource):
        super().__init__(daemon, cfg)
        node = cfg.nodes[self.node]
        if node.metadata is None:
            raise ReplError(f"resource {cfg.name}: node {self.node} is the source but has no metadata device")
        self.data_dev = str(node.device)
        self.meta_dev = str(node.metadata)
        self.size = metadata.device_bytes(self.data_dev)
        self.chunk_bytes = cfg.chunk_size
        self.chunk_sectors = cfg.chunk_size // SECTOR
        self.nr_chunks = -(-self.size // self.chunk_bytes)
        remove_stale_temporaries(self.state_dir)
        self.gen_path = self.state_dir / "generation.json"
        self.gen = load_json(self.gen_path, {}, action=GENERATION_ACTION, check=_check_generation)
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.engine_wake = threading.Event()
        self.consumer: Consumer = None  # type: ignore[assignment]
        self.kstate = None
        self.dev_path = f"/dev/mapper/{self.name}"
        self.read_fd = -1
        self.links = {t: Link(self, target, cfg.nodes[t]) for t, target in cfg.targets.items()}
        self.engine = threading.Thread(target=self._engine, name=f"engine-{self.name}", daemon=True)
        self.last_clean = 0.0
        self.sync_on = False
        self.released = 0
        self.verifying: dict[str, VerifyProgress] = {}  # target -> its running verify
        self.failed: str | None = None  # why the engine stopped for good (state `failed`)
        self.pending_clean: tuple[int, frozenset[str]] | None = None  # (mark, absorbed links)

    def generations(self) -> P.Generations:
        return P.Generations(int(self.gen["current"]), tuple(self.gen.get("history", ())))

    # -- device --------------------------------------------------------
    def _table(self) -> dm.Target:
        sectors = self.size // SECTOR
        # the config accepts exactly the kernel's ranges (whole MiB, 100 ms .. 10 min)
        ring_mb = self.cfg.ring_size >> 20
        timeout_ms = round(self.cfg.sync_timeout * 1000)
        return dm.Target(0, sectors, "repl", f"{self.data_dev} {self.meta_dev} {self.chunk_sectors} "
                         f"4 ring_mb {ring_mb} sync_timeout_ms {timeout_ms}")

    def _bind_generation(self, md_uuid: str) -> None:
        """Tie the data generation to the metadata superblock (P6, issue 10 item 9).

        A superblock with another uuid than the one the generation was made with means the
        metadata was formatted anew: the data device was replaced or restored, so that neither
        the kernel's bitmap nor the targets' OOS bitmaps say what differs. A new generation
        starts (the old one goes to the history), and every target gets a full sync.
        """
        if "current" not in self.gen:
            self.gen = {"current": secrets.randbits(63) | 1, "history": [], "md_uuid": md_uuid}
            save_json(self.gen_path, self.gen)
            return
        old = self.gen.get("md_uuid")
        if old == md_uuid:
            return
        if old is not None:
            text = (f"metadata {self.meta_dev} has uuid {md_uuid}, the generation was made with "
                    f"{old}: the metadata was formatted anew, so the data may differ anywhere; "
                    "new data generation, every target gets a full sync")
            log.warning("%s: %s", self.name, text)
            self.events.emit(resource=self.name, what="new_generation", text=text)
            history = [int(self.gen["current"]), *self.gen.get("history", [])][:P.MAX_HISTORY]
            self.gen = {"current": secrets.randbits(63) | 1, "history": history}
            for link in self.links.values():
                link.oos.set_all()
                link.oos.save()
        self.gen["md_uuid"] = md_uuid
        save_json(self.gen_path, self.gen)

    def start(self) -> None:
        sb = metadata.read_superblock(self.meta_dev)
        if sb is None:
            raise ReplError(f"resource {self.name}: metadata device {self.meta_dev} is not "
                            f"formatted: run `repctl create-md {self.name}` first")
        self._bind_generation(sb.uuid)
        with dm.DMControl() as ctl:
            names = {d.name for d in ctl.list_devices()}
            if self.name not in names:
                dm.create_device(self.name, [self._table()], ctl=ctl)
        self.consumer = Consumer(self.dev_path, sync=False)  # sync once a sync target joins
        # O_DIRECT: a filesystem's data writes bypass the block device's page
        # cache, so a buffered resync read could send stale data
        self.read_fd = os.open(self.dev_path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        self.engine.start()
        for link in self.links.values():
            link.thread.start()
        self.events.emit(resource=self.name, what="up", text=f"source of {self.name} on {self.dev_path}")

    def stop(self, remove: bool = False) -> None:
        self.stopping.set()
        self.engine_wake.set()
        for link in self.links.values():
            link.wake.set()
            if link.conn is not None:
                link.conn.close()
        for link in self.links.values():
            if link.thread.is_alive():
                link.thread.join(5)
        if self.engine.is_alive():
            self.engine.join(5)
        for link in self.links.values():
            link.oos.save()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1
        if self.consumer is not None:
            self.consumer.close()
        if remove:
            dm.remove_device(self.name)
        self.events.emit(resource=self.name, what="down")

    def resync_buffer(self) -> mmap.mmap:
        """A buffer for read_chunks, for one link: page-aligned, as O_DIRECT needs."""
        return mmap.mmap(-1, RESYNC_RUN * self.chunk_bytes)

    def read_chunks(self, run: range, buf: mmap.mmap | None = None) -> memoryview:
        """The chunks' current content, read past the page cache into buf (valid until its next use)."""
        off = run.start * self.chunk_bytes
        length = min(len(run) * self.chunk_bytes, self.size - off)
        if buf is None or len(buf) < length:
            buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
        view = memoryview(buf)[:length]
        got = 0
        while got < length:  # a read may return less than asked: go on from where it stopped
            n = os.preadv(self.read_fd, [view[got:got + READ_PIECE]], off + got)
            if n <= 0:
                raise ReplError(f"{self.dev_path}: read at {off + got} ended early ({got} of "
                                f"{length} bytes)")
            got += n
        return view

    # -- joining the stream (engine thread) ------------------------------
    def join(self, link: Link) -> None:
        with self.lock:
            link.join_wanted = True
        self.engine_wake.set()

    def unjoin(self, link: Link) -> None:
        with self.lock:
            link.joined = False
            link.join_wanted = False
        self.engine_wake.set()

    def _absorb(self, links: list[Link]) -> int:
        """MARK, then OR the kernel bitmap into each link's OOS and make it durable."""
        mark = self.consumer.mark()
        if links:
            bm = self.consumer.bitmap()
            for link in links:
                link.oos.absorb(bm)
                link.oos.save()
        return mark

    def _engine(self) -> None:
        """The engine's thread. An OSError or ReplError is retried each second; anything else
        is a bug: the resource goes to state `failed`, the consumer detaches (the kernel goes on
        serving I/O and tracks every change in its bitmap, P5) and the targets stop, until
        `repctl down` and `up`."""
        while not self.stopping.is_set():
            try:
                self._cycle()
            except (OSError, ReplError) as e:
                log.exception("%s: engine: %s", self.name, e)
                self.events.emit(resource=self.name, what="error", text=str(e))
                time.sleep(1)
            except Exception as e:
                self._fail(f"engine: internal error: {e!r}")
                return
            self.engine_wake.wait(0.05)
            self.engine_wake.clear()

    def _fail(self, why: str) -> None:
        log.exception("%s: %s: the resource has failed", self.name, why)
        self.failed = why
        self.events.emit(resource=self.name, what="failed", text=why)
        self.stopping.set()  # the links stop
        for link in self.links.values():
            link.wake.set()
            if link.conn is not None:
                link.conn.close()
        for link in self.links.values():
            if link.thread.is_alive():
                link.thread.join(5)  # none still reads the ring
        try:
            self.consumer.close()  # detached: the kernel tracks writes in its bitmap
        except Exception:
            log.exception("%s: cannot detach the consumer", self.name)

    def _quiesce(self, link: Link) -> None:
        """Wait until `link` reads no ring record; cut its connection if its sender is stuck in a
        send (a target that stopped reading must not hold back the others, item 7)."""
        if link.send_lock.acquire(timeout=LOCK_WAIT):
            link.send_lock.release()
            return
        log.warning("%s/%s: the sender is stuck for %g s: connection cut", self.name, link.name,
                    LOCK_WAIT)
        conn = link.conn
        if conn is not None:
            conn.close()
        with link.send_lock:
            pass

    def _cycle(self) -> None:
        st = self.consumer.state()
        self.kstate = st
        links = list(self.links.values())
        if not st.streaming:
            self.pending_clean = None  # the new ring's absorb covers it
            # not started yet, or fell behind: every target takes the kernel's
            # bitmap into its own, and a new ring starts
            if st.reason not in ("no_consumer", "detached") or st.stream_start:
                self.events.emit(resource=self.name, what="fell_behind", text=st.reason)
            with self.lock:
                for link in links:
                    link.joined = False
                    link.join_wanted = link.join_wanted or link.conn is not None
            for link in links:
                self._quiesce(link)  # no sender is still reading the old ring
            self.consumer.start_stream()
            mark = self._absorb(links)
            # every target holds everything before the mark in its own bitmap
            self.consumer.clean(mark)
            self.kstate = st = self.consumer.state()
            self._admit(mark)
            return

        with self.lock:
            wanting = [l for l in links if l.join_wanted and not l.joined]
        if wanting:
            mark = self._absorb(wanting)
            self._admit(mark, wanting)

        # Synchronous writers wait only for the joined sync targets' durable
        # acks (RELEASE); ring space comes back when every joined target has
        # the records (ACK). An async target never delays a sync writer.
        with self.lock:
            joined = [l for l in links if l.joined]
        sync_joined = [l for l in joined if l.mode is TargetMode.SYNC]
        if bool(sync_joined) != self.sync_on:
            self.sync_on = bool(sync_joined)
            self.consumer.set_sync(self.sync_on)
        try:
            if sync_joined:
                release = min(min(l.durable for l in sync_joined), st.published)
                if release > self.released:
                    self.consumer.release(release)
                    self.released = release
            ack = min((l.durable if l.mode is TargetMode.SYNC else l.ack) for l in joined) \
                if joined else st.published
            ack = min(ack, st.published)
            if ack > st.acked and ack >= st.stream_start - 1:
                self.consumer.ack(ack)
        except RingError as e:
            log.debug("%s: ack/release: %s", self.name, e)

        # an async target whose backlog passes its max_lag falls behind (P4): the oldest
        # unacknowledged record is the laggiest target's, so the ring in use is its backlog
        oldest = min((x.ack for x in joined), default=st.published)
        for l in joined:
            if (l.mode is TargetMode.ASYNC and l.ack < st.published and l.ack == oldest
                    and st.ring_used > l.max_lag):
                log.warning("%s/%s: async target lags %d records, %d bytes (max_lag %d): falls "
                            "behind into its bitmap", self.name, l.name, st.published - l.ack,
                            st.ring_used, l.max_lag)
                with self.lock:
                    l.joined = False
                self._quiesce(l)  # its records in flight are sent before others may ack past them
                self.join(l)
                l.wake.set()

        if time.monotonic() - self.last_clean >= CLEAN_INTERVAL:
            self.last_clean = time.monotonic()
            self._clean_cycle(links)

    def _admit(self, mark: int, links: list[Link] | None = None) -> None:
        with self.lock:
            for link in links if links is not None else self.links.values():
                if not link.join_wanted:
                    continue
                with link.cond:
                    link.join_pos = mark
                    link.ack = link.durable = mark - 1
                link.join_gen += 1
                link.joined = True
                link.join_wanted = False
                link.wake.set()

    def _clean_cycle(self, links: list[Link]) -> None:
        """MARK now, CLEAN later: once every target holds what came before the mark, durably
        or in its OOS. Never waits: a slow target only delays the clean, not the others' acks."""
        if self.pending_clean is None:
            if not self.kstate or not self.kstate.dirty_chunks:
                return
            with self.lock:
                outside = [l for l in links if not l.joined]
            mark = self._absorb(outside)
            self.pending_clean = (mark, frozenset(l.name for l in outside))
        mark, absorbed = self.pending_clean
        with self.lock:
            for l in links:
                if l.name in absorbed:
                    continue  # its OOS holds everything before the mark
                if not l.joined:
                    self.pending_clean = None  # left the stream since: absorb it next cycle
                    return
                if l.durable < mark - 1:
                    return  # not yet: look again next cycle
        self.pending_clean = None
        self.consumer.clean(mark)

    # -- admin -------------------------------------------------------
    def link(self, target: str) -> Link:
        try:
            return self.links[target]
        except KeyError:
            raise ReplError(f"resource {self.name} has no target {target!r} "
                            f"(targets: {', '.join(self.links)})") from None

    def status(self) -> dict[str, Any]:
        if self.failed is not None:
            return {"name": self.name, "role": "source", "device": self.dev_path, "state": "failed",
                    "last_error": self.failed, "size": self.size,
                    "targets": [self._target_status(l) for l in self.links.values()]}
        st = self.kstate
        kernel = None
        if st is not None:
            kernel = {"mode": st.mode, "reason": st.reason, "dirty_chunks": st.dirty_chunks,
                      "chunk_size": self.chunk_bytes, "ring_used": st.ring_used,
                      "ring_bytes": st.ring_bytes, "published": st.published, "acked": st.acked}
        return {"name": self.name, "role": "source", "device": self.dev_path, "kernel": kernel,
                "size": self.size, "targets": [self._target_status(l) for l in self.links.values()]}

    def _target_status(self, link: Link) -> dict[str, Any]:
        """A target's status, with what the administrator asked (`admin`: up, paused or
        disconnected) and the progress of a verify that runs (null otherwise)."""
        progress = self.verifying.get(link.name)
        return {**link.status(), "admin": link.admin,
                "verify": progress.status() if progress is not None else None}

    def verify(self, target: str) -> dict[str, Any]:
        """Compare chunk digests with the target; a second pass re-checks what differed."""
        link = self.link(target)
        conn = link.conn
        if conn is None or link.state != "streaming":
            raise ReplError(f"{self.name}/{target}: not streaming ({link.state}): cannot verify now")
        progress = VerifyProgress(self.nr_chunks, self.chunk_bytes)
        if self.verifying.setdefault(target, progress) is not progress:
            # two verifies would take each other's checksum replies
            raise ReplError(f"{self.name}/{target}: a verify is already running "
                            "(its progress is in `repctl status`)")
        try:
            differing = self._compare(link, conn, range(self.nr_chunks), progress)
            if differing:
                time.sleep(0.5)  # writes in flight during the first pass settle
                progress.begin(2, len(differing))
                differing = self._compare(link, conn, sorted(differing), progress)
        finally:
            del self.verifying[target]
        return {"resource": self.name, "target": target, "chunks": self.nr_chunks,
                "chunk_size": self.chunk_bytes, "differing": sorted(differing)}

    def _compare(self, link: Link, conn: P.FramedConnection, chunks: range | list[int],
                 progress: VerifyProgress | None = None) -> set[int]:
        # everything published now must be durable on the target first
        published = self.consumer.state().published
        deadline = time.monotonic() + 30
        with link.cond:
            while link.durable < published and link.joined and time.monotonic() < deadline:
                link.cond.wait(0.1)
        link._ping(conn)
        algo = P.DigestAlgorithm.BLAKE2B_256
        while True:  # a reply that came after an earlier verify gave up is not ours
            try:
                link.csum_replies.get_nowait()
            except queue.Empty:
                break
        differing: set[int] = set()
        chunk_list = list(chunks)
        # at most MAX_CSUM_BYTES of chunks per request: the target reads them in one go
        step = max(1, min(4096, P.MAX_CSUM_BYTES // self.chunk_bytes))
        i = 0
        while i < len(chunk_list):
            first = chunk_list[i]
            count = 1
            while (i + count < len(chunk_list) and count < step
                   and chunk_list[i + count] == first + count):
                count += 1
            conn.send_message(P.CsumRequest(first, count, algo))
            reply = self._csum_reply(link, first, algo)
            if len(reply.digests) != count:
                # fewer digests would leave chunks uncompared: never "identical" by omission
                raise ReplError(f"{self.name}/{link.name}: checksum reply for chunks {first}+{count} "
                                f"has {len(reply.digests)} digests")
            local = self.read_chunks(range(first, first + count))
            before = len(differing)
            for k, digest in enumerate(reply.digests):
                mine = algo.digest(local[k * self.chunk_bytes:(k + 1) * self.chunk_bytes])
                if mine != digest:
                    differing.add(first + k)
            i += count
            if progress is not None:
                progress.advance(count, len(differing) - before)
        return differing

    def _csum_reply(self, link: Link, first: int, algo: P.DigestAlgorithm) -> P.CsumReply:
        """The reply to our CSUM_REQUEST for `first`; stale replies (an earlier verify's) are dropped."""
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = link.csum_replies.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise ReplError(f"{self.name}/{link.name}: no checksum reply within 60 s") from None
            if reply.first == first and reply.algorithm is algo:
                return reply
            log.info("%s/%s: dropped a stale checksum reply (chunk %d)", self.name, link.name, reply.first)


# ------------------------------------------------------------------ target side


class TargetResource(_Resource):
    """A resource this node is a target of: listen, authenticate, apply in order.

    The listener thread only accepts; each connection is handled in a thread of its own, so that
    a peer that never finishes its handshake holds nothing but its own thread, for at most the
    handshake's deadline. One authenticated source connection at a time: a second one is refused
    with BUSY.
    """

    def __init__(self, daemon: Daemon, cfg: Resource):
        super().__init__(daemon, cfg)
        self.state_path = self.state_dir / "target.json"
        self.last_error: str | None = None
        try:
            self.saved = load_json(self.state_path, {"current": 0, "history": [], "consistent": True},
                                   action=TARGET_STATE_ACTION, check=_check_target_state)
        except StateError as e:
            # never trust a copy whose state is unknown: no generation, inconsistent: a full sync
            self.saved = {"current": 0, "history": [], "consistent": False}
            self.last_error = f"{e} (taken as inconsistent: the source resyncs everything)"
            log.error("%s: %s", self.name, self.last_error)
            _set_aside(self.state_path)
            self._save()
        self.device = str(cfg.nodes[self.node].device)
        self.store: Store | None = None
        self.listener: socket.socket | None = None
        self.stopping = threading.Event()
        self.conn: P.FramedConnection | None = None
        self.conn_lock = threading.Lock()  # guards conn and pending
        self.pending = 0  # connections still in their handshake
        self.handlers: set[threading.Thread] = set()
        self.state = "disconnected"
        self.bytes_received = 0
        self.thread = threading.Thread(target=self._listen, name=f"listen-{self.name}", daemon=True)

    def start(self) -> None:
        self.store = open_store(self.device)
        addr = self.cfg.nodes[self.node].address
        self.listener = socket.create_server((addr, self.cfg.port), reuse_port=False)
        self.listener.settimeout(0.5)
        self.thread.start()
        self.events.emit(resource=self.name, what="up", text=f"target of {self.name} on {self.device}")

    def stop(self, remove: bool = False) -> None:
        self.stopping.set()
        with self.conn_lock:
            conn = self.conn
        if conn is not None:
            conn.close()
        if self.thread.is_alive():
            self.thread.join(5)
        for t in list(self.handlers):
            t.join(5)
        if self.listener is not None:
            self.listener.close()
        if self.store is not None:
            self.store.close()
        self.events.emit(resource=self.name, what="down")

    def _save(self) -> None:
        save_json(self.state_path, self.saved)

    def _set_state(self, state: str, why: str = "") -> None:
        if state != self.state:
            old, self.state = self.state, state
            self.events.emit(resource=self.name, target=self.node, what="state", old=old, new=state, text=why)

    def _listen(self) -> None:
        assert self.listener is not None
        while not self.stopping.is_set():
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.1)  # EMFILE and the like: never end the listener
                continue
            with self.conn_lock:
                if self.pending >= MAX_PENDING_HANDSHAKES:
                    sock.close()  # a flood of unauthenticated connections: shed them
                    log.warning("%s: %d handshakes pending: closed a connection from %s",
                                self.name, self.pending, peer[0])
                    continue
                self.pending += 1
            t = threading.Thread(target=self._handle, args=(sock, peer), daemon=True,
                                 name=f"conn-{self.name}-{peer[0]}:{peer[1]}")
            self.handlers.add(t)
            t.start()

    def _handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """One connection, from its handshake to its end. Nothing it raises escapes: every other
        connection, and the listener, go on."""
        conn = P.FramedConnection(sock)
        claimed = False

        def claim(info: P.PeerInfo) -> None:
            nonlocal claimed
            with self.conn_lock:
                if self.conn is not None:
                    raise HandshakeRefused(P.RefuseReason.BUSY,
                                           f"resource {self.name} on {self.node} is already "
                                           f"connected to its source {info.node}")
                self.conn = conn
                claimed = True

        try:
            _tune(sock)
            try:
                info = P.handshake(conn, self._local_info(), self.secret,
                                   P.Expect(frozenset({self.cfg.source}), claim))
            finally:
                with self.conn_lock:
                    self.pending -= 1
            self.last_error = None
            self._serve(conn, info)
        except HandshakeRefused as e:
            self.last_error = f"refused {peer[0]}: {e}"
            log.warning("%s: refused connection from %s: %s", self.name, peer[0], e)
        except (OSError, ReplError) as e:
            self.last_error = f"connection from {peer[0]}: {e}"
            log.warning("%s: connection from %s: %s", self.name, peer[0], e)
        except Exception as e:  # a bug: this connection ends, the listener and the rest go on
            self.last_error = f"connection from {peer[0]}: internal error: {e!r}"
            log.exception("%s: connection from %s: internal error", self.name, peer[0])
            with contextlib.suppress(OSError, ReplError):
                conn.send_message(P.Error(P.ErrorCode.INTERNAL, f"internal error: {e!r}"))
        finally:
            conn.close()
            if claimed:
                with self.conn_lock:
                    if self.conn is conn:
                        self.conn = None
                self._set_state("disconnected")
            self.handlers.discard(threading.current_thread())

    def _local_info(self) -> P.HandshakeInfo:
        assert self.store is not None
        return P.HandshakeInfo(resource=self.name, node=self.node, role=P.Role.TARGET,
                               device_size=self.store.size, chunk_size=self.cfg.chunk_size,
                               generations=P.Generations(int(self.saved["current"]),
                                                         tuple(self.saved["history"])))

    def _serve(self, conn: P.FramedConnection, info: P.PeerInfo) -> None:
        store = self.store
        assert store is not None
        sock = conn.sock
        source_gen = info.generations
        self._set_state("streaming", f"source {info.node} connected")
        chunk = self.cfg.chunk_size
        # ring sequence numbers belong to this connection: nothing of it is applied yet, and an
        # ack never speaks of records an earlier connection (or an earlier boot) sent
        applied = acked = 0
        # a sync source's writers wait for durable acks: flush per FLUSH_BYTES of records
        sync = self.cfg.targets[self.node].mode is TargetMode.SYNC
        dirty = False
        record_bytes = 0  # of records written since the last flush
        last_flush = last_ack = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if dirty and ((sync and record_bytes >= FLUSH_BYTES) or now - last_flush > 0.2
                          or not _readable(sock)):
                # idle, or a busy stream every MiB or 200 ms: make it durable, say so (a sync
                # source's writers wait for this; per MiB keeps several of them in flight)
                store.flush()
                dirty, record_bytes = False, 0
                last_flush = last_ack = now
                acked = applied
                if applied:
                    conn.send_message(P.Ack(applied, durable=True))
            elif applied > acked and now - last_ack > 0.005:
                acked, last_ack = applied, now
                conn.send_message(P.Ack(applied, durable=False))
            frame = conn.recv()
            msg = P.decode(frame.type, frame.payload)
            if isinstance(msg, P.Record):
                if msg.ring_seq <= applied:
                    raise ProtocolError(f"record {msg.ring_seq} after record {applied}: "
                                        "records must come in ring order")
                end = msg.sector * SECTOR + msg.length
                if end > store.size:
                    raise ProtocolError(f"record {msg.ring_seq} ends at byte {end}, past the device")
                store.apply(msg.op.name.lower(), msg.sector, msg.length, msg.data,
                            bool(msg.flags & P.RecordFlags.FUA))
                self.bytes_received += msg.length if msg.op is P.RecordOp.WRITE else 0
                applied = msg.ring_seq
                dirty = True
                record_bytes += msg.length
            elif isinstance(msg, P.ResyncChunk):
                off = msg.chunk * chunk
                data = memoryview(msg.data)
                if off + data.nbytes > store.size:
                    raise ProtocolError(f"resync chunk {msg.chunk} ends past the device")
                if self.saved["consistent"]:
                    self.saved["consistent"] = False
                    self._save()
                    self._set_state("syncing", "resync started")
                store.write(off, data)
                self.bytes_received += data.nbytes
                dirty = True  # a resync's durability comes with the PONGs
            elif isinstance(msg, P.ResyncDone):
                store.flush()
                self.saved.update(consistent=True, current=source_gen.current,
                                  history=list(source_gen.history))
                self._save()
                self._set_state("streaming", "resync finished: consistent")
            elif isinstance(msg, P.Ping):
                store.flush()
                dirty, record_bytes = False, 0
                conn.send_message(P.Pong(msg.token, msg.time_ns))
            elif isinstance(msg, P.Pause):
                store.flush()
                dirty, record_bytes = False, 0
                acked = applied
                if applied:
                    conn.send_message(P.Ack(applied, durable=True))
                self._set_state("paused", "paused by the source")
            elif isinstance(msg, P.CsumRequest):
                conn.send_message(self._checksums(msg))
            elif isinstance(msg, P.Error):
                raise ProtocolError(f"source reported: {msg.text}")
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} from the source")

    def _checksums(self, msg: P.CsumRequest) -> P.CsumReply:
        """The digests a CSUM_REQUEST asks for, read in bounded pieces."""
        store = self.store
        assert store is not None
        chunk = self.cfg.chunk_size
        if msg.count * chunk > P.MAX_CSUM_BYTES:
            raise ProtocolError(f"CSUM_REQUEST for {msg.count} chunks of {chunk} bytes: at most "
                                f"{P.MAX_CSUM_BYTES} bytes per request")
        end = min(msg.first + msg.count, -(-store.size // chunk))
        digests = []
        c = msg.first
        per_read = max(1, READ_PIECE // chunk)
        while c < end:
            n = min(per_read, end - c)
            data = store.read(c * chunk, n * chunk)
            digests += [msg.algorithm.digest(data[i * chunk:(i + 1) * chunk]) for i in range(n)]
            c += n
        return P.CsumReply(msg.first, tuple(digests), msg.algorithm)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "role": "target", "device": self.device, "source": self.cfg.source,
                "connection": "connected" if self.conn is not None else "waiting",
                "state": self.state if self.saved["consistent"] or self.state != "streaming" else "syncing",
                "consistent": bool(self.saved["consistent"]), "bytes_received": self.bytes_received,
                "generation": f"{int(self.saved['current']):#x}", "last_error": self.last_error,
                "targets": []}


def _check_target_state(data: dict[str, Any]) -> str | None:
    try:
        P.Generations(int(data["current"]), tuple(int(g) for g in data["history"]))
    except (KeyError, TypeError, ValueError) as e:
        return f"no valid generations ({e!r})"
    if not isinstance(data.get("consistent"), bool):
        return "no valid 'consistent' flag"
    return None


def _set_aside(path: Path) -> None:
    """Keep a corrupt state file for the administrator, out of the daemon's way."""
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))


def _check_generation(data: dict[str, Any]) -> str | None:
    if not data:
        return None  # an empty object: no generation yet
    try:
        P.Generations(int(data["current"]), tuple(int(g) for g in data.get("history", ())))
    except (KeyError, TypeError, ValueError) as e:
        return f"no valid generations ({e!r})"
    if int(data["current"]) == 0:
        return "current generation 0 (a source always has one)"
    if not isinstance(data.get("md_uuid", ""), str):
        return "md_uuid is not a string"
    return None


def _readable(sock: socket.socket) -> bool:
    r, _, _ = select.select([sock], [], [], 0)
    return bool(r)


def _tune(sock: socket.socket) -> None:
    """No Nagle delay for acks; keepalives so that a dead peer is noticed within ~10 s; a send
    timeout (TCP_USER_TIMEOUT) for a peer that stops reading."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 4)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    # a peer that takes no data (dead, or alive and not reading: zero window) ends the
    # connection after this long, so a blocked send never holds a link's lock forever
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, SEND_TIMEOUT_MS)


# ------------------------------------------------------------------ the daemon


class Daemon:
    """The service layer the control socket dispatches to."""

    def __init__(self, config: Config, node: str | None = None):
        self.config = config
        self.state_dir = Path(config.global_.state_dir)
        self.events = Events()
        self.node = self._find_node(config, node)
        self.resources: dict[str, SourceResource | TargetResource] = {}
        self.failed: dict[str, str] = {}  # resources that could not come up, and why

    @staticmethod
    def _find_node(config: Config, node: str | None) -> str:
        errors = []
        for name in config.resources:
            try:
                return config.local_node(name, node).name
            except ReplError as e:
                errors.append(str(e))
        raise ReplError(errors[0] if errors else f"{config.file}: no resources")

    def _make(self, name: str) -> SourceResource | TargetResource | None:
        cfg = self.config.resource(name)
        if self.node == cfg.source:
            return SourceResource(self, cfg)
        if self.node in cfg.targets:
            return TargetResource(self, cfg)
        return None

    def start(self) -> None:
        for name, cfg in self.config.resources.items():
            if self.node in cfg.nodes:
                try:
                    self.up(name)
                except Exception as e:  # one resource's trouble never keeps the others down
                    if not isinstance(e, ReplError):
                        log.exception("%s: cannot bring up", name)
                    log.error("%s: cannot bring up: %s", name, e)
                    self.failed[name] = str(e)
                    self.events.emit(resource=name, what="failed", text=str(e))

    def stop(self) -> None:
        for res in list(self.resources.values()):
            res.stop()
        self.resources.clear()

    # -- commands ------------------------------------------------------
    def _res(self, name: str) -> SourceResource | TargetResource:
        if name not in self.config.resources:
            raise ReplError(f"unknown resource {name!r}")
        try:
            return self.resources[name]
        except KeyError:
            raise ReplError(f"resource {name} is down on {self.node}: `repctl up {name}`") from None

    def _source(self, name: str) -> SourceResource:
        res = self._res(name)
        if not isinstance(res, SourceResource):
            raise ReplError(f"resource {name}: {self.node} is a target; run this on the source "
                            f"({self.config.resource(name).source})")
        return res

    def up(self, resource: str) -> str:
        if resource in self.resources:
            return f"{resource} is already up"
        res = self._make(resource)
        if res is None:
            raise ReplError(f"resource {resource}: node {self.node} is neither its source nor a target")
        try:
            res.start()
        except BaseException:
            with contextlib.suppress(Exception):
                res.stop()
            raise
        self.resources[resource] = res
        self.failed.pop(resource, None)
        return f"{resource} is up as {'source' if isinstance(res, SourceResource) else 'target'}"

    def down(self, resource: str) -> str:
        res = self._res(resource)
        if isinstance(res, SourceResource):
            with dm.DMControl() as ctl:
                users = ctl.info(resource).open_count - 1  # the daemon's own resync reader
            if users > 0:
                raise ReplError(f"{res.dev_path} is in use ({users} opener(s): mounted?); "
                                "unmount it first")
        res.stop(remove=isinstance(res, SourceResource))
        del self.resources[resource]
        return f"{resource} is down"

    def _targets(self, resource: str, target: str | None) -> list[Link]:
        res = self._source(resource)
        return [res.link(target)] if target else list(res.links.values())

    def pause(self, resource: str, target: str | None = None) -> str:
        for link in self._targets(resource, target):
            link.set_admin("paused")
        return "paused"

    def resume(self, resource: str, target: str | None = None) -> str:
        for link in self._targets(resource, target):
            link.set_admin("up")
        return "resumed"

    def disconnect(self, resource: str, target: str | None = None) -> str:
        for link in self._targets(resource, target):
            link.set_admin("disconnected")
        return "disconnected"

    def connect(self, resource: str, target: str | None = None) -> str:
        return self.resume(resource, target).replace("resumed", "connecting")

    def verify(self, resource: str, target: str) -> dict[str, Any]:
        return self._source(resource).verify(target)

    def status(self) -> dict[str, Any]:
        failed = [{"name": name, "role": self._role(name), "state": "failed", "last_error": why,
                   "targets": []} for name, why in self.failed.items() if name not in self.resources]
        return {"node": self.node, "resources": [r.status() for r in self.resources.values()] + failed}

    def _role(self, name: str) -> str:
        return "source" if self.config.resource(name).source == self.node else "target"

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        return self.events.subscribe()

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        self.events.unsubscribe(q)


__all__ = ["Daemon", "SourceResource", "TargetResource", "Link", "STATES", "VerifyProgress"]
