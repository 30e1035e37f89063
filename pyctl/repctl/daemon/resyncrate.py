"""How fast one link's resync may send: a small controller that favours the application.

A resync left to itself sends as fast as the socket takes it: it fills the link (an async
target's records then queue behind megabytes of resync data), and its reads compete with the
application's I/O on the source's disk. `ResyncRate` paces it, in the spirit of DRBD's dynamic
resync-rate controller (`c-plan-ahead`, `c-fill-target`, `c-min-rate`, `c-max-rate`), written
for this daemon and kept small.

Every STEP (0.1 s) the link gives the controller three measurements:

- `fill`: the bytes queued toward the peer now, unsent or unacknowledged by its TCP
  (``SIOCOUTQ`` of the link's socket; records and resync chunks alike);
- `app_bps`: the application's write rate on the source, bytes per second (the kernel's
  `write_bytes` counter of the repl device, which counts every write the application makes);
- `app_latency`: the application's mean write latency in seconds over the step (the device's
  ``/sys/block/dm-N/stat``), or None where it is not known;
- `app_waiting`: the application's writes in flight at the step (``/sys/block/dm-N/inflight``).
  A writer that waits behind the resync (a synchronous target whose link is full of resync
  data) completes a write or two a second: neither its rate nor a latency it rarely reports
  shows it, its waiting writes do.

and the controller computes a rate, in bytes per second:

    drain   = what the network took per second, smoothed  ((sent + fill_before - fill) / dt)
    want    = drain + (fill_target - fill) / plan_ahead      # steer the queue to fill_target,
                                                             # closing the gap over plan_ahead
    want    = max(want, rate * 1.5) while fill < fill_target   # the link takes it all: ramp up,
                                                # to at most 2 * drain + min_rate
    ceiling = ceiling / 2               each step the application is busy,
              ceiling * 1.5 + min_rate  each step it is not (up to max_rate)
    rate    = min(want, ceiling), clamped to [min_rate, max_rate]

The application is *busy* when it writes at least `app_busy` bytes per second (DRBD's "application
I/O detected"), when it has writes in flight at the step, or when its write latency is more
than twice the lowest latency seen (a baseline that forgets slowly, 2 % a step, so that it
follows a disk that got slower for good). So the
resync backs off to `min_rate` within a few steps of the application becoming busy, never below
(a resync always finishes), and comes back to full speed within about a second of it becoming
quiet. A short queue toward the peer keeps an async target's records from waiting behind resync
data.

A resync run (one frame) is at most a quarter of `fill_target` (`run_bytes`), so that the
queue holds several frames at the target and the peer never waits for the next one.

Sending is paced by a token bucket at `rate` (`delay`, `sent`): the link asks how long to wait
before its next run and, meanwhile, keeps streaming records: pacing never holds the stream back.
Nothing here reads a clock, a socket or a file: the caller passes `now` and the measurements, so
that tests drive it step by step.
"""

from __future__ import annotations

from repctl.config import ResyncSettings

__all__ = ["STEP", "ResyncRate", "ResyncSettings", "TokenBucket", "run_bytes"]

STEP = 0.1          # seconds between two updates of the rate, at least
GROW = 1.5          # the factor of a step up (the ramp, the ceiling's recovery)
BACK_OFF = 0.5      # the factor of the ceiling's step down while the application is busy
LATENCY_FACTOR = 2.0  # busy: the application's write latency above this times its baseline
BASELINE_FORGET = 1.02  # the latency baseline creeps up by this factor a step toward the present
SMOOTH = 0.5        # weight of the newest drain measurement in its moving average
BURST = 0.1         # a token bucket holds at most this many seconds of its rate


def run_bytes(settings: ResyncSettings, largest: int) -> int:
    """The most bytes one resync run (frame) carries: a quarter of the fill target, at least
    64 KiB, at most `largest`."""
    return max(64 << 10, min(largest, settings.fill_target // 4))


class TokenBucket:
    """A rate in bytes per second. `delay(now)` is how long to wait before sending; `take` takes
    what was sent, and may run into debt (a 1 MiB run at 100 KiB/s waits 10 s after it); the
    bucket fills up to BURST seconds of its rate while nothing is sent. A rate of None is no
    limit."""

    def __init__(self, rate: float | None, now: float) -> None:
        self.rate = rate
        self.tokens = 0.0
        self.at = now

    def _refill(self, now: float) -> None:
        if self.rate is not None and now > self.at:
            self.tokens = min(self.tokens + (now - self.at) * self.rate, self.rate * BURST)
        self.at = max(self.at, now)

    def set_rate(self, rate: float | None, now: float) -> None:
        self._refill(now)
        self.rate = rate

    def delay(self, now: float) -> float:
        """Seconds until a send may start (0: now)."""
        if self.rate is None:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def take(self, nbytes: int, now: float) -> None:
        if self.rate is not None:
            self._refill(now)
            self.tokens -= nbytes


class ResyncRate:
    """One link's resync rate controller (the module's docstring says what it computes)."""

    def __init__(self, settings: ResyncSettings, now: float) -> None:
        self.s = settings
        self.top = float(settings.max_rate) if settings.max_rate is not None else float("inf")
        self.rate = float(settings.min_rate)      # bytes per second, now
        self.ceiling = self.top                   # lowered while the application is busy
        self.drain = 0.0                          # what the network took, bytes per second
        self.baseline: float | None = None        # the application's quiet write latency
        self.busy = False                         # the last step found the application busy
        self.at = now                             # the last update
        self.fill = 0                             # the queue toward the peer at the last update
        self.sent_since = 0                       # resync bytes sent since the last update
        self.bucket = TokenBucket(self._bucket_rate(), now)

    def _bucket_rate(self) -> float | None:
        return None if self.rate == float("inf") else self.rate

    def due(self, now: float) -> bool:
        """Whether an update is due (STEP passed since the last)."""
        return now - self.at >= STEP

    def update(self, now: float, *, fill: int, app_bps: float,
               app_latency: float | None = None, app_waiting: int = 0) -> float:
        """One step of the controller with this step's measurements; returns the new rate."""
        s = self.s
        dt = max(now - self.at, 1e-6)
        drained = max(self.sent_since + self.fill - fill, 0)
        self.drain = SMOOTH * (drained / dt) + (1 - SMOOTH) * self.drain
        want = self.drain + (s.fill_target - fill) / s.plan_ahead
        if fill < s.fill_target:
            # the queue stays short: the link takes it all. Ramp up, but no further than twice
            # what was sent (a resync held back by the CPU or the disk never runs up a rate
            # that it would take many steps to come down from)
            want = max(want, min(self.rate * GROW, 2 * self.drain + s.min_rate))

        self.busy = (app_bps >= s.app_busy or app_waiting > 0
                     or self._latency_high(app_latency))
        if self.busy:
            self.ceiling = max(float(s.min_rate), min(self.ceiling, self.rate) * BACK_OFF)
        else:
            self.ceiling = min(self.top, self.ceiling * GROW + s.min_rate)
        self.rate = max(float(s.min_rate), min(want, self.ceiling, self.top))
        self.at, self.fill, self.sent_since = now, fill, 0
        self.bucket.set_rate(self._bucket_rate(), now)
        return self.rate

    def _latency_high(self, latency: float | None) -> bool:
        """Whether `latency` is above LATENCY_FACTOR times the baseline (which it updates)."""
        if latency is None or latency <= 0:
            return False
        if self.baseline is None or latency < self.baseline:
            self.baseline = latency
            return False
        high = latency > LATENCY_FACTOR * self.baseline
        self.baseline = min(self.baseline * BASELINE_FORGET, latency)
        return high

    def delay(self, now: float) -> float:
        """Seconds the link waits before it sends its next resync run (0: now)."""
        return self.bucket.delay(now)

    def sent(self, nbytes: int, now: float) -> None:
        """The link sent `nbytes` of resync data."""
        self.sent_since += nbytes
        self.bucket.take(nbytes, now)

    def status(self) -> dict[str, object]:
        """The controller's state for `repctl status`: bytes per second (null: no limit)."""
        return {"rate_bps": None if self.rate == float("inf") else round(self.rate),
                "app_busy": self.busy}
