#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""What one replicated write costs the two daemons: CPU per write, and where it goes.

Runs INSIDE the test VM, as root, with dm-mod, kmod/dm-repl.ko and brd loaded: bench/run.sh
--sync-cost-only (or `make bench-sync-cost`). replicate_bench's set-up (namespaces rb-src /
rb-dst and their veth, /dev/ram0 -> /dev/ram2, the initial sync), then beta synchronous (or
asynchronous, --mode async) and, for each fio job (sync: target_bench's lat4k, 4 KiB random
writes at QD1, and rand4k, the same at QD16; async: paced4k, rand4k held at 2,000 IOPS so
that the link keeps up and every write is streamed, and rand4k):

    IOPS, mean latency, and each daemon's user and system CPU seconds over the job, per write

The CPU is read once the link has caught up after the job (an async link sends its backlog
after fio ends), and a job in which beta fell behind says so: its writes were tracked in the
bitmap, not streamed one by one. An async link's CPU per streamed record bounds the rate it
can carry: one vCPU's worth divided by it.

A sync write's latency is a chain through two processes (alpha's link thread sends the record,
beta's connection thread writes and flushes it and acknowledges, alpha's receiver releases
the writer). When the CPU per write of the two daemons adds up to the latency, the chain is
bound by its CPU, not by a late wake-up (docs/benchmarks-peers.md, "What bounds repctl sync").

With --profile, every thread of both daemons runs under cProfile (a sitecustomize module on
the daemons' PYTHONPATH starts one per thread; each dumps its statistics when the daemon
exits), and the report gives, per thread, its time outside blocking calls and its top
functions with their calls per write. A profile spans the daemons' whole life: their start
(imports, the handshake) is in it too, but costs nothing per write. cProfile slows the daemons
down: the figures of a profiled job are printed apart, not compared. The initial sync runs
profiled too, reported per MiB synced: what bounds it against a raw socket copy.

    sync_cost.py [--results DIR] [--runtime S] [--runs N] [--mode sync|async] [--profile]
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicate_bench as rb  # noqa: E402  (sets the pycache prefix before repctl is imported)
import target_bench as tb  # noqa: E402

# fio jobs: target_bench's, and paced4k, 4 KiB QD16 held at a rate an async link keeps up
# with here, so that every write is streamed (CPU per record, not per write tracked)
JOBS = {"lat4k": tb.TESTS["lat4k"]["args"], "rand4k": tb.TESTS["rand4k"]["args"],
        "paced4k": [*tb.TESTS["rand4k"]["args"], "--rate_iops=2000"]}
TESTS = {"sync": ("lat4k", "rand4k"), "async": ("paced4k", "rand4k")}
# calls that block (wait for the kernel, the peer or a wake-up): not CPU, left out of a
# thread's busy time
BLOCKING = re.compile(r"\{method '(poll|recv_into|_accept|acquire)'|\{built-in method "
                      r"(fcntl\.ioctl|select\.select|time\.sleep)\}")

SITE = '''\
"""bench/sync_cost.py --profile: a cProfile per thread of this process, dumped at exit."""
import atexit, cProfile, os, sys, threading
_profiles = []
_lock = threading.Lock()

def _start(frame, event, arg):
    sys.setprofile(None)
    p = cProfile.Profile()
    with _lock:
        _profiles.append((threading.current_thread().name, p))
    p.enable()

threading.setprofile(_start)

@atexit.register
def _dump():
    out = os.environ["REPCTL_BENCH_PROFILE"]
    for name, p in list(_profiles):
        try:
            p.dump_stats(f"{out}-{os.getpid()}-{name}.pstats")
        except Exception:
            pass
'''


def say(msg: str) -> None:
    print(f"synccost: {msg}", flush=True)


def fio(dev: str, test: str, runtime: float, workdir: Path) -> dict[str, float]:
    jobs = tb.fio(dev, [f"--name={test}", *JOBS[test], f"--runtime={runtime:g}",
                        "--time_based"], timeout=runtime * 4 + 180, cwd=workdir)
    f = tb.figures(jobs[0])
    f["ios"] = jobs[0]["write"]["total_ios"]
    return f


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def profile_report(prefix: Path, pids: dict[str, int], ios: int,
                   unit: str = "write") -> list[str]:
    """Per thread of each daemon: busy time (outside blocking calls) per write (per `unit`:
    `ios` of them) and its top functions by own time, with their calls per write."""
    lines = []
    for node, pid in pids.items():
        for path in sorted(prefix.parent.glob(f"{prefix.name}-{pid}-*.pstats")):
            st = pstats.Stats(str(path))
            rows = st.stats  # type: ignore[attr-defined]
            busy = sum(tt for fn, (cc, nc, tt, ct, callers) in rows.items()
                       if not BLOCKING.search(pstats.func_std_string(fn)))
            if busy * 1e6 / max(ios, 1) < 50:
                continue  # the control socket, the listener: nothing per write
            thread = path.stem.split(f"-{pid}-", 1)[1]
            lines.append(f"  {node} {thread}: busy {busy * 1e6 / ios:.0f} us per {unit}")
            top = sorted(((tt, nc, fn) for fn, (cc, nc, tt, ct, callers) in rows.items()),
                         reverse=True)[:10]
            for tt, nc, fn in top:
                name = pstats.func_std_string(fn).replace(str(rb.REPO) + "/pyctl/", "")
                lines.append(f"      {tt * 1e6 / ios:8.0f} us  {nc / ios:6.2f} calls  "
                             f"{name[-80:]}")
    return lines


class SyncCost(rb.Bench):
    def __init__(self, args: argparse.Namespace):
        args.ring_size, args.poll, args.sha256 = "64MiB", 0.5, False
        args.raw_server = args.raw_client = None
        super().__init__(args)
        self.out["bench"] = "sync_cost"
        self.tests = TESTS[args.mode]
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in self.tests}
        self.site = self.results / "site"

    def restart(self, profile_prefix: Path | None) -> None:
        from repctl import dm

        c = self.cluster
        assert c is not None
        # the engine's CLEAN cycle (every second) first clears what the last job wrote: a
        # bitmap left dirty would be resynced after the restart, into the next profile
        c.wait_converged()
        time.sleep(3)
        c.stop_all()  # a profiled daemon dumps its statistics as it exits
        if Path(rb.DEV).exists():
            dm.remove_device(rb.RES, retries=50)
        rb.CHILD_ENV.pop("PYTHONPATH", None)
        if profile_prefix is not None:
            self.profiled(profile_prefix)
        self.restart_sync_mode(self.args.mode)
        c.wait_converged()

    def profiled(self, prefix: Path) -> None:
        """The daemons started from now on run under cProfile, dumping to `prefix`-PID-THREAD."""
        self.site.mkdir(exist_ok=True)
        (self.site / "sitecustomize.py").write_text(SITE)
        rb.CHILD_ENV["PYTHONPATH"] = str(self.site)
        rb.CHILD_ENV["REPCTL_BENCH_PROFILE"] = str(prefix)

    def job(self, test: str, label: str) -> dict[str, Any]:
        c = self.cluster
        assert c is not None
        t0 = {n: cpu_times(p) for n, p in c.pids.items()}
        w0 = time.time()
        f = fio(rb.DEV, test, self.args.runtime, self.results)
        caught_up = c.wait_converged()  # an async link may still be sending the job's records
        t1 = {n: cpu_times(p) for n, p in c.pids.items()}
        ios = max(int(f["ios"]), 1)
        behind = [e.get("text", "") for e in c.events_since("alpha", w0)
                  if e.get("what") == "state" and e.get("new") == "behind"]
        r: dict[str, Any] = {"iops": f["iops"], "lat_us": f["lat_us"], "ios": ios,
                             "caught_up_s": caught_up, "fell_behind": behind}
        for n in t0:
            r[f"{n}_user_us"] = (t1[n][0] - t0[n][0]) * 1e6 / ios
            r[f"{n}_sys_us"] = (t1[n][1] - t0[n][1]) * 1e6 / ios
        say(f"{label:9} {test:7} {f['iops']:7.0f} IOPS  {f['lat_us']:8.0f} us  CPU per write: "
            + "  ".join(f"{n} {r[f'{n}_user_us']:.0f} user + {r[f'{n}_sys_us']:.0f} sys us"
                        for n in t0)
            + (f"  (fell behind: {behind[0]}; the CPU is not per streamed record)" if behind
               else ""))
        return r

    def table(self) -> list[str]:
        head = (f"{'':8}{'IOPS':>8}{'lat us':>9}" + "".join(
            f"{n + ' ' + k + ' us/w':>17}" for n in ("alpha", "beta") for k in ("user", "sys")))
        lines = [head]
        for test in self.tests:
            runs = self.rows[test]
            if not runs:
                continue
            keys = ["iops", "lat_us"] + [f"{n}_{k}_us" for n in ("alpha", "beta")
                                         for k in ("user", "sys")]
            med = {k: statistics.median(r[k] for r in runs) for k in keys}
            lines.append(f"{test:8}{med['iops']:8.0f}{med['lat_us']:9.0f}" + "".join(
                f"{med[k]:17.0f}" for k in keys[2:]))
        return lines

    def run(self) -> int:
        rc = 0
        t0 = time.monotonic()
        try:
            self.preflight()
            self.make_net()
            self.fill()
            if self.args.profile:  # the initial sync too: what bounds it against a raw copy
                self.profiled(self.results / "profile-initial")
            self.initial_sync()
            pids = dict(self.cluster.pids)  # type: ignore[union-attr]
            self.restart(None)
            if self.args.profile:
                mib = self.size // rb.MiB
                ph = self.out["phases"]["initial_sync"]
                initial = [f"initial sync of {mib} MiB (profiled: {ph['mib_s']:.1f} MiB/s):",
                           *profile_report(self.results / "profile-initial", pids, mib, "MiB")]
                for ln in initial:
                    print(ln, flush=True)
            for i in range(self.args.runs):
                for test in self.tests:
                    self.rows[test].append(self.job(test, f"run {i + 1}"))
            lines = self.table()
            say(f"median of {self.args.runs} runs, fio {self.args.runtime:g} s per job, beta {self.args.mode}:")
            for ln in lines:
                print(ln, flush=True)
            (self.results / "sync-cost.txt").write_text("\n".join(lines) + "\n")
            self.out["runs"] = self.rows
            if self.args.profile:
                report = initial
                for test in self.tests:
                    prefix = self.results / f"profile-{test}"
                    self.restart(prefix)
                    pids = dict(self.cluster.pids)  # type: ignore[union-attr]
                    r = self.job(test, "profiled")
                    self.restart(None)  # the profiled daemons exit: their statistics
                    report.append(f"{test} (profiled: {r['iops']:.0f} IOPS, "
                                  f"{r['lat_us']:.0f} us, {r['ios']} writes):")
                    report += profile_report(prefix, pids, r["ios"])
                for ln in report:
                    print(ln, flush=True)
                (self.results / "sync-profile.txt").write_text("\n".join(report) + "\n")
        except Exception as e:  # noqa: BLE001 (reported, exit 1)
            rc = 1
            self.failed(e, say)
        finally:
            rc = self.finish(rc, t0, "sync-cost.json", say)
        return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--results", default="/tmp/synccost-results")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per fio job (5)")
    ap.add_argument("--runs", type=int, default=2, help="runs of each job (2)")
    ap.add_argument("--mode", choices=sorted(TESTS), default="sync",
                    help="beta's mode (sync); async runs paced4k (every write streamed) and rand4k")
    ap.add_argument("--profile", action="store_true",
                    help="then one job each with cProfile in every daemon thread")
    return SyncCost(ap.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
