# SPDX-License-Identifier: GPL-2.0-only
"""Fixtures for the VM tier: tests that need the real kernel and dm-repl.ko.

These tests run only inside the QEMU guest that tests/vmrun.py boots (guest-run.sh exports
REPCTL_IN_VM=1 after loading the modules). Anywhere else they are skipped.

Everything a test creates in the kernel (loop devices, dm devices, mounts, processes,
network namespaces) is registered with the `cleanup` fixture, which undoes it in reverse
order even when the test fails: a leak would make `rmmod dm_repl` fail at the end of the run,
and that fails the tier.

In the guest, /tmp is writable but held in the guest's memory (an overlay on tmpfs), and the
repository is read-only. Sparse backing files cost memory only for the blocks written.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

IN_VM = os.environ.get("REPCTL_IN_VM") == "1"
VM_DIR = Path(__file__).resolve().parent
P = TypeVar("P", bound=subprocess.Popen)  # type: ignore[type-arg]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/vm as `vm`, and skip them all outside the guest."""
    skip = pytest.mark.skip(reason="VM tier: runs only inside the test VM (make test-vm)")
    for item in items:
        if VM_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.vm)
            if not IN_VM:
                item.add_marker(skip)


# ---------------------------------------------------------------- running commands


class CommandError(AssertionError):
    """A command exited non-zero; the message has its output."""


def run(cmd: str | Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run cmd (a list, or a string split like a shell would, without a shell).

    Returns the completed process with text stdout/stderr. With check (the default), a
    non-zero exit raises CommandError whose message has the command and its output.
    """
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise CommandError(f"{shlex.join(argv)} exited {p.returncode}\n"
                           f"stdout: {p.stdout.strip()}\nstderr: {p.stderr.strip()}")
    return p


@pytest.fixture(name="run")
def run_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    """The `run(cmd, check=True, input=None, timeout=120)` helper, as a fixture."""
    return run


# ---------------------------------------------------------------- cleanup registry


class Cleanup:
    """Undo actions, run last-registered first. Every action runs even if one fails."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, fn: Callable[[], object]) -> None:
        """Register any undo action; `what` names it in error messages."""
        self._actions.append((what, fn))

    def loop(self, dev: str) -> str:
        self.add(f"loop device {dev}", lambda: run(["losetup", "-d", dev]))
        return dev

    def dm(self, name: str) -> str:
        self.add(f"dm device {name}", lambda: run(["dmsetup", "remove", "--retry", name]))
        return name

    def mount(self, path: str | Path) -> str:
        self.add(f"mount {path}", lambda: run(["umount", str(path)]))
        return str(path)

    def netns(self, name: str) -> str:
        self.add(f"netns {name}", lambda: run(["ip", "netns", "delete", name]))
        return name

    def file(self, path: str | Path) -> Path:
        self.add(f"file {path}", lambda: Path(path).unlink(missing_ok=True))
        return Path(path)

    def process(self, proc: P, timeout: float = 10) -> P:
        """Terminate (then kill) a process started by the test, if still running."""
        def stop() -> None:
            if proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self.add(f"process {proc.pid} ({proc.args!r})", stop)
        return proc

    def run_all(self) -> list[str]:
        """Run every action in reverse order; return the failures as messages."""
        errors = []
        while self._actions:
            what, fn = self._actions.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - report every failure, keep cleaning
                errors.append(f"cleanup of {what} failed: {e}")
        return errors


def _cleanup_fixture() -> Iterator[Cleanup]:
    c = Cleanup()
    yield c
    errors = c.run_all()
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    """Per-test cleanup registry; a failed cleanup is reported as an error of the test."""
    yield from _cleanup_fixture()


@pytest.fixture(scope="session")
def session_cleanup() -> Iterator[Cleanup]:
    """Cleanup registry for resources shared by the whole session."""
    yield from _cleanup_fixture()


# ---------------------------------------------------------------- block devices


SCRATCH = Path("/tmp/repctl-vm")


@pytest.fixture
def loopdev(cleanup: Cleanup) -> Callable[[int], str]:
    """Factory: loopdev(size_mb) -> "/dev/loopN" backed by a new sparse file under /tmp.

    The loop device and its file are removed after the test.
    """
    def make(size_mb: int = 64) -> str:
        SCRATCH.mkdir(parents=True, exist_ok=True)
        backing = cleanup.file(SCRATCH / f"loop-{uuid.uuid4().hex[:8]}.img")
        with backing.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        dev = run(["losetup", "--show", "-f", str(backing)]).stdout.strip()
        cleanup.loop(dev)
        _wait_for_node(dev)
        return dev

    return make


def _wait_for_node(dev: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not Path(dev).exists():
        if time.monotonic() > deadline:
            raise CommandError(f"{dev} did not appear within {timeout} s")
        time.sleep(0.05)
