#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""repctl against its peers: DRBD 8.4, md raid1 + nbd, dm-linear and the raw device, one table.

Runs INSIDE the test VM (`make bench-peers`: tests/vmrun.py --bench -- --peers, then
bench/run.sh), as root, with dm-mod, kmod/dm-repl.ko and brd (six 256 MiB RAM disks) loaded.
It reuses bench/replicate_bench.py (namespaces rb-src / rb-dst and their veth, the raw socket
copy, the repctl daemons and their initial sync) and bench/target_bench.py (fio and its
figures). See docs/benchmarks-peers.md.

    /dev/ram0  primary data of every set-up (filled with incompressible data first)
    /dev/ram1  primary metadata (DRBD's flex-external meta data, repctl's metadata)
    /dev/ram2  secondary data (DRBD's peer, the nbd export, repctl's target)
    /dev/ram3  DRBD peer's flex-external meta data

Set-ups, one after the other, each holding ram0 (and ram2) alone:

    raw, linear   fio on /dev/ram0 and on dm-linear over it
    raw copy      replicate_bench's Python socket copy ram0 -> ram2 across rb-src -> rb-dst
    drbd          two DRBD 8.4 minors (0: ram0, 1: ram2) joined over the veth pair pdr0/pdr1.
                  DRBD opens its sockets in the initial network namespace (drbd_receiver.c:
                  sock_create_kern(&init_net, ...)), so both ends stay in the root namespace
                  and policy routing sends the traffic between their two addresses over the
                  veth (not through lo). Full syncs at the default resync controller, then
                  unthrottled (c-plan-ahead 0, resync-rate 4000M); fio with protocol C and A;
                  the resync after 1 % of the 4 KiB blocks changed while disconnected
    md            md raid1 (metadata 1.2, internal write-intent bitmap) of ram0 and /dev/nbd0,
                  nbd-server in rb-dst exporting ram2, nbd-client -L in rb-src; the nbd leg
                  write-mostly (sysfs); full recovery, fio, bitmap re-add after 1 % changed
    repctl        replicate_bench's initial sync (alpha in rb-src -> beta in rb-dst), fio with
                  beta async, the resync after 1 % changed while disconnected (repctl
                  disconnect / connect), then beta sync (daemons restarted, state kept) and fio

fio (libaio, O_DIRECT, time based, target_bench's jobs): seq1m (1 MiB writes QD4, MB/s),
rand4k (4 KiB random writes QD16, IOPS), lat4k (4 KiB random writes QD1, mean latency).
Every figure is taken --runs times; the table shows the median and the spread (min-max).

Aims (issue 15), printed as MET or MISSED, never a failure: repctl async >= 90 % of
dm-linear's MB/s and >= 80 % of its IOPS; repctl sync ahead of DRBD protocol C on all three
figures; repctl's initial sync >= the raw copy and >= 2x DRBD at its default rate; resync
bytes on the wire <= 1.05x the bytes changed.

    peers_bench.py [--runs N] [--runtime S] [--only LIST] [--results DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import replicate_bench as rb  # noqa: E402  (sets the pycache prefix before repctl is imported)
import target_bench as tb  # noqa: E402

say_prefix = "peers"
MB = 1_000_000
DATA, META, TDATA, TMETA = "/dev/ram0", "/dev/ram1", "/dev/ram2", "/dev/ram3"
LINEAR = "pb-linear"
TESTS = ["seq1m", "rand4k", "lat4k"]
METRIC = {"seq1m": "mb_s", "rand4k": "iops", "lat4k": "lat_us"}
LABEL = {"seq1m": "1 MiB seq write QD4 (MB/s)", "rand4k": "4 KiB rand write QD16 (IOPS)",
         "lat4k": "4 KiB write QD1 latency (us)"}
SETUPS = {"raw": "raw device", "linear": "dm-linear", "drbd-A": "DRBD 8.4 protocol A",
          "drbd-C": "DRBD 8.4 protocol C", "md": "md raid1 + nbd (bitmap)",
          "repctl-async": "repctl async", "repctl-sync": "repctl sync"}
SYNCS = {"drbd-default": "DRBD default resync rate", "drbd-fast": "DRBD unthrottled",
         "md": "md raid1 + nbd", "repctl": "repctl", "raw": "raw socket copy"}
RESYNCS = {"drbd": "DRBD 8.4", "md": "md raid1 + nbd (bitmap)", "repctl": "repctl"}
PEERS = ("base", "raw", "drbd", "md", "repctl")

# DRBD: both minors in the root namespace, over the veth pair pdr0 (10.77.0.1) / pdr1 (.2)
DRBD_IF = ("pdr0", "pdr1")
DRBD_IP = ("10.77.0.1", "10.77.0.2")
DRBD_PORT = 7800
DRBD_RES = ("pa", "pb")
DRBDSETUP = "/lib/drbd/drbdsetup-84"
# md + nbd
NBD_PORT = 10809
NBD_DEV = "/dev/nbd0"
MD_DEV = "/dev/md0"
ROOT = Path("/tmp/peersbench")


def say(msg: str) -> None:
    print(f"{say_prefix}: {msg}", flush=True)


sh = rb.sh
BenchError = rb.BenchError


def wait_until(pred: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> float:
    """Seconds until pred() is true; BenchError after timeout."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tx_bytes(*devs: str, ns: str | None = None) -> int:
    """Sum of the veth ends' tx_bytes counters (both directions when both ends are given)."""
    total = 0
    for d in devs:
        if ns:
            total += int(sh("ip", "netns", "exec", ns, "cat",
                            f"/sys/class/net/{d}/statistics/tx_bytes").stdout)
        else:
            total += int(Path(f"/sys/class/net/{d}/statistics/tx_bytes").read_text())
    return total


def rb_wire() -> int:
    """Bytes both ways on the rb-src/rb-dst veth (tx of one end + rx of it = tx of both)."""
    v = rb.veth_bytes()
    return v["tx_bytes"] + v["rx_bytes"]


# ---------------------------------------------------------------- fio


def fio_block(dev: str, runtime: float, workdir: Path) -> dict[str, dict[str, float]]:
    """The three tests in one fio process (fio takes seconds to start here), one after the
    other; {test: figures}."""
    args: list[str] = []
    for i, test in enumerate(TESTS):
        args += [f"--name={test}", *tb.TESTS[test]["args"], f"--runtime={runtime:g}",
                 "--time_based"]
        if i:
            args.append("--stonewall")
    jobs = tb.fio(dev, args, timeout=runtime * len(TESTS) * 4 + 180, cwd=workdir)
    out = {}
    for job in jobs:
        f = tb.figures(job)
        f["mb_s"] = job["write"]["bw_bytes"] / MB
        out[job["jobname"]] = f
    return out


def change_blocks(dev: str, fraction: float, workdir: Path) -> dict[str, Any]:
    """Write `fraction` of dev's 4 KiB blocks, each once (fio's random map), fresh random
    data; the bytes written."""
    blocks = rb.device_bytes(dev) // 4096
    n = max(1, int(blocks * fraction))
    jobs = tb.fio(dev, ["--name=change", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                        f"--number_ios={n}", "--randrepeat=0", "--refill_buffers"],
                  timeout=300, cwd=workdir)
    written = jobs[0]["write"]["io_bytes"]
    if written != n * 4096:
        raise BenchError(f"fio wrote {written} bytes, not {n} blocks of 4 KiB")
    return {"blocks": n, "of_blocks": blocks, "bytes": written}


# ---------------------------------------------------------------- the bench


class Peers:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results = Path(args.results).resolve()
        self.results.mkdir(parents=True, exist_ok=True)
        self.workdir = ROOT / "fio"
        shutil.rmtree(ROOT, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        # replicate_bench's Bench: namespaces, veth, fill, raw copy, repctl cluster
        self.rb = rb.Bench(argparse.Namespace(results=str(self.results / "replicate"),
                                              runtime=args.runtime, ring_size="64MiB",
                                              poll=0.5, sha256=False))
        self.fio: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in SETUPS}
        self.syncs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYNCS}
        self.resyncs: dict[str, list[dict[str, Any]]] = {s: [] for s in RESYNCS}
        self.cpu: dict[str, list[dict[str, Any]]] = {}
        self.notes: list[str] = []
        self.undo: list[tuple[str, Callable[[], None]]] = []
        self.failed: list[str] = []
        self.profiled: dict[str, dict[str, dict[str, float]]] = {}
        self.peer_s: dict[str, float] = {}
        self.size = 0

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"NOTE: {text}")

    def cleanup(self) -> list[str]:
        problems = []
        while self.undo:
            what, fn = self.undo.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (reported)
                problems.append(f"{what}: {e}")
        return problems

    def measure(self, setup: str, dev: str, check: Callable[[], None] | None = None,
                cpu_pids: dict[str, int] | None = None, profiled: bool = False) -> None:
        """One fio block on dev as set-up `setup`; check() before and after (a peer that is
        not replicating gives no figure). For repctl, a run during which the target left
        streaming (fell behind into its bitmap) is noted: the writer's figure stands, but
        the target was not kept up to date all along."""
        if check:
            check()
        cpu = rb.CpuMeter(cpu_pids) if cpu_pids else None
        t0 = time.time()
        profilers = self.start_profilers(setup, cpu_pids) if cpu_pids and profiled else []
        try:
            figs = fio_block(dev, self.args.runtime, self.workdir)
        finally:
            self.stop_profilers(setup, profilers)
        if setup.startswith("repctl") and self.rb.cluster is not None:
            ev = [e for e in self.rb.cluster.events_since("alpha", t0)
                  if e.get("what") == "fell_behind"
                  or (e.get("what") == "state" and e.get("new") != "streaming")]
            if ev:
                self.note(f"{SETUPS[setup]} run {len(self.fio[setup]) + 1}: beta left "
                          f"streaming: {rb.state_events(ev[:4])}")
        if cpu:
            self.cpu.setdefault(setup + (" (profiled)" if profiled else ""), []).append(
                cpu.stop())
        if check:
            check()
        if profiled:  # the profilers cost CPU: kept apart, not in the table
            self.profiled[setup] = figs
            say(f"{SETUPS[setup]:26} profiled run: {figs['seq1m']['mb_s']:7.1f} MB/s  "
                f"{figs['rand4k']['iops']:7.0f} IOPS  {figs['lat4k']['lat_us']:7.1f} us")
            return
        self.fio[setup].append(figs)
        say(f"{SETUPS[setup]:26} run {len(self.fio[setup])}: "
            f"{figs['seq1m']['mb_s']:7.1f} MB/s  {figs['rand4k']['iops']:7.0f} IOPS  "
            f"{figs['lat4k']['lat_us']:7.1f} us"
            + (f"  ({rb.fmt_cpu(self.cpu[setup][-1])})" if cpu else ""))

    # -- --profile: py-spy on the daemons, perf on the whole guest, during a repctl fio block
    def start_profilers(self, setup: str, pids: dict[str, int]) -> list[tuple[str, Any]]:
        if not self.args.profile:
            return []
        n = "profiled"
        out = self.results / "profile"
        out.mkdir(exist_ok=True)
        secs = str(int(self.args.runtime * len(TESTS) + 8))
        procs: list[tuple[str, Any]] = []
        spy = shutil.which("py-spy") or str(rb.REPO / ".venv" / "bin" / "py-spy")
        if Path(spy).exists():
            for node, pid in pids.items():
                procs.append(("py-spy", subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--duration", secs, "--rate", "250",
                     "--idle", "--threads", "--format", "raw", "--nonblocking",
                     "--output", str(out / f"pyspy-{setup}-{n}-{node}.txt")],
                    stdout=subprocess.DEVNULL, stderr=open(out / f"pyspy-{node}.log", "a"))))
        if shutil.which("perf"):
            procs.append(("perf", subprocess.Popen(
                ["perf", "record", "-a", "-g", "-e", "cpu-clock", "-F", "499",
                 "-o", str(out / f"perf-{setup}-{n}.data"), "--", "sleep", secs],
                stdout=subprocess.DEVNULL, stderr=open(out / "perf.log", "a"))))
        time.sleep(2)  # attached before fio starts
        return procs

    def stop_profilers(self, setup: str, procs: list[tuple[str, Any]]) -> None:
        n = "profiled"
        out = self.results / "profile"
        for name, p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
                p.wait(30)
            if name == "perf":
                data = out / f"perf-{setup}-{n}.data"
                rep = sh("perf", "report", "-i", str(data), "--stdio", "--no-children",
                         "--sort", "comm,dso,sym", "-g", "none", "--percent-limit", "0.5",
                         check=False, timeout=300)
                (out / f"perf-{setup}-{n}.txt").write_text(rep.stdout + rep.stderr)
                data.unlink(missing_ok=True)

    # -- base: raw device and dm-linear, interleaved
    def base(self) -> None:
        from repctl import dm

        for _ in range(self.args.runs):
            self.measure("raw", DATA)
            dm.create_device(LINEAR, [dm.Target(0, self.size // 512, "linear", f"{DATA} 0")])
            try:
                self.measure("linear", f"/dev/mapper/{LINEAR}")
            finally:
                dm.remove_device(LINEAR, retries=50)

    # -- the raw socket copy (replicate_bench's), the initial sync's yardstick
    def raw(self) -> None:
        for i in range(self.args.runs):
            r = self.rb.raw_copy(f"raw{i + 1}", TDATA, verify=(i == 0))
            self.syncs["raw"].append({"seconds": r["seconds"], "bytes": self.size,
                                      "mb_s": self.size / MB / r["seconds"],
                                      "wire_bytes": r["wire_bytes"]})

    # -- DRBD 8.4
    def drbd_net(self) -> None:
        a, b = DRBD_IF
        ia, ib = DRBD_IP
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        self.undo.append(("deleting the DRBD veth", lambda: sh("ip", "link", "del", a)))
        macs = {}
        for dev, ip in zip(DRBD_IF, DRBD_IP):
            sh("ip", "addr", "add", f"{ip}/32", "dev", dev)
            sh("ip", "link", "set", dev, "up")
            macs[dev] = json.loads(sh("ip", "-j", "link", "show", dev).stdout)[0]["address"]
        # both addresses are local: without this, traffic between them would go through lo.
        # Locally made packets to the other address leave through its veth end (rules on
        # iif lo, before the local table); arriving, they are local (accept_local: their
        # source address is one of ours too).
        for k in ("all", "default", a, b):
            sh("sysctl", "-qw", f"net.ipv4.conf.{k}.accept_local=1",
               f"net.ipv4.conf.{k}.rp_filter=0")
        for pref, (dst, dev, src, table) in enumerate(((ib, a, ia, 177), (ia, b, ib, 178))):
            sh("ip", "route", "add", f"{dst}/32", "dev", dev, "src", src, "table", str(table))
            sh("ip", "rule", "add", "pref", str(100 + pref), "iif", "lo", "to", f"{dst}/32",
               "lookup", str(table))
        sh("ip", "neigh", "replace", ib, "lladdr", macs[b], "dev", a, "nud", "permanent")
        sh("ip", "neigh", "replace", ia, "lladdr", macs[a], "dev", b, "nud", "permanent")
        sh("ip", "rule", "add", "pref", "1000", "lookup", "local")
        sh("ip", "rule", "del", "pref", "0", "lookup", "local")

        def restore() -> None:
            sh("ip", "rule", "add", "pref", "0", "lookup", "local", check=False)
            sh("ip", "rule", "del", "pref", "1000", "lookup", "local", check=False)
            for pref in (100, 101):
                sh("ip", "rule", "del", "pref", str(pref), check=False)

        self.undo.append(("restoring the routing rules", restore))
        # check that the traffic takes the veth
        t0 = tx_bytes(a)
        with socket.create_server((ib, DRBD_PORT + 1)) as ls:
            got = [0]

            def receive() -> None:
                conn, _ = ls.accept()
                with conn:
                    while n := len(conn.recv(1 << 20)):
                        got[0] += n

            t = threading.Thread(target=receive, daemon=True)
            t.start()
            with socket.create_connection((ib, DRBD_PORT + 1), timeout=10,
                                          source_address=(ia, 0)) as c:
                c.sendall(bytes(1 << 20))
            t.join(10)
        if got[0] != 1 << 20 or tx_bytes(a) - t0 < 1 << 20:
            raise BenchError(f"1 MiB from {ia} to {ib} did not cross {a}: "
                             f"{tx_bytes(a) - t0} bytes")

    @staticmethod
    def drbd_state() -> dict[int, dict[str, str]]:
        """/proc/drbd per minor: connection state, roles, disk states, protocol, and the
        KiB out of sync (oos)."""
        text = Path("/proc/drbd").read_text()
        return {int(m[1]): {"cs": m[2], "ro": m[3], "ds": m[4], "proto": m[5],
                            "oos": int(m[6]) if m[6] else -1}
                for m in re.finditer(r"^\s*(\d+): cs:(\S+) ro:(\S+) ds:(\S+) (\S)"
                                     r"[^\n]*\n(?:[^\n]*?oos:(\d+))?", text, re.M)}

    def drbd_ok(self, proto: str | None = None) -> bool:
        st = self.drbd_state().get(0)
        return bool(st and st["cs"] == "Connected" and st["ds"] == "UpToDate/UpToDate"
                    and st["oos"] == 0 and (proto is None or st["proto"] == proto))

    def drbd_check(self, proto: str) -> Callable[[], None]:
        def check() -> None:
            if not self.drbd_ok(proto):
                raise BenchError(f"DRBD is not Connected UpToDate/UpToDate protocol {proto}:\n"
                                 + Path("/proc/drbd").read_text())
        return check

    def drbd_connect(self, proto: str) -> None:
        for i, res in enumerate(DRBD_RES):
            sh(DRBDSETUP, "connect", res, f"ipv4:{DRBD_IP[i]}:{DRBD_PORT}",
               f"ipv4:{DRBD_IP[1 - i]}:{DRBD_PORT}", f"--protocol={proto}")

    def drbd_disconnect(self) -> None:
        for i in range(2):
            sh(DRBDSETUP, "disconnect", f"ipv4:{DRBD_IP[i]}:{DRBD_PORT}",
               f"ipv4:{DRBD_IP[1 - i]}:{DRBD_PORT}")
        wait_until(lambda: all(s["cs"] == "StandAlone" for s in self.drbd_state().values()),
                   30, "DRBD StandAlone")

    def drbd_full_sync(self, tag: str, first: bool) -> None:
        t0 = time.monotonic()
        w0 = tx_bytes(*DRBD_IF)
        if first:  # both Inconsistent: make minor 0 the primary, the sync source
            sh(DRBDSETUP, "primary", "0", "--force")
        else:
            sh(DRBDSETUP, "invalidate-remote", "0")
        wait_until(lambda: self.drbd_state()[0]["cs"] != "Connected", 10,
                   "DRBD to start its sync")
        wait_until(lambda: self.drbd_ok(), 900, f"DRBD's sync ({tag})")
        s = time.monotonic() - t0
        r = {"seconds": s, "bytes": self.size, "mb_s": self.size / MB / s,
             "wire_bytes": tx_bytes(*DRBD_IF) - w0}
        self.syncs[tag].append(r)
        say(f"{SYNCS[tag]}: {self.size >> 20} MiB in {s:.2f} s: {r['mb_s']:.1f} MB/s")

    def drbd(self) -> None:
        sh("modprobe", "drbd", "usermode_helper=/bin/true")
        ver = Path("/proc/drbd").read_text().splitlines()[0]
        say(f"DRBD: {ver}; two minors in the root namespace over {DRBD_IF[0]}/{DRBD_IF[1]}")
        self.drbd_net()
        for minor, (res, data, meta) in enumerate(zip(DRBD_RES, (DATA, TDATA), (META, TMETA))):
            sh("drbdmeta", "--force", str(minor), "v08", meta, "flex-external", "create-md",
               env={**rb.CHILD_ENV, "PATH": "/lib/drbd:" + os.environ["PATH"]})
            sh(DRBDSETUP, "new-resource", res)
            self.undo.append((f"drbdsetup down {res}",
                              lambda r=res: sh(DRBDSETUP, "down", r)))
            sh(DRBDSETUP, "new-minor", res, str(minor), "0")
            sh(DRBDSETUP, "attach", str(minor), data, meta, "flexible")
        self.drbd_connect("C")
        wait_until(lambda: all(s["cs"] == "Connected" for s in self.drbd_state().values()),
                   60, "DRBD Connected")
        say("DRBD defaults: " + " ".join(
            ln.strip() for ln in sh(DRBDSETUP, "show", "--show-defaults", "pa").stdout
            .splitlines() if re.search(r"resync-rate|c-plan-ahead|c-max-rate|c-fill-target"
                                       r"|protocol", ln)))
        for i in range(self.args.runs):
            self.drbd_full_sync("drbd-default", first=(i == 0))
        for minor in (0, 1):
            sh(DRBDSETUP, "disk-options", str(minor), "--c-plan-ahead=0",
               "--resync-rate=4000M")
        for _ in range(self.args.runs):
            self.drbd_full_sync("drbd-fast", first=False)
        for minor in (0, 1):  # back to the defaults for the rest
            sh(DRBDSETUP, "disk-options", str(minor), "--set-defaults")
        for _ in range(self.args.runs):
            for proto in ("C", "A"):
                if not self.drbd_ok(proto):
                    self.drbd_disconnect()
                    self.drbd_connect(proto)
                    wait_until(lambda p=proto: self.drbd_ok(p), 60,
                               f"DRBD connected with protocol {proto}")
                self.measure(f"drbd-{proto}", "/dev/drbd0", self.drbd_check(proto))
        if not self.drbd_ok("C"):
            self.drbd_disconnect()
            self.drbd_connect("C")
            wait_until(lambda: self.drbd_ok("C"), 60, "DRBD connected with protocol C")
        # the resync after 1 % changed while disconnected
        for _ in range(self.args.runs):
            self.drbd_disconnect()
            ch = change_blocks("/dev/drbd0", self.args.change, self.workdir)
            w0 = tx_bytes(*DRBD_IF)
            t0 = time.monotonic()
            self.drbd_connect("C")
            wait_until(lambda: self.drbd_state()[0]["cs"] != "StandAlone", 30, "DRBD to connect")
            wait_until(lambda: self.drbd_ok("C"), 300, "DRBD's resync")
            self.resync_result("drbd", ch, tx_bytes(*DRBD_IF) - w0, time.monotonic() - t0)

    def resync_result(self, peer: str, ch: dict[str, Any], wire: int, s: float) -> None:
        r = {**ch, "wire_bytes": wire, "seconds": s, "ratio": wire / ch["bytes"]}
        self.resyncs[peer].append(r)
        say(f"{RESYNCS[peer]}: {ch['blocks']} of {ch['of_blocks']} 4 KiB blocks changed "
            f"({ch['bytes']} bytes); resync: {wire} bytes on the wire ({r['ratio']:.3f}x), "
            f"{s:.2f} s")

    # -- md raid1 + nbd
    def md_sync_done(self) -> bool:
        md = Path("/sys/block/md0/md")
        return ((md / "sync_action").read_text().strip() == "idle"
                and (md / "degraded").read_text().strip() == "0")

    def md_add(self, how: str) -> float:
        """Add the nbd leg (--add: full recovery; --re-add: the bitmap's chunks) and wait
        until in sync; the seconds."""
        t0 = time.monotonic()
        sh("mdadm", MD_DEV, how, NBD_DEV)
        wait_until(lambda: Path("/sys/block/md0/md/sync_action").read_text().strip() != "idle"
                   or self.md_sync_done(), 10, "md's recovery to start", 0.01)
        wait_until(self.md_sync_done, 900, "md's recovery")
        s = time.monotonic() - t0
        Path("/sys/block/md0/md/dev-nbd0/state").write_text("writemostly\n")
        return s

    def md_remove(self) -> None:
        sh("mdadm", MD_DEV, "--fail", NBD_DEV)
        wait_until(lambda: sh("mdadm", MD_DEV, "--remove", NBD_DEV, check=False).returncode
                   == 0, 30, "mdadm --remove", 0.2)

    def md_check(self) -> None:
        md = Path("/sys/block/md0/md")
        if not self.md_sync_done() or "write_mostly" not in (md / "dev-nbd0/state").read_text():
            raise BenchError("md0 is degraded, syncing, or the nbd leg is not write-mostly: "
                             + Path("/proc/mdstat").read_text())

    def md(self) -> None:
        sh("modprobe", "-a", "nbd", "raid1")
        conf = ROOT / "nbd-server.conf"
        conf.write_text(f"[generic]\n    user = root\n    group = root\n"
                        f"    listenaddr = {rb.DST_IP}\n    port = {NBD_PORT}\n"
                        f"[peers]\n    exportname = {TDATA}\n")
        srv = subprocess.Popen(["ip", "netns", "exec", rb.DST_NS, "nbd-server", "-d", "-C",
                                str(conf)], stdout=open(self.results / "nbd-server.log", "w"),
                               stderr=subprocess.STDOUT)

        def stop_server() -> None:
            srv.terminate()
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()

        self.undo.append(("stopping nbd-server", stop_server))
        time.sleep(1)
        deadline = time.monotonic() + 30
        while True:
            p = sh("ip", "netns", "exec", rb.SRC_NS, "nbd-client", rb.DST_IP, str(NBD_PORT),
                   NBD_DEV, "-N", "peers", "-L", "-b", "4096", check=False, timeout=60)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline or srv.poll() is not None:
                raise BenchError(f"nbd-client: {p.stdout}{p.stderr}")
            time.sleep(0.5)
        self.undo.append(("nbd-client -d", lambda: sh("nbd-client", "-d", NBD_DEV)))
        wait_until(lambda: rb.device_bytes(NBD_DEV) > 0, 30, f"{NBD_DEV} to have a size")
        sh("mdadm", "--zero-superblock", DATA, check=False)
        # the finest bitmap mdadm takes: it gives an internal bitmap 4 KiB of room on a
        # device of this size (super1.c, choose_bm_space), too little for 4 KiB chunks
        for chunk in dict.fromkeys((self.args.md_bitmap_chunk, "8K", "16K", "32K", "64K")):
            p = sh("mdadm", "--create", MD_DEV, "--run", "--level=1", "--raid-devices=2",
                   "--metadata=1.2", "--data-offset=1M", "--bitmap=internal",
                   f"--bitmap-chunk={chunk}", DATA, "missing", check=False)
            if p.returncode == 0:
                break
            say(f"mdadm --create with bitmap chunk {chunk}: {p.stderr.strip()}")
        else:
            raise BenchError("mdadm --create failed")
        self.undo.append(("mdadm --stop", lambda: (sh("mdadm", "--stop", MD_DEV),
                                                   sh("mdadm", "--zero-superblock", DATA,
                                                      check=False))))
        md_bytes = int(Path("/sys/block/md0/size").read_text()) * 512
        mdsys = Path("/sys/block/md0/md")
        self.note(f"md's write-intent bitmap chunk: "
                  f"{(mdsys / 'bitmap/chunksize').read_text().strip()} bytes (the finest "
                  f"mdadm --create takes here); md0 is {md_bytes} bytes")
        say(f"md: {MD_DEV} {md_bytes >> 20} MiB of {self.size >> 20} (metadata 1.2, bitmap "
            f"chunk {(mdsys / 'bitmap/chunksize').read_text().strip()} bytes); sync speed "
            f"limits {Path('/proc/sys/dev/raid/speed_limit_min').read_text().strip()}-"
            f"{Path('/proc/sys/dev/raid/speed_limit_max').read_text().strip()} KiB/s")
        for i in range(self.args.runs):
            if i:
                self.md_remove()
                sh("mdadm", "--zero-superblock", NBD_DEV)
            w0 = rb_wire()
            s = self.md_add("--add")
            r = {"seconds": s, "bytes": md_bytes, "mb_s": md_bytes / MB / s,
                 "wire_bytes": rb_wire() - w0}
            self.syncs["md"].append(r)
            say(f"md recovery onto the nbd leg: {md_bytes >> 20} MiB in {s:.2f} s: "
                f"{r['mb_s']:.1f} MB/s")
        for _ in range(self.args.runs):
            self.measure("md", MD_DEV, self.md_check)
        for _ in range(self.args.runs):
            self.md_remove()
            ch = change_blocks(MD_DEV, self.args.change, self.workdir)
            w0 = rb_wire()
            s = self.md_add("--re-add")
            self.resync_result("md", ch, rb_wire() - w0, s)
        self.cleanup()

    # -- repctl
    def repctl(self) -> None:
        for i in range(self.args.runs):
            if self.rb.cluster is not None:
                self.rb.cluster.stop_all()
                from repctl import dm
                dm.remove_device(rb.RES, retries=50)
            rb.zero_device(TDATA)  # the initial sync must find nothing there
            self.rb.initial_sync()
            p = self.rb.out["phases"]["initial_sync"]
            self.rb.out["phases"][f"initial_sync{i + 1}"] = p
            self.syncs["repctl"].append({"seconds": p["seconds"], "bytes": self.size,
                                         "mb_s": self.size / MB / p["seconds"],
                                         "wire_bytes": p["wire_bytes"]})
        c = self.rb.cluster
        assert c is not None
        dev = rb.DEV

        def converged() -> None:
            c.wait_converged()

        for _ in range(self.args.runs):
            self.measure("repctl-async", dev, converged, cpu_pids=c.pids)
        if self.args.profile:
            self.measure("repctl-async", dev, converged, cpu_pids=c.pids, profiled=True)
        for _ in range(self.args.runs):
            c.repctl("alpha", "disconnect", rb.RES, "beta")
            wait_until(lambda: c.link()["state"] == "disconnected", 30, "repctl disconnected")
            ch = change_blocks(dev, self.args.change, self.workdir)
            w0 = rb_wire()
            t0 = time.monotonic()
            c.repctl("alpha", "connect", rb.RES, "beta")
            wait_until(lambda: c.link()["state"] != "disconnected", 30, "repctl connecting")
            c.wait_converged()
            self.resync_result("repctl", ch, rb_wire() - w0, time.monotonic() - t0)
        # as replicate_bench's linear phase does before it: both daemons stopped and r0
        # removed; the restart finds the same generation and a clean bitmap (no resync)
        c.stop_all()
        from repctl import dm
        dm.remove_device(rb.RES, retries=50)
        self.rb.restart_sync_mode()
        for _ in range(self.args.runs):
            self.measure("repctl-sync", dev, converged, cpu_pids=c.pids)
        if self.args.profile:
            self.measure("repctl-sync", dev, converged, cpu_pids=c.pids, profiled=True)
        self.rb.check(dev, TDATA, "repctl, at the end")

    # -- the plan
    def run(self) -> int:
        a = self.args
        t0 = time.monotonic()
        rc = 0
        failed = None
        dmesg_start = len(rb.dmesg_lines())
        try:
            self.rb.preflight()
            self.size = self.rb.size
            for d in (TDATA, TMETA):
                if rb.device_bytes(d) != self.size:
                    raise BenchError(f"{d} and {DATA} differ in size")
            self.rb.make_net()
            self.rb.fill()
            sh("blkdiscard", "-z", TMETA, timeout=300)
            for peer in PEERS:
                if peer not in a.only:
                    continue
                say(f"---- {peer}")
                t1 = time.monotonic()
                try:
                    getattr(self, peer)()
                except Exception as e:  # noqa: BLE001 (reported; the other set-ups still run)
                    if not isinstance(e, BenchError):
                        traceback.print_exc()
                    self.failed.append(f"{peer}: {type(e).__name__}: {e}")
                    say(f"FAILED: {peer}: {e}")
                finally:
                    problems = self.cleanup()
                    if problems:
                        raise BenchError(f"cleaning up after {peer}: {'; '.join(problems)}")
                self.peer_s[peer] = time.monotonic() - t1
                say(f"---- {peer}: {self.peer_s[peer]:.0f} s")
        except Exception as e:  # noqa: BLE001 (reported, exit 1)
            rc = 1
            failed = f"{type(e).__name__}: {e}"
            if not isinstance(e, BenchError):
                traceback.print_exc()
            say(f"FAILED: {e}")
        finally:
            problems = self.cleanup() + self.rb.teardown()
            for p in problems:
                say(f"teardown: {p}")
            if problems:
                rc = 1
        new = rb.dmesg_lines()[dmesg_start:]
        bad = [ln for ln in new if any(b in ln for b in rb.KERNEL_BAD)]
        if bad:
            rc = 1
            say("kernel log problems:\n  " + "\n  ".join(bad[:40]))
        elapsed = time.monotonic() - t0
        summary = summarise(self)
        lines = report(self, summary, elapsed)
        if failed:
            self.failed.append(failed)
        if self.failed:
            rc = 1
            lines += [""] + [f"FAILED: {f}" for f in self.failed]
        lines.append("seconds per set-up: " + ", ".join(f"{k} {v:.0f}"
                                                        for k, v in self.peer_s.items()))
        print("\n" + "\n".join(lines) + "\n", flush=True)
        (self.results / "peers-table.txt").write_text("\n".join(lines) + "\n")
        raw = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "environment": tb.environment(), "machine": machine(),
               "config": {"runs": a.runs, "runtime_s": a.runtime, "change": a.change,
                          "md_bitmap_chunk": a.md_bitmap_chunk, "only": a.only,
                          "profile": a.profile,
                          "device_bytes": self.size},
               "summary": summary, "fio": self.fio, "syncs": self.syncs,
               "resyncs": self.resyncs, "cpu": self.cpu, "notes": self.notes,
               "seconds_per_setup": self.peer_s, "profiled_runs": self.profiled,
               "replicate": self.rb.out, "kernel_log": new[-200:], "failed": self.failed,
               "elapsed_s": elapsed}
        (self.results / "peers-results.json").write_text(
            json.dumps(raw, indent=1, default=str) + "\n")
        say(f"results in {self.results}; {elapsed:.0f} s; exit {rc}")
        return rc


# ---------------------------------------------------------------- the report


def spread(vals: list[float]) -> dict[str, float] | None:
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def summarise(p: Peers) -> dict[str, Any]:
    s: dict[str, Any] = {"fio": {}, "sync": {}, "resync": {}, "aims": []}
    for test in TESTS:
        m = METRIC[test]
        s["fio"][test] = {k: spread([run[test][m] for run in runs])
                          for k, runs in p.fio.items() if runs}
    s["sync"] = {k: spread([r["mb_s"] for r in v]) for k, v in p.syncs.items() if v}
    s["resync"] = {k: {**spread([r["wire_bytes"] for r in v]),  # type: ignore[dict-item]
                       "changed": v[0]["bytes"]} for k, v in p.resyncs.items() if v}

    def med(section: str, test: str | None, key: str) -> float | None:
        d = s[section][test] if test else s[section]
        return d[key]["median"] if d.get(key) else None

    def aim(what: str, val: float | None, base: float | None, need: float,
            lower_better: bool = False) -> None:
        if val is None or not base:
            s["aims"].append({"aim": what, "result": "not measured"})
            return
        r = val / base
        met = r <= need if lower_better else r >= need
        s["aims"].append({"aim": what, "ratio": r, "result": "MET" if met else "MISSED"})

    aim("repctl async >= 90 % of dm-linear's MB/s", med("fio", "seq1m", "repctl-async"),
        med("fio", "seq1m", "linear"), 0.90)
    aim("repctl async >= 80 % of dm-linear's IOPS", med("fio", "rand4k", "repctl-async"),
        med("fio", "rand4k", "linear"), 0.80)
    for test in TESTS:
        lower = METRIC[test] == "lat_us"
        aim(f"repctl sync ahead of DRBD protocol C: {LABEL[test]}",
            med("fio", test, "repctl-sync"), med("fio", test, "drbd-C"), 1.0, lower)
    aim("repctl initial sync >= the raw copy", med("sync", None, "repctl"),
        med("sync", None, "raw"), 1.0)
    aim("repctl initial sync >= 2x DRBD at its default rate", med("sync", None, "repctl"),
        med("sync", None, "drbd-default"), 2.0)
    r = s["resync"].get("repctl")
    aim("repctl: resync bytes <= 1.05x changed", r["median"] if r else None,
        r["changed"] if r else None, 1.05, lower_better=True)
    return s


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def fmt_bytes(v: float) -> str:
    return f"{v / 2**20:.2f} MiB"


def fmt_ratio(v: float | None, base: float | None) -> str:
    return "-" if v is None or not base else f"{v / base:.2f}x"


def report(p: Peers, s: dict[str, Any], elapsed: float) -> list[str]:
    env = machine()
    head = [f"repctl and its peers, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"{env['guest_cpus']} vCPUs, {env['guest_memory']}, kernel {env['kernel']}, "
            f"{env['emulation']}; guest CPU {env['cpu_model']}",
            f"brd RAM disks of {p.size >> 20} MiB; medians of {p.args.runs} runs (min-max); "
            f"fio {p.args.runtime:g} s per job; measurements took {elapsed:.0f} s", ""]
    rows = [["figure / set-up", "median", "min-max", "vs dm-linear", "vs DRBD C", "aim"]]
    aims = {a["aim"]: a for a in s["aims"]}

    def verdict(name: str) -> str:
        a = aims.get(name)
        return "" if a is None else a["result"]

    for test in TESTS:
        rows.append([LABEL[test], "", "", "", "", ""])
        fig = s["fio"][test]
        lin = fig.get("linear", {}).get("median") if fig.get("linear") else None
        drbd = fig.get("drbd-C", {}).get("median") if fig.get("drbd-C") else None
        for k, name in SETUPS.items():
            f = fig.get(k)
            if not f:
                continue
            v = ""
            if k == "repctl-async" and test != "lat4k":
                n = ("repctl async >= 90 % of dm-linear's MB/s" if test == "seq1m" else
                     "repctl async >= 80 % of dm-linear's IOPS")
                v = f"{'>= 0.90x' if test == 'seq1m' else '>= 0.80x'} linear {verdict(n)}"
            if k == "repctl-sync":
                v = (f"{'<' if test == 'lat4k' else '>'} DRBD C "
                     f"{verdict(f'repctl sync ahead of DRBD protocol C: {LABEL[test]}')}")
            rows.append([f"  {name}", fmt(f["median"]), f"{fmt(f['min'])}-{fmt(f['max'])}",
                         fmt_ratio(f["median"], lin), fmt_ratio(f["median"], drbd), v])
    rows.append([f"initial full sync of {p.size >> 20} MiB (MB/s)", "", "", "vs raw copy",
                 "vs DRBD dflt", ""])
    raw = s["sync"].get("raw", {}).get("median") if s["sync"].get("raw") else None
    dd = (s["sync"].get("drbd-default", {}).get("median") if s["sync"].get("drbd-default")
          else None)
    for k, name in SYNCS.items():
        f = s["sync"].get(k)
        if not f:
            continue
        v = ""
        if k == "repctl":
            v = (f">= raw {verdict('repctl initial sync >= the raw copy')}, >= 2x DRBD "
                 f"{verdict('repctl initial sync >= 2x DRBD at its default rate')}")
        rows.append([f"  {name}", fmt(f["median"]), f"{fmt(f['min'])}-{fmt(f['max'])}",
                     fmt_ratio(f["median"], raw), fmt_ratio(f["median"], dd), v])
    ch = next((r["changed"] for r in s["resync"].values()), None)
    rows.append([f"resync, {p.args.change * 100:g} % of 4 KiB blocks changed (wire bytes)",
                 "", "", "vs changed", "vs DRBD", ""])
    if ch:
        rows.append(["  bytes changed", fmt_bytes(ch), "", "1.00x", "", ""])
    dr = s["resync"].get("drbd", {}).get("median") if s["resync"].get("drbd") else None
    for k, name in RESYNCS.items():
        f = s["resync"].get(k)
        if not f:
            continue
        rows.append([f"  {name}", fmt_bytes(f["median"]),
                     f"{f['min'] / 2**20:.2f}-{f['max'] / 2**20:.2f}",
                     fmt_ratio(f["median"], f["changed"]), fmt_ratio(f["median"], dr),
                     f"<= 1.05x {verdict('repctl: resync bytes <= 1.05x changed')}"
                     if k == "repctl" else ""])
    lines = head + tb.render(rows)
    lines += ["", "Aims (a miss is reported, not a failure):"]
    for a in s["aims"]:
        r = f" ({a['ratio']:.2f}x)" if "ratio" in a else ""
        lines.append(f"  {a['result']:12} {a['aim']}{r}")
    if p.cpu:
        lines += ["", "CPU seconds during the repctl fio runs (per process, median run):"]
        for k, runs in p.cpu.items():
            tops = sorted(runs, key=lambda c: c["wall_s"])[len(runs) // 2]
            name, _, extra = k.partition(" ")
            lines.append(f"  {SETUPS.get(name, name)}{' ' + extra if extra else ''}: "
                         + rb.fmt_cpu(tops))
    if p.profiled:
        lines += ["", "Profiled runs (py-spy and perf attached; not in the table):"]
        for k, figs in p.profiled.items():
            lines.append(f"  {SETUPS[k]}: {figs['seq1m']['mb_s']:.1f} MB/s, "
                         f"{figs['rand4k']['iops']:.0f} IOPS, {figs['lat4k']['lat_us']:.1f} us")
    if p.notes:
        lines += ["", "Notes:"] + [f"  {n}" for n in p.notes]
    return lines


def machine() -> dict[str, Any]:
    cpu = ""
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name"):
            cpu = ln.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
    if "QEMU" in cpu:
        hyp = "QEMU software emulation (TCG)"
    else:
        hyp = sh("systemd-detect-virt", check=False).stdout.strip() or "unknown"
    return {"cpu_model": cpu, "guest_cpus": os.cpu_count(),
            "guest_memory": f"{int(mem[1]) // 1024} MiB", "kernel": os.uname().release,
            "emulation": hyp}


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of every figure (default 3)")
    ap.add_argument("--runtime", type=float, default=3, help="seconds per fio job (default 3)")
    ap.add_argument("--only", default=",".join(PEERS),
                    help=f"comma-separated set-ups, from {','.join(PEERS)} (default all)")
    ap.add_argument("--change", type=float, default=0.01,
                    help="fraction of 4 KiB blocks changed while disconnected (default 0.01)")
    ap.add_argument("--profile", action="store_true",
                    help="one more fio block each of repctl async and sync, not in the "
                         "table, under py-spy record of both daemons (raw collapsed stacks, "
                         "idle threads included) and perf record -a; in RESULTS/profile/")
    ap.add_argument("--md-bitmap-chunk", default="4K",
                    help="md's write-intent bitmap chunk (default 4K: DRBD's and repctl's "
                         "granularity)")
    ap.add_argument("--results", default=os.environ.get("REPCTL_VM_RESULTS",
                                                        "/tmp/peersbench-results"),
                    help="folder for peers-table.txt and peers-results.json")
    a = ap.parse_args(argv)
    a.only = [x for x in a.only.split(",") if x]
    bad = [x for x in a.only if x not in PEERS]
    if bad:
        ap.error(f"unknown set-up: {', '.join(bad)}")
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, _interrupted)
    return Peers(a).run()


if __name__ == "__main__":
    sys.exit(main())
