"""The daemon's resync scheduler: how many resyncs run at once, and the bytes per second that
the resyncs toward one peer node share.

Many resources of one daemon (or many targets of one resource) may need a resync at the same
time: after a reboot, a network outage, the initial syncs of many sources onto one backup
node. Run all at once, they storm the disks and the links. `ResyncScheduler` is one per daemon:

- **Slots.** A resync runs only while it holds one of `concurrency` slots (None: no limit). A
  link whose resync is due (`acquire`) takes a free slot or waits in a queue, first come, first
  served: slots go in the order in which the resyncs became due, never by size or name, so
  that the order is predictable (`repctl status` shows each waiting resync's place). A slot
  is given back (`release`) when the resync finishes, fails or is cancelled, when its session
  ends (a lost connection, a pause, a disconnect, `down`): the head of the queue gets it at
  once, and its link is woken. A link that comes back waits at the end of the queue again.
- **Peer budget.** The resyncs toward one peer node (by its name in the configuration, the
  same machine in every resource) share `peer_rate` bytes per second (None: no limit), one
  token bucket per peer: each link asks `peer_delay` before it sends a run and says what it
  sent with `peer_take`. The stream of records is never counted nor held: only resyncs.

Thread-safe: links call it from their own threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from repctl.daemon.resyncrate import TokenBucket

__all__ = ["ResyncScheduler", "Slot"]


@dataclass
class Slot:
    """A resync known to the scheduler: its peer node, when it became due, its wake-up."""

    peer: str
    since: float
    wake: Callable[[], None]


class ResyncScheduler:
    """Slots for resyncs (FIFO) and per-peer byte budgets; see the module's docstring."""

    def __init__(self, concurrency: int | None, peer_rate: int | None) -> None:
        self.concurrency = concurrency
        self.peer_rate = peer_rate
        self._lock = threading.Lock()
        self._running: dict[Hashable, Slot] = {}
        self._waiting: dict[Hashable, Slot] = {}  # in the order they became due (dicts keep it)
        self._buckets: dict[str, TokenBucket] = {}

    def acquire(self, key: Hashable, peer: str, now: float,
                wake: Callable[[], None] = lambda: None) -> bool:
        """Whether the resync `key` (toward node `peer`) may run now: True once it holds a
        slot; else it waits in the queue (from its first call on), and `wake` is called when
        its turn comes."""
        with self._lock:
            if key in self._running:
                return True
            if key not in self._waiting:
                self._waiting[key] = Slot(peer, now, wake)
            woken = self._promote()
            mine = self._running.get(key)
        for slot in woken:
            if slot is not mine:
                slot.wake()  # another resync got its slot meanwhile
        return mine is not None

    def release(self, key: Hashable) -> None:
        """The resync `key` ended (done, failed, cancelled, its session gone) or no longer
        waits: its slot or its place goes to the next."""
        with self._lock:
            self._running.pop(key, None)
            self._waiting.pop(key, None)
            woken = self._promote()
        for slot in woken:
            slot.wake()

    def _promote(self) -> list[Slot]:
        """Lock held: give free slots to the head of the queue; the slots given."""
        given = []
        while self._waiting and (self.concurrency is None
                                 or len(self._running) < self.concurrency):
            key = next(iter(self._waiting))
            slot = self._running[key] = self._waiting.pop(key)
            given.append(slot)
        return given

    def position(self, key: Hashable) -> int | None:
        """The place of `key` in the queue (1: next to run); None if it is not waiting."""
        with self._lock:
            for i, k in enumerate(self._waiting, 1):
                if k == key:
                    return i
        return None

    def running(self) -> list[Hashable]:
        with self._lock:
            return list(self._running)

    def waiting(self) -> list[Hashable]:
        with self._lock:
            return list(self._waiting)

    def peer_delay(self, peer: str, now: float) -> float:
        """Seconds before a resync toward `peer` may send its next run (0: now)."""
        if self.peer_rate is None:
            return 0.0
        with self._lock:
            return self._bucket(peer, now).delay(now)

    def peer_take(self, peer: str, nbytes: int, now: float) -> None:
        """A resync sent `nbytes` toward `peer`."""
        if self.peer_rate is None:
            return
        with self._lock:
            self._bucket(peer, now).take(nbytes, now)

    def _bucket(self, peer: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.peer_rate, now)
        return bucket
