"""A resource this node is the primary of: the device, the engine and the links to its targets
(every other node of the resource, `Resource.targets_for`).

The **engine** thread owns the kernel consumer's control verbs: it starts the ring, lets targets
join the stream, acknowledges records to the kernel (the minimum over the joined targets;
durable acks for sync targets), and runs the MARK / CLEAN cycle that moves responsibility for
changed chunks from the kernel's bitmap to each target's persistent out-of-sync bitmap. One
**link** per target (link.py) sends.

The invariant behind P2: the kernel clears a chunk's bit (CLEAN at mark M) only when every
target either has durably acknowledged every record before M or has absorbed a bitmap snapshot
taken after M into its persistent OOS file.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import queue
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from repctl import dm, metadata
from repctl import protocol as P
from repctl.config import Resource, TargetMode
from repctl.daemon.base import READ_PIECE, SECTOR, Listener, ResourceBase, new_generation, tune
from repctl.daemon.link import RESYNC_RUN, Link
from repctl.daemon.resyncrate import STEP
from repctl.daemon.state import DiskState, Event, LinkState, Role
from repctl.daemon.verify import VerifyProgress
from repctl.errors import HandshakeRefused, ReplError
from repctl.hooks import HookEvent, run_hooks
from repctl.ring import Consumer, RingError, State
from repctl.statefile import load_json, remove_stale_temporaries, save_json

if TYPE_CHECKING:
    from repctl.daemon.service import Daemon

log = logging.getLogger("repctl.daemon")

__all__ = ["SourceResource", "Wakeup"]

CLEAN_INTERVAL = 1.0     # seconds between MARK / CLEAN cycles
LOCK_WAIT = 1.0          # the engine waits this long for a link's sender before it cuts the link
LAG_POLL = 0.05          # seconds between the engine's looks at the ring while records wait in it
IDLE_WAIT = 10.0         # the engine's longest sleep, with nothing in the ring and nothing to clean

GENERATION_ACTION = ("the resource stays down: restore the file from a backup of the state folder, "
                     "or see docs/architecture.md, \"State files\", to start a new generation")


class Wakeup:
    """A wake-up for a thread that sleeps in poll(): after `set`, from any thread, `fileno` is
    readable until `clear`. An eventfd, so that the sleeper polls it together with the kernel's
    file. The sleeper clears it when it wakes, before its work: a `set` during the work makes
    its next poll return at once (a clear after the work would lose that set)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # a set never writes to a closed (or reused) descriptor
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        return self._fd

    def set(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def clear(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    os.eventfd_read(self._fd)
                except BlockingIOError:
                    pass  # not set

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class SourceResource(ResourceBase):
    """A resource this node is the primary (source) of."""

    def __init__(self, daemon: Daemon, cfg: Resource):
        super().__init__(daemon, cfg)
        node = cfg.nodes[self.node]
        if node.metadata is None:
            raise ReplError(f"resource {cfg.name}: node {self.node} is the primary but has no metadata "
                            "device")
        self.data_dev = str(node.device)
        self.meta_dev = str(node.metadata)
        self.size = metadata.device_bytes(self.data_dev)
        self.chunk_bytes = cfg.chunk_size
        self.chunk_sectors = cfg.chunk_size // SECTOR
        self.nr_chunks = -(-self.size // self.chunk_bytes)
        remove_stale_temporaries(self.state_dir)
        self.gen_path = self.state_dir / "generation.json"
        self.gen = load_json(self.gen_path, {}, action=GENERATION_ACTION, check=check_generation)
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.engine_wake = Wakeup()  # acks, joins, stop: the engine looks again (`_sleep`)
        self.seen = (-1, -1)  # (events, published) of the kernel state the engine last acted on
        self.watching = False  # the engine sleeps until the next record is published
        self.consumer: Consumer = None  # type: ignore[assignment]
        self.kstate: State | None = None
        self.dev_path = f"/dev/mapper/{self.name}"
        self.read_fd = -1
        self.links = {t: Link(self, target, cfg.nodes[t])
                      for t, target in cfg.targets_for(self.node).items()}
        # the primary listens too, to tell a peer that connects (a node that would be promoted,
        # or a second primary) that it is the primary: ROLE_CONFLICT
        self.listener = Listener(self.name, (node.address, cfg.port), self._answer)
        self.drained: frozenset[str] = frozenset()  # targets holding every write (demote)
        self.engine = threading.Thread(target=self._engine, name=f"engine-{self.name}", daemon=True)
        self.last_clean = 0.0
        self.sync_on = False
        self.released = 0
        self.release_lock = threading.Lock()  # the engine's and the sync receivers' RELEASE
        self.verifying: dict[str, VerifyProgress] = {}  # target -> its running verify
        self.failed: str | None = None  # why the engine stopped for good (state `failed`)
        self.pending_clean: tuple[int, frozenset[str]] | None = None  # (mark, absorbed links)
        # the application's load, for the links' resync controllers (app_load)
        self.load_lock = threading.Lock()
        self.load_at = 0.0
        self.load_counts = (0, 0, 0)  # (write_bytes, writes done, write ms) at load_at
        self.load: tuple[float, float | None, int] = (0.0, None, 0)

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
            self.gen = {"current": new_generation(), "history": [], "md_uuid": md_uuid}
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
            self.events.emit(resource=self.name, what=Event.NEW_GENERATION, text=text)
            history = [int(self.gen["current"]), *self.gen.get("history", [])][:P.MAX_HISTORY]
            self.gen = {"current": new_generation(), "history": history}
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
        if not mapping_of(self.name, self.data_dev):
            dm.create_device(self.name, [self._table()])
        self.consumer = Consumer(self.dev_path, sync=False)  # sync once a sync target joins
        # O_DIRECT: a filesystem's data writes bypass the block device's page
        # cache, so a buffered resync read could send stale data
        self.read_fd = os.open(self.dev_path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        self.engine.start()
        for link in self.links.values():
            link.thread.start()
        self.listener.start()
        self.events.emit(resource=self.name, what=Event.UP,
                         text=f"primary of {self.name} on {self.dev_path}")

    def _stop_links(self) -> None:
        """Stop every link (they see `stopping`) and wait until none reads the ring."""
        self.stopping.set()
        self.engine_wake.set()
        for link in self.links.values():
            link.wake.set()
            if link.conn is not None:
                link.conn.close()
        for link in self.links.values():
            if link.thread.is_alive():
                link.thread.join(5)

    def stop(self, remove: bool = False) -> None:
        self.engine_wake.set()
        self._stop_links()
        if self.engine.is_alive():
            self.engine.join(5)
        self.listener.stop()
        if self.drained:
            self._final_clean()
        for link in self.links.values():
            link.oos.save()
            link.oos.close()  # a later save (a link thread still ending) rewrites it whole
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1
        if self.consumer is not None:
            self.consumer.close()
        self.engine_wake.close()
        if remove:
            dm.remove_device(self.name)
        self.events.emit(resource=self.name, what=Event.DOWN)

    def split_brain(self, peer: str, why: str, *, settled: bool = False) -> None:
        """A peer's data diverged from ours, or it is primary too: report it (log, event, the
        split-brain hook). Unless `settled` (the policy discards the peer's changes: Link.
        _settle_split_brain), the link stays refused. When settled, a failing hook refuses the
        settlement: HandshakeRefused, nothing changed."""
        log.error("%s: split brain with %s: %s", self.name, peer, why)
        self.events.emit(resource=self.name, what=Event.SPLIT_BRAIN, peer=peer, text=why)
        try:
            run_hooks(self.cfg, HookEvent.SPLIT_BRAIN, node=self.node, peer=peer,
                      role=Role.PRIMARY, executor=self.daemon.executor)
        except ReplError as e:
            log.error("%s: %s", self.name, e)
            if settled:
                raise HandshakeRefused(P.RefuseReason.SPLIT_BRAIN,
                                       f"split brain with {peer} not settled: {e}") from None

    def drain(self, timeout: float) -> list[str]:
        """Wait (at most `timeout` s) until every target in session holds durably every write
        published so far; the caller has made sure nothing writes any more. Returns the targets
        that do not (out of session, or too slow): they keep what they lack in their OOS bitmap.
        `stop` then lets the kernel forget what the drained targets hold."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.kernel_state()
            with self.lock:
                joined = [l for l in self.links.values() if l.joined]
            # a target still resyncing lacks chunks that no record will bring: not drained
            done = {l.name for l in joined if l.durable >= st.published
                    and l.state is LinkState.STREAMING} if st.streaming else set()
            if len(done) == len(self.links) or time.monotonic() >= deadline:
                self.drained = frozenset(done)
                return sorted(set(self.links) - done)
            time.sleep(0.05)

    def _final_clean(self) -> None:
        """With no writer left and the links stopped: CLEAN the kernel's bitmap, first ORing it
        into the OOS of every target that is not drained (P2: each chunk stays either on every
        target or in its bitmap). Then the metadata holds only what some target lacks."""
        if self.consumer is None:
            return
        try:
            mark = self.consumer.mark()
            lacking = [l for l in self.links.values() if l.name not in self.drained]
            if lacking:
                bm = self.consumer.bitmap()
                for l in lacking:
                    l.oos.absorb(bm)
                    l.oos.save()
            self.consumer.clean(mark)
        except (OSError, ReplError) as e:
            log.warning("%s: final clean: %s (the bitmap keeps those chunks dirty)", self.name, e)

    def _answer(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """A peer connected to the primary: tell it, once authenticated, that this node is the
        primary (ROLE_CONFLICT). A prober learns it may not promote; a second primary is a
        split brain, reported."""
        conn = P.FramedConnection(sock)
        # the largest size: no peer is refused as larger than us before it learns we are primary
        local = P.HandshakeInfo(resource=self.name, node=self.node, role=P.Role.TARGET,
                                device_size=2**63 - 1, chunk_size=self.chunk_bytes,
                                generations=self.generations())

        def refuse(info: P.PeerInfo) -> None:
            self.transport.check_peer(conn.sock, info.node)  # TLS: its certificate names it
            raise HandshakeRefused(P.RefuseReason.ROLE_CONFLICT,
                                   f"{self.node} is the primary of {self.name}")
        try:
            tune(sock)
            conn = P.FramedConnection(self.transport.server(sock, peer))
            P.handshake(conn, local, self.secret,
                        P.Expect(frozenset(self.links), refuse))
        except HandshakeRefused as e:
            self.daemon.stats.refusal(self.name, e)
            log.info("%s: told %s that this node is the primary (%s)", self.name, peer[0], e)
        except (OSError, ReplError) as e:
            self.daemon.stats.handshake_failed(self.name, e)
            log.info("%s: connection from %s: %s", self.name, peer[0], e)
        except Exception:
            log.exception("%s: connection from %s: internal error", self.name, peer[0])
        finally:
            self.listener.handshake_over()
            conn.close()

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

    def app_load(self) -> tuple[float, float | None, int]:
        """The application's writes since the last look, for the resync controllers
        (resyncrate.py): bytes per second (the kernel's write_bytes counter, every write made
        through the device), the mean write latency in seconds (the device's block stat file;
        None when unknown or nothing completed), and the writes in flight now (its `inflight`
        file: a writer held back behind the resync completes little, and shows only there).
        One look per STEP serves every link."""
        with self.load_lock:
            now = time.monotonic()
            if now - self.load_at < STEP:
                return self.load
            wbytes = int(getattr(self.kernel_state(), "write_bytes", 0))
            done, ticks, waiting = _write_stat(self.dev_path)
            if self.load_at:
                dt = now - self.load_at
                old_bytes, old_done, old_ticks = self.load_counts
                bps = max(wbytes - old_bytes, 0) / dt
                latency = ((ticks - old_ticks) / 1000 / (done - old_done)
                           if done > old_done and ticks >= old_ticks else None)
                self.load = (bps, latency, waiting)
            self.load_at, self.load_counts = now, (wbytes, done, ticks)
            return self.load

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

    def release_sync(self) -> bool:
        """RELEASE the synchronous writers up to the lowest durable ack of the joined sync
        targets (P2: a sync write completes once every joined sync target holds it durable);
        True if the writers moved. The engine's cycle calls it, and so does a sync link's
        receiver on each durable ack: a writer then does not wait for the engine to wake and
        read the kernel's state first. RingError if the kernel refuses (a new ring started)."""
        with self.lock:
            durable = [l.durable for l in self.links.values()
                       if l.joined and l.mode is TargetMode.SYNC]
        if not durable:
            return False
        release = min(durable)
        with self.release_lock:
            if release <= self.released:
                return False
            self.consumer.release(release)
            self.released = release
        return True

    def _absorb(self, links: list[Link]) -> int:
        """MARK, then OR the kernel bitmap into each link's OOS and make it durable."""
        mark = self.consumer.mark()
        if links:
            bm = self.consumer.bitmap()
            for link in links:
                link.oos.absorb(bm)
                link.oos.save()
        return mark

    def kernel_state(self) -> State:
        """The kernel's state (GET_STATE), for any thread but the engine's own cycle.

        Every GET_STATE on the consumer's file moves that file's baseline for poll (docs/
        dm-repl.rst, "poll"): a mode change read here would no longer raise POLLPRI for the
        engine, nor a record published while it sleeps POLLIN. So what the engine has not
        seen yet is passed on to it as a wake-up.
        """
        st = self.consumer.state()
        events, published = self.seen
        if st.events != events or (self.watching and st.published != published):
            self.engine_wake.set()
        return st

    def _engine(self) -> None:
        """The engine's thread: a cycle, then a sleep until something needs it (`_sleep`). An
        OSError or ReplError is retried each second; anything else is a bug: the resource goes
        to state `failed`, the consumer detaches (the kernel goes on serving I/O and tracks
        every change in its bitmap, P5) and the targets stop, until `repctl down` and `up`."""
        poller = select.poll()
        poller.register(self.engine_wake.fileno(), select.POLLIN)
        while not self.stopping.is_set():
            try:
                self._sleep(poller, self._cycle())
            except (OSError, ReplError) as e:
                log.exception("%s: engine: %s", self.name, e)
                self.events.emit(resource=self.name, what=Event.ERROR, text=str(e))
                time.sleep(1)
            except Exception as e:
                self._fail(f"engine: internal error: {e!r}")
                return

    def _sleep(self, poller: select.poll, busy: bool) -> None:
        """Sleep until something needs the engine (docs/architecture.md, "The engine's
        wake-ups"): a wake-up (`engine_wake`: an ack, a join, a pause, a stop), a mode change
        of the kernel (POLLPRI), the next CLEAN cycle; while records wait in the ring (`busy`),
        every LAG_POLL as well, so that the max_lag check sees the ring grow; with the ring
        empty, the next record published (POLLIN), and at most IDLE_WAIT.

        No wake-up is lost: `engine_wake` is an eventfd, cleared only after the sleep, before
        the next cycle reads anything; the kernel's file stays readable while its state
        differs from what the engine last read, and a GET_STATE of another thread, which
        moves that baseline, wakes the engine itself (`kernel_state`)."""
        kernel = self.consumer.fileno()
        if busy:
            timeout, mask = LAG_POLL, select.POLLPRI
        else:
            st = self.kstate
            if self.pending_clean is not None or (st is not None and st.dirty_chunks):
                timeout = max(self.last_clean + CLEAN_INTERVAL - time.monotonic(), 0.0)
            else:
                timeout = IDLE_WAIT
            mask = select.POLLPRI | select.POLLIN
            # say so first, then take the kernel's baseline again: a record published since
            # the cycle read the state, or read by a link from now on, wakes the engine
            self.watching = True
            st = self.consumer.state()
            if (st.events, st.published) != self.seen:
                self.watching = False
                return  # something moved since the cycle looked: look again at once
        poller.register(kernel, mask)
        try:
            poller.poll(math.ceil(timeout * 1000))
        finally:
            self.watching = False
            poller.unregister(kernel)
        self.engine_wake.clear()

    def _fail(self, why: str) -> None:
        log.exception("%s: %s: the resource has failed", self.name, why)
        self.failed = why
        self.events.emit(resource=self.name, what=Event.FAILED, text=why)
        self._stop_links()
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

    def _cycle(self) -> bool:
        """One turn of the engine, in order: a new ring if the kernel fell behind, the targets
        that want to join, RELEASE and ACK, the max_lag check, the MARK / CLEAN cycle. True
        while records wait in the ring (the engine looks again soon: `_sleep`)."""
        st = self.consumer.state()
        self.kstate = st
        self.seen = (st.events, st.published)
        links = list(self.links.values())
        if not st.streaming:
            self.pending_clean = None  # the new ring's absorb covers it
            # not started yet, or fell behind: every target takes the kernel's
            # bitmap into its own, and a new ring starts
            if st.reason not in ("no_consumer", "detached") or st.stream_start:
                self.events.emit(resource=self.name, what=Event.FELL_BEHIND, text=st.reason)
                self.daemon.stats.fell_behind(self.name, st.reason)
            with self.lock:
                for link in links:
                    link.joined = False
                    link.join_wanted = link.join_wanted or link.conn is not None
                    link.behind_reason = st.reason
            for link in links:
                self._quiesce(link)  # no sender is still reading the old ring
            self.consumer.start_stream()
            mark = self._absorb(links)
            # every target holds everything before the mark in its own bitmap
            self.consumer.clean(mark)
            self.kstate = st = self.kernel_state()
            self._admit(mark)
            return True

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
        acked = st.acked
        moved = False  # an ACK or RELEASE: the kernel's numbers changed since `st`
        try:
            if sync_joined and self.release_sync():
                moved = True
            ack = min((l.durable if l.mode is TargetMode.SYNC else l.ack) for l in joined) \
                if joined else st.published
            ack = min(ack, st.published)
            if ack > st.acked and ack >= st.stream_start - 1:
                self.consumer.ack(ack)
                acked, moved = ack, True
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
                    l.behind_reason = "max_lag"
                self.daemon.stats.target_fell_behind(self.name, l.name)
                self._quiesce(l)  # its records in flight are sent before others may ack past them
                self.join(l)
                l.wake.set()

        if time.monotonic() - self.last_clean >= CLEAN_INTERVAL:
            self.last_clean = time.monotonic()
            self._clean_cycle(links)
        # records still in the ring: a lagging async target must be seen to grow (max_lag);
        # after an ACK, one more look refreshes `kstate` for the status
        return moved or st.published > acked

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
            return {"name": self.name, "role": Role.PRIMARY, "disk": DiskState.UP_TO_DATE,
                    "device": self.dev_path,
                    "state": LinkState.FAILED,
                    "last_error": self.failed, "size": self.size,
                    "targets": [self._target_status(l) for l in self.links.values()]}
        st = self.kstate
        kernel = None
        if st is not None:
            kernel = {"mode": st.mode, "reason": st.reason, "dirty_chunks": st.dirty_chunks,
                      "chunk_size": self.chunk_bytes, "ring_used": st.ring_used,
                      "ring_bytes": st.ring_bytes, "published": st.published, "acked": st.acked}
        return {"name": self.name, "role": Role.PRIMARY, "disk": DiskState.UP_TO_DATE,
                "device": self.dev_path, "kernel": kernel,
                "size": self.size, "targets": [self._target_status(l) for l in self.links.values()]}

    def _target_status(self, link: Link) -> dict[str, Any]:
        """A target's status, with what the administrator asked (`admin`: up, paused or
        disconnected) and the progress of a verify that runs (null otherwise)."""
        progress = self.verifying.get(link.name)
        return {**link.status(), "admin": link.admin,
                "verify": progress.status() if progress is not None else None}

    def verify(self, target: str, repair: bool = False) -> dict[str, Any]:
        """Compare chunk digests with the target; a second pass re-checks what differed.

        With `repair`, the chunks that still differ are marked out of sync for this target
        only, durably before the answer (`marked_out_of_sync` in it), and its link resyncs
        them from this node's device: its state goes from streaming to syncing and back."""
        link = self.link(target)
        conn = link.conn
        if conn is None or link.state is not LinkState.STREAMING:
            what = "verify and repair" if repair else "verify"
            raise ReplError(f"{self.name}/{target}: not streaming ({link.state}): cannot {what} "
                            f"now; run it once `repctl status {self.name}` shows it streaming")
        progress = VerifyProgress(self.nr_chunks, self.chunk_bytes)
        if self.verifying.setdefault(target, progress) is not progress:
            # two verifies would take each other's checksum replies
            raise ReplError(f"{self.name}/{target}: a verify is already running "
                            "(its progress is in `repctl status`)")
        try:
            differing = self._compare(link, conn, range(self.nr_chunks), progress)
            if differing:
                progress.cancelled.wait(0.5)  # writes in flight during the first pass settle
                progress.begin(2, len(differing))
                differing = self._compare(link, conn, sorted(differing), progress)
            if repair and differing:
                # durable before anyone hears of it: a crash from now on resyncs them anyway
                try:
                    link.mark_out_of_sync(sorted(differing))
                except OSError as e:
                    raise ReplError(f"{self.name}/{target}: {len(differing)} chunks differ, but "
                                    f"marking them out of sync failed: {e}; the resync may not "
                                    "have started: run the verify with --repair again") from e
                log.warning("%s/%s: verify --repair: %d chunks differ, marked out of sync for "
                            "this target: resyncing them", self.name, target, len(differing))
        finally:
            del self.verifying[target]
            progress.finished.set()
        if differing:
            try:
                run_hooks(self.cfg, HookEvent.OUT_OF_SYNC, node=self.node, peer=target,
                          role=Role.PRIMARY, executor=self.daemon.executor,
                          extra_env={"REPCTL_OUT_OF_SYNC_CHUNKS": str(len(differing)),
                                     "REPCTL_REPAIR": "1" if repair else "0"})
            except ReplError as e:
                log.error("%s: %s", self.name, e)
        result: dict[str, Any] = {"resource": self.name, "target": target,
                                  "chunks": self.nr_chunks, "chunk_size": self.chunk_bytes,
                                  "differing": sorted(differing)}
        if repair:
            result["marked_out_of_sync"] = len(differing)
        return result

    def cancel_verify(self, target: str, wait: float = 30.0) -> str:
        """Stop the running verify of `target` at its next chunk boundary (after the answer to
        the checksum request in flight: the target keeps no verify state, nothing is left
        behind there). Returns once it has stopped, or after `wait` seconds."""
        self.link(target)  # ReplError for an unknown target
        progress = self.verifying.get(target)
        if progress is None:
            raise ReplError(f"{self.name}/{target}: no verify is running")
        progress.cancelled.set()
        if progress.finished.wait(wait):
            return f"{self.name}/{target}: verify cancelled"
        return (f"{self.name}/{target}: verify cancelling: it stops after the checksum request "
                "in flight")

    def _compare(self, link: Link, conn: P.FramedConnection, chunks: range | list[int],
                 progress: VerifyProgress | None = None) -> set[int]:
        # everything published now must be durable on the target first
        published = self.kernel_state().published
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
            if progress is not None:  # a chunk boundary: stop here if cancelled
                progress.check_cancelled(f"{self.name}/{link.name}")
            first = chunk_list[i]
            count = 1
            while (i + count < len(chunk_list) and count < step
                   and chunk_list[i + count] == first + count):
                count += 1
            conn.send_message(P.CsumRequest(first, count, algo))
            reply = self.csum_reply(link, first, algo)
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

    def csum_reply(self, link: Link, first: int, algo: P.DigestAlgorithm) -> P.CsumReply:
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



def _write_stat(dev_path: str) -> tuple[int, int, int]:
    """(writes completed, milliseconds spent writing, writes in flight now) of a block device,
    from its `stat` and `inflight` files in sysfs (Documentation/block/stat.rst); zeros if
    they cannot be read."""
    try:
        rdev = os.stat(dev_path).st_rdev
        sysfs = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
        with open(f"{sysfs}/stat") as f:
            fields = f.read().split()
        with open(f"{sysfs}/inflight") as f:
            waiting = int(f.read().split()[1])
        return int(fields[4]), int(fields[7]), waiting
    except (OSError, ValueError, IndexError):
        return 0, 0, 0


def check_generation(data: dict[str, Any]) -> str | None:
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



def mapping_of(name: str, data_dev: str) -> bool:
    """Whether /dev/mapper/`name` is up as this node's `repl` device over `data_dev`. ReplError
    if a device of that name maps something else: never take it for ours."""
    with dm.DMControl() as ctl:
        if name not in {d.name for d in ctl.list_devices()}:
            return False
        table = ctl.table(name)
    rdev = os.stat(data_dev).st_rdev
    ours = f"{os.major(rdev)}:{os.minor(rdev)}"
    if len(table) == 1 and table[0].target_type == "repl" and _same_device(
            table[0].params.split()[0], rdev):
        return True
    raise ReplError(f"/dev/mapper/{name} exists but is not the repl device over {data_dev} "
                    f"({ours}): its table is {[(t.target_type, t.params) for t in table]}; "
                    "remove it or rename the resource")


def _same_device(spec: str, rdev: int) -> bool:
    """Whether a table's device argument (a path, as the target repeats it, or MAJ:MIN) is the
    block device `rdev`."""
    if spec.count(":") == 1 and not spec.startswith("/"):
        major, minor = spec.split(":")
        return major.isdigit() and minor.isdigit() and os.makedev(int(major), int(minor)) == rdev
    try:
        return os.stat(spec).st_rdev == rdev
    except OSError:
        return False
