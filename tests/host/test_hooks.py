"""The hook seam (repctl.hooks): real subprocesses for the executor, fakes for netlink and mount.

No privileges, no network: the address action gets a fake IPRoute, the mount and service actions
a fake executor, and the mount table is a mountinfo file in tmp_path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, ip_interface
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Self

import pytest
import yaml
from repctl import config as c
from repctl import hooks
from repctl.config import HookEvent
from repctl.errors import HookError, ReplError

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "resources": {
        "r0": {
            "port": 7789,
            "source": "alpha",
            "nodes": {
                "alpha": {"address": "10.0.0.1", "device": "/dev/a", "metadata": "/dev/a-md"},
                "beta": {"address": "10.0.0.2", "device": "/dev/b", "metadata": "/dev/b-md"},
            },
            "targets": {"beta": {"mode": "sync"}},
        }
    }
}


def resource(
    hooks_: Mapping[HookEvent, Sequence[Sequence[str]]] | None = None,
    actions: Sequence[c.Action] = (),
    hook_timeout: float = 5.0,
) -> c.Resource:
    res = c.parse_config(yaml.safe_dump(BASE)).resource("r0")
    commands = {e: tuple(tuple(argv) for argv in cmds) for e, cmds in (hooks_ or {}).items()}
    return dataclasses.replace(
        res, hooks=MappingProxyType(commands), actions=tuple(actions), hook_timeout=hook_timeout
    )


def script(tmp_path: Path, body: str, name: str = "hook") -> str:
    """An executable /bin/sh script in tmp_path; its absolute path."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def gone(pid: int, within: float = 3.0) -> bool:
    """Whether process `pid` has exited (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def wait_for(path: Path, within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


@pytest.fixture
def reap():
    """Pids to SIGKILL at the end of the test, should the code under test leave them running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------
# Executor.run on real processes
# --------------------------------------------------------------------------------------------


def test_run_returns_output_merged(tmp_path):
    cmd = script(tmp_path, "echo out; echo err >&2; echo out again\n")
    result = hooks.Executor().run([cmd, "x"], timeout=5, what="test")
    assert result.argv == (cmd, "x") and result.returncode == 0
    assert result.output == "out\nerr\nout again\n"
    assert 0 < result.duration < 5


def test_a_failure_names_what_the_status_and_the_last_lines(tmp_path):
    cmd = script(tmp_path, "for i in $(seq 1 15); do echo line $i; done; exit 3\n")
    with pytest.raises(HookError) as info:
        hooks.Executor().run([cmd], timeout=5, what="r0: before-promote hook")
    text = str(info.value)
    assert isinstance(info.value, ReplError)
    assert text.startswith(f"r0: before-promote hook: {cmd} exited with status 3; its last output:")
    assert "line 6\n" in text and text.endswith("line 15")
    assert "line 5\n" not in text  # ten lines, not all


def test_a_signal_is_named(tmp_path):
    cmd = script(tmp_path, "kill -KILL $$\n")
    with pytest.raises(HookError, match=r"was killed by signal SIGKILL \(no output\)$"):
        hooks.Executor().run([cmd], timeout=5, what="test")


def test_a_command_that_cannot_start(tmp_path):
    with pytest.raises(HookError, match=r"^t: cannot run /nonexistent/x: No such file"):
        hooks.Executor().run(["/nonexistent/x"], timeout=5, what="t")
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(HookError, match="Permission denied"):
        hooks.Executor().run([str(plain)], timeout=5, what="t")


def test_no_shell_is_involved(tmp_path):
    cmd = script(tmp_path, 'for a in "$@"; do echo "[$a]"; done\n')
    result = hooks.Executor().run([cmd, "$HOME", "a b", "*", ";", "|"], timeout=5, what="t")
    assert result.output == "[$HOME]\n[a b]\n[*]\n[;]\n[|]\n"


def test_stdin_is_closed(tmp_path):
    # Give this process a stdin with something to read: the command must not see it.
    r, w = os.pipe()
    os.write(w, b"secret\n")
    os.close(w)
    saved = os.dup(0)
    os.dup2(r, 0)
    try:
        cmd = script(tmp_path, 'if read line; then echo "read $line"; else echo eof; fi\n')
        assert hooks.Executor().run([cmd], timeout=5, what="t").output == "eof\n"
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)


def test_the_command_leads_its_own_session(tmp_path):
    cmd = script(tmp_path, 'echo $$; cut -d" " -f5,6 /proc/$$/stat\n')
    pid, ids = hooks.Executor().run([cmd], timeout=5, what="t").output.splitlines()
    assert ids == f"{pid} {pid}"  # process group and session are its own
    assert int(pid) != os.getpgrp()


def test_env_is_added_to_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTER_VARIABLE", "outer")
    cmd = script(tmp_path, 'echo "$OUTER_VARIABLE $EXTRA_VARIABLE"\n')
    run = hooks.Executor().run
    assert run([cmd], timeout=5, env={"EXTRA_VARIABLE": "x y"}, what="t").output == "outer x y\n"
    assert run([cmd], timeout=5, what="t").output == "outer \n"


def test_output_is_logged(tmp_path, caplog):
    cmd = script(tmp_path, "echo hello; echo world >&2; exit 2\n")
    caplog.set_level(logging.INFO, logger="repctl.hooks")
    with pytest.raises(HookError):
        hooks.Executor().run([cmd], timeout=5, what="r0: split-brain hook")
    records = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("repctl.hooks", "r0: split-brain hook: hello") in records
    assert ("repctl.hooks", "r0: split-brain hook: world") in records
    assert any("exited with status 2" in m for _, m in records)


def test_output_keeps_the_last_bytes(tmp_path):
    cmd = script(tmp_path, "seq 1 5000\n")
    result = hooks.Executor(output_limit=1024).run([cmd], timeout=5, what="t")
    full = "".join(f"{i}\n" for i in range(1, 5001))
    header, rest = result.output.split("\n", 1)
    assert header == f"[{len(full) - 1024} bytes of output dropped]"
    assert rest == full[-1024:]


def test_a_timeout_kills_the_process_group(tmp_path, reap):
    pidfile = tmp_path / "grandchild"
    cmd = script(tmp_path, f"sleep 60 & echo $! > {pidfile}; echo started; wait\n")
    start = time.monotonic()
    with pytest.raises(HookError) as info:
        hooks.Executor().run([cmd], timeout=0.5, what="r0: fence-peer hook")
    grandchild = int(pidfile.read_text())
    reap.append(grandchild)
    assert str(info.value) == (
        f"r0: fence-peer hook: {cmd} timed out after 0.5 s and was killed with its process "
        "group; its last output:\n    started"
    )
    assert gone(grandchild)
    assert time.monotonic() - start < 2.0  # SIGTERM was enough: no wait for the grace


def test_a_timeout_escalates_to_sigkill(tmp_path, reap, caplog):
    pidfile = tmp_path / "grandchild"
    cmd = script(tmp_path, f"trap '' TERM; sleep 60 & echo $! > {pidfile}; wait; wait\n")
    start = time.monotonic()
    with pytest.raises(HookError, match="timed out after 0.3 s"):
        hooks.Executor(kill_grace=0.5).run([cmd], timeout=0.3, what="t")
    grandchild = int(pidfile.read_text())
    reap.append(grandchild)
    assert gone(grandchild, within=0.5)
    assert time.monotonic() - start >= 0.8  # the timeout, then the grace before SIGKILL
    assert any("outlived SIGTERM" in r.getMessage() for r in caplog.records)


def test_a_background_child_does_not_hold_the_run(tmp_path, reap):
    pidfile = tmp_path / "daemon"
    cmd = script(tmp_path, f"sleep 30 & echo $! > {pidfile}; echo done\n")
    start = time.monotonic()
    result = hooks.Executor().run([cmd], timeout=10, what="t")
    daemon = int(pidfile.read_text())
    reap.append(daemon)
    assert result.output == "done\n"
    assert time.monotonic() - start < 3
    assert not gone(daemon, within=0.1)  # left running: only a timeout or a cancel kills


def test_keyboard_interrupt_kills_the_group_and_goes_on(tmp_path, reap):
    pidfile = tmp_path / "grandchild"
    cmd = script(tmp_path, f"sleep 60 & echo $! > {pidfile}; wait\n")

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.4)
    try:
        with pytest.raises(KeyboardInterrupt):
            hooks.Executor().run([cmd], timeout=30, what="t")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grandchild = int(wait_for(pidfile))
    reap.append(grandchild)
    assert gone(grandchild)


def test_cancel_from_another_thread(tmp_path, reap):
    pidfile = tmp_path / "grandchild"
    cmd = script(tmp_path, f"sleep 60 & echo $! > {pidfile}; wait\n")
    executor = hooks.Executor()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            executor.run([cmd], timeout=30, what="r0: before-demote hook")
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    grandchild = int(wait_for(pidfile))
    reap.append(grandchild)
    executor.cancel()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], HookError)
    assert str(errors[0]).startswith(
        f"r0: before-demote hook: {cmd} was cancelled and killed with its process group"
    )
    assert gone(grandchild)


def test_dry_run_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    cmd = script(tmp_path, f"touch {marker}; exit 1\n")
    executor = hooks.Executor(dry_run=True)
    result = executor.run([cmd, "a b"], timeout=5, env={"X": "1"}, what="r0: test")
    assert result == hooks.Result((cmd, "a b"), 0, "", 0.0)
    assert not marker.exists()
    assert executor.planned == [hooks.Planned("r0: test", f"{cmd} 'a b'", {"X": "1"})]
    assert executor.transcript() == f"r0: test: {cmd} 'a b'\n"
    assert executor.dry("r0: step", "add 10.0.0.100/24 to eth0") is True
    assert hooks.Executor().dry("r0: step", "anything") is False


# --------------------------------------------------------------------------------------------
# run_hooks
# --------------------------------------------------------------------------------------------

ENV_NAMES = (
    "REPCTL_RESOURCE", "REPCTL_NODE", "REPCTL_PEER", "REPCTL_ROLE", "REPCTL_EVENT", "REPCTL_DEVICE",
)  # fmt: skip


def test_a_hook_sees_its_environment(tmp_path):
    out = tmp_path / "env"
    body = "".join(f'echo "{name}=${name}" >> {out}\n' for name in (*ENV_NAMES, "EXTRA", "PATH"))
    res = resource({HookEvent.BEFORE_PROMOTE: [[script(tmp_path, body)]]})
    hooks.run_hooks(
        res, HookEvent.BEFORE_PROMOTE, node="beta", peer=None, role="secondary",
        executor=hooks.Executor(), extra_env={"EXTRA": "x", "REPCTL_NODE": "not me"},
    )  # fmt: skip
    assert out.read_text().splitlines() == [
        "REPCTL_RESOURCE=r0",
        "REPCTL_NODE=beta",  # the REPCTL_ variables win over extra_env
        "REPCTL_PEER=",
        "REPCTL_ROLE=secondary",
        "REPCTL_EVENT=before-promote",
        "REPCTL_DEVICE=/dev/mapper/r0",
        "EXTRA=x",
        f"PATH={os.environ['PATH']}",
    ]


def test_hooks_run_in_order_and_stop_at_the_first_failure(tmp_path):
    log = tmp_path / "log"
    one = script(tmp_path, f"echo one >> {log}\n", "one")
    two = script(tmp_path, f'echo "two $1" >> {log}; echo broken; exit 4\n', "two")
    three = script(tmp_path, f"echo three >> {log}\n", "three")
    res = resource({HookEvent.AFTER_PROMOTE: [[one], [two, "arg"], [three]]})
    with pytest.raises(HookError) as info:
        hooks.run_hooks(
            res, HookEvent.AFTER_PROMOTE, node="alpha", peer="beta", role="primary",
            executor=hooks.Executor(),
        )  # fmt: skip
    assert log.read_text() == "one\ntwo arg\n"
    assert str(info.value) == (
        f"r0: after-promote hook 2/3: {two} exited with status 4; its last output:\n    broken"
    )


def test_only_the_event_s_hooks_run(tmp_path):
    executor = hooks.Executor(dry_run=True)
    res = resource({HookEvent.AFTER_DEMOTE: [["/bin/a"]], HookEvent.SPLIT_BRAIN: [["/bin/b"]]})
    hooks.run_hooks(res, HookEvent.FENCE_PEER, node="b", peer="a", role="s", executor=executor)
    assert executor.planned == []
    hooks.run_hooks(res, HookEvent.SPLIT_BRAIN, node="b", peer="a", role="s", executor=executor)
    assert executor.transcript() == "r0: split-brain hook: /bin/b\n"


def test_hooks_run_with_the_resource_s_timeout(tmp_path):
    cmd = script(tmp_path, "sleep 30\n")
    res = resource({HookEvent.OUT_OF_SYNC: [[cmd]]}, hook_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(HookError, match="timed out after 0.3 s"):
        hooks.run_hooks(
            res, HookEvent.OUT_OF_SYNC, node="a", peer="b", role="p", executor=hooks.Executor()
        )
    assert 0.3 <= time.monotonic() - start < 2.0


def test_dry_run_of_hooks_is_golden():
    res = resource(
        {
            HookEvent.FENCE_PEER: [["/usr/local/sbin/fence-peer", "--ipmi"]],
            HookEvent.AFTER_PROMOTE: [["/usr/local/bin/notify", "r0 is up"], ["/bin/true"]],
        }
    )
    executor = hooks.Executor(dry_run=True)
    for event in (HookEvent.FENCE_PEER, HookEvent.BEFORE_PROMOTE, HookEvent.AFTER_PROMOTE):
        hooks.run_hooks(res, event, node="beta", peer="alpha", role="secondary", executor=executor)
    assert executor.transcript() == (
        "r0: fence-peer hook: /usr/local/sbin/fence-peer --ipmi\n"
        "r0: after-promote hook 1/2: /usr/local/bin/notify 'r0 is up'\n"
        "r0: after-promote hook 2/2: /bin/true\n"
    )
    assert executor.planned[0].env == {
        "REPCTL_RESOURCE": "r0", "REPCTL_NODE": "beta", "REPCTL_PEER": "alpha",
        "REPCTL_ROLE": "secondary", "REPCTL_EVENT": "fence-peer", "REPCTL_DEVICE": "/dev/mapper/r0",
    }  # fmt: skip


def test_the_hook_environment_is_documented():
    text = (ROOT / "docs" / "config.md").read_text()
    for name in ENV_NAMES:
        assert f"`{name}`" in text
    for event in HookEvent:
        assert f"`{event.value}`" in text


# --------------------------------------------------------------------------------------------
# Built-in actions, with a fake executor, a fake IPRoute and a mountinfo file
# --------------------------------------------------------------------------------------------

MOUNT = c.MountAction(Path("/srv/r0 data"), "ext4", "noatime")
SERVICE_A = c.ServiceAction("a.service")
SERVICE_B = c.ServiceAction("b.service")
ADDRESS = c.AddressAction(ip_interface("10.0.0.100/24"), "eth0")
ADDRESS6 = c.AddressAction(ip_interface("fd00::100/64"), "eth0")


def mountinfo_line(mountpoint: str, source: str, number: str = "253:3") -> str:
    escaped = mountpoint.replace(" ", "\\040")
    return f"412 29 {number} / {escaped} rw,noatime shared:220 - ext4 {source} rw\n"


class World:
    """A fake node: the mount table, the addresses and a log of every change, in order."""

    def __init__(self, tmp_path: Path) -> None:
        self.mountinfo = tmp_path / "mountinfo"
        self.mountinfo.write_text(mountinfo_line("/", "/dev/sda1", "8:1"))
        self.calls: list[str] = []
        self.fail: set[str] = set()  # calls that fail
        self.links = {"eth0": 2}
        self.addresses: dict[int, list[tuple[str, int]]] = {2: [("10.0.0.1", 24)]}
        self.open_sockets = 0
        self.announce_error: Exception | None = None

    def check(self, call: str) -> None:
        self.calls.append(call)
        if call in self.fail:
            raise HookError(f"{call} failed")

    def apply(self, res: c.Resource, executor: hooks.Executor | None = None) -> None:
        hooks.apply_actions(
            res, executor or FakeExecutor(self), ipr_factory=lambda: FakeIPRoute(self),
            announce=self.announce, mountinfo=self.mountinfo,
        )  # fmt: skip

    def undo(self, res: c.Resource, executor: hooks.Executor | None = None) -> None:
        hooks.undo_actions(
            res, executor or FakeExecutor(self), ipr_factory=lambda: FakeIPRoute(self),
            mountinfo=self.mountinfo,
        )  # fmt: skip

    def announce(self, interface: str, ip: IPv4Address) -> None:
        self.calls.append(f"arp {ip} {interface}")
        if self.announce_error:
            raise self.announce_error


class FakeExecutor(hooks.Executor):
    """Runs nothing; mount and umount change the World's mountinfo."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        what: str,
    ) -> hooks.Result:
        assert timeout == 5.0
        self.world.check(shlex.join(argv))
        if argv[0] == hooks.MOUNT:
            with self.world.mountinfo.open("a") as f:
                f.write(mountinfo_line(argv[-1], argv[-2]))
        elif argv[0] == hooks.UMOUNT:
            lines = self.world.mountinfo.read_text().splitlines(keepends=True)
            where = argv[-1].replace(" ", "\\040")
            last = max(i for i, line in enumerate(lines) if line.split()[4] == where)
            self.world.mountinfo.write_text("".join(lines[:last] + lines[last + 1 :]))
        return hooks.Result(tuple(argv), 0, "", 0.0)


class FakeIPRoute:
    def __init__(self, world: World) -> None:
        self.world = world
        world.open_sockets += 1

    def link_lookup(self, *, ifname: str) -> list[int]:
        return [self.world.links[ifname]] if ifname in self.world.links else []

    def addr(self, command: str, **kw: Any) -> Any:
        if command == "dump":
            return [
                {"family": 2, "index": kw["index"], "address": a, "local": a, "prefixlen": p}
                for a, p in self.world.addresses.get(kw["index"], [])
            ]
        name = {v: k for k, v in self.world.links.items()}[kw["index"]]
        self.world.check(f"ip {command} {kw['address']}/{kw['prefixlen']} dev {name}")
        entry = (kw["address"], kw["prefixlen"])
        if command == "add":
            self.world.addresses[kw["index"]].append(entry)
        else:
            assert command == "remove"
            self.world.addresses[kw["index"]].remove(entry)
        return []

    def close(self) -> None:
        self.world.open_sockets -= 1


DO = [
    "/usr/bin/mount -t ext4 -o noatime /dev/mapper/r0 '/srv/r0 data'",
    "/usr/bin/systemctl start a.service",
    "ip add 10.0.0.100/24 dev eth0",
    "arp 10.0.0.100 eth0",
]
UNDO = [
    "ip remove 10.0.0.100/24 dev eth0",
    "/usr/bin/systemctl stop a.service",
    "/usr/bin/umount '/srv/r0 data'",
]


def test_actions_apply_in_order_and_undo_in_reverse(tmp_path):
    world = World(tmp_path)
    res = resource(actions=[MOUNT, SERVICE_A, ADDRESS])
    world.apply(res)
    assert world.calls == DO
    assert "/srv/r0\\040data" in world.mountinfo.read_text()
    assert ("10.0.0.100", 24) in world.addresses[2]
    world.calls.clear()
    world.undo(res)
    assert world.calls == UNDO
    assert "/srv/r0" not in world.mountinfo.read_text()
    assert world.addresses[2] == [("10.0.0.1", 24)]
    assert world.open_sockets == 0


def test_a_failed_action_undoes_those_before_it(tmp_path):
    world = World(tmp_path)
    world.fail.add("/usr/bin/systemctl start b.service")
    res = resource(actions=[MOUNT, SERVICE_A, ADDRESS, SERVICE_B, ADDRESS6])
    with pytest.raises(HookError) as info:
        world.apply(res)
    assert world.calls == [*DO, "/usr/bin/systemctl start b.service", *UNDO]
    assert str(info.value) == (
        "r0: action 4 of 5 (service b.service) failed; the 3 done before it were undone\n"
        "/usr/bin/systemctl start b.service failed"
    )
    assert "/srv/r0" not in world.mountinfo.read_text()
    assert world.addresses[2] == [("10.0.0.1", 24)]


def test_a_rollback_leaves_what_was_in_effect_before(tmp_path):
    world = World(tmp_path)
    with world.mountinfo.open("a") as f:
        f.write(mountinfo_line("/srv/r0 data", "/dev/mapper/r0"))
    world.addresses[2].append(("10.0.0.100", 24))
    world.fail.add("/usr/bin/systemctl start b.service")
    with pytest.raises(HookError, match=r"failed; the 1 done before it were undone"):
        world.apply(resource(actions=[MOUNT, ADDRESS, SERVICE_A, SERVICE_B]))
    assert world.calls == [
        "arp 10.0.0.100 eth0",
        "/usr/bin/systemctl start a.service",
        "/usr/bin/systemctl start b.service",
        "/usr/bin/systemctl stop a.service",
    ]
    assert ("10.0.0.100", 24) in world.addresses[2]
    assert "/srv/r0\\040data" in world.mountinfo.read_text()


def test_a_failed_rollback_is_named(tmp_path, caplog):
    world = World(tmp_path)
    world.fail |= {"ip add 10.0.0.100/24 dev eth0", "/usr/bin/systemctl stop a.service"}
    with pytest.raises(HookError) as info:
        world.apply(resource(actions=[MOUNT, SERVICE_A, ADDRESS]))
    assert world.calls == [*DO[:3], *UNDO[1:]]  # the unmount was still tried
    assert str(info.value).startswith(
        "r0: action 3 of 3 (address 10.0.0.100/24 on eth0) failed; undoing those before it "
        "failed for: service a.service\n"
    )
    assert any("stop a.service failed" in r.getMessage() for r in caplog.records)


def test_a_failed_first_action_undoes_nothing(tmp_path):
    world = World(tmp_path)
    world.fail.add(DO[0])
    with pytest.raises(HookError, match=r"action 1 of 2 \(mount /dev/mapper/r0 on /srv/r0 data\) "
                       "failed; nothing was done before it"):  # fmt: skip
        world.apply(resource(actions=[MOUNT, SERVICE_A]))
    assert world.calls == [DO[0]]


def test_an_unexpected_error_is_a_hook_error_and_rolls_back(tmp_path):
    world = World(tmp_path)

    def broken() -> hooks.IPRouteAPI:
        raise PermissionError(1, "Operation not permitted")

    with pytest.raises(HookError) as info:
        hooks.apply_actions(
            resource(actions=[SERVICE_A, ADDRESS]), FakeExecutor(world), ipr_factory=broken,
            announce=world.announce, mountinfo=world.mountinfo,
        )  # fmt: skip
    assert world.calls == [
        "/usr/bin/systemctl start a.service",
        "/usr/bin/systemctl stop a.service",
    ]
    assert str(info.value).endswith(
        "\nr0: address 10.0.0.100/24 on eth0: PermissionError: [Errno 1] Operation not permitted"
    )


def test_undo_carries_on_past_failures(tmp_path):
    world = World(tmp_path)
    res = resource(actions=[MOUNT, SERVICE_A, ADDRESS])
    world.apply(res)
    world.calls.clear()
    world.fail |= {UNDO[0], UNDO[2]}
    with pytest.raises(HookError) as info:
        world.undo(res)
    assert world.calls == UNDO
    assert str(info.value) == (
        "r0: 2 of 3 actions could not be undone:\n"
        "ip remove 10.0.0.100/24 dev eth0 failed\n"
        "/usr/bin/umount '/srv/r0 data' failed"
    )


def test_what_is_in_effect_is_not_done_again(tmp_path):
    world = World(tmp_path)
    with world.mountinfo.open("a") as f:
        f.write(mountinfo_line("/srv/r0 data", "/dev/mapper/r0"))
    world.addresses[2].append(("10.0.0.100", 24))
    world.apply(resource(actions=[MOUNT, ADDRESS]))
    assert world.calls == ["arp 10.0.0.100 eth0"]  # announced again all the same
    assert world.addresses[2].count(("10.0.0.100", 24)) == 1


def test_the_same_address_with_another_prefix_is_added(tmp_path):
    world = World(tmp_path)
    world.addresses[2].append(("10.0.0.100", 16))
    world.apply(resource(actions=[ADDRESS]))
    assert world.calls == DO[2:]


def test_what_is_not_in_effect_is_not_undone(tmp_path):
    world = World(tmp_path)
    with world.mountinfo.open("a") as f:
        f.write(mountinfo_line("/srv/r0", "/dev/mapper/r0"))  # another mount point
        f.write(mountinfo_line("/srv/r0 data/sub", "/dev/mapper/r0"))
    world.undo(resource(actions=[MOUNT, ADDRESS]))
    assert world.calls == []
    world.links.clear()  # the interface went away, and its addresses with it
    world.undo(resource(actions=[ADDRESS]))
    assert world.calls == []


def test_another_file_system_at_the_mount_point(tmp_path):
    world = World(tmp_path)
    with world.mountinfo.open("a") as f:
        f.write(mountinfo_line("/srv/r0 data", "/dev/sdz", "8:250"))
    with pytest.raises(HookError, match=r"r0: mount /dev/mapper/r0 on /srv/r0 data: /srv/r0 data "
                       r"has another file system mounted on it \(/dev/sdz\)"):  # fmt: skip
        world.apply(resource(actions=[MOUNT]))
    assert world.calls == []
    world.undo(resource(actions=[MOUNT]))  # not ours: nothing to undo
    assert world.calls == []
    # ours below another one: cannot be unmounted
    world.mountinfo.write_text(
        mountinfo_line("/srv/r0 data", "/dev/mapper/r0")
        + mountinfo_line("/srv/r0 data", "tmpfs", "0:77")
    )
    with pytest.raises(HookError, match=r"another file system \(tmpfs\) is mounted over it"):
        world.undo(resource(actions=[MOUNT]))
    assert world.calls == []


def test_our_device_is_recognised_by_its_number(tmp_path, monkeypatch):
    world = World(tmp_path)
    with world.mountinfo.open("a") as f:
        f.write(mountinfo_line("/srv/r0 data", "/dev/dm-3", "253:3"))
    real_stat = os.stat

    class DeviceNode:
        st_rdev = os.makedev(253, 3)

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        return DeviceNode() if str(path) == "/dev/mapper/r0" else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(hooks.os, "stat", fake_stat)
    world.apply(resource(actions=[MOUNT]))
    assert world.calls == []
    world.undo(resource(actions=[MOUNT]))
    assert world.calls == ["/usr/bin/umount '/srv/r0 data'"]


def test_an_unknown_interface_is_named(tmp_path):
    world = World(tmp_path)
    action = c.AddressAction(ip_interface("10.0.0.100/24"), "bond7")
    with pytest.raises(HookError, match="r0: address 10.0.0.100/24 on bond7: no network "
                       "interface 'bond7' on this node"):  # fmt: skip
        world.apply(resource(actions=[action]))
    assert world.calls == [] and world.open_sockets == 0


def test_ipv6_is_not_announced_by_arp(tmp_path):
    world = World(tmp_path)
    world.apply(resource(actions=[ADDRESS6]))
    assert world.calls == ["ip add fd00::100/64 dev eth0"]


def test_a_failed_announcement_is_only_a_warning(tmp_path, caplog):
    world = World(tmp_path)
    world.announce_error = PermissionError(1, "Operation not permitted")
    world.apply(resource(actions=[ADDRESS, SERVICE_A]))
    assert world.calls == [*DO[2:], "/usr/bin/systemctl start a.service"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not announce it with gratuitous ARP" in w for w in warnings)


GOLDEN_ACTIONS = """\
r0: mount /dev/mapper/r0 on /srv/r0 data: /usr/bin/mount -t ext4 -o noatime /dev/mapper/r0 '/srv/r0 data'
r0: mount /dev/mapper/r0 on /srv/b: /usr/bin/mount /dev/mapper/r0 /srv/b
r0: service a.service: /usr/bin/systemctl start a.service
r0: address 10.0.0.100/24 on eth0: add 10.0.0.100/24 to eth0
r0: address 10.0.0.100/24 on eth0: announce 10.0.0.100 on eth0 (gratuitous ARP)
r0: address fd00::100/64 on eth0: add fd00::100/64 to eth0
r0: address fd00::100/64 on eth0: remove fd00::100/64 from eth0
r0: address 10.0.0.100/24 on eth0: remove 10.0.0.100/24 from eth0
r0: service a.service: /usr/bin/systemctl stop a.service
r0: mount /dev/mapper/r0 on /srv/b: /usr/bin/umount /srv/b
r0: mount /dev/mapper/r0 on /srv/r0 data: /usr/bin/umount '/srv/r0 data'
"""


def test_dry_run_of_actions_is_golden(tmp_path):
    def no_netlink() -> hooks.IPRouteAPI:
        raise AssertionError("a dry run does not touch netlink")

    def no_arp(interface: str, ip: IPv4Address) -> None:
        raise AssertionError("a dry run sends nothing")

    res = resource(actions=[MOUNT, c.MountAction(Path("/srv/b")), SERVICE_A, ADDRESS, ADDRESS6])
    executor = hooks.Executor(dry_run=True)
    missing = tmp_path / "no-mountinfo"  # a dry run does not look at the mount table either
    hooks.apply_actions(res, executor, ipr_factory=no_netlink, announce=no_arp, mountinfo=missing)
    hooks.undo_actions(res, executor, ipr_factory=no_netlink, mountinfo=missing)
    assert executor.transcript() == GOLDEN_ACTIONS


def test_no_actions_do_nothing(tmp_path):
    world = World(tmp_path)
    world.apply(resource())
    world.undo(resource())
    assert world.calls == [] and world.open_sockets == 0


# --------------------------------------------------------------------------------------------
# Gratuitous ARP
# --------------------------------------------------------------------------------------------

MAC = bytes.fromhex("525400123456")


def test_arp_announcement_bytes():
    frame = hooks.arp_announcement(MAC, IPv4Address("192.0.2.100"))
    assert frame == bytes.fromhex(
        "ffffffffffff"  # Ethernet: destination, broadcast
        "525400123456"  # source
        "0806"  # EtherType ARP
        "0001"  # hardware type Ethernet
        "0800"  # protocol type IPv4
        "06"  # hardware address length
        "04"  # protocol address length
        "0001"  # operation: request (an RFC 5227 announcement)
        "525400123456"  # sender hardware address
        "c0000264"  # sender protocol address 192.0.2.100
        "000000000000"  # target hardware address: zero
        "c0000264"  # target protocol address: the same address
    )
    assert len(frame) == 42
    with pytest.raises(ValueError, match="6 bytes, got 8"):
        hooks.arp_announcement(bytes(8), IPv4Address("192.0.2.100"))


class FakePacketSocket:
    made: ClassVar[list[FakePacketSocket]] = []

    def __init__(self, family: int, kind: int, proto: int, hatype: int = 1) -> None:
        self.args = (family, kind, proto)
        self.hatype = hatype
        self.bound: tuple[str, int] | None = None
        self.sent: list[bytes] = []
        self.closed = False
        FakePacketSocket.made.append(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def bind(self, address: tuple[str, int]) -> None:
        self.bound = address

    def getsockname(self) -> tuple[str, int, int, int, bytes]:
        assert self.bound is not None
        return (self.bound[0], 0x0806, 0, self.hatype, MAC if self.hatype == 1 else b"")

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


def test_announce_ipv4_sends_three_announcements(monkeypatch):
    import socket

    FakePacketSocket.made.clear()
    sleeps: list[float] = []
    monkeypatch.setattr(hooks.socket, "socket", FakePacketSocket)
    monkeypatch.setattr(hooks.time, "sleep", sleeps.append)
    hooks.announce_ipv4("eth0", IPv4Address("192.0.2.100"))
    (sock,) = FakePacketSocket.made
    assert sock.args == (socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    assert sock.bound == ("eth0", 0x0806)
    assert sock.sent == [hooks.arp_announcement(MAC, IPv4Address("192.0.2.100"))] * 3
    assert len(sleeps) == 2 and all(0 < s <= 1 for s in sleeps)
    assert sock.closed


def test_announce_ipv4_leaves_a_non_ethernet_interface_alone(monkeypatch):
    FakePacketSocket.made.clear()
    monkeypatch.setattr(
        hooks.socket,
        "socket",
        lambda *a: FakePacketSocket(*a, hatype=772),  # loopback
    )
    hooks.announce_ipv4("lo", IPv4Address("127.0.0.2"))
    assert FakePacketSocket.made[0].sent == []
