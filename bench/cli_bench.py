#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""How long the `repctl` CLI takes to start: wall time of whole commands, as a script sees it.

Each command runs N times (default 20) in a fresh process, the commands taking turns so that
a slow moment of the machine falls on all of them; printed side by side in one run, with the
median and the 90th percentile (nearest rank) of the wall time, the median less that of
`python -c pass`, and the median CPU time (user + system) of the process, which a busy machine
disturbs less than the wall time:

    command                           median       p90   - python        cpu
    python -c pass                   11.1 ms   14.2 ms     0.0 ms    10.8 ms
    python -c 'import repctl.cli'    94.5 ms  111.4 ms    83.4 ms    92.1 ms
    ...

`repctl status` and `repctl status --json` ask a live control socket: a `ControlServer`
(the real one, repctl.control) served by a thread of this process, in front of a stand-in
daemon that answers `status` with a fixed document (2 resources, 3 targets), and a config
file in a temporary directory whose `global.control_socket` names that socket. No daemon, no
root, no kernel: it runs on the host and in the test VM (bench/run.sh runs it there).

Bytecode: the commands run with their compiled modules (.pyc) in a cache of their own under
/tmp (PYTHONPYCACHEPREFIX; PYTHONDONTWRITEBYTECODE dropped), written by a first unmeasured run,
as an installed package has them; the repository stays untouched (it is read-only in the VM).
One more row, "no repctl bytecode", runs `repctl status --json` with everything compiled but
repctl's own modules, which are then compiled from source on every run: what a stale or
unwritable __pycache__ costs (the test VM sets PYTHONDONTWRITEBYTECODE on a read-only tree).

Aim (issue "Operations"): `repctl status --json` under 150 ms on the host. A missed aim is
printed as MISSED but is not an error; the exit status is non-zero only when a command failed.

    cli_bench.py [--runs N] [--repctl PATH] [--imports N]

--imports N also prints the N modules that take longest to import (cumulative, from
``python -X importtime``) in one run of `repctl status --json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pyctl"))

from repctl.control import ControlServer

AIM_MS = 150.0

#: What the stand-in daemon answers to `status` (the shape of docs/cli.md).
STATUS: dict[str, Any] = {
    "node": "alpha",
    "resources": [
        {
            "name": "r0", "role": "primary", "disk": "UpToDate", "device": "/dev/mapper/r0",
            "kernel": {"mode": "streaming", "reason": "started", "dirty_chunks": 12,
                       "chunk_size": 65536, "ring_used": 0, "ring_bytes": 33554432},
            "targets": [
                {"name": "beta", "mode": "sync", "state": "streaming", "connection": "connected",
                 "address": "10.0.0.2:7789", "out_of_sync_bytes": 0, "bytes_sent": 123,
                 "lag_bytes": 0, "lag_records": 0, "sync": None, "last_error": None},
                {"name": "gamma", "mode": "async", "state": "syncing",
                 "connection": "connected", "address": "192.0.2.7:7789",
                 "out_of_sync_bytes": 3 << 30, "bytes_sent": 5 << 20, "lag_bytes": 1 << 20,
                 "lag_records": 7,
                 "sync": {"done_bytes": 1 << 30, "total_bytes": 4 << 30, "rate_bps": 50e6,
                          "eta_s": 64.0},
                 "last_error": "connection reset by peer"},
            ],
        },
        {"name": "r1", "role": "secondary", "disk": "UpToDate", "device": "/srv/r1.img",
         "source": "beta", "connection": "connected", "state": "streaming", "consistent": True,
         "bytes_received": 456, "targets": []},
    ],
}

CONFIG = """\
global:
  control_socket: {sock}
  state_dir: {tmp}/state
  secret_file: {tmp}/secret
resources:
  r0:
    port: 7789
    chunk_size: 64KiB
    source: alpha
    nodes:
      alpha: {{address: 10.0.0.1, device: {tmp}/r0.img, metadata: {tmp}/r0-md.img}}
      beta: {{address: 10.0.0.2, device: {tmp}/r0.img, metadata: {tmp}/r0-md.img}}
      gamma: {{address: 192.0.2.7, device: {tmp}/r0.img}}
    targets:
      beta: {{mode: sync}}
      gamma: {{mode: async}}
  r1:
    port: 7790
    source: beta
    nodes:
      beta: {{address: 10.0.0.2, device: /dev/vg0/mail, metadata: /dev/vg0/mail-md}}
      alpha: {{address: 10.0.0.1, device: /srv/r1.img}}
    targets:
      alpha: {{mode: sync}}
"""


class StandIn:
    """The daemon's side of `status`, and nothing else."""

    def status(self) -> dict[str, Any]:
        return STATUS


def find_repctl(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).parent / "repctl"
    if beside.exists():
        return str(beside)
    found = shutil.which("repctl")
    if found is None:
        sys.exit("cli_bench.py: no repctl beside this Python nor on PATH: make venv, or --repctl")
    return found


def nearest_rank(sorted_ms: list[float], q: float) -> float:
    """The `q` quantile of sorted samples, nearest rank: of 20 samples, p90 is the 18th."""
    return sorted_ms[max(0, math.ceil(len(sorted_ms) * q) - 1)]


@dataclass
class Command:
    name: str
    argv: list[str]
    env: dict[str, str]
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


def slowest_imports(argv: list[str], env: dict[str, str], count: int) -> list[tuple[int, str]]:
    """The `count` largest cumulative import times (µs) of one run of `argv` under Python."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env,
                          capture_output=True, text=True, check=False)
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, module = line.split("|")
            if cumulative.strip().isdigit():
                rows.append((int(cumulative), module.rstrip()))
    return sorted(rows, reverse=True)[:count]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="runs of each command (20)")
    p.add_argument("--repctl", help="the repctl script (default: the one beside this Python)")
    p.add_argument("--imports", type=int, default=0, metavar="N",
                   help="also print the N slowest imports of `repctl status --json`")
    args = p.parse_args()
    py, repctl = sys.executable, find_repctl(args.repctl)

    tmp = Path(tempfile.mkdtemp(prefix="repctl-clibench-", dir="/tmp"))
    sock = tmp / "repctl.sock"
    config = tmp / "repctl.yaml"
    config.write_text(CONFIG.format(sock=sock, tmp=tmp))
    pycache, uncompiled = tmp / "pycache", tmp / "pycache-no-repctl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "COLUMNS")}
    env.update(REPCTL_CONFIG=str(config), PYTHONPYCACHEPREFIX=str(pycache))
    commands = [
        Command("python -c pass", [py, "-c", "pass"], env),
        Command("python -c 'import repctl.cli'", [py, "-c", "import repctl.cli"], env),
        Command("repctl --help", [repctl, "--help"], env),
        Command("repctl status --json", [repctl, "status", "--json"], env),
        Command("repctl status", [repctl, "status"], env),
    ]
    server = ControlServer(sock, StandIn())  # type: ignore[arg-type]  # status is all it serves
    server.start()
    rc = 0
    try:
        # Once first, unmeasured: a command that fails is reported, not timed; the .pyc files
        # are written; the JSON is the stand-in's document.
        for cmd in commands:
            done = subprocess.run(cmd.argv, env=cmd.env, capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                print(f"cli_bench.py: {cmd.name} failed (exit {done.returncode}): "
                      f"{done.stderr.strip()}", file=sys.stderr)
                return 1
            if cmd.name == "repctl status --json" and json.loads(done.stdout) != STATUS:
                print("cli_bench.py: repctl status --json printed another document",
                      file=sys.stderr)
                return 1
        # The same cache less repctl's own modules (those the commands import), and nothing
        # written to it.
        where = subprocess.run([py, "-c", "import repctl; print(repctl.__file__)"], env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        package = Path(where).parent  # as imported: the cache mirrors that path
        shutil.copytree(pycache, uncompiled)
        shutil.rmtree(uncompiled / package.relative_to(package.anchor))
        commands.append(Command("repctl status --json, no repctl bytecode",
                                [repctl, "status", "--json"],
                                {**env, "PYTHONPYCACHEPREFIX": str(uncompiled),
                                 "PYTHONDONTWRITEBYTECODE": "1"}))

        for _ in range(args.runs):
            for cmd in commands:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                timed = subprocess.run(cmd.argv, env=cmd.env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, check=False)
                cmd.ms.append((time.perf_counter() - start) * 1000)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cmd.cpu_ms.append((after.ru_utime - before.ru_utime
                                   + after.ru_stime - before.ru_stime) * 1000)
                if timed.returncode != 0:
                    print(f"cli_bench.py: {cmd.name} failed (exit {timed.returncode})",
                          file=sys.stderr)
                    rc = 1

        cmdline = Path("/proc/cmdline")
        vm = cmdline.exists() and "repctl_vm=1" in cmdline.read_text().split()
        print(f"== cli bench: {args.runs} runs each, {'in the test VM' if vm else 'host'}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} (at the end), Python "
              f"{sys.version.split()[0]}")
        print("   status asks a ControlServer (repctl.control) served by this process, in front "
              "of a stand-in daemon\n   with a fixed status document; compiled modules in a "
              "cache of the benchmark's own (PYTHONPYCACHEPREFIX)")
        base = statistics.median(commands[0].ms)
        width = max(len(cmd.name) for cmd in commands)
        print(f"{'command':<{width}}  {'median':>10}  {'p90':>10}  {'- python':>10}  "
              f"{'cpu':>10}")
        for cmd in commands:
            ms = sorted(cmd.ms)
            med = statistics.median(ms)
            print(f"{cmd.name:<{width}}  {med:>7.1f} ms  {nearest_rank(ms, 0.9):>7.1f} ms  "
                  f"{med - base:>7.1f} ms  {statistics.median(cmd.cpu_ms):>7.1f} ms")
        status_ms = statistics.median(commands[3].ms)
        verdict = "met" if status_ms < AIM_MS else "MISSED"
        print(f"aim: repctl status --json median under {AIM_MS:.0f} ms on the host: "
              f"{status_ms:.1f} ms {verdict}{' (this is the VM)' if vm else ''}")

        if args.imports:
            print("slowest imports of repctl status --json (cumulative, µs):")
            for us, module in slowest_imports([repctl, "status", "--json"], env, args.imports):
                print(f"{us:>10}  {module}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
