"""Counts the status document does not carry, kept where the events happen: the latency of a
sync target's durable acknowledgements, the falls into bitmap tracking, the refused handshakes.

Plain Python, always on and cheap: the metrics endpoint (`metrics`, docs/metrics.md) reads them
at scrape time, and nothing here imports prometheus_client. They live on the `Daemon`, keyed by
resource (and target), so that they survive a resource's down/up and role changes; they start
at zero with the daemon, as a Prometheus counter does with its process.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from typing import TypeVar

from repctl.errors import ConnectionClosed, HandshakeRefused, ProtocolError, TLSError
from repctl.protocol import RefuseReason

__all__ = ["LATENCY_BUCKETS", "Histogram", "Stats", "reason_name"]

_K = TypeVar("_K")

#: Upper bounds (seconds) of the sync-ack latency buckets: a LAN's fraction of a millisecond up
#: to the range of a resource's sync_timeout (5 s by default).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations counted in fixed buckets, with their sum.

    One thread observes at a time (a link's receiver) and takes no lock; a reader may see a
    snapshot one observation behind in some bucket, never a count that goes down.
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a value equal to a bound is in it
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], int, float]:
        """The cumulative count at or under each bound, the count of every observation (the
        `+Inf` bucket) and the sum."""
        counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, n in zip(self.bounds, counts, strict=False):
            running += n
            cumulative.append((bound, running))
        return cumulative, running + counts[-1], total


def reason_name(reason: int) -> str:
    """The word for a refusal code: its RefuseReason name in lower case (``auth_failed``)."""
    try:
        return RefuseReason(reason).name.lower()
    except ValueError:  # a code this side does not know (a newer peer's)
        return str(int(reason))


class Stats:
    """The daemon's counters, keyed by resource. Increments take a lock: none of them is on a
    per-record path (the histograms, which are, take none)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (resource, reason, by) -> handshakes refused; by: "local" (this node refused the
        #: peer) or "peer" (the peer refused this node)
        self.refusals: dict[tuple[str, str, str], int] = {}
        #: (resource, reason) -> the kernel fell into bitmap tracking (its reason)
        self.fallbacks: dict[tuple[str, str], int] = {}
        #: (resource, target) -> an async target passed max_lag and fell into its bitmap
        self.target_fallbacks: dict[tuple[str, str], int] = {}
        #: (resource, target) -> seconds from sending records to a sync target until it
        #: acknowledged them durable
        self.ack_latency: dict[tuple[str, str], Histogram] = {}

    def _add(self, table: dict[_K, int], key: _K) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + 1

    def refused(self, resource: str, reason: str, *, by_peer: bool) -> None:
        """A handshake of `resource` was refused for `reason` (a RefuseReason word)."""
        self._add(self.refusals, (resource, reason, "peer" if by_peer else "local"))

    def refusal(self, resource: str, exc: HandshakeRefused) -> None:
        """Count the refusal `exc` (either side's)."""
        self.refused(resource, reason_name(exc.reason), by_peer=exc.remote)

    def handshake_failed(self, resource: str, exc: BaseException) -> None:
        """A peer's handshake with this node's listener ended in `exc`: a refusal by either
        side counts with its reason; a malformed or unfinished one (ProtocolError: garbage, a
        timeout) as ``protocol``, refused by this node; a failed TLS handshake (a certificate
        refused, TLS on one side only) as ``tls``. A peer that only closed the connection (a
        port probe) is not counted."""
        if isinstance(exc, HandshakeRefused):
            self.refusal(resource, exc)
        elif isinstance(exc, ProtocolError) and not isinstance(exc, ConnectionClosed):
            self.refused(resource, "protocol", by_peer=False)
        elif isinstance(exc, TLSError):
            self.refused(resource, "tls", by_peer=False)

    def fell_behind(self, resource: str, reason: str) -> None:
        """The kernel of `resource` stopped its ring: every target tracks in its bitmap."""
        self._add(self.fallbacks, (resource, reason))

    def target_fell_behind(self, resource: str, target: str) -> None:
        """An async target of `resource` passed its max_lag: it tracks in its bitmap."""
        self._add(self.target_fallbacks, (resource, target))

    def latency(self, resource: str, target: str) -> Histogram:
        """The sync-ack latency histogram of `target` (made on first use, then the same)."""
        with self._lock:
            return self.ack_latency.setdefault((resource, target), Histogram())

    def snapshot(self) -> Stats:
        """A copy of the counters as they are now (the histograms shared: see Histogram)."""
        copy = Stats()
        with self._lock:
            copy.refusals = dict(self.refusals)
            copy.fallbacks = dict(self.fallbacks)
            copy.target_fallbacks = dict(self.target_fallbacks)
            copy.ack_latency = dict(self.ack_latency)
        return copy
