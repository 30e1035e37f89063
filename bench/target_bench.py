#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""The repl target against dm-linear on the same RAM disk, side by side in one run.

Runs INSIDE the test VM (bench/run.sh, through `make bench`), as root, on brd RAM disks:
/dev/ram0 is the data device of both a dm-linear device and a repl device, /dev/ram1 the
repl device's metadata (4 KiB chunks, a 64 MiB ring). fio (libaio, O_DIRECT) measures

    seq1m    1 MiB sequential writes, queue depth 4: throughput
    rand4k   4 KiB random writes, queue depth 16: IOPS
    lat4k    4 KiB random writes, queue depth 1: latency

on dm-linear and on the repl device in three set-ups:

    async     a consumer process attached, streaming, acknowledging every record without
              reading it (the ring copy and the consumer's wake-ups are paid, no network)
    sync      the same consumer attached in synchronous mode: a write completes only once
              acknowledged
    tracking  no consumer: only the dirty bitmap (the breakdown row)

Steady state: a warm-up pass writes the whole device once first, so that every bitmap bit
is already set and durable, as on a device in use. Cold: the bitmap starts clean (the
metadata freshly formatted) and every write is the first to its chunk, so it waits for a
bitmap commit: each test makes one pass over a third of the device of its own (fio's random
map: each block once), capped at the runtime, against the same jobs on dm-linear just before.

The tests of one set-up run in one fio process, one after the other (fio takes seconds to
start in the emulated VM); the set-ups alternate, in a rotating order, to cancel drift (the
VM shares two host cores with other VMs), and each figure is the median of its runs. Around
each job (outside the measured time) the target's status is taken to check that it
stayed in streaming mode and to count the ring records the consumer acknowledged. A run that
fell behind (ring_full) is reported and left out of the medians.

The aims: repl-async at least 90 % of dm-linear's sequential throughput and 80 % of its
4 KiB QD16 IOPS. Missing an aim is reported (MISSED), not an error: the exit status is
non-zero only when something failed.

    target_bench.py [--runtime S] [--reps N] [--side-reps N] [--results DIR]
    target_bench.py --consumer DEVICE      (internal: the draining consumer process)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

DATA = "/dev/ram0"
META = "/dev/ram1"
LINEAR = "bench-linear"
REPL = "bench-repl"
SECTOR = 512
CHUNK_SECTORS = 8
RING_MB = 64

AIMS = {"seq1m": 0.90, "rand4k": 0.80}

TESTS: dict[str, dict[str, Any]] = {
    "seq1m": {"label": "1 MiB seq write, QD4 (MiB/s)", "short": "seq MiB/s", "metric": "bw_mib",
              "args": ["--rw=write", "--bs=1M", "--iodepth=4"]},
    "rand4k": {"label": "4 KiB rand write, QD16 (IOPS)", "short": "4k QD16 IOPS",
               "metric": "iops",
               "args": ["--rw=randwrite", "--bs=4k", "--iodepth=16"]},
    # not in the default set: a size the repl target does not split (see docs/benchmarks.md)
    "seq64k": {"label": "64 KiB seq write, QD4 (MiB/s)", "short": "seq64k MiB/s",
               "metric": "bw_mib", "args": ["--rw=write", "--bs=64k", "--iodepth=4"]},
    "lat4k": {"label": "4 KiB rand write, QD1 mean latency (us)", "short": "QD1 lat us",
              "metric": "lat_us",
              "more": {"p50_us": "4 KiB rand write, QD1 p50 latency (us)",
                       "p99_us": "4 KiB rand write, QD1 p99 latency (us)"},
              "args": ["--rw=randwrite", "--bs=4k", "--iodepth=1"]},
}
DEFAULT_TESTS = ["seq1m", "rand4k", "lat4k"]
VARIANTS = {
    "linear": "dm-linear",
    "async": "repl-async",
    "sync": "repl-sync",
    "tracking": "repl, no consumer (tracking)",
    # not in the default set: acks every 20 ms instead of waiting for each publication
    "poll": "repl-async, consumer polls 20 ms",
}
DEFAULT_VARIANTS = ["linear", "async", "sync", "tracking"]
STREAMING = ("async", "sync", "poll")


def say(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


# ---------------------------------------------------------------- the consumer process


WAIT_BATCH = 64  # records per wake-up of the async consumer
WAIT_MS = 10     # ... or this long


def consumer_main(device: str) -> int:
    """Commands on stdin, one JSON reply per line on stdout.

    start async|sync|poll   attach (Consumer(device, sync=...)), start_stream, drain in a
                            thread (poll: ack every 20 ms instead of waiting)
    stop               stop draining, detach; reply with the counts
    quit               detach if attached, exit (also on end of input)
    """
    from repctl.ring import Consumer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    cur: dict[str, Any] | None = None

    def drain(c: Consumer, stop: threading.Event, stats: dict[str, Any], poll: bool) -> None:
        try:
            while not stop.is_set():
                st = c.state()
                stats["states"] += 1
                if not st.streaming:
                    # fell behind (ring_full): note it, start a new stream as a daemon
                    # would once resynchronised, so that the next test streams again
                    stats["fell_behind"].append({"mode": st.mode, "reason": st.reason,
                                                 "published": st.published,
                                                 "acked": st.acked})
                    c.start_stream()
                    continue
                r = st.readable()
                if len(r):
                    c.ack(r[-1])
                    stats["acks"] += 1
                    stats["records"] += len(r)
                if poll:
                    time.sleep(0.02)
                else:
                    # as the daemon does: woken per batch (or sooner, see Consumer.wait)
                    c.wait(st.published, WAIT_MS, batch=WAIT_BATCH)
                    stats["waits"] += 1
        except BaseException as e:  # reported with the stop reply
            stats["error"] = f"{type(e).__name__}: {e}"

    def stop_current() -> dict[str, Any]:
        nonlocal cur
        assert cur is not None
        cur["stop"].set()
        cur["thread"].join(10)
        stats = cur["stats"]
        stats["seconds"] = time.monotonic() - cur["t0"]
        if cur["thread"].is_alive():
            stats["error"] = (stats.get("error") or "") + " drain thread did not stop"
        cur["consumer"].close()
        cur = None
        return stats

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "start":
                if cur is not None:
                    raise RuntimeError("already attached")
                c = Consumer(device, sync=words[1] == "sync")
                try:
                    mark = c.start_stream()
                except BaseException:
                    c.close()
                    raise
                stats = {"acks": 0, "records": 0, "states": 0, "waits": 0,
                         "fell_behind": [], "error": None}
                stop = threading.Event()
                t = threading.Thread(target=drain, args=(c, stop, stats, words[1] == "poll"),
                                     daemon=True)
                cur = {"consumer": c, "stop": stop, "stats": stats, "thread": t,
                       "t0": time.monotonic()}
                t.start()
                reply({"ok": True, "mark": mark})
            elif words[0] == "stop":
                if cur is None:
                    raise RuntimeError("not attached")
                reply({"ok": True, "stats": stop_current()})
            elif words[0] == "quit":
                break
            else:
                raise RuntimeError(f"unknown command {words[0]!r}")
        except Exception as e:
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    if cur is not None:
        stop_current()
    return 0


class ConsumerProc:
    """The parent's handle on the consumer process."""

    def __init__(self, device: str, cpu: int | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--consumer", device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}))
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.attached: str | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _cmd(self, text: str, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"consumer: no reply to {text!r} in {timeout} s") from None
        if line is None:
            raise RuntimeError(f"consumer exited (status {self.proc.wait()}) on {text!r}")
        r = json.loads(line)
        if not r.get("ok"):
            raise RuntimeError(f"consumer: {text}: {r.get('error')}")
        return r

    def start(self, mode: str) -> int:
        r = self._cmd(f"start {mode}")
        self.attached = mode
        return int(r["mark"])

    def stop(self) -> dict[str, Any]:
        self.attached = None
        return dict(self._cmd("stop")["stats"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- the benchmark


class Snapshots(threading.Thread):
    """The repl target's status around each fio job, taken on fio's request.

    fio runs a job's exec_prerun / exec_postrun command through /bin/sh outside the
    measured time; `command()` is shell builtins only (exec'ing a program costs a second
    in the emulated VM): it names the job on one FIFO and waits on another until the
    status has been taken here.
    """

    def __init__(self, workdir: Path):
        super().__init__(daemon=True)
        self.req = workdir / "req"
        self.ack = workdir / "ack"
        os.mkfifo(self.req)
        os.mkfifo(self.ack)
        self.taken: dict[str, dict[str, Any]] = {}
        self.error: str | None = None
        self.streaming = False  # a consumer is attached (set for each block)

    def command(self, phase: str, job: str) -> str:
        return f"echo {phase} {job} > {self.req}; read x < {self.ack}"

    def run(self) -> None:
        while True:
            with open(self.req) as f:
                words = f.read().split()
            if len(words) != 2:
                return  # "quit" from stop()
            try:
                st = repl_status()
                if words[0] == "prerun" and self.streaming:
                    # a consumer that fell behind in the previous test starts a new
                    # stream: let this test start streaming (for up to 3 s)
                    deadline = time.monotonic() + 3
                    while st["mode"] != "streaming" and time.monotonic() < deadline:
                        time.sleep(0.02)
                        st = repl_status()
                self.taken[f"{words[1]}.{words[0]}"] = st
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
            with open(self.ack, "w") as f:
                f.write("ok\n")

    def take(self, phase: str, job: str) -> dict[str, Any]:
        if self.error:
            raise RuntimeError(f"status around fio job {job}: {self.error}")
        try:
            return self.taken[f"{job}.{phase}"]
        except KeyError:
            raise RuntimeError(f"no status from before/after fio job {job} ({phase})") from None

    def stop(self) -> None:
        try:  # wakes the open() of req; fails (ENXIO) when the thread is not in it
            fd = os.open(self.req, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"quit\n")
            os.close(fd)
        except OSError:
            pass
        self.join(2)


def repl_status() -> dict[str, Any]:
    from repctl import dm

    with dm.DMControl() as ctl:
        return parse_status(ctl.status(REPL)[0].text.split())


def parse_status(f: list[str]) -> dict[str, Any]:
    dirty, chunks = f[4].split("/")
    used, size = f[9].split("/")
    return {"meta": f[0], "mode": f[1], "reason": f[2], "dirty": int(dirty),
            "chunks": int(chunks), "writes": int(f[5]), "write_bytes": int(f[6]),
            "ring_used": int(used), "ring_bytes": int(size), "published": int(f[10]),
            "acked": int(f[11]), "consumer": f[12], "sync": f[13]}


FIO_EXTRA: list[str] = []


def queue_limit(dev: str, name: str = "max_sectors_kb") -> str:
    st = os.stat(dev)
    try:
        return Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/queue/"
                    f"{name}").read_text().strip()
    except OSError:
        return "?"


def fio(dev: str, args: list[str], timeout: float, cwd: Path) -> list[dict[str, Any]]:
    """Run fio (global options, then args: one or more --name=JOB sections); its jobs."""
    cmd = ["fio", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
           "--numjobs=1", "--output-format=json", *FIO_EXTRA, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    out = p.stdout
    start = out.find("{")
    if p.returncode != 0 or start < 0:
        raise RuntimeError(f"fio failed (exit {p.returncode}): {' '.join(cmd)}\n"
                           f"{p.stderr.strip()}\n{out.strip()[:2000]}")
    jobs: list[dict[str, Any]] = json.loads(out[start:])["jobs"]
    for job in jobs:
        if job.get("error"):
            raise RuntimeError(f"fio job {job['jobname']} error {job['error']}: "
                               f"{' '.join(cmd)}\n{p.stderr.strip()}")
    return jobs


def figures(job: dict[str, Any]) -> dict[str, float]:
    w = job["write"]
    pct = w.get("clat_ns", {}).get("percentile", {})
    return {
        "bw_mib": w["bw_bytes"] / 2**20,
        "iops": w["iops"],
        "lat_us": w["lat_ns"]["mean"] / 1000,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "ios": w["total_ios"],
        "runtime_s": w["runtime"] / 1000,
    }


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results: list[dict[str, Any]] = []
        self.created: list[str] = []
        self.consumer: ConsumerProc | None = None
        self.sectors = 0
        self.repl_path = ""
        self.linear_path = ""
        self.problems: list[str] = []
        self.fell_behind: list[str] = []
        self.limits: dict[str, str] = {}
        self.blocks: list[dict[str, Any]] = []
        # fio's working folder: exec_prerun/postrun write their output there
        self.workdir = Path(tempfile.mkdtemp(prefix="repl-bench-"))
        self.snapshots = Snapshots(self.workdir)
        self.snapshots.start()

    # -- devices
    def setup(self) -> None:
        from repctl import dm, metadata

        for d in (DATA, META):
            if not Path(d).is_block_device():
                raise RuntimeError(f"{d} is not a block device: load brd first (bench/run.sh)")
        self.sectors = metadata.device_bytes(DATA) // SECTOR
        need = metadata.metadata_bytes(self.sectors, CHUNK_SECTORS)
        say(f"data {DATA} ({self.sectors * SECTOR >> 20} MiB), metadata {META} "
            f"(needs {need} bytes), chunk {CHUNK_SECTORS * SECTOR} bytes, ring {RING_MB} MiB")
        info = dm.create_device(LINEAR, [dm.Target(0, self.sectors, "linear", f"{DATA} 0")])
        self.created.append(LINEAR)
        self.linear_path = info.path
        self.make_repl()
        # how large a bio each device takes in one piece (dm splits at the target's
        # max_io_len capped by the queue's max_sectors; dm-linear sets none)
        self.limits = {"ram0": queue_limit(DATA), "linear": queue_limit(self.linear_path),
                       "repl": queue_limit(self.repl_path)}
        say("max_sectors_kb: " + ", ".join(f"{k} {v}" for k, v in self.limits.items()))

    def make_repl(self) -> None:
        """(Re)create the repl device over freshly formatted (all clean) metadata."""
        from repctl import dm, metadata

        if REPL in self.created:
            dm.remove_device(REPL)
            self.created.remove(REPL)
        metadata.format_metadata(META, self.sectors, CHUNK_SECTORS, force=True)
        info = dm.create_device(REPL, [dm.Target(
            0, self.sectors, "repl", f"{DATA} {META} {CHUNK_SECTORS} 2 ring_mb {RING_MB}")])
        self.created.append(REPL)
        self.repl_path = info.path
        if self.consumer is None:
            self.consumer = ConsumerProc(self.repl_path, 0 if self.args.same_cpu else None)

    def teardown(self) -> None:
        from repctl import dm

        if self.consumer is not None:
            try:
                if self.consumer.attached:
                    self.consumer.stop()
            except Exception as e:
                self.problems.append(f"stopping the consumer: {e}")
            self.consumer.close()
        for name in reversed(self.created):
            try:
                dm.remove_device(name)
            except Exception as e:
                self.problems.append(f"removing {name}: {e}")
        self.created.clear()
        self.snapshots.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- one block: the tests in one fio process, one after the other (stonewall)
    def block(self, variant: str, rep: int, cold: bool = False) -> None:
        """Run every test on one set-up in one fio process (fio takes seconds to start under
        emulation). Around each job, outside the measured time, fio has the target's status
        taken (Snapshots): the mode and the ring counters per test."""
        a = self.args
        tests = a.tests
        dev = self.linear_path if variant == "linear" else self.repl_path
        args: list[str] = []
        region = (self.sectors * SECTOR // len(tests)) >> 20 << 20
        for i, test in enumerate(tests):
            args += [f"--name={test}", *TESTS[test]["args"], f"--runtime={a.runtime}"]
            if i:
                args.append("--stonewall")
            if cold:
                # one pass over a region of its own, each block once (fio's random map):
                # every write is the first to its chunk. Capped at the runtime.
                args += [f"--offset={i * region}", f"--size={region}"]
            else:
                args.append("--time_based")
            if variant != "linear":
                args += [f"--exec_prerun={self.snapshots.command('prerun', test)}",
                         f"--exec_postrun={self.snapshots.command('postrun', test)}"]
        self.snapshots.taken.clear()
        assert self.consumer is not None
        streaming = variant in STREAMING
        self.snapshots.streaming = streaming
        if streaming:
            self.consumer.start(variant)
        t0 = time.monotonic()
        try:
            before = repl_status()
            jobs = fio(dev, args, timeout=a.runtime * len(tests) * 4 + 120, cwd=self.workdir)
            t1 = time.monotonic()
            after = repl_status()
            if streaming:
                deadline = time.monotonic() + 3
                while after["acked"] < after["published"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                    after = repl_status()
        finally:
            cstats = self.consumer.stop() if streaming else None
        if cstats and cstats.get("error"):
            raise RuntimeError(f"consumer error during {variant}: {cstats['error']}")
        wall = {"fio": t1 - t0, "total": time.monotonic() - t0}
        by_name = {j["jobname"]: j for j in jobs}
        for test in tests:
            job = by_name[test]
            rec: dict[str, Any] = {"variant": variant, "test": test, "rep": rep, "cold": cold,
                                   **figures(job)}
            if variant != "linear":
                pre = self.snapshots.take("prerun", test)
                post = self.snapshots.take("postrun", test)
                rec["status_before"], rec["status_after"] = pre, post
                rec["repl_writes"] = post["writes"] - pre["writes"]
                rec["dirty_before"] = pre["dirty"]
                if variant == "tracking" and post["mode"] != "tracking":
                    raise RuntimeError(f"tracking run but the target is {post['mode']}")
            if streaming:
                rec["records"] = post["acked"] - pre["acked"]
                rec["records_per_s"] = (rec["records"] / rec["runtime_s"]
                                        if rec["runtime_s"] else 0.0)
                events = [e for e in (cstats or {}).get("fell_behind", [])
                          if pre["published"] < e["published"] <= post["published"]]
                rec["fell_behind"] = (bool(events) or post["mode"] != "streaming"
                                      or pre["mode"] != "streaming")
                if rec["fell_behind"]:
                    why = events[0]["reason"] if events else post["reason"]
                    msg = (f"{variant} {test} rep {rep}{' cold' if cold else ''}: the target "
                           f"fell behind into tracking ({why}); not a streaming figure")
                    self.fell_behind.append(msg)
                    say("WARNING: " + msg)
            rec["fio"] = job
            self.results.append(rec)
            extra = ""
            if streaming:
                extra = f", {rec['records_per_s']:.0f} records/s, mode {post['mode']}"
            say(f"{'cold ' if cold else ''}{test:6} {VARIANTS[variant]:28} rep {rep}: "
                f"{rec['bw_mib']:8.1f} MiB/s {rec['iops']:7.0f} IOPS {rec['lat_us']:8.1f} us "
                f"(p50 {rec['p50_us']:.0f} p99 {rec['p99_us']:.0f} us, "
                f"{rec['runtime_s']:.1f} s){extra}")
        if streaming and cstats:
            cstats["records_per_ack"] = cstats["records"] / max(1, cstats["acks"])
            say(f"  consumer: {cstats['records']} records in {cstats['acks']} acks "
                f"({cstats['records_per_ack']:.1f} per ack), {cstats['waits']} waits")
        self.blocks.append({"variant": variant, "rep": rep, "cold": cold, "wall_s": wall,
                            "status_before": before, "status_after": after,
                            "consumer": cstats})

    def warm_up(self, dev: str, what: str) -> None:
        t0 = time.monotonic()
        job = fio(dev, ["--name=warmup", "--rw=write", "--bs=1M", "--iodepth=4"],
                  timeout=300, cwd=self.workdir)[0]
        f = figures(job)
        say(f"warm-up through {what}: wrote the whole device once "
            f"({f['bw_mib']:.0f} MiB/s, {time.monotonic() - t0:.1f} s)")

    # -- the plan
    def main(self) -> None:
        a = self.args
        t0 = time.monotonic()
        self.setup()
        assert self.consumer is not None
        # brd allocates its pages on first write: make both devices start from a full disk
        self.warm_up(self.linear_path, "dm-linear (allocates the RAM disk's pages)")

        if not a.no_cold and "async" in a.variants:
            say("cold: bitmap clean, each write the first to its chunk (one pass per test)")
            self.block("linear", 0, cold=True)
            self.block("async", 0, cold=True)  # the metadata was just formatted: all clean

        # steady state: every chunk dirty and durable
        self.make_repl()
        self.consumer.start("async")
        self.warm_up(self.repl_path, "repl (async consumer): every bitmap bit set")
        self.consumer.stop()
        st = repl_status()
        say(f"bitmap: {st['dirty']}/{st['chunks']} chunks dirty")
        if st["dirty"] != st["chunks"]:
            raise RuntimeError("the warm-up did not dirty every chunk")

        for rep in range(a.reps):
            vs = [v for v in ("linear", "async", "tracking", "sync", "poll") if v in a.variants and
                  rep < (a.reps if v in ("linear", "async") else a.side_reps)]
            if not vs:
                continue
            k = rep % len(vs)
            for v in vs[k:] + vs[:k]:
                self.block(v, rep)
        self.elapsed = time.monotonic() - t0


# ---------------------------------------------------------------- the report


def median_of(results: list[dict[str, Any]], variant: str, test: str, cold: bool,
              key: str) -> float | None:
    # a run that fell behind into tracking is not a streaming figure: reported, not counted
    vals = [r[key] for r in results
            if r["variant"] == variant and r["test"] == test and r["cold"] == cold and key in r
            and not r.get("fell_behind")]
    return statistics.median(vals) if vals else None


def samples(results: list[dict[str, Any]], variant: str, test: str, key: str) -> list[str]:
    """Every steady-state figure; `*` marks a run that fell behind (not in the median)."""
    return [fmt_val(r[key]) + ("*" if r.get("fell_behind") else "") for r in results
            if r["variant"] == variant and r["test"] == test and not r["cold"]]


def ratio(test: str, base: float | None, val: float | None) -> float | None:
    """Fraction of dm-linear's performance; for latency, repl's latency over linear's."""
    if not base or val is None:
        return None
    return val / base


def fmt_ratio(test: str, r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}x" if TESTS[test]["metric"] == "lat_us" else f"{100 * r:.1f}%"


def fmt_val(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}"


def build_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"steady": {}, "cold": {}, "aims": {}}
    present = {r["test"] for r in results}
    for test, t in TESTS.items():
        if test not in present:
            continue
        m = t["metric"]
        row = {v: median_of(results, v, test, False, m) for v in VARIANTS}
        row["more"] = {}
        for key in t.get("more", {}):
            vals = {v: median_of(results, v, test, False, key) for v in VARIANTS}
            vals["ratio"] = {v: ratio(test, vals["linear"], vals[v]) for v in VARIANTS}
            row["more"][key] = vals
        row["records_per_s"] = {v: median_of(results, v, test, False, "records_per_s")
                                for v in STREAMING}
        row["samples"] = {v: samples(results, v, test, m) for v in VARIANTS}
        row["ratio"] = {v: ratio(test, row["linear"], row[v]) for v in VARIANTS}
        summary["steady"][test] = row
        cold = {v: median_of(results, v, test, True, m) for v in ("linear", "async")}
        if cold["async"] is not None:
            cold["ratio"] = ratio(test, cold["linear"], cold["async"])
            summary["cold"][test] = cold
        if test in AIMS:
            r = row["ratio"]["async"]
            summary["aims"][test] = {"aim": AIMS[test], "ratio": r,
                                     "met": r is not None and r >= AIMS[test]}
    return summary


def table(summary: dict[str, Any]) -> list[str]:
    hdr = ["test", "dm-linear", "repl-async", "ratio", "repl-sync", "ratio", "aim", "result"]
    rows = [hdr]
    for test, row in summary["steady"].items():
        t = TESTS[test]
        aim = summary["aims"].get(test)
        rows.append([t["label"], fmt_val(row["linear"]), fmt_val(row["async"]),
                     fmt_ratio(test, row["ratio"]["async"]), fmt_val(row["sync"]),
                     fmt_ratio(test, row["ratio"]["sync"]),
                     f">= {100 * aim['aim']:.0f}%" if aim else "-",
                     ("MET" if aim["met"] else "MISSED") if aim else "(no aim)"])
        for key, label in t.get("more", {}).items():
            m = row["more"][key]
            rows.append([label, fmt_val(m["linear"]), fmt_val(m["async"]),
                         fmt_ratio(test, m["ratio"]["async"]), fmt_val(m["sync"]),
                         fmt_ratio(test, m["ratio"]["sync"]), "-", "(no aim)"])
    for test, cold in summary["cold"].items():
        rows.append([f"cold bitmap: {TESTS[test]['label']}", fmt_val(cold["linear"]),
                     fmt_val(cold["async"]), fmt_ratio(test, cold["ratio"]), "-", "-", "-",
                     "(info)"])
    return render(rows)


def breakdown(summary: dict[str, Any]) -> list[str]:
    hdr = ["set-up"]
    steady = summary["steady"]
    for test in steady:
        hdr += [TESTS[test]["short"], "ratio"]
    if "lat4k" in steady:
        hdr += ["QD1 p50 us", "ratio"]
    rows = [hdr]
    present = {v for s in steady.values() for v in VARIANTS if s[v] is not None}
    for v in ("linear", "tracking", "poll", "async", "sync"):
        if v not in present:
            continue
        row = [VARIANTS[v]]
        for test, s in steady.items():
            row += [fmt_val(s[v]), fmt_ratio(test, s["ratio"][v])]
        if "lat4k" in steady:
            p50 = steady["lat4k"]["more"]["p50_us"]
            row += [fmt_val(p50[v]), fmt_ratio("lat4k", p50["ratio"][v])]
        rows.append(row)
    return render(rows)


def render(rows: list[list[str]]) -> list[str]:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if n == 0:
            out.append("  ".join("-" * x for x in w))
    return out


def environment() -> dict[str, Any]:
    def cmd(*c: str) -> str:
        try:
            return subprocess.run(c, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0]
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent
    ko = repo / "kmod" / "dm-repl.ko"
    try:
        ko_sha = hashlib.sha256(ko.read_bytes()).hexdigest()[:12]
    except OSError:
        ko_sha = ""
    kmod_dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--",
                                 "kmod"], capture_output=True).returncode
    return {"commit": cmd("git", "-C", str(repo), "rev-parse", "--short", "HEAD"),
            "kmod_changed_since_commit": kmod_dirty != 0,
            "module_sha256": ko_sha,
            "module_built": (dt.datetime.fromtimestamp(ko.stat().st_mtime, dt.timezone.utc)
                             .isoformat(timespec="seconds") if ko.exists() else ""),
            "kernel": os.uname().release, "cpus": os.cpu_count(), "memory": mem,
            "fio": cmd("fio", "--version"), "data": DATA, "metadata": META,
            "chunk_bytes": CHUNK_SECTORS * SECTOR, "ring_mb": RING_MB,
            "in_vm": os.environ.get("REPCTL_IN_VM") == "1"}


def dmesg_lines() -> list[str]:
    try:
        return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return []


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--consumer", metavar="DEVICE", help=argparse.SUPPRESS)
    p.add_argument("--runtime", type=int, default=5, help="seconds per measured run (5)")
    p.add_argument("--reps", type=int, default=3,
                   help="runs of dm-linear and repl-async per test (3)")
    p.add_argument("--side-reps", type=int, default=2,
                   help="runs of the other set-ups (sync, tracking, poll) (2)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-bitmap runs")
    p.add_argument("--same-cpu", action="store_true",
                   help="diagnostic: run fio and the consumer on CPU 0 only (no cross-CPU "
                        "wake-ups, but they share one CPU)")
    p.add_argument("--tests", default=",".join(DEFAULT_TESTS),
                   help=f"comma-separated, from {','.join(TESTS)} "
                        f"(default {','.join(DEFAULT_TESTS)})")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {','.join(VARIANTS)} "
                        f"(default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--results", default=os.environ.get("REPCTL_VM_RESULTS", "/tmp/repctl-bench"),
                   help="folder for bench-results.json and bench-table.txt "
                        "($REPCTL_VM_RESULTS, else /tmp/repctl-bench)")
    a = p.parse_args(argv)
    if a.consumer:
        return consumer_main(a.consumer)
    if a.same_cpu:
        FIO_EXTRA.append("--cpus_allowed=0")
    a.tests = [t for t in a.tests.split(",") if t]
    a.variants = [v for v in a.variants.split(",") if v]
    bad = [x for x in a.tests if x not in TESTS] + [x for x in a.variants if x not in VARIANTS]
    if bad:
        p.error(f"unknown test or variant: {', '.join(bad)}")
    if os.geteuid() != 0:
        say("needs root (it creates device-mapper devices on /dev/ram0 and /dev/ram1)")
        return 2

    results_dir = Path(a.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    env = environment()
    changed = " (kmod/ changed since)" if env["kmod_changed_since_commit"] else ""
    say(f"repository {env['commit']}{changed}, dm-repl.ko built {env['module_built']} "
        f"(sha256 {env['module_sha256']})")
    say(f"{started:%Y-%m-%d %H:%M} UTC, kernel {env['kernel']}, {env['cpus']} CPUs, "
        f"{env['fio']}, runtime {a.runtime} s, {a.reps} runs of linear/async, "
        f"{a.side_reps} of the others{', fio and consumer on CPU 0' if a.same_cpu else ''}")
    dmesg_start = len(dmesg_lines())

    b = Bench(a)
    failed = None
    # SIGTERM (a killed VM run) still removes the devices, so that dm_repl can unload
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        b.main()
    except BaseException as e:
        failed = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        b.teardown()

    summary = build_summary(b.results)
    lines = [f"dm-repl benchmark, {started:%Y-%m-%d %H:%M} UTC, kernel {env['kernel']}, "
             f"{env['cpus']} vCPUs, brd; medians of {a.reps} runs (others: {a.side_reps}) "
             f"of {a.runtime} s", ""]
    if b.results:
        lines += table(summary)
        lines += ["", "Breakdown (steady state; ratio: of dm-linear, latency: repl/linear)", ""]
        lines += breakdown(summary)
        lines += ["", "Ring records/s drained by the consumer (median):"]
        for test in summary["steady"]:
            rs = summary["steady"][test]["records_per_s"]
            lines.append(f"  {test:6}  " + "   ".join(
                f"{v} {fmt_val(rs[v])}" for v in STREAMING if rs[v] is not None))
        lines += ["", "Samples (steady state; * fell behind, left out of the medians):"]
        for test in summary["steady"]:
            s = summary["steady"][test]["samples"]
            lines.append(f"  {test:6}  " + "   ".join(
                f"{v}: {', '.join(s[v])}" for v in VARIANTS if s[v]))
        lines.append("")
        for test, aim in summary["aims"].items():
            r = aim["ratio"]
            lines.append(f"AIM {test}: repl-async {fmt_ratio(test, r)} of dm-linear, aim "
                         f">= {100 * aim['aim']:.0f}%: {'MET' if aim['met'] else 'MISSED'}")
        if b.fell_behind:
            lines.append(f"FELL BEHIND in {len(b.fell_behind)} run(s):")
            lines += [f"  {m}" for m in b.fell_behind]
        elif any(r["variant"] in STREAMING for r in b.results):
            lines.append("The repl device stayed in streaming mode through every consumer run.")

    new_kernel = dmesg_lines()[dmesg_start:]
    notable = [ln for ln in new_kernel if "repl" in ln or "device-mapper" in ln
               or "WARNING" in ln or "BUG" in ln]
    if notable:
        lines += ["", "Kernel log during the benchmark:"] + [f"  {ln}" for ln in notable[:40]]
    if b.problems:
        lines += ["", "Problems:"] + [f"  {x}" for x in b.problems]
    if failed:
        lines += ["", f"FAILED: {failed}"]
    elapsed = getattr(b, "elapsed", None)
    if elapsed:
        lines.append(f"(measurements took {elapsed:.0f} s)")

    print("\n".join(lines), flush=True)
    (results_dir / "bench-table.txt").write_text("\n".join(lines) + "\n")
    env["max_sectors_kb"] = b.limits
    raw = {"date": started.isoformat(), "environment": env,
           "config": {"runtime_s": a.runtime, "reps": a.reps, "side_reps": a.side_reps,
                      "tests": {t: TESTS[t] for t in a.tests}, "variants": a.variants,
                      "aims": AIMS, "cold": not a.no_cold, "same_cpu": a.same_cpu},
           "summary": summary, "fell_behind": b.fell_behind, "kernel_log": new_kernel,
           "problems": b.problems, "failed": failed, "blocks": b.blocks, "runs": b.results}
    (results_dir / "bench-results.json").write_text(json.dumps(raw, indent=1) + "\n")
    say(f"raw results in {results_dir / 'bench-results.json'}")
    return 1 if failed or b.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
