"""The daemon's event bus: state changes fanned out to `repctl events` subscribers and the log."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from repctl.daemon.state import Event

log = logging.getLogger("repctl.daemon")

__all__ = ["Events", "Subscription"]

#: Events a subscriber may fall behind before it is dropped (the daemon never waits for one).
MAX_BACKLOG = 10000


class Subscription(queue.Queue):  # type: ignore[type-arg]
    """A subscriber's queue of events. `dropped` is set once it fell MAX_BACKLOG events behind:
    the bus stopped filling it, and its stream ends, after what it holds, with an error saying
    so (control.py), instead of going quiet."""

    def __init__(self) -> None:
        super().__init__(maxsize=MAX_BACKLOG)
        self.dropped = False


class Events:
    """Fan-out of state-change events to subscribers (``repctl events``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []

    def subscribe(self) -> Subscription:
        q = Subscription()
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: Subscription) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    def emit(self, **event: Any) -> None:
        event.setdefault("time", time.time())
        # a resync's progress comes every second: the log has its start and end as states
        log.log(logging.DEBUG if event.get("what") == Event.PROGRESS else logging.INFO,
                "event: %s", " ".join(f"{k}={v}" for k, v in event.items() if k != "time"))
        with self._lock:
            for q in list(self._subs):
                try:
                    q.put_nowait(event)
                except queue.Full:
                    q.dropped = True
                    self._subs.remove(q)
                    log.warning("events: a subscriber fell %d events behind: dropped", MAX_BACKLOG)

