# SPDX-License-Identifier: GPL-2.0-only
"""Two (or more) test VMs at once, joined by one network link: the host side.

Each guest is a virtme-ng boot of the same kernel as the VM tier (tests/vmrun.py), with its own
results folder shared writable, its own disk images (raw files on the host, attached as
virtio-blk disks with serial numbers) and one NIC on a link that QEMU carries over UDP on the
host's loopback:

    -netdev socket,udp=127.0.0.1:PEER,localaddr=127.0.0.1:MINE

UDP, not a TCP listen/connect pair: either guest can be killed (a power cut) and booted again,
and the link comes back without the other guest doing anything. Inside, the NIC is the one
entry of /sys/class/net other than `lo`; tests/vm/guest-run.sh gives it 10.79.0.N/24 (N is the
guest's index, from 1) when the kernel command line says repctl_node=N.

A guest's console is followed live (copied to its console.log and to this process's output
with a prefix) so that a test can wait for a marker line or kill the guest the moment it sees
one. kill() is SIGKILL of QEMU: the guest's page cache is lost, whatever QEMU had written to an
image file is kept (the host's page cache), as with a disk whose volatile cache survived.

Nothing here talks to any address but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vmrun

SERIAL = "repctl-{}"  # disk serials: at most 20 bytes


def free_udp_ports(n: int) -> list[int]:
    """n UDP ports on 127.0.0.1 that nothing holds now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def make_image(path: Path, size: int, ext4: bool = False) -> Path:
    """A sparse raw image of size bytes (zeros), or a fresh ext4 file system in one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    if ext4:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(path)], check=True)
    return path


@dataclass
class Guest:
    """One guest of the pair: booted by start(), waited for by wait(), killed by kill()."""

    name: str
    index: int                      # 1, 2, ...: its address is 10.79.0.INDEX
    results: Path                   # shared writable with the guest
    disks: dict[str, Path]          # role -> image; serial SERIAL.format(role)
    ports: tuple[int, int]          # (mine, peer) UDP ports of the link on the host
    memory: str = "1G"
    cpus: int = 1
    timeout: float = 15 * 60
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    _lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def qemu_args(self) -> list[str]:
        mine, peer = self.ports
        args = ["-netdev", f"socket,id=rp0,udp=127.0.0.1:{peer},localaddr=127.0.0.1:{mine}",
                "-device", f"virtio-net-pci,netdev=rp0,mac=52:54:00:79:00:{self.index:02x}"]
        for role, path in self.disks.items():
            file = str(path).replace(",", ",,")
            args += ["-drive", f"if=none,id=d-{role},file={file},format=raw",
                     "-device", f"virtio-blk-pci,drive=d-{role},serial={SERIAL.format(role)}"]
        return args

    def start(self, mode: str, args: list[str], log_name: str) -> None:
        """Boot and run `guest-run.sh MODE RESULTS -- ARGS` in the guest."""
        vng = vmrun.find_vng()
        kver = vmrun.choose_kver(None)
        assert vng is not None and kver is not None, "vmrun.missing_requirements first"
        self.results.mkdir(parents=True, exist_ok=True)
        guest_cmd = vmrun.guest_command(mode, self.results, args)
        cmd = vmrun.vng_command(vng, kver, self.memory, self.cpus, self.results, guest_cmd,
                                False, self.qemu_args())
        cmd[cmd.index("--append") + 1] += f" repctl_node={self.index}"
        cmd += ["--name", self.name, "--no-dhcp"]
        with self._cond:
            self._lines = []
        log = self.results / log_name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=vmrun.vng_env(vng),
                                     start_new_session=True)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._pump, args=(self.proc, log), daemon=True)
        self._reader.start()

    def _pump(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        assert proc.stdout is not None
        prefix = f"[{self.name}] "
        with log.open("w", errors="replace") as f:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                f.write(line + "\n")
                f.flush()
                if not line.startswith("PC-ACK "):  # the power-cut writer's stream stays in the log
                    print(prefix + (line if len(line) <= 160 else line[:150] + " [...]"),
                          flush=True)
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first console line matching pattern (from the start of this boot), waiting up to
        timeout seconds; None when the guest ends or the time is up without one."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self._lines)
                left = deadline - time.monotonic()
                reader_done = self._reader is None or not self._reader.is_alive()
                if left <= 0 or reader_done:
                    return None
                self._cond.wait(min(left, 1.0))

    def kill(self) -> None:
        """The power cut: SIGKILL QEMU (and vng) at once."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            if self._reader is not None:
                self._reader.join(10)

    def wait(self, timeout: float | None = None) -> tuple[int | None, bool]:
        """Wait for the guest to power off. Returns (vng exit code, timed out); a guest that
        outlasts timeout (default: its own) is killed."""
        assert self.proc is not None
        left = (self.timeout if timeout is None else timeout) - (time.monotonic() - self.started)
        try:
            rc = self.proc.wait(max(left, 1))
        except subprocess.TimeoutExpired:
            vmrun.say(f"{self.name}: TIMEOUT; killing QEMU")
            vmrun.stop_group(self.proc)
            if self._reader is not None:
                self._reader.join(10)
            return self.proc.returncode, True
        if self._reader is not None:
            self._reader.join(10)
        return rc, False


def pair(root: Path, names: tuple[str, ...], disks: dict[str, dict[str, Path]],
         memory: str = "1G") -> dict[str, Guest]:
    """Guests named `names` (index 1, 2, ...) on one link; each results in root/NAME."""
    if len(names) != 2:
        raise ValueError("a QEMU UDP socket link joins exactly two guests")
    p1, p2 = free_udp_ports(2)
    ports = {names[0]: (p1, p2), names[1]: (p2, p1)}
    return {n: Guest(n, i, root / n, disks[n], ports[n], memory=memory)
            for i, n in enumerate(names, start=1)}
