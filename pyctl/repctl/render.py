"""How the CLI shows things: the one table printer (which also speaks JSON) and the status view.

Everything here is a pure function of plain data (the daemon's status dict, a verify result, an
event) to text or rich renderables, so tests compare strings and the CLI stays thin.

rich is imported by the functions that draw, not here: `print_json`, `human_bytes` and
`event_line` (``repctl status --json``, ``repctl events``) do without it, and importing rich
costs more than the rest of a short command (docs/benchmarks.md, "CLI start").
"""

from __future__ import annotations

import json as jsonlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from repctl.daemon.state import Event, LinkState, Role

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

__all__ = [
    "STATUS_COLUMNS",
    "Bar",
    "Column",
    "console",
    "event_line",
    "human_bytes",
    "human_duration",
    "human_rate",
    "print_json",
    "print_table",
    "progress_view",
    "status_details",
    "status_rows",
    "status_view",
    "sync_bar",
    "sync_text",
    "table",
    "text_bar",
    "verify_bar",
]

MISSING = "-"

#: Colour of each mirror state (docs/cli.md lists the states).
STATE_STYLES: Mapping[str, str] = {
    LinkState.STREAMING: "green",
    LinkState.SYNCING: "cyan",
    LinkState.CONNECTING: "yellow",
    LinkState.BEHIND: "yellow",
    LinkState.PAUSED: "blue",
    LinkState.DISCONNECTED: "red",
    LinkState.FAILED: "bold red",
}


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def human_bytes(n: object) -> str:
    """``0 B``, ``512 B``, ``4.0 KiB``, ``1.5 GiB``; ``-`` for a missing value."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return MISSING
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(bps: object) -> str:
    """Bytes per second as ``12.0 MiB/s``."""
    text = human_bytes(bps)
    return text if text == MISSING else f"{text}/s"


def human_duration(seconds: object) -> str:
    """``42s``, ``5m03s``, ``2h07m``, ``3d04h``; ``-`` for a missing value."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or math.isnan(seconds):
        return MISSING
    s = max(int(seconds + 0.5), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# --------------------------------------------------------------------------------------------
# The shared printer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column: the row key it shows, its header, and how a value becomes a cell."""

    key: str
    header: str
    fmt: Callable[[Any], str | Text | RenderableType] = (
        lambda v: MISSING if v is None else str(v))
    justify: Literal["left", "right", "center"] = "left"


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr). Not a terminal and no COLUMNS: wide, so that a pipe or a
    log gets whole lines rather than wrapped cells."""
    from rich.console import Console  # here, not at the top: start time (module docstring)

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con = Console(stderr=stderr, highlight=False, width=200)
    return con


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> Table:
    """A rich table of `rows` (dicts keyed by the columns' keys), no borders."""
    from rich.table import Table  # start time

    out = Table(header_style="bold", box=None, pad_edge=False)
    for col in columns:
        out.add_column(col.header, justify=col.justify, no_wrap=True)
    for row in rows:
        out.add_row(*(col.fmt(row.get(col.key)) for col in columns))
    return out


def print_json(doc: object, *, file: Any = None) -> None:
    """Exactly one JSON document on stdout (indented, sorted as given), newline-terminated."""
    out = file if file is not None else sys.stdout
    out.write(jsonlib.dumps(doc, indent=2) + "\n")
    out.flush()


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    json: bool = False,
    doc: object = None,
    title: str | None = None,
    footer: Sequence[str] = (),
) -> None:
    """Print `rows` as a table with `columns`, or with ``json=True`` one JSON document: `doc` if
    given (the command's whole result), else the rows as a list of objects with raw values."""
    if json:
        print_json(doc if doc is not None else [dict(r) for r in rows])
        return
    con = console()
    if title:
        con.print(title, markup=False)  # a line of its own: a table title would wrap to its width
    con.print(table(rows, columns))
    for line in footer:
        con.print(line, markup=False)


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


def state_text(state: object) -> Text:
    from rich.text import Text  # start time

    if state is None:
        return Text(MISSING)
    word = str(state).split(" ", 1)[0]  # `syncing (queued 2)`: styled as syncing
    return Text(str(state), style=STATE_STYLES.get(word, ""))


#: Cells of the bar in the Sync column.
SYNC_BAR = 10


def text_bar(fraction: float, width: int = SYNC_BAR, *, ascii: bool = False) -> str:
    """A bar of `width` cells, `fraction` of them full: ``██░░░░░░░░`` (``##--------`` in
    ASCII). Full and empty cells differ without colour, so a pipe or a log shows it too."""
    full = int(min(max(fraction, 0.0), 1.0) * width)
    on, off = ("#", "-") if ascii else ("█", "░")
    return on * full + off * (width - full)


def sync_text(sync: object, *, ascii: bool = False) -> tuple[str, str]:
    """The Sync cell of a target as (bar, text): ``("██░░░░░░░░", "25.0% 47.7 MiB/s ETA
    1m04s")`` while it resyncs (the status document's ``sync``), ``("", "-")`` otherwise."""
    if not isinstance(sync, Mapping):
        return "", MISSING
    total, done = _num(sync.get("total_bytes")), _num(sync.get("done_bytes"))
    bar, parts = "", []
    if total and done is not None and total > 0:
        bar = text_bar(done / total, ascii=ascii)
        parts.append(f"{min(100.0, 100.0 * done / total):.1f}%")
    if sync.get("rate_bps") is not None:
        parts.append(human_rate(sync["rate_bps"]))
    if sync.get("eta_s") is not None:
        parts.append(f"ETA {human_duration(sync['eta_s'])}")
    return bar, " ".join(parts) or MISSING


class _SyncCell:
    """The Sync cell: `sync_text`, its bar in ASCII on a console that cannot print the blocks,
    coloured on a terminal, plain in a pipe."""

    def __init__(self, sync: object) -> None:
        self.sync = sync

    def _text(self, ascii: bool) -> Text:
        from rich.text import Text  # start time

        bar, rest = sync_text(self.sync, ascii=ascii)
        if not bar:
            return Text(rest, no_wrap=True)
        return Text.assemble((bar, "cyan"), " ", rest, no_wrap=True)

    def __rich_console__(self, con: Console, options: ConsoleOptions) -> RenderResult:
        yield self._text(options.ascii_only)

    def __rich_measure__(self, con: Console, options: ConsoleOptions) -> Measurement:
        from rich.measure import Measurement  # start time

        width = len(self._text(True))
        return Measurement(width, width)


def _lag(lag: object) -> str:
    if not isinstance(lag, Mapping):
        return MISSING
    text = human_bytes(lag.get("bytes"))
    records = lag.get("records")
    if isinstance(records, int) and records:
        text = f"{text} ({records} writes)" if text != MISSING else f"{records} writes"
    return text


STATUS_COLUMNS: Sequence[Column] = (
    Column("resource", "Resource"),
    Column("role", "Role"),
    Column("disk", "Disk"),
    Column("target", "Target"),
    Column("mode", "Mode"),
    Column("state", "State", state_text),
    Column("connection", "Connection"),
    Column("out_of_sync", "Out of sync", human_bytes, "right"),
    Column("sync", "Sync", _SyncCell),
    Column("lag", "Lag", _lag, "right"),
    Column("sent", "Sent", lambda v: v if isinstance(v, str) else human_bytes(v), "right"),
)


def status_rows(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (resource, target) for `STATUS_COLUMNS`.

    A resource this node is a secondary of has one row: its primary in the Target column
    (``<- alpha``) and the bytes received in the Sent column (``recv 1.0 MiB``).
    """
    rows: list[dict[str, Any]] = []
    for res in status.get("resources") or []:
        base = {"resource": res.get("name"), "role": res.get("role"), "disk": res.get("disk")}
        targets = res.get("targets") or []
        if res.get("role") == Role.SECONDARY or not targets:
            source = res.get("source")
            received = res.get("bytes_received")
            rows.append({
                **base,
                "target": f"<- {source}" if source else None,
                "state": res.get("state"),
                "connection": res.get("connection"),
                "sent": f"recv {human_bytes(received)}" if received is not None else None,
            })
            continue
        for t in targets:
            rows.append({
                **base,
                "target": t.get("name"),
                "mode": t.get("mode"),
                # a resync waiting for a slot of the daemon's scheduler says its place
                "state": (f"{t.get('state')} (queued {t['resync_queued']})"
                          if t.get("resync_queued") else t.get("state")),
                "connection": t.get("connection"),
                "out_of_sync": t.get("out_of_sync_bytes"),
                "sync": t.get("sync"),
                "lag": {"bytes": t.get("lag_bytes"), "records": t.get("lag_records")},
                "sent": t.get("bytes_sent"),
            })
    return rows


#: Why an async target fell behind into its bitmap (status's `behind_reason`), in words.
_BEHIND = {"max_lag": "its backlog passed max_lag",
           "ring_full": "the kernel's ring filled (ring_size)",
           "sync_timeout": "a sync target did not answer within sync_timeout"}

_COMPRESSION = {"compression", "compression_raw_bytes", "compression_wire_bytes",
                "compression_skipped_bytes"}
_KNOWN_RES = {"name", "role", "disk", "device", "kernel", "targets", "source", "connection",
              "state", "consistent", "bytes_received", "last_error", "size", *_COMPRESSION}
_KNOWN_TARGET = {"name", "mode", "state", "connection", "address", "out_of_sync_bytes",
                 "bytes_sent", "resync_bytes", "lag_bytes", "lag_records", "sync", "last_error", "admin", "verify",
                 "resync_queued", "resync_rate_bps", "resync_app_busy", "behind_reason",
                 *_COMPRESSION}


def _extra(d: Mapping[str, Any], known: set[str]) -> list[str]:
    return [f"{k} {v}" for k, v in d.items() if k not in known and v is not None]


def _compression(d: Mapping[str, Any]) -> list[str]:
    """`zstd: 120.0 MiB as 40.0 MiB (33 %)`: the session's codec and what it saved, when a
    codec is on or has been."""
    codec, raw = d.get("compression"), d.get("compression_raw_bytes") or 0
    if (codec is None or codec == "none") and not raw:
        return []
    text = f"compression {codec}" if codec else "compression"  # null: not connected now
    if raw:
        wire = d.get("compression_wire_bytes") or 0
        text += f": {human_bytes(raw)} as {human_bytes(wire)} ({100 * wire / raw:.0f} %)"
        if d.get("compression_skipped_bytes"):
            text += f", {human_bytes(d['compression_skipped_bytes'])} of it sent as is"
    return [text]


def status_details(status: Mapping[str, Any]) -> list[str]:
    """The fields the table has no column for, one line per resource and per target with any:
    device, size, kernel state, addresses, consistency, last errors, and fields unknown here."""
    lines: list[str] = []
    for res in status.get("resources") or []:
        name = res.get("name", "?")
        parts = []
        if res.get("device"):
            parts.append(str(res["device"]))
        if res.get("size") is not None:
            parts.append(human_bytes(res["size"]))
        kernel = res.get("kernel")
        if isinstance(kernel, Mapping):
            k = f"kernel {kernel.get('mode', '?')}"
            if kernel.get("reason"):
                k += f" ({kernel['reason']})"
            if kernel.get("dirty_chunks") is not None:
                k += f", {kernel['dirty_chunks']} dirty chunks"
                if kernel.get("chunk_size"):
                    k += f" of {human_bytes(kernel['chunk_size'])}"
            if kernel.get("ring_bytes"):
                k += (f", ring {human_bytes(kernel.get('ring_used'))} of "
                      f"{human_bytes(kernel['ring_bytes'])} used")
            k += "".join(
                f", {key} {value}" for key, value in kernel.items()
                if key not in {"mode", "reason", "dirty_chunks", "chunk_size", "ring_used",
                               "ring_bytes"}
            )
            parts.append(k)
        if res.get("consistent") is not None:
            parts.append("consistent" if res["consistent"] else "INCONSISTENT (sync not finished)")
        parts += _compression(res)
        parts += _extra(res, _KNOWN_RES)
        if res.get("last_error"):
            parts.append(f"last error: {res['last_error']}")
        if parts:
            lines.append(f"{name}: " + ", ".join(parts))
        for t in res.get("targets") or []:
            tparts = []
            if t.get("address"):
                tparts.append(f"at {t['address']}")
            if isinstance(t.get("verify"), Mapping):
                tparts.append(f"verifying: {verify_bar(t['verify']).detail}")
            if t.get("behind_reason"):
                tparts.append(f"fell behind: {_BEHIND.get(t['behind_reason'], t['behind_reason'])}")
            if t.get("resync_queued"):
                tparts.append(f"resync waits for a slot: {t['resync_queued']} in the queue")
            if t.get("resync_rate_bps") is not None:
                tparts.append(f"resync paced at {human_rate(t['resync_rate_bps'])}"
                              + (" (the application is busy)" if t.get("resync_app_busy")
                                 else ""))
            tparts += _compression(t)
            tparts += _extra(t, _KNOWN_TARGET)
            if t.get("last_error"):
                tparts.append(f"last error: {t['last_error']}")
            if tparts:
                lines.append(f"{name} -> {t.get('name', '?')}: " + ", ".join(tparts))
    return lines


def status_view(status: Mapping[str, Any], *, empty: str = "no resource is up",
                header: str | None = None) -> RenderableType:
    """The whole `repctl status` screen: the table, then the detail lines. `empty` is what it
    says when there is no row; `header`, if given, is a first line (``--watch``'s clock)."""
    from rich.console import Group  # start time
    from rich.text import Text

    node = status.get("node")
    rows = status_rows(status)
    title = f"repctl on {node}" if node else None
    parts: list[RenderableType] = []
    if header:
        parts.append(Text(header, style="dim"))
    if not rows:
        parts.append(Text(f"{title + ': ' if title else ''}{empty}"))
    else:
        if title:
            parts.append(Text(title, style="bold"))
        parts.append(table(rows, STATUS_COLUMNS))
    details = status_details(status)
    if details:
        parts.append(Text(""))
        parts.extend(Text(line) for line in details)
    return Group(*parts)


# --------------------------------------------------------------------------------------------
# Progress of long operations (verify, a resync awaited with --wait)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One progress bar: `completed` of `total` (None: not known yet, the bar pulses), and a text
    after it."""

    completed: float
    total: float | None
    detail: str


def _num(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _rate_eta(rate_bps: object, eta_s: object) -> str:
    parts = []
    if _num(rate_bps):
        parts.append(human_rate(rate_bps))
    if _num(eta_s) is not None:
        parts.append(f"ETA {human_duration(eta_s)}")
    return "  ".join(parts)


def verify_bar(v: Mapping[str, Any]) -> Bar:
    """The bar of a running verify, from the target's ``verify`` object in the status document:
    ``4096 of 16384 chunks  16.0 MiB/s  ETA 3s  2 differ``."""
    done, total = _num(v.get("done_chunks")) or 0.0, _num(v.get("total_chunks"))
    parts = [f"{int(done)} of {int(total)} chunks" if total is not None else f"{int(done)} chunks"]
    if v.get("pass") == 2:
        parts[0] += " re-checked"
    rate, size = _num(v.get("rate_cps")), _num(v.get("chunk_size"))
    parts.append(_rate_eta(rate * size if rate and size else None, v.get("eta_s")))
    if v.get("differing_chunks"):
        parts.append(f"{v['differing_chunks']} differ")
    return Bar(done, total, "  ".join(p for p in parts if p))


def sync_bar(t: Mapping[str, Any]) -> Bar:
    """The bar of a target awaited until it streams, from its entry in the status document:
    ``syncing 1.0 GiB of 4.0 GiB  47.7 MiB/s  ETA 1m04s``."""
    state = str(t.get("state") or "?")
    if state == LinkState.STREAMING:
        return Bar(1, 1, LinkState.STREAMING)
    sync = t.get("sync")
    if isinstance(sync, Mapping):
        done, total = _num(sync.get("done_bytes")) or 0.0, _num(sync.get("total_bytes"))
        if total:
            text = f"{state} {human_bytes(done)} of {human_bytes(total)}"
            speed = _rate_eta(sync.get("rate_bps"), sync.get("eta_s"))
            return Bar(min(done, total), total, f"{text}  {speed}" if speed else text)
    text = state
    if t.get("out_of_sync_bytes"):
        text += f", {human_bytes(t['out_of_sync_bytes'])} out of sync"
    if state == LinkState.CONNECTING and t.get("last_error"):
        text += f" (last error: {t['last_error']})"
    return Bar(0, None, text)


def progress_view(bars: Mapping[str, Bar]) -> RenderableType:
    """One line per bar: its name, the bar, the percentage and the detail text. On a narrow
    terminal the bar, then the detail text, are cut short, never the name or the percentage."""
    return _ProgressView(dict(bars))


class _ProgressView:
    BAR = 30  # widest bar
    MIN_BAR = 10

    def __init__(self, bars: dict[str, Bar]) -> None:
        self.bars = bars

    def __rich_console__(self, con: Console, options: ConsoleOptions) -> RenderResult:
        from rich.progress_bar import ProgressBar  # start time
        from rich.table import Table
        from rich.text import Text

        name_w = max((len(n) for n in self.bars), default=0)
        percent_w = 6
        details = max((len(b.detail) for b in self.bars.values()), default=0)
        room = options.max_width - name_w - percent_w - 3  # the three spaces between columns
        bar_w = max(self.MIN_BAR, min(self.BAR, room - details))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, width=name_w)
        grid.add_column(no_wrap=True, width=bar_w)
        grid.add_column(justify="right", no_wrap=True, width=percent_w)
        grid.add_column(no_wrap=True, overflow="ellipsis", width=max(room - bar_w, 1))
        for name, bar in self.bars.items():
            total = bar.total if bar.total else None
            percent = f"{min(100.0, 100.0 * bar.completed / total):.1f}%" if total else ""
            grid.add_row(Text(name), ProgressBar(total=total, completed=bar.completed,
                                                 width=bar_w),
                         percent, Text(bar.detail, no_wrap=True, overflow="ellipsis"))
        yield grid


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


#: The keys `event_line` shows in its own way; any other is appended as ``key=value``.
_EVENT_KEYS = frozenset({"time", "resource", "target", "what", "old", "new", "text"})
_PROGRESS_KEYS = frozenset({"done_bytes", "total_bytes", "percent", "rate_bps", "eta_s"})


def event_line(event: Mapping[str, Any]) -> str:
    """One line for an event: ``12:03:04 r0/beta state: syncing -> streaming (caught up)``, or
    for a resync's progress ``12:03:05 r0/beta progress: 37.5% 12.0 MiB/s ETA 1m04s (1.5 GiB
    of 4.0 GiB)``.

    Known keys: time (unix seconds), resource, target, what, old, new, text, and a progress
    event's fields (docs/cli.md); any other key is appended as ``key=value``.
    """
    when = event.get("time")
    stamp = (
        time.strftime("%H:%M:%S", time.localtime(when))
        if isinstance(when, int | float)
        else time.strftime("%H:%M:%S")
    )
    where = str(event.get("resource") or "-")
    if event.get("target"):
        where += f"/{event['target']}"
    line = f"{stamp} {where} {event.get('what') or 'event'}"
    known = _EVENT_KEYS
    if event.get("what") == Event.PROGRESS:
        known |= _PROGRESS_KEYS
        line += f": {_progress_text(event)}"
    if "old" in event or "new" in event:
        line += f": {event.get('old') or '?'} -> {event.get('new') or '?'}"
    if event.get("text"):
        line += f" ({event['text']})"
    extra = [f"{k}={v}" for k, v in event.items() if k not in known]
    if extra:
        line += " " + " ".join(extra)
    return line


def _progress_text(event: Mapping[str, Any]) -> str:
    """``37.5% 12.0 MiB/s ETA 1m04s (1.5 GiB of 4.0 GiB)``: the percent as the event says it."""
    parts = []
    percent = _num(event.get("percent"))
    if percent is not None:
        parts.append(f"{percent:.1f}%")
    if _num(event.get("rate_bps")) is not None:
        parts.append(human_rate(event["rate_bps"]))
    if _num(event.get("eta_s")) is not None:
        parts.append(f"ETA {human_duration(event['eta_s'])}")
    done, total = event.get("done_bytes"), event.get("total_bytes")
    if total is not None:
        parts.append(f"({human_bytes(done)} of {human_bytes(total)})")
    return " ".join(parts) or MISSING
