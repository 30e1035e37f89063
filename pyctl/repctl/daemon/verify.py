"""How far a running `verify` has got."""

from __future__ import annotations

import threading
import time
from typing import Any

from repctl.errors import ReplError

__all__ = ["VerifyCancelled", "VerifyProgress"]


class VerifyCancelled(ReplError):
    """The administrator cancelled the verify (Ctrl-C on `repctl verify`)."""


class VerifyProgress:
    """How far a running `verify` has got; `status` shows it on the target (docs/cli.md).

    Pass 1 compares every chunk; pass 2, if any differed, re-checks only those.
    """

    def __init__(self, total: int, chunk_bytes: int):
        self._lock = threading.Lock()
        self.started = time.time()
        self.chunk_bytes = chunk_bytes
        self.cancelled = threading.Event()  # set by `cancel_verify`: stop at a chunk boundary
        self.finished = threading.Event()   # set once the verify has returned or raised
        self.begin(1, total)

    def begin(self, pass_no: int, total: int) -> None:
        with self._lock:
            self.pass_no, self.total, self.done, self.differing = pass_no, total, 0, 0
            self._t0 = time.monotonic()

    def check_cancelled(self, where: str) -> None:
        """Raise VerifyCancelled if `cancel_verify` asked this verify to stop."""
        if self.cancelled.is_set():
            raise VerifyCancelled(f"{where}: verify cancelled")

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

