"""Following long operations through the daemon's status document.

Two things take long and the control socket answers only at their end (or not at all):

* ``verify`` blocks until every chunk is compared; meanwhile the daemon reports its progress as
  the target's ``verify`` object in ``status``. `call_with_progress` runs the blocking call in a
  thread and polls the status on a second connection meanwhile.
* ``resume`` and ``connect`` return at once and the resync runs in the background;
  `wait_streaming` polls the status until the targets stream, or fails with one line.

Nothing here prints: the caller passes a `show` callback (the CLI draws bars with it). The clock
and sleep are parameters so that tests need not wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from repctl.daemon.state import LinkState
from repctl.errors import ReplError

__all__ = ["POLL_INTERVAL", "call_with_progress", "find_target", "wait_streaming"]

#: Seconds between two status polls.
POLL_INTERVAL = 0.5

T = TypeVar("T")
Status = Mapping[str, Any]

#: States a target stays in until the administrator changes its setting (resume, connect).
STOPPED = (LinkState.PAUSED, LinkState.DISCONNECTED)

#: Seconds a target may stay refused as BUSY before a wait fails: right after a reconnection
#: the target may not have seen its previous connection end yet, and takes the next one.
BUSY_GRACE = 10.0

#: What to do about a handshake refusal, by the reason in the target's ``connection``
#: (``refused: SPLIT_BRAIN``; protocol.RefuseReason names them). {r} is the resource.
REFUSAL_HINTS: Mapping[str, str] = {
    "SPLIT_BRAIN": "the copies diverged: `repctl resolve {r} --discard-local` on the node whose "
                   "changes go, or an after_split_brain policy (docs/failover.md)",
    "ROLE_CONFLICT": "both nodes are primary: `repctl demote {r}` on one of them "
                     "(docs/failover.md)",
    "AUTH_FAILED": "the two nodes have different secrets: give both the same global.secret_file",
    "UNKNOWN_RESOURCE": "the target's configuration has no resource {r}: make both nodes' "
                        "configuration files the same, then systemctl restart repctl there",
    "UNEXPECTED_NODE": "the nodes' configuration files disagree about the nodes of {r}: make "
                       "them the same, then systemctl restart repctl on the target",
    "CHUNK_SIZE_MISMATCH": "the nodes' configuration files disagree about chunk_size: make them "
                           "the same, then systemctl restart repctl on the target",
    "DEVICE_TOO_SMALL": "the target's device is smaller than this node's: give it a larger one",
    "VERSION": "the nodes run repctl versions without a protocol in common: install the same "
               "version on both",
    "BUSY": "the target is connected to another primary: see `repctl status` there",
}


def find_target(status: Status, resource: str, target: str) -> Mapping[str, Any] | None:
    """The entry of `target` of `resource` in the status document, or None."""
    for t in _targets_of(status, resource) or []:
        if t.get("name") == target:
            return t
    return None


def call_with_progress(
    call: Callable[[], T],
    poll: Callable[[], Status],
    show: Callable[[Status], None],
    interval: float = POLL_INTERVAL,
) -> T:
    """Run the blocking `call` in a thread; until it returns, every `interval` seconds `poll` the
    status and `show` it. Returns what `call` returns, or raises what it raised. A poll that
    fails is skipped: the call's own answer decides."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="repctl-call", daemon=True)
    worker.start()
    while True:
        worker.join(interval)
        if not worker.is_alive():
            break
        try:
            status = poll()
        except ReplError:
            continue
        show(status)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


def _describe(t: Mapping[str, Any]) -> str:
    state = str(t.get("state") or "unknown")
    sync = t.get("sync")
    if isinstance(sync, Mapping):
        done, total = sync.get("done_bytes"), sync.get("total_bytes")
        if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
            state += f", {min(100.0, 100.0 * done / total):.1f}% done"
    oos = t.get("out_of_sync_bytes")
    if state == LinkState.STREAMING and isinstance(oos, int) and oos:
        state += f", {oos} bytes out of sync"  # marked by `verify --repair`, not yet resyncing
    if t.get("last_error") and state == LinkState.CONNECTING:
        state += f", last error: {t['last_error']}"
    return state


def _stopped_by_admin(t: Mapping[str, Any]) -> bool:
    """True if the administrator's setting keeps the target from streaming. Right after a resume
    or connect the state may still be the old one, while ``admin`` is already ``up``."""
    admin = t.get("admin")
    if admin is None:  # a daemon that does not report it: its connection says "down"
        return t.get("connection") == "down"
    return admin != "up"


def _refusal(t: Mapping[str, Any]) -> str | None:
    """The reason word if the target's last handshake was refused (``refused: REASON``)."""
    connection = str(t.get("connection") or "")
    if not connection.startswith("refused"):
        return None
    return connection.partition(":")[2].strip() or "?"


def refused_text(resource: str, t: Mapping[str, Any], reason: str) -> str:
    """One line: which target refused, the daemon's text, and what to do about it."""
    name = t.get("name")
    hint = REFUSAL_HINTS.get(reason, "fix what the text says")
    why = t.get("last_error") or f"refused: {reason}"
    return (f"{resource}/{name}: refused while waiting for it to stream: {why}; "
            f"{hint.format(r=resource)} (the daemon keeps retrying: repctl status {resource})")


def _targets_of(status: Status, resource: str) -> list[Mapping[str, Any]] | None:
    for res in status.get("resources") or []:
        if res.get("name") == resource:
            return list(res.get("targets") or [])
    return None


def wait_streaming(
    poll: Callable[[], Status],
    resource: str,
    targets: Sequence[str] | None = None,
    *,
    timeout: float | None = None,
    show: Callable[[Sequence[Mapping[str, Any]]], None] | None = None,
    interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    in_sync: bool = False,
) -> list[str]:
    """Poll the status until every one of `targets` of `resource` (default: all of them) is
    streaming; return their names. `show` gets the awaited targets' entries at every poll.
    With `in_sync`, also until none has chunks out of sync: right after `verify --repair`
    marked chunks, a target may stream for a moment before its resync of them starts.

    ReplError with one line if the resource is not in the status, a target is missing, a target
    is paused or disconnected by the administrator (its ``admin`` is not ``up``: it will not
    stream until someone resumes or connects it), a target refuses the connection (its
    ``connection`` is ``refused: REASON``; BUSY only after `BUSY_GRACE` seconds: it may be
    transient), or `timeout` seconds pass. A target that cannot be reached is retried by the
    daemon; only the timeout ends that wait.
    """
    deadline = None if timeout is None else clock() + timeout
    busy: dict[str, float] = {}  # target -> when it was first seen refused as BUSY
    while True:
        entries = _targets_of(poll(), resource)
        if entries is None:
            raise ReplError(f"resource {resource} is no longer up on this node "
                            f"(repctl status; repctl up {resource})")
        by_name = {str(t.get("name")): t for t in entries}
        names = list(targets) if targets is not None else list(by_name)
        for name in names:
            if name not in by_name:
                raise ReplError(f"resource {resource} has no target {name!r} in the status "
                                f"(its targets: {', '.join(by_name) or 'none'})")
        awaited = [by_name[n] for n in names]
        if show is not None:
            show(awaited)
        now = clock()
        for t in awaited:
            state = t.get("state")
            if state in STOPPED and _stopped_by_admin(t):
                undo = "resume" if state == LinkState.PAUSED else "connect"
                raise ReplError(
                    f"{resource}/{t.get('name')}: {state} by the administrator while waiting "
                    f"for it to stream (repctl {undo} {resource} {t.get('name')})"
                )
            reason, name = _refusal(t), str(t.get("name"))
            if reason != "BUSY":
                busy.pop(name, None)
            if reason is None or (reason == "BUSY"
                                  and now - busy.setdefault(name, now) < BUSY_GRACE):
                continue
            raise ReplError(refused_text(resource, t, reason))
        pending = [t for t in awaited if t.get("state") != LinkState.STREAMING
                   or (in_sync and t.get("out_of_sync_bytes"))]
        if not pending:
            return names
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                which = "; ".join(f"{resource}/{t.get('name')} {_describe(t)}" for t in pending)
                raise ReplError(
                    f"timed out after {timeout:g} s waiting to stream: {which} "
                    f"(it goes on in the background: repctl status {resource})"
                )
            sleep(min(interval, left))
        else:
            sleep(interval)
