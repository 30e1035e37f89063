"""The one seam through which repctl runs subprocesses, hook commands and built-in actions.

`Executor.run` runs a command without a shell, in its own process group, with stdin closed, its
output (stdout and stderr merged) captured and logged to the ``repctl.hooks`` logger, and a
timeout; a command that times out or is cancelled is killed with its whole process group. Any
failure is a `HookError` that names what ran and ends with the last lines of its output. An
executor made with ``dry_run=True`` runs nothing: it records what it would do in `planned`.

`run_hooks` runs the commands that a resource configures for an event (``resources.NAME.hooks``,
see docs/config.md). `apply_actions` does the built-in actions (mount, floating address, systemd
unit) in their configured order on promote, all or nothing; `undo_actions` undoes them in reverse
order on demote.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute

from repctl.config import Action, AddressAction, HookEvent, MountAction, Resource, ServiceAction
from repctl.errors import HookError

__all__ = [
    "Executor",
    "HookError",
    "HookEvent",
    "IPRouteAPI",
    "Planned",
    "Result",
    "announce_ipv4",
    "apply_actions",
    "arp_announcement",
    "describe",
    "run_hooks",
    "undo_actions",
]

log = logging.getLogger("repctl.hooks")

OUTPUT_LIMIT = 64 * 1024  # bytes of a command's output kept (the last ones)
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to a process group
TAIL_LINES = 10  # lines of output that an error message quotes
EXIT_DRAIN = 0.5  # seconds to read output after the command exited (a child may hold the pipe)

MOUNT = "/usr/bin/mount"
UMOUNT = "/usr/bin/umount"
SYSTEMCTL = "/usr/bin/systemctl"
MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Result:
    """A command that ran and exited with status 0."""

    argv: tuple[str, ...]
    returncode: int
    output: str  # stdout and stderr merged, the last OUTPUT_LIMIT bytes
    duration: float  # seconds


@dataclass(frozen=True)
class Planned:
    """A step that a dry run recorded instead of doing: ``str()`` gives ``WHAT: COMMAND``."""

    what: str
    command: str  # the command line (shlex-quoted), or the words for an in-process step
    env: Mapping[str, str] = field(default_factory=dict)  # the variables it would add

    def __str__(self) -> str:
        return f"{self.what}: {self.command}"


class Executor:
    """Runs commands for repctl; the one place that starts processes (tests patch or fake it).

    Safe to share between threads. ``dry_run=True``: nothing runs; each step is logged and
    appended to `planned`, and `run` returns a successful Result with no output.
    """

    def __init__(
        self,
        *,
        dry_run: bool = False,
        kill_grace: float = KILL_GRACE,
        output_limit: int = OUTPUT_LIMIT,
    ) -> None:
        self.dry_run = dry_run
        self.kill_grace = kill_grace
        self.output_limit = output_limit
        self.planned: list[Planned] = []
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._cancelled: set[int] = set()  # pids that cancel() killed

    def transcript(self) -> str:
        """What a dry run would have done, one ``WHAT: COMMAND`` line per step."""
        return "".join(f"{p}\n" for p in self.planned)

    def dry(self, what: str, command: str) -> bool:
        """For steps done in process (netlink, raw sockets): in a dry run, record that `what`
        would do `command` and return True (the caller skips the step); otherwise return False."""
        if not self.dry_run:
            return False
        self._plan(Planned(what, command))
        return True

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        what: str,
    ) -> Result:
        """Run `argv` (no shell) to completion and return its Result.

        `env` is added to this process's environment; `what` names the step in the log and in
        errors. HookError if the command cannot be started, exits with a non-zero status or a
        signal, runs longer than `timeout` seconds, or is cancelled (`cancel`); a command that
        times out is killed with its process group (SIGTERM, SIGKILL after `kill_grace`). On
        KeyboardInterrupt (or any other exception) the process group is killed likewise and the
        exception goes on. A process that the command left running in the background after it
        exited is not killed.
        """
        argv = tuple(argv)
        if not argv:
            raise ValueError(f"{what}: an empty command")
        extra = dict(env or {})
        if self.dry_run:
            self._plan(Planned(what, shlex.join(argv), extra))
            return Result(argv, 0, "", 0.0)
        log.info("%s: running %s", what, shlex.join(argv))
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, **extra},
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            message = f"{what}: cannot run {argv[0]}: {exc.strerror or exc}"
            log.warning("%s", message)
            raise HookError(message) from None
        with self._lock:
            self._running.add(proc)
        tail = _Tail(self.output_limit)
        try:
            timed_out = self._collect(proc, tail, start + timeout)
            if timed_out:
                self._kill_group(proc)
                self._drain(proc, tail)
        except BaseException:
            self._kill_group(proc)
            raise
        finally:
            assert proc.stdout is not None
            proc.stdout.close()
            with self._lock:
                self._running.discard(proc)
                cancelled = proc.pid in self._cancelled
                self._cancelled.discard(proc.pid)
        duration = time.monotonic() - start
        output = tail.text()
        for line in output.splitlines():
            log.info("%s: %s", what, line)
        rc = proc.returncode
        if timed_out:
            how = f"timed out after {timeout:g} s and was killed with its process group"
        elif cancelled:
            how = "was cancelled and killed with its process group"
        elif rc is None:  # killed but stuck (uninterruptible sleep): see _kill_group
            how = "was killed but did not exit"
        elif rc < 0:
            how = f"was killed by signal {_signame(-rc)}"
        elif rc > 0:
            how = f"exited with status {rc}"
        else:
            log.info("%s: %s exited with status 0 after %.2f s", what, argv[0], duration)
            return Result(argv, 0, output, duration)
        message = f"{what}: {argv[0]} {how}"
        log.warning("%s (after %.2f s)", message, duration)
        raise HookError(message + _quote_tail(output))

    def cancel(self) -> None:
        """Kill every command running now, with its process group; their `run` raises HookError."""
        with self._lock:
            procs = list(self._running)
            self._cancelled.update(p.pid for p in procs)
        for proc in procs:
            self._kill_group(proc)

    def _plan(self, step: Planned) -> None:
        log.info("dry run: %s", step)
        with self._lock:
            self.planned.append(step)

    def _collect(self, proc: subprocess.Popen[bytes], tail: _Tail, deadline: float) -> bool:
        """Read `proc`'s output into `tail` until it exits; True if `deadline` passed first."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        exited_at: float | None = None
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return True
                if sel.select(min(deadline - now, 0.1)):
                    chunk = _read(fd)
                    if chunk == b"":  # end of file: every writer has closed the pipe
                        break
                    tail.add(chunk or b"")
                if exited_at is None:
                    if proc.poll() is not None:
                        exited_at = now
                elif now - exited_at > EXIT_DRAIN:
                    break  # a background child still holds the pipe: stop reading
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            return True
        return False

    def _drain(self, proc: subprocess.Popen[bytes], tail: _Tail) -> None:
        """Read what the killed command left in its pipe, without waiting for more."""
        assert proc.stdout is not None
        for _ in range(64):
            chunk = _read(proc.stdout.fileno())
            if not chunk:
                return
            tail.add(chunk)

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM `proc`'s process group; SIGKILL what is left of it after `kill_grace`."""
        pgid = proc.pid  # start_new_session: the command leads its own group
        if not _signal_group(pgid, signal.SIGTERM):
            return  # no process left in the group: the leader has been reaped already
        deadline = time.monotonic() + self.kill_grace
        while _group_alive(pgid) and time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that it does not count as alive
            time.sleep(0.02)
        if _group_alive(pgid):
            log.warning("process group %d outlived SIGTERM by %g s: SIGKILL", pgid, self.kill_grace)
            _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(self.kill_grace)
        except subprocess.TimeoutExpired:  # in uninterruptible sleep (a hung mount, say)
            log.error("process %d did not exit after SIGKILL; leaving it", proc.pid)


class _Tail:
    """The last `limit` bytes of a command's output."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.buf += chunk
        excess = len(self.buf) - self.limit
        if excess > 0:
            del self.buf[:excess]
            self.dropped += excess

    def text(self) -> str:
        text = self.buf.decode("utf-8", errors="replace")
        if self.dropped:
            return f"[{self.dropped} bytes of output dropped]\n{text}"
        return text


def _read(fd: int) -> bytes | None:
    """Up to 64 KiB from non-blocking `fd`: b"" at end of file, None if nothing is there now."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is alive (zombies waiting to be reaped do not count)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _quote_tail(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()][-TAIL_LINES:]
    if not lines:
        return " (no output)"
    return "; its last output:\n" + "\n".join(f"    {line}" for line in lines)


# --------------------------------------------------------------------------------------------
# Hook commands
# --------------------------------------------------------------------------------------------


def run_hooks(
    resource: Resource,
    event: HookEvent,
    *,
    node: str,
    peer: str | None,
    role: str,
    executor: Executor,
    extra_env: Mapping[str, str] | None = None,
) -> None:
    """Run the commands that `resource` configures for `event`, in order, each within the
    resource's hook_timeout. Nothing happens when there are none.

    Each sees the daemon's environment plus `extra_env` plus REPCTL_RESOURCE, REPCTL_NODE (this
    node), REPCTL_PEER (empty if none), REPCTL_ROLE, REPCTL_EVENT and REPCTL_DEVICE
    (/dev/mapper/NAME); the REPCTL_ variables win over `extra_env`. The first command that fails
    raises HookError and the later ones do not run.
    """
    commands = resource.hooks.get(event, ())
    if not commands:
        log.debug("%s: no %s hook", resource.name, event)
        return
    env = {
        **(extra_env or {}),
        "REPCTL_RESOURCE": resource.name,
        "REPCTL_NODE": node,
        "REPCTL_PEER": peer or "",
        "REPCTL_ROLE": role,
        "REPCTL_EVENT": event.value,
        "REPCTL_DEVICE": str(resource.mapper_path),
    }
    for i, argv in enumerate(commands, 1):
        what = f"{resource.name}: {event.value} hook"
        if len(commands) > 1:
            what += f" {i}/{len(commands)}"
        executor.run(argv, timeout=resource.hook_timeout, env=env, what=what)


# --------------------------------------------------------------------------------------------
# Built-in actions
# --------------------------------------------------------------------------------------------


class IPRouteAPI(Protocol):
    """The part of pyroute2's IPRoute that the address action uses."""

    def link_lookup(self, *, ifname: str) -> list[int]: ...

    def addr(self, command: str, **kwargs: Any) -> Any: ...

    def close(self) -> None: ...


Announce = Callable[[str, IPv4Address], None]


def describe(resource: Resource, action: Action) -> str:
    """The words for `action` in logs, errors and dry runs (``mount /dev/mapper/r0 on /srv``)."""
    match action:
        case MountAction(mountpoint, _, _):
            return f"mount {resource.mapper_path} on {mountpoint}"
        case AddressAction(ip, interface):
            return f"address {ip} on {interface}"
        case ServiceAction(unit):
            return f"service {unit}"


def apply_actions(
    resource: Resource,
    executor: Executor,
    *,
    ipr_factory: Callable[[], IPRouteAPI] = IPRoute,
    announce: Announce | None = None,
    mountinfo: Path = MOUNTINFO,
) -> None:
    """Do the resource's actions in their configured order (on promote, once /dev/mapper/NAME
    exists), all or nothing.

    One already in effect (mounted there, address present) is left as it is. If one fails, those
    before it that this call did are undone in reverse order (best effort, failures logged) and
    HookError names the one that failed. An IPv4 address is announced with gratuitous ARP by
    `announce` (default `announce_ipv4`); a failed announcement is a warning only. An interrupt
    (KeyboardInterrupt) stops the executor's command and goes on without undoing anything.
    """
    steps = _Steps(resource, executor, ipr_factory, announce or announce_ipv4, mountinfo)
    changed: list[Action] = []  # what this call did, to be undone if a later action fails
    for i, action in enumerate(resource.actions):
        try:
            if steps.apply(action):
                changed.append(action)
        except Exception as exc:
            undo_failed = []
            for done in reversed(changed):
                try:
                    steps.undo(done)
                except Exception as undo_exc:  # noqa: BLE001 - best effort, each one reported
                    log.error("%s", _error_text(steps, done, undo_exc))
                    undo_failed.append(describe(resource, done))
            message = (
                f"{resource.name}: action {i + 1} of {len(resource.actions)} "
                f"({describe(resource, action)}) failed; "
            )
            if not changed:
                message += "nothing was done before it"
            elif undo_failed:
                message += f"undoing those before it failed for: {', '.join(undo_failed)}"
            else:
                message += f"the {len(changed)} done before it were undone"
            raise HookError(f"{message}\n{_error_text(steps, action, exc)}") from exc


def undo_actions(
    resource: Resource,
    executor: Executor,
    *,
    ipr_factory: Callable[[], IPRouteAPI] = IPRoute,
    mountinfo: Path = MOUNTINFO,
) -> None:
    """Undo the resource's actions in reverse order (on demote, before /dev/mapper/NAME goes).

    One not in effect (not mounted, address absent, unit stopped) is skipped. A failure does not
    stop the others; at the end one HookError names every action that could not be undone.
    """
    steps = _Steps(resource, executor, ipr_factory, announce_ipv4, mountinfo)
    failed: list[str] = []
    for action in reversed(resource.actions):
        try:
            steps.undo(action)
        except Exception as exc:  # noqa: BLE001 - carry on; every failure is in the error
            failed.append(_error_text(steps, action, exc))
            log.error("%s", failed[-1])
    if failed:
        raise HookError(
            f"{resource.name}: {len(failed)} of {len(resource.actions)} actions could not be "
            "undone:\n" + "\n".join(failed)
        )


def _error_text(steps: _Steps, action: Action, exc: Exception) -> str:
    if isinstance(exc, HookError):
        return str(exc)
    return f"{steps.what(action)}: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Steps:
    """How each kind of action is done and undone, for one resource."""

    resource: Resource
    executor: Executor
    ipr_factory: Callable[[], IPRouteAPI]
    announce: Announce
    mountinfo: Path

    def what(self, action: Action) -> str:
        return f"{self.resource.name}: {describe(self.resource, action)}"

    def run(self, action: Action, argv: Sequence[str]) -> None:
        self.executor.run(argv, timeout=self.resource.hook_timeout, what=self.what(action))

    def apply(self, action: Action) -> bool:
        """Do `action`; False if it was in effect already (nothing done)."""
        match action:
            case MountAction(mountpoint, fstype, options):
                if not self.executor.dry_run:
                    stack = self.mounts_at(action)
                    if stack and stack[-1][0]:
                        log.info("%s: already mounted", self.what(action))
                        return False
                    if stack:
                        raise HookError(
                            f"{self.what(action)}: {mountpoint} has another file system mounted "
                            f"on it ({stack[-1][1]})"
                        )
                argv = [MOUNT]
                if fstype is not None:
                    argv += ["-t", fstype]
                if options is not None:
                    argv += ["-o", options]
                self.run(action, [*argv, str(self.resource.mapper_path), str(mountpoint)])
            case AddressAction(ip, interface):
                return self.address(action, ip, interface, add=True)
            case ServiceAction(unit):  # whether it was running is not asked: started counts
                self.run(action, [SYSTEMCTL, "start", unit])
        return True

    def undo(self, action: Action) -> None:
        match action:
            case MountAction(mountpoint, _, _):
                if not self.executor.dry_run:
                    stack = self.mounts_at(action)
                    if not any(ours for ours, _ in stack):
                        log.info("%s: not mounted, nothing to unmount", self.what(action))
                        return
                    if not stack[-1][0]:
                        raise HookError(
                            f"{self.what(action)}: another file system ({stack[-1][1]}) is "
                            "mounted over it"
                        )
                self.run(action, [UMOUNT, str(mountpoint)])
            case AddressAction(ip, interface):
                self.address(action, ip, interface, add=False)
            case ServiceAction(unit):
                self.run(action, [SYSTEMCTL, "stop", unit])

    def mounts_at(self, action: MountAction) -> list[tuple[bool, str]]:
        """The file systems mounted at the action's mount point, from the bottom to the top:
        for each, whether it is the resource's device, and its source (as mountinfo shows it)."""
        where = os.path.realpath(action.mountpoint)
        device = self.resource.mapper_path
        try:
            rdev = os.stat(device).st_rdev
            number: str | None = f"{os.major(rdev)}:{os.minor(rdev)}"
        except OSError:
            number = None
        stack = []
        # mountinfo: ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...
        for line in self.mountinfo.read_text().splitlines():
            fields = line.split()
            if len(fields) < 10 or _unescape(fields[4]) != where or "-" not in fields[6:]:
                continue
            sep = fields.index("-", 6)
            source = _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""
            stack.append((source == str(device) or fields[2] == number, source))
        return stack

    def address(
        self, action: Action, ip: IPv4Interface | IPv6Interface, interface: str, *, add: bool
    ) -> bool:
        """Add or remove the address; False if it was already there (add) or absent (remove)."""
        what = self.what(action)
        verb = "add" if add else "remove"
        if self.executor.dry(what, f"{verb} {ip} {'to' if add else 'from'} {interface}"):
            if add and isinstance(ip, IPv4Interface):
                self.executor.dry(what, f"announce {ip.ip} on {interface} (gratuitous ARP)")
            return True
        ipr = self.ipr_factory()
        try:
            index = ipr.link_lookup(ifname=interface)
            if not index:
                if add:
                    raise HookError(f"{what}: no network interface {interface!r} on this node")
                log.info("%s: interface %s is gone, and the address with it", what, interface)
                return False
            present = any(
                msg.get("prefixlen") == ip.network.prefixlen
                and str(ip.ip) in (msg.get("local"), msg.get("address"))
                for msg in ipr.addr("dump", index=index[0])
            )
            changed = present != add
            if not changed:
                log.info("%s: %s", what, "already present" if add else "not present")
            else:
                ipr.addr(verb, index=index[0], address=str(ip.ip), prefixlen=ip.network.prefixlen)
                log.info("%s: %s", what, "added" if add else "removed")
        finally:
            ipr.close()
        if add and isinstance(ip, IPv4Interface):
            try:
                self.announce(interface, ip.ip)
            except Exception as exc:  # noqa: BLE001 - announcing is a courtesy, not the step
                log.warning(
                    "%s: could not announce it with gratuitous ARP (%s); neighbours learn the "
                    "new place when their ARP entries expire",
                    what,
                    exc,
                )
        return changed


def _unescape(text: str) -> str:
    """A mountinfo field as the path it is (the kernel writes space as \\040 and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


# --------------------------------------------------------------------------------------------
# Gratuitous ARP
# --------------------------------------------------------------------------------------------

ETH_P_ARP = 0x0806  # <linux/if_ether.h>
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1  # <linux/if_arp.h>
ARPOP_REQUEST = 1

# An Ethernet II header (destination, source, EtherType) followed by an ARP packet for IPv4 over
# Ethernet (RFC 826): hardware type, protocol type, address lengths, operation, sender hardware
# and protocol addresses, target hardware and protocol addresses. 42 bytes; the NIC pads it.
_ARP_FRAME = struct.Struct("!6s6sH HHBBH 6s4s6s4s")


def arp_announcement(mac: bytes, ip: IPv4Address) -> bytes:
    """The Ethernet frame that announces `ip` at hardware address `mac` (an ARP announcement,
    RFC 5227 section 2.3): a broadcast ARP request whose sender and target protocol addresses are
    both `ip`, with a zero target hardware address."""
    if len(mac) != 6:
        raise ValueError(f"an Ethernet address has 6 bytes, got {len(mac)}")
    broadcast = b"\xff" * 6
    return _ARP_FRAME.pack(
        broadcast, mac, ETH_P_ARP,
        ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST,
        mac, ip.packed, bytes(6), ip.packed,
    )  # fmt: skip


def announce_ipv4(
    interface: str, ip: IPv4Address, *, count: int = 3, interval: float = 0.2
) -> None:
    """Broadcast `count` ARP announcements of `ip` on `interface`, so that the neighbours point
    their ARP entries at this node. Needs CAP_NET_RAW; OSError if it cannot send. An interface
    that is not Ethernet (no ARP) is left alone."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((interface, ETH_P_ARP))
        hatype, mac = sock.getsockname()[3:5]
        if hatype != ARPHRD_ETHER or len(mac) != 6:
            log.info("%s is not an Ethernet interface: %s not announced", interface, ip)
            return
        frame = arp_announcement(mac, ip)
        for i in range(count):
            if i:
                time.sleep(interval)
            sock.send(frame)
    log.info("announced %s on %s (%d gratuitous ARP)", ip, interface, count)
