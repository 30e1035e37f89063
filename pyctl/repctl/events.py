"""Mode changes of dm-repl targets, as the kernel announces them over netlink.

The target raises a KOBJ_CHANGE uevent on its dm disk with DM_REPL_MODE,
DM_REPL_REASON and DM_REPL_EVENT (see docs/dm-repl.rst).  The daemon does not
use this module: it is the consumer, and its engine is woken by POLLPRI on the
consumer's file, which carries the same mode changes, sooner (no work item in
between) and without a netlink socket; `repctl events` shows what the daemon
made of them.  This is the way for anything that is not the consumer (a
monitoring tool, the VM test of the kernel's uevents) to hear them.
"""

from __future__ import annotations

import queue
import threading
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
    """Receive dm-repl mode events from the kernel's uevent netlink group.

    pyroute2 reads ahead and keeps messages in its own buffer, and its
    synchronous socket only works in the thread that made it: so one reader
    thread owns the socket and feeds a queue.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[ModeEvent] = queue.Queue()
        self._closed = False
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name="uevents", daemon=True)
        self._reader.start()
        self._bound.wait(10)
        if self._error:
            raise self._error

    def _read(self) -> None:
        try:
            self._sock = UeventSocket()
            self._sock.bind(MONITOR_GROUP_KERNEL)
        except BaseException as e:  # surfaced by __init__
            self._error = e
            return
        finally:
            self._bound.set()
        while not self._closed:
            try:
                msgs = self._sock.get()
            except Exception:  # noqa: BLE001 - the socket was closed under us
                return
            for msg in msgs:
                mode = msg.get("DM_REPL_MODE")
                if mode is None:
                    continue
                self._queue.put(ModeEvent(
                    device=msg.get("DEVNAME", "?"), major=int(msg.get("MAJOR", 0)),
                    minor=int(msg.get("MINOR", 0)), mode=mode,
                    reason=msg.get("DM_REPL_REASON", "?"), event=int(msg.get("DM_REPL_EVENT", 0))))

    def events(self, timeout: float | None = None) -> Iterator[ModeEvent]:
        """Yield the events received so far, waiting up to ``timeout`` seconds for the first."""
        try:
            yield self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        """Stop delivering events (the reader thread ends with the next message or the process)."""
        self._closed = True

    def __enter__(self) -> UeventWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
