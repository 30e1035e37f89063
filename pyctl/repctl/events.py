"""Mode changes of dm-repl targets, as the kernel announces them over netlink.

The target raises a KOBJ_CHANGE uevent on its dm disk with DM_REPL_MODE,
DM_REPL_REASON and DM_REPL_EVENT (see docs/dm-repl.rst).  The daemon also
polls the consumer file (POLLPRI) and DM_DEV_WAIT; this is the way for
anything that is not the consumer (``repctl events``, monitoring) to hear them.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import UeventSocket
from pyroute2.netlink.uevent import MONITOR_GROUP_KERNEL


@dataclass(frozen=True)
class ModeEvent:
    device: str      # kernel name, e.g. dm-3
    major: int
    minor: int
    mode: str        # tracking, streaming or fail
    reason: str
    event: int


class UeventWatcher:
    """Receive dm-repl mode events from the kernel's uevent netlink group."""

    def __init__(self) -> None:
        self._sock = UeventSocket()
        self._sock.bind(MONITOR_GROUP_KERNEL)

    def fileno(self) -> int:
        return self._sock.fileno()

    def events(self, timeout: float | None = None) -> Iterator[ModeEvent]:
        """Yield the dm-repl events that arrive within ``timeout`` seconds (None: wait for one batch)."""
        ready, _, _ = select.select([self._sock.fileno()], [], [], timeout)
        if not ready:
            return
        for msg in self._sock.get():
            mode = msg.get("DM_REPL_MODE")
            if mode is None:
                continue
            yield ModeEvent(device=msg.get("DEVNAME", "?"), major=int(msg.get("MAJOR", 0)),
                            minor=int(msg.get("MINOR", 0)), mode=mode,
                            reason=msg.get("DM_REPL_REASON", "?"),
                            event=int(msg.get("DM_REPL_EVENT", 0)))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> UeventWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
