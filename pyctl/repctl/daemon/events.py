"""The daemon's event bus: state changes fanned out to `repctl events` subscribers and the log."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from repctl.daemon.state import Event

log = logging.getLogger("repctl.daemon")

__all__ = ["Events"]


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
        # a resync's progress comes every second: the log has its start and end as states
        log.log(logging.DEBUG if event.get("what") == Event.PROGRESS else logging.INFO,
                "event: %s", " ".join(f"{k}={v}" for k, v in event.items() if k != "time"))
        with self._lock:
            for q in list(self._subs):
                try:
                    q.put_nowait(event)
                except queue.Full:
                    self._subs.remove(q)

