# SPDX-License-Identifier: GPL-2.0-only
"""Fixtures of the Vagrant cluster tier (make test-vagrant; docs/vagrant.md).

`cluster` brings up vagrant/Vagrantfile's three nodes (alpha, beta, gamma) with python-vagrant,
one at a time, once per session, and destroys them at the end (REPCTL_VAGRANT_KEEP=1 keeps
them for a look: `cd vagrant && vagrant ssh alpha`). Commands run on a node through plain
`ssh -F <vagrant ssh-config>`, and their exit status is checked: python-vagrant's own `ssh()`
does not fail on a non-zero exit.

Nothing runs unless REPCTL_VAGRANT=1 (make test-vagrant sets it), so that a plain `pytest`
never boots three machines. Then everything skips, with the reason, where the cluster cannot
run: python-vagrant, vagrant, the vagrant-libvirt plugin, libvirtd, the box or the wheelhouse
missing (`make test-vagrant` installs and prepares all of them but the box: `make
vagrant-box`). Nothing here is in CI.

The host's two CPUs are shared: before each node boots, the fixture waits while two or more
QEMU guests other than this cluster's run (`pgrep qemu-system`, every 20 s).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
STATE = REPO / "build" / "vagrant"
LOGS = STATE / "logs"
NODES = ("alpha", "beta", "gamma")
BOX = os.environ.get("REPCTL_VAGRANT_BOX", "repctl/debian12")
PREFIX = os.environ.get("REPCTL_VAGRANT_PREFIX", "repctl-")
DATA = "/dev/disk/by-id/virtio-repctl-data"
META = "/dev/disk/by-id/virtio-repctl-md"
TOOL = "/repctl/tests/cluster/node_tool.py"   # the repository as synced into each node
STEP = 20 * 60                                  # the longest one step may take (emulation)
# Zero a disk: WRITE ZEROES (QEMU's virtio-blk does it on the host file), else plain writes.
ZERO = ("zero() { blkdiscard -z \"$1\" 2>/dev/null || dd if=/dev/zero of=\"$1\" bs=1M "
        "oflag=direct status=none count=$(( $(blockdev --getsize64 \"$1\") >> 20 )); }")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] cluster: {msg}", flush=True)


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def vagrant_env() -> dict[str, str]:
    env = dict(os.environ)
    # Software emulation unless told otherwise: on these machines /dev/kvm exists but a KVM
    # guest does not run (docs/vagrant.md), so the Vagrantfile's own guess would be wrong.
    env.setdefault("REPCTL_VAGRANT_DRIVER", "qemu")
    env.setdefault("VAGRANT_DEFAULT_PROVIDER", "libvirt")
    return env


def preflight() -> str | None:
    """Why the cluster cannot be brought up here, or None."""
    if shutil.which("vagrant") is None:
        return "vagrant is not installed (vagrant/install-deps, run by make test-vagrant)"
    p = _run(["vagrant", "plugin", "list"], 120)
    if "vagrant-libvirt" not in p.stdout:
        return f"the vagrant-libvirt plugin is missing (vagrant plugin list: {p.stdout.strip()!r})"
    if shutil.which("virsh") is None:
        return "virsh is not installed (vagrant/install-deps)"
    p = _run(["virsh", "-c", "qemu:///system", "version"])
    if p.returncode != 0:
        return ("libvirtd does not answer on qemu:///system (vagrant/host-setup starts it): "
                + (p.stderr.strip() or p.stdout.strip()))
    p = _run(["virsh", "-c", "qemu:///system", "pool-info", "default"])
    if p.returncode != 0:
        return "libvirt has no storage pool 'default' (vagrant/host-setup defines it)"
    p = _run(["vagrant", "box", "list"], 120)
    if not any(line.split()[:1] == [BOX] for line in p.stdout.splitlines()):
        return f"the box {BOX} is not installed: make vagrant-box"
    # the guests install repctl's dependencies from it: the versions of .venv, made again when
    # they change (quick when they have not)
    p = _run([str(VAGRANT_DIR / "wheels.sh")], 600)
    if p.returncode != 0:
        return f"vagrant/wheels.sh failed: {p.stderr.strip() or p.stdout.strip()}"
    return None


def other_guests() -> int:
    """QEMU guests on this host that are not this cluster's nodes."""
    p = _run(["pgrep", "-a", "qemu-system"])
    return sum(1 for line in p.stdout.splitlines() if f"guest={PREFIX}" not in line)


def wait_for_room() -> None:
    while (n := other_guests()) >= 2:
        say(f"{n} other QEMU guests running: waiting 20 s before booting")
        time.sleep(20)


class CommandFailed(AssertionError):
    pass


class Node:
    """One node, reached with `ssh -F` over Vagrant's management network."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name

    def _ssh(self, command: str) -> list[str]:
        return ["ssh", "-F", str(self.cluster.ssh_config), "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=60", "-o", "ServerAliveInterval=15", self.name,
                "sudo -n bash -c " + shlex.quote(command)]

    def run(self, command: str, *, check: bool = True, timeout: float = STEP,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `command` as root with bash on this node; fail (CommandFailed) on a non-zero exit
        unless check=False."""
        t0 = time.monotonic()
        p = subprocess.run(self._ssh(command), capture_output=True, text=True, input=input,
                           timeout=timeout, check=False)
        with open(LOGS / f"{self.name}.log", "a") as log:
            log.write(f"$ {command}\n{p.stdout}{p.stderr}[exit {p.returncode}, "
                      f"{time.monotonic() - t0:.1f} s]\n")
        if check and p.returncode != 0:
            raise CommandFailed(f"{self.name}: `{command}` exited {p.returncode}\n"
                                f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def popen(self, command: str) -> subprocess.Popen[str]:
        """Start `command` on the node; its stdout is read line by line by the caller."""
        return subprocess.Popen(self._ssh(command), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1)

    def repctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("repctl " + " ".join(shlex.quote(a) for a in args), check=check)

    def status(self) -> dict[str, Any]:
        """This node's entry for r0 in `repctl status --json`, or {} when r0 is not up."""
        p = self.run("repctl status --json", check=False)
        if p.returncode != 0:
            return {}
        doc = json.loads(p.stdout)
        return next((r for r in doc.get("resources", []) if r.get("name") == "r0"), {})

    def sha256(self, dev: str = DATA) -> str:
        return self.run(f"python3 {TOOL} sha256 {dev}").stdout.strip()


class Cluster:
    def __init__(self, v: Any) -> None:
        self.v = v
        self.ssh_config = STATE / "ssh-config"
        self.nodes = {n: Node(self, n) for n in NODES}
        self.booted: list[str] = []   # the nodes brought up so far (in the ssh config)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def refresh_ssh_config(self) -> None:
        """`vagrant ssh-config` of every node brought up, in one file for `ssh -F`."""
        self.ssh_config.write_text("".join(self.v.ssh_config(vm_name=n) for n in self.booted))

    def up(self, name: str) -> None:
        wait_for_room()
        say(f"vagrant up {name}")
        t0 = time.monotonic()
        self.v.up(vm_name=name, provider="libvirt")
        say(f"{name} up in {time.monotonic() - t0:.0f} s")
        if name not in self.booted:
            self.booted.append(name)
        self.refresh_ssh_config()   # a node that booted again may have a new address

    def power_off(self, name: str) -> None:
        """Pull the plug: `virsh destroy` kills the node's QEMU at once. Not `vagrant halt
        --force`: vagrant-libvirt 0.11 (Debian 12's) sends an ACPI power-button press first and
        waits for the guest to shut down cleanly (vagrant-libvirt issue 1765, fixed in 0.12),
        which stops the daemon before the writes: no power cut at all."""
        domain = PREFIX + name
        say(f"virsh destroy {domain}")
        p = _run(["virsh", "-c", "qemu:///system", "destroy", domain])
        assert p.returncode == 0, f"virsh destroy {domain}: {p.stderr.strip()}"

    # -- the state every scenario starts from --

    def reset(self) -> None:
        """Daemons stopped, devices and state gone, all data disks zeroed; then alpha the source
        again (metadata freshly formatted) with beta and gamma streaming."""
        for n in NODES:
            self[n].run(
                f"{ZERO}; systemctl stop repctl; umount /mnt/r0 2>/dev/null; "
                "dmsetup remove --retry r0 2>/dev/null; rm -rf /var/lib/repctl/r0; "
                f"zero {DATA} && zero {META} && test ! -e /dev/mapper/r0")
        self["alpha"].repctl("create-md", "r0", "--force")
        for n in ("gamma", "beta", "alpha"):
            self[n].run("systemctl start repctl")
        self.wait_converged("alpha")

    def converged(self, primary: str) -> bool:
        st = self[primary].status()
        k = st.get("kernel") or {}
        targets = st.get("targets") or []
        return (st.get("role") == "primary" and bool(k) and k.get("acked", 0) >= k.get(
            "published", 0) and len(targets) == 2 and all(
            t.get("state") == "streaming" and t.get("out_of_sync_bytes") == 0
            and t.get("lag_records") == 0 for t in targets))

    def wait_converged(self, primary: str, timeout: float = STEP) -> None:
        wait_for(lambda: self.converged(primary), timeout,
                 f"{primary} primary with both targets streaming and nothing out of sync",
                 lambda: self[primary].status())


def wait_for(pred: Callable[[], Any], timeout: float, what: str,
             last: Callable[[], Any] | None = None, interval: float = 3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f"; last: {last()!r}" if last else ""))


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("REPCTL_VAGRANT") != "1":
        pytest.skip("the Vagrant cluster tier runs only when asked for (make test-vagrant, or "
                    "REPCTL_VAGRANT=1): it boots three emulated machines for half an hour")
    try:
        import vagrant  # python-vagrant: imported here so that its absence is a skip
    except ImportError:
        pytest.skip("python-vagrant is not installed in this Python (vagrant/install-deps "
                    "installs it into .venv; make test-vagrant runs that)")
    reason = preflight()
    if reason:
        pytest.skip(f"the Vagrant cluster cannot run here: {reason}")
    LOGS.mkdir(parents=True, exist_ok=True)
    v = vagrant.Vagrant(root=str(VAGRANT_DIR), env=vagrant_env(),
                        out_cm=vagrant.make_file_cm(str(LOGS / "vagrant.log")),
                        err_cm=vagrant.make_file_cm(str(LOGS / "vagrant.log")))
    c = Cluster(v)
    try:
        for n in NODES:
            c.up(n)
        yield c
    finally:
        if os.environ.get("REPCTL_VAGRANT_KEEP") == "1":
            say("REPCTL_VAGRANT_KEEP=1: leaving the nodes running "
                "(cd vagrant && vagrant destroy -f)")
        else:
            say("vagrant destroy -f")
            v.destroy()
