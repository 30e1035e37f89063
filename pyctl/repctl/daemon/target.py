"""A resource this node is a target of: listen, authenticate the source, apply in order.

Records are applied in ring order and resync chunks as they come (docs/architecture.md); what
the source waits for (durable acks, PONGs) is sent only once the store has it durable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from repctl import protocol as P
from repctl.compress import CompressionStats
from repctl.config import Resource, TargetMode
from repctl.daemon.base import (
    READ_PIECE,
    SECTOR,
    Listener,
    ResourceBase,
    local_changes,
    readable,
    set_aside,
    tune,
)
from repctl.daemon.state import Connection, DiskState, Event, ReplicaState, Role
from repctl.errors import HandshakeRefused, ProtocolError, ReplError
from repctl.hooks import HookEvent, run_hooks
from repctl.statefile import StateError, load_json, save_json
from repctl.store import Store, StoreError, open_store

if TYPE_CHECKING:
    from repctl.daemon.service import Daemon

log = logging.getLogger("repctl.daemon")

__all__ = ["TargetResource"]

FLUSH_BYTES = 1 << 20    # a target makes its writes durable (and says so) at least this often
# a store that cannot take more data (ERROR NO_SPACE to the source); any other failure: IO_ERROR
OP_NAMES = {op: op.name.lower() for op in P.RecordOp}  # as Store.apply takes them
FUA = int(P.RecordFlags.FUA)  # tested as an int: an IntFlag's & runs Python code per record
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

TARGET_STATE_ACTION = ("the copy is treated as inconsistent and the source resyncs it whole; "
                       "the corrupt file is kept beside it for inspection")


class TargetResource(ResourceBase):
    """A resource this node is a target of: listen, authenticate, apply in order.

    Any other node of the resource may connect as its primary (base.Listener: a thread per
    connection, the handshake bounded). One authenticated primary connection at a time: a second
    one is refused with BUSY. Right after the handshake the secondary tells the primary which of
    its chunks may differ (OUT_OF_SYNC: its own writes as a former primary).

    Each resource has its own listener, port, threads and store: a node that is the target of
    many resources (a backup node for many sources) serves them all at once, and what happens
    to one (a hung source, a full file system under its image file) happens to it alone.
    """

    def __init__(self, daemon: Daemon, cfg: Resource):
        super().__init__(daemon, cfg)
        self.state_path = self.state_dir / "target.json"
        self.last_error: str | None = None
        # the store failed (a full file system, an I/O error): the state is `failed` until a
        # later session makes data durable on it again
        self.store_error: str | None = None
        try:
            self.saved = load_json(self.state_path, {"current": 0, "history": [], "consistent": True},
                                   action=TARGET_STATE_ACTION, check=_check_target_state)
        except StateError as e:
            # never trust a copy whose state is unknown: no generation, inconsistent: a full sync
            self.saved = {"current": 0, "history": [], "consistent": False}
            self.last_error = f"{e} (taken as inconsistent: the source resyncs everything)"
            log.error("%s: %s", self.name, self.last_error)
            set_aside(self.state_path)
            self._save()
        self.device = str(cfg.nodes[self.node].device)
        self.store: Store | None = None
        self.stopping = threading.Event()
        self.conn: P.FramedConnection | None = None
        self.peer: str | None = None  # the primary connected now
        self.conn_lock = threading.Lock()  # guards conn and peer
        self.state = ReplicaState.DISCONNECTED
        self.disk = DiskState.INCONSISTENT if not self.saved["consistent"] else DiskState.CONSISTENT
        self.bytes_received = 0
        self.compression_stats = CompressionStats()  # of the primary's sessions, since the start
        self.in_sync = False  # the primary said so (RESYNC_DONE) in this session
        self.listener = Listener(self.name, (cfg.nodes[self.node].address, cfg.port), self._handle)

    def start(self) -> None:
        self.store = open_store(self.device)
        self.listener.start()
        self.events.emit(resource=self.name, what=Event.UP,
                         text=f"secondary of {self.name} on {self.device}")

    def stop(self, remove: bool = False) -> None:
        self.stopping.set()
        with self.conn_lock:
            conn = self.conn
        if conn is not None:
            conn.close()
        self.listener.stop()
        if self.store is not None:
            self.store.close()
        self.events.emit(resource=self.name, what=Event.DOWN)

    def _save(self) -> None:
        save_json(self.state_path, self.saved)

    def _set_state(self, state: ReplicaState, why: str = "") -> None:
        if self.store_error is not None:
            state = ReplicaState.FAILED  # until the store takes data again (_store_healed)
        if state is not self.state:
            old, self.state = self.state, state
            self.events.emit(resource=self.name, target=self.node, what=Event.STATE, old=old,
                             new=state, text=why)
        disk = self.disk_state()  # changes with the state, the connection or the consistency
        if disk is not self.disk:
            old_disk, self.disk = self.disk, disk
            self.events.emit(resource=self.name, what=Event.DISK, old=old_disk, new=disk,
                             text=why)

    def generations(self) -> P.Generations:
        return P.Generations(int(self.saved["current"]), tuple(self.saved["history"]))

    def disk_state(self) -> DiskState:
        """What this copy is worth now (DiskState)."""
        if self.store is None:
            return DiskState.DISKLESS
        if not self.saved["consistent"]:
            return DiskState.INCONSISTENT
        if self.saved.get("outdated"):
            return DiskState.OUTDATED
        if self.conn is not None and self.state is ReplicaState.STREAMING and self.in_sync:
            return DiskState.UP_TO_DATE
        return DiskState.CONSISTENT

    def _handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """One connection, from its handshake to its end. Nothing it raises escapes: every other
        connection, and the listener, go on."""
        conn = P.FramedConnection(sock)
        claimed = False
        shaken = False  # the handshake succeeded

        def claim(info: P.PeerInfo) -> None:
            nonlocal claimed
            self.transport.check_peer(conn.sock, info.node)  # TLS: its certificate names it
            with self.conn_lock:
                if self.conn is not None:
                    raise HandshakeRefused(P.RefuseReason.BUSY,
                                           f"resource {self.name} on {self.node} is already "
                                           f"connected to its primary {self.peer}")
                self.conn, self.peer = conn, info.node
                claimed = True

        try:
            tune(sock)
            try:
                conn = P.FramedConnection(self.transport.server(sock, peer),
                                          compression_stats=self.compression_stats)
                info = P.handshake(conn, self._local_info(), self.secret,
                                   P.Expect(frozenset(self.cfg.targets_for(self.node)), claim))
            finally:
                self.listener.handshake_over()
            shaken = True
            self.last_error = self.store_error  # a failed store stays the news until it heals
            self.events.emit(resource=self.name, target=self.node, what=Event.CONNECTION,
                             old=Connection.WAITING, new=Connection.CONNECTED, peer=info.node,
                             text=f"source {info.node} at {peer[0]}")
            self._report_out_of_sync(conn, info)
            self._serve(conn, info)
        except StoreError as e:
            self._store_failed(conn, e)
        except HandshakeRefused as e:
            self.daemon.stats.refusal(self.name, e)
            self.last_error = f"refused {peer[0]}: {e}"
            log.warning("%s: refused connection from %s: %s", self.name, peer[0], e)
        except (OSError, ReplError) as e:
            if not shaken:
                self.daemon.stats.handshake_failed(self.name, e)
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
                        self.conn, self.peer = None, None
                self._set_state(ReplicaState.DISCONNECTED, self.last_error or "")
                if shaken:
                    self.events.emit(resource=self.name, target=self.node,
                                     what=Event.CONNECTION, old=Connection.CONNECTED,
                                     new=Connection.WAITING, peer=info.node,
                                     text=self.last_error or "closed")

    def _store_failed(self, conn: P.FramedConnection, e: StoreError) -> None:
        """The store failed (a full file system under the image file, an I/O error): this
        session ends. Nothing since the last durable acknowledgement is claimed, so the source
        still holds all of it (its ring, or its bitmap) and sends it again in a later session;
        it hears why first (ERROR), and waits longer each time a session fails at once. No
        other resource of this node is touched."""
        first = self.store_error is None
        self.store_error = self.last_error = (
            f"{e}; the copy keeps what was acknowledged durable, the source sends the rest "
            "again once the store takes data")
        if first:
            log.error("%s: %s", self.name, self.store_error)
            self.events.emit(resource=self.name, what=Event.ERROR, text=self.store_error)
        else:
            log.warning("%s: %s", self.name, self.store_error)
        code = P.ErrorCode.NO_SPACE if e.errno in NO_SPACE_ERRNOS else P.ErrorCode.IO_ERROR
        with contextlib.suppress(OSError, ReplError):
            conn.send_message(P.Error(code, f"{self.node}: {self.store_error}"))
            conn.linger()  # the source reads the ERROR before the connection ends

    def _store_healed(self) -> None:
        """Data made durable on a store that had failed: it takes data again."""
        if self.store_error is None:
            return
        self.store_error = self.last_error = None
        log.info("%s: %s takes data again", self.name, self.device)
        self._set_state(ReplicaState.STREAMING, f"{self.device} takes data again")

    def _hook(self, event: HookEvent, peer: str) -> None:
        run_hooks(self.cfg, event, node=self.node, peer=peer, role=Role.SECONDARY,
                  executor=self.daemon.executor)

    def _report_out_of_sync(self, conn: P.FramedConnection, info: P.PeerInfo) -> None:
        """Tell the primary which chunks of this copy may differ from its data (OUT_OF_SYNC)."""
        nr_chunks = -(-info.device_size // self.cfg.chunk_size)
        bits = local_changes(self.state_dir, self.cfg.nodes[self.node].metadata, info.node,
                             nr_chunks) if self.saved.get("local_changes") else b""
        for piece in P.out_of_sync_pieces(bits):
            conn.send_message(piece)

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
        self.in_sync = False  # until the primary says so: its report may still refuse us
        self._set_state(ReplicaState.STREAMING, f"source {info.node} connected")
        chunk = self.cfg.chunk_size
        size = store.size  # an ioctl: read once a session (the handshake checked it)
        # ring sequence numbers belong to this connection: nothing of it is applied yet, and an
        # ack never speaks of records an earlier connection (or an earlier boot) sent
        applied = acked = durable = 0  # last record applied, acknowledged, acknowledged durable
        # a sync source's writers wait for durable acks: flush per FLUSH_BYTES of records
        sync = self.cfg.targets_for(info.node)[self.node].mode is TargetMode.SYNC
        dirty = False
        record_bytes = 0  # of records written since the last flush
        last_flush = last_ack = time.monotonic()
        resynced = False  # this session made the copy inconsistent: after-resync-target at the end

        def make_durable() -> None:
            """Flush what was applied (StoreError if the store cannot)."""
            store.flush()
            if dirty and self.store_error is not None:
                self._store_healed()  # written and made durable: the store takes data again

        while not self.stopping.is_set():
            now = time.monotonic()
            if dirty and ((sync and record_bytes >= FLUSH_BYTES) or now - last_flush > 0.2
                          or not readable(sock)):
                # idle, or a busy stream every MiB or 200 ms: make it durable, say so (a sync
                # source's writers wait for this; per MiB keeps several of them in flight)
                make_durable()
                dirty, record_bytes = False, 0
                last_flush = last_ack = now
                acked = applied
                if applied > durable:
                    durable = applied
                    conn.send_message(P.Ack(applied, durable=True))
            elif applied > acked and now - last_ack > 0.005:
                acked, last_ack = applied, now
                conn.send_message(P.Ack(applied, durable=False))
            frame = conn.recv()
            msg = P.decode(frame.type, frame.payload)
            if isinstance(msg, (P.Records, P.Record)):
                records = msg.records if isinstance(msg, P.Records) else (msg,)
                if records[0].ring_seq <= applied:
                    raise ProtocolError(f"record {records[0].ring_seq} after record {applied}: "
                                        "records must come in ring order")
                for rec in records:  # consecutive (Records.decode): in order
                    end = rec.sector * SECTOR + rec.length
                    if end > size:
                        raise ProtocolError(f"record {rec.ring_seq} ends at byte {end}, "
                                            "past the device")
                for rec in records:  # all checked first: a bad frame changes nothing
                    store.apply(OP_NAMES[rec.op], rec.sector, rec.length, rec.data,
                                bool(int(rec.flags) & FUA))
                    self.bytes_received += rec.length if rec.op is P.RecordOp.WRITE else 0
                    record_bytes += rec.length
                applied = records[-1].ring_seq
                dirty = True
            elif isinstance(msg, P.ResyncChunk):
                off = msg.chunk * chunk
                data = memoryview(msg.data)
                if off + data.nbytes > size:
                    raise ProtocolError(f"resync chunk {msg.chunk} ends past the device")
                if self.saved["consistent"]:
                    # a failing hook (e.g. a snapshot of the consistent copy first) ends the
                    # connection before the copy changes; the primary tries again
                    self._hook(HookEvent.BEFORE_RESYNC_TARGET, info.node)
                    self.saved["consistent"] = False
                    self._save()
                    self._set_state(ReplicaState.SYNCING, "resync started")
                    resynced = True
                store.write(off, data)
                self.bytes_received += data.nbytes
                dirty = True  # a resync's durability comes with the PONGs
            elif isinstance(msg, P.ResyncDone):
                make_durable()
                # in sync with this primary now: its generation, and no change of our own left
                self.saved.update(consistent=True, current=source_gen.current,
                                  history=list(source_gen.history), source=info.node,
                                  local_changes=False, outdated=False)
                self._save()
                self.in_sync = True
                self._set_state(ReplicaState.STREAMING, "resync finished: consistent")
                if resynced:
                    resynced = False
                    try:
                        self._hook(HookEvent.AFTER_RESYNC_TARGET, info.node)
                    except ReplError as e:
                        log.error("%s: %s", self.name, e)
            elif isinstance(msg, P.Ping):
                make_durable()
                dirty, record_bytes = False, 0
                if applied > durable:
                    # records acknowledged before as not yet durable are durable now: say so,
                    # or a sync writer waits for the next record's flush (or its sync_timeout)
                    acked = durable = applied
                    conn.send_message(P.Ack(applied, durable=True))
                conn.send_message(P.Pong(msg.token, msg.time_ns))
            elif isinstance(msg, P.Pause):
                make_durable()
                dirty, record_bytes = False, 0
                acked = applied
                if applied > durable:
                    durable = applied
                    conn.send_message(P.Ack(applied, durable=True))
                self._set_state(ReplicaState.PAUSED, "paused by the source")
            elif isinstance(msg, P.CsumRequest):
                conn.send_message(self._checksums(msg))
            elif isinstance(msg, P.Error):
                if msg.code == P.ErrorCode.SPLIT_BRAIN:
                    log.error("%s: split brain with %s: %s", self.name, info.node, msg.text)
                    self.events.emit(resource=self.name, what=Event.SPLIT_BRAIN, peer=info.node,
                                     text=msg.text)
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
        state = self.state
        if state is ReplicaState.STREAMING and not self.saved["consistent"]:
            state = ReplicaState.SYNCING
        return {"name": self.name, "role": Role.SECONDARY, "disk": self.disk_state(),
                "device": self.device, "source": self.peer or self.saved.get("source"),
                "connection": Connection.CONNECTED if self.conn is not None else Connection.WAITING,
                "state": state,
                "consistent": bool(self.saved["consistent"]), "bytes_received": self.bytes_received,
                "compression": conn.codec.word if (conn := self.conn) is not None else None,
                "compression_raw_bytes": self.compression_stats.raw_bytes,
                "compression_wire_bytes": self.compression_stats.wire_bytes,
                "compression_skipped_bytes": self.compression_stats.skipped_bytes,
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
