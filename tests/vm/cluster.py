"""A replication cluster inside the test VM: config, devices, daemons.

Two flavours: ``InProcessCluster`` runs every node's Daemon in the test
process on loopback addresses (127.0.0.x), which is quick to debug;
tests/vm/test_replicate.py runs real daemon processes in network namespaces.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from repctl import metadata
from repctl.config import parse_config
from repctl.daemon import Daemon

ROOT = Path("/tmp/repctl-cluster")


def write_secret(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"test-secret-0123456789abcdef")
    os.close(fd)
    return path


def config_text(node: str, nodes: dict[str, dict], targets: dict[str, str], *, source: str = "alpha",
                port: int = 7789, root: Path = ROOT, secret: Path | None = None, name: str = "r0",
                extra: str = "", sync_timeout: str = "3s", metrics: int | None = None) -> str:
    secret = secret or write_secret(root / "secret")
    lines = [
        "global:",
        f"  control_socket: {root / node / 'repctl.sock'}",
        f"  state_dir: {root / node / 'state'}",
        f"  secret_file: {secret}",
        *([f"  metrics: {metrics}"] if metrics is not None else []),  # 127.0.0.1:PORT
        "resources:",
        f"  {name}:",
        f"    port: {port}",
        "    chunk_size: 4KiB",
        "    ring_size: 16MiB",
        f"    sync_timeout: {sync_timeout}",
        f"    source: {source}",
    ]
    lines += [f"    {x}" for x in extra.splitlines() if x]
    lines.append("    nodes:")
    for n, spec in nodes.items():
        lines.append(f"      {n}:")
        for k, v in spec.items():
            lines.append(f"        {k}: {v}")
    lines.append("    targets:")
    for t, mode in targets.items():
        lines.append(f"      {t}: {{mode: {mode}}}")
    return "\n".join(lines) + "\n"


def veth_pair(cleanup, ns: dict[str, str], veth: dict[str, tuple[str, str]]) -> None:
    """Two network namespaces (ns: node -> namespace), removed at cleanup, joined by one veth
    pair (veth: node -> (device, address)), /24 addresses set and every link up."""
    for name in ns.values():
        _run("ip", "netns", "add", name)
        cleanup.netns(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
    (a, (da, _)), (b, (db, _)) = veth.items()
    _run("ip", "link", "add", da, "netns", ns[a], "type", "veth", "peer", "name", db, "netns", ns[b])
    for node, (dev, ip) in veth.items():
        _run("ip", "-n", ns[node], "addr", "add", f"{ip}/24", "dev", dev)
        _run("ip", "-n", ns[node], "link", "set", dev, "up")


def _run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")


def wait_for(pred, timeout: float = 60, what: str = "condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


class InProcessCluster:
    """alpha (source) -> beta (sync), gamma (async, image file), all in this process."""

    def __init__(self, cleanup, loopdev, size_mb: int = 64, targets=None):
        self.targets = targets or {"beta": "sync", "gamma": "async"}
        alpha_data = loopdev(size_mb)
        sectors = metadata.device_bytes(alpha_data) // 512
        alpha_meta = loopdev(2)
        metadata.format_metadata(alpha_meta, sectors, 8, force=True)
        self.devices = {"alpha": alpha_data}
        nodes = {"alpha": {"address": "127.0.0.1", "device": alpha_data, "metadata": alpha_meta}}
        for i, t in enumerate(self.targets, start=2):
            if t == "gamma":
                img = ROOT / "gamma.img"
                img.parent.mkdir(parents=True, exist_ok=True)
                with open(img, "wb") as f:
                    f.truncate(size_mb << 20)
                cleanup.file(img)
                self.devices[t] = str(img)
            else:
                self.devices[t] = loopdev(size_mb)
            nodes[t] = {"address": f"127.0.0.{i}", "device": self.devices[t]}
        self.daemons: dict[str, Daemon] = {}
        self.configs = {n: parse_config(config_text(n, nodes, self.targets), f"<{n}>") for n in nodes}
        self.cleanup = cleanup
        for n in ["alpha", *self.targets]:
            os.system(f"rm -rf {ROOT / n}")
        cleanup.add("cluster daemons", self.stop)

    def start(self, node: str) -> Daemon:
        d = Daemon(self.configs[node], node)
        d.start()
        self.daemons[node] = d
        return d

    def stop(self, node: str | None = None) -> None:
        for n in [node] if node else list(self.daemons):
            d = self.daemons.pop(n, None)
            if d:
                for res in d.resources.values():
                    res.stop(remove=(n == "alpha"))
                d.resources.clear()

    def source_status(self) -> dict:
        return self.daemons["alpha"].status()["resources"][0]

    def target_states(self) -> dict[str, str]:
        return {t["name"]: t["state"] for t in self.source_status()["targets"]}
