#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Replication over a real link: initial sync against a raw copy, streaming against dm-linear.

Runs INSIDE the test VM, as root, with dm-mod, kmod/dm-repl.ko and brd (four 256 MiB RAM
disks: `modprobe brd rd_nr=4 rd_size=262144`) loaded. Two network namespaces (rb-src
10.78.0.1, rb-dst 10.78.0.2) joined by one veth pair; real `repctl daemon` processes, one in
each (the approach of tests/vm/test_replicate.py, with the config writer of tests/vm/cluster.py).

    /dev/ram0  source data (filled with incompressible data first)
    /dev/ram1  source metadata
    /dev/ram2  target data
    /dev/ram3  destination of the second raw copy (so that the replica is left alone)

Phases, in this order (one VM run; see docs/benchmarks-replication.md):

    raw1      a plain Python socket copy of /dev/ram0 into /dev/ram2 over the veth (client in
              rb-src: 1 MiB preadv + sendall; server in rb-dst: 1 MiB recv_into + pwrite, one
              fdatasync at the end, then a one-byte ack, which ends the timing); checked
    sync      repctl: alpha (rb-src, ram0/ram1) -> beta (rb-dst, ram2, zeroed), mode async,
              freshly formatted metadata: the full initial sync, timed from the source's link
              going "syncing" to "streaming" (the daemon's own event timestamps; the control
              socket is also polled every 0.1 s from this process as a cross-check); then
              /dev/mapper/r0 == ram2
    raw2      the raw copy again, into ram3, right after the sync (the host drifts): the
              baseline of the initial sync is the mean of raw1 and raw2
    async     fio 1 MiB sequential writes, O_DIRECT, libaio QD4, time based, on /dev/mapper/r0
              with beta async; then: did beta stay streaming, how long until converged, and
              r0 == ram2 once converged
    linear    daemons stopped, r0 removed, dm-linear over the same /dev/ram0, the same fio;
              then ram0 is restored from the replica (ram2, just checked identical) so that
              the replica stays an exact copy and the next phase needs no resync
    syncmode  config rewritten with beta as a sync target, both daemons restarted with their
              state directories kept (the target is not resynced: same generation, clean
              out-of-sync bitmap); the same fio, the same checks

Replicas are compared byte for byte (O_DIRECT reads, memcmp); --sha256 compares sha256
digests instead, which is much slower in the emulated VM (about 10 MB/s per vCPU).

Aims (issue): initial sync >= 80 % of the raw copy, async streaming >= 80 % of dm-linear.
A missed aim is printed as MISSED but is not an error: the exit status is non-zero only
when something failed (a device, a daemon, a replica that differs, a timeout, a kernel
warning).

    replicate_bench.py [--results DIR] [--runtime S] [--ring-size SIZE] [--sha256]
    replicate_bench.py --raw-server ... | --raw-client ...   (internal: the raw copy's ends)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import mmap
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vm"))

# The repository (and so repctl's __pycache__) is read-only in the VM: compiled modules go to
# /tmp, so that only the first Python process compiles repctl (a daemon starts in tens of
# seconds in the emulated VM otherwise). Set before anything imports repctl.
PYCACHE = "/tmp/replbench-pycache"
sys.pycache_prefix = PYCACHE
sys.dont_write_bytecode = False
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
CHILD_ENV["PYTHONPYCACHEPREFIX"] = PYCACHE

PY = sys.executable
REPCTL = str(REPO / ".venv" / "bin" / "repctl")
ROOT = Path("/tmp/replbench")
SRC_NS, DST_NS = "rb-src", "rb-dst"
SRC_IF, DST_IF = "rbs0", "rbd0"
SRC_IP, DST_IP = "10.78.0.1", "10.78.0.2"
REPL_PORT, RAW_PORT = 7789, 7790
DATA, META, TDATA, SPARE = "/dev/ram0", "/dev/ram1", "/dev/ram2", "/dev/ram3"
RES = "r0"
DEV = f"/dev/mapper/{RES}"
LINEAR = "rb-linear"
MiB = 1 << 20
BLOCK = MiB
AIMS = {"initial_sync": 0.80, "async": 0.80}


def say(msg: str) -> None:
    print(f"replbench: {msg}", flush=True)


class BenchError(Exception):
    """Something failed (not a missed aim)."""


def sh(*cmd: str, check: bool = True, timeout: float = 120,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                       env=env or CHILD_ENV)
    if check and p.returncode:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def device_bytes(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def sha256_direct(path: str, size: int) -> str:
    """sha256 of the first `size` bytes, read with O_DIRECT (no stale page cache, none made)."""
    h = hashlib.sha256()
    buf = mmap.mmap(-1, 4 * MiB)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                raise BenchError(f"{path}: short read at {off}")
            n = min(n, size - off)
            h.update(view[:n])
            off += n
    finally:
        view.release()
        os.close(fd)
        buf.close()
    return h.hexdigest()


def digests(a: str, b: str, size: int) -> tuple[str, str, float]:
    """Both digests, in two threads (hashlib drops the GIL); and the seconds it took."""
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fa, fb = ex.submit(sha256_direct, a, size), ex.submit(sha256_direct, b, size)
        return fa.result(), fb.result(), time.monotonic() - t0


def compare_direct(a: str, b: str, size: int, chunk: int = 4096) -> dict[str, Any]:
    """Byte-for-byte comparison of the first `size` bytes (O_DIRECT reads, memcmp): the
    number of differing `chunk`-byte chunks and the first one."""
    bufs = [mmap.mmap(-1, 4 * MiB) for _ in range(2)]
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in (a, b)]
    differing, first = 0, None
    try:
        off = 0
        while off < size:
            want = min(4 * MiB, size - off)
            got = []
            for fd, buf, path in zip(fds, bufs, (a, b)):
                n = os.preadv(fd, [buf], off)
                if n < want:
                    raise BenchError(f"{path}: short read at {off}")
                got.append(buf[:want])
            if got[0] != got[1]:
                for k in range(0, want, chunk):
                    if got[0][k:k + chunk] != got[1][k:k + chunk]:
                        differing += 1
                        first = off + k if first is None else first
            off += want
    finally:
        for fd in fds:
            os.close(fd)
        for buf in bufs:
            buf.close()
    return {"equal": differing == 0, "differing_chunks": differing, "first_differing": first}


def same_content(a: str, b: str, size: int, sha: bool) -> dict[str, Any]:
    """Whether a and b hold the same first `size` bytes: sha256 of each (--sha256) or a
    byte-for-byte comparison (default: sha256 runs at ~10 MB/s per vCPU in the emulated VM)."""
    t0 = time.monotonic()
    if sha:
        da, db, _ = digests(a, b, size)
        r: dict[str, Any] = {"equal": da == db, "sha256": [da, db]}
    else:
        r = compare_direct(a, b, size)
    r["method"] = "sha256" if sha else "byte compare"
    r["seconds"] = time.monotonic() - t0
    return r


def describe(r: dict[str, Any]) -> str:
    if r["equal"]:
        return f"identical ({r['method']}, {r['seconds']:.1f} s)"
    extra = (f": {r['differing_chunks']} differing 4 KiB chunks, the first at byte "
             f"{r['first_differing']}" if "differing_chunks" in r else "")
    return f"DIFFERENT ({r['method']}){extra}"


# ---------------------------------------------------------------- CPU accounting


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def system_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    total = sum(f[:8])
    idle = f[3] + f[4]
    tck = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tck, total / tck


def all_cpu_s() -> dict[int, tuple[str, float]]:
    """{pid: (name, utime + stime seconds)} of every process, kernel threads included."""
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        out[int(d.name)] = (stat[stat.index("(") + 1:stat.rindex(")")],
                            (int(f[11]) + int(f[12])) / tck)
    return out


class CpuMeter:
    """CPU seconds over a phase: the daemons', the machine's, and the top processes'."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.start = {n: proc_cpu_s(p) for n, p in pids.items()}
        self.all0 = all_cpu_s()
        self.sys0 = system_cpu_s()
        self.t0 = time.monotonic()

    def stop(self) -> dict[str, Any]:
        busy, total = system_cpu_s()
        r: dict[str, Any] = {f"{n}_cpu_s": round(proc_cpu_s(p) - self.start[n], 2)
                             for n, p in self.pids.items()}
        r["machine_busy_cpu_s"] = round(busy - self.sys0[0], 2)
        r["machine_total_cpu_s"] = round(total - self.sys0[1], 2)
        r["wall_s"] = round(time.monotonic() - self.t0, 2)
        names = {p: n for n, p in self.pids.items()}
        deltas = [(cpu - self.all0.get(pid, ("", 0.0))[1], names.get(pid, f"{comm}[{pid}]"))
                  for pid, (comm, cpu) in all_cpu_s().items()]
        r["top"] = [[name, round(d, 2)] for d, name in sorted(deltas, reverse=True)[:8] if d > 0]
        return r


def calibrate() -> dict[str, float]:
    """MB/s of a few in-memory operations in this (emulated) machine, for the reading."""
    data = os.urandom(16 * MiB)
    r = {}
    for name, fn in (("memcpy", lambda: bytearray(data)), ("zlib_crc32", lambda: zlib.crc32(data)),
                     ("sha256", lambda: hashlib.sha256(data).digest())):
        t0 = time.monotonic()
        fn()
        r[f"{name}_mb_s"] = round(len(data) / 1e6 / (time.monotonic() - t0), 1)
    return r


def dmesg_lines() -> list[str]:
    return sh("dmesg", check=False).stdout.splitlines()


KERNEL_BAD = ("WARNING:", "BUG:", "Oops", "general protection fault", "Call Trace:",
              "kernel BUG", "UBSAN", "KASAN", "soft lockup", "hung_task")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def zero_device(path: str) -> None:
    sh("blkdiscard", "-z", path, timeout=300)


def veth_bytes() -> dict[str, int]:
    out = sh("ip", "-n", SRC_NS, "-s", "-j", "link", "show", SRC_IF).stdout
    st = json.loads(out)[0]["stats64"]
    return {"tx_bytes": st["tx"]["bytes"], "tx_packets": st["tx"]["packets"],
            "rx_bytes": st["rx"]["bytes"]}


# ---------------------------------------------------------------- the raw copy's two ends


def cpu_since(ru0: resource.struct_rusage) -> float:
    """User + system CPU seconds of this process since `ru0`."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime


def raw_server(dev: str, addr: str, port: int, size: int) -> int:
    """Receive `size` bytes into `dev` (1 MiB recv_into, pwrite), fdatasync, ack one byte."""
    fd = os.open(dev, os.O_WRONLY)
    ls = socket.create_server((addr, port))
    ls.settimeout(120)
    conn, _ = ls.accept()
    conn.settimeout(120)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    off = 0
    t0 = None
    recvs = 0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    while off < size:
        want = min(BLOCK, size - off)
        got = 0
        while got < want:
            n = conn.recv_into(view[got:want], want - got)
            if n == 0:
                raise BenchError(f"raw server: EOF after {off + got} of {size} bytes")
            if t0 is None:
                t0 = time.monotonic()
            got += n
            recvs += 1
        done = 0
        while done < got:
            done += os.pwrite(fd, view[done:got], off + done)
        off += got
    t1 = time.monotonic()
    os.fdatasync(fd)
    t2 = time.monotonic()
    conn.sendall(b"K")
    conn.close()
    os.close(fd)
    print(json.dumps({"bytes": off, "recv_calls": recvs, "receive_s": t1 - (t0 or t1),
                      "fdatasync_s": t2 - t1, "cpu_s": cpu_since(ru0)}), flush=True)
    return 0


def raw_client(dev: str, addr: str, port: int, size: int) -> int:
    """Send the first `size` bytes of `dev` in 1 MiB blocks; time until the server's ack."""
    fd = os.open(dev, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    deadline = time.monotonic() + 300
    while True:  # started together with the server: wait until it listens
        try:
            s = socket.create_connection((addr, port), timeout=120)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    off = 0
    while off < size:
        n = os.preadv(fd, [buf], off)
        if n <= 0:
            raise BenchError(f"raw client: short read of {dev} at {off}")
        n = min(n, size - off)
        s.sendall(view[:n])
        off += n
    ack = s.recv(1)
    t1 = time.monotonic()
    if ack != b"K":
        raise BenchError(f"raw client: no ack from the server (got {ack!r})")
    s.close()
    os.close(fd)
    print(json.dumps({"bytes": off, "seconds": t1 - t0, "cpu_s": cpu_since(ru0)}), flush=True)
    return 0


# ---------------------------------------------------------------- fio


def fio(dev: str, runtime: float, results: Path, tag: str) -> dict[str, Any]:
    cmd = ["fio", f"--name={tag}", f"--filename={dev}", "--rw=write", "--bs=1M", "--direct=1",
           "--ioengine=libaio", "--iodepth=4", "--numjobs=1", "--time_based",
           f"--runtime={runtime:g}", f"--size={device_bytes(dev)}", "--output-format=json"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, check=False, capture_output=True, text=True,
                       timeout=runtime + 180)
    wall = time.monotonic() - t0
    (results / f"fio-{tag}.json").write_text(p.stdout)
    start = p.stdout.find("{")
    if p.returncode or start < 0:
        raise BenchError(f"fio failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr}\n"
                         f"{p.stdout[:2000]}")
    job = json.loads(p.stdout[start:])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {p.stderr}")
    w = job["write"]
    cpu_s = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100 * w["runtime"] / 1000
    return {"cpu_s": cpu_s, "mib_s": w["bw_bytes"] / MiB, "io_bytes": w["io_bytes"], "runtime_s": w["runtime"] / 1000,
            "lat_ms_mean": w["lat_ns"]["mean"] / 1e6,
            "lat_ms_p99": w.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1e6,
            "wall_s": wall}


# ---------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, results: Path, ring_size: str):
        from cluster import config_text, write_secret  # tests/vm/cluster.py

        self.config_text = config_text
        self.results = results
        self.ring_size = ring_size
        self.procs: dict[str, subprocess.Popen] = {}
        self.ns = {"alpha": SRC_NS, "beta": DST_NS}
        self.cfg = {n: ROOT / n / "repctl.yaml" for n in self.ns}
        self.sock = {n: ROOT / n / "repctl.sock" for n in self.ns}
        self.nodes = {"alpha": {"address": SRC_IP, "device": DATA, "metadata": META},
                      "beta": {"address": DST_IP, "device": TDATA}}
        shutil.rmtree(ROOT, ignore_errors=True)
        self.secret = write_secret(ROOT / "secret")
        self.events: dict[str, list[dict[str, Any]]] = {n: [] for n in self.ns}
        self.start_s: list[float] = []

    def write_config(self, mode: str) -> None:
        for node in self.ns:
            text = self.config_text(node, self.nodes, {"beta": mode}, port=REPL_PORT, root=ROOT,
                                    secret=self.secret, name=RES)
            text = text.replace("ring_size: 16MiB", f"ring_size: {self.ring_size}")
            if f"ring_size: {self.ring_size}" not in text:
                raise BenchError("tests/vm/cluster.py's config_text changed: no ring_size line")
            self.cfg[node].parent.mkdir(parents=True, exist_ok=True)
            self.cfg[node].write_text(text)

    def repctl(self, node: str, *args: str) -> str:
        return sh(REPCTL, "-c", str(self.cfg[node]), *args, timeout=300).stdout

    def renice(self, node: str, nice: int) -> None:
        """Set the CPU priority of every thread of node's daemon (setpriority is per thread)."""
        pid = self.procs[node].pid
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        say(f"{node}'s daemon (pid {pid}) now runs at nice {nice}")

    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def start(self, *nodes: str) -> None:
        """Start the daemons of `nodes` at the same time (a Python start in the emulated VM
        takes tens of seconds), wait until each serves its control socket, follow its events."""
        t0 = time.monotonic()
        for node in nodes:
            with open(self.results / f"daemon-{node}.log", "a") as log:
                log.write(f"---- {dt.datetime.now().isoformat(timespec='seconds')} start\n")
                log.flush()
                # `ip netns exec` execs the command: the pid is the daemon's
                self.procs[node] = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns[node], REPCTL, "-c", str(self.cfg[node]),
                     "daemon", "--node", node], stdout=log, stderr=subprocess.STDOUT,
                    env=CHILD_ENV)
        for node in nodes:
            deadline = time.monotonic() + 300
            while True:
                if self.procs[node].poll() is not None:
                    raise BenchError(f"{node}'s daemon exited {self.procs[node].returncode}: "
                                     f"see {self.results / f'daemon-{node}.log'}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{node}'s daemon did not serve its control socket "
                                     "within 300 s")
                if self.sock[node].exists():
                    try:  # the socket is bound before the daemon serves it: ask once
                        self.status(node)
                        break
                    except Exception:  # noqa: BLE001, S110 not serving yet
                        pass
                time.sleep(0.2)
            self._follow(node)
        self.start_s.append(time.monotonic() - t0)

    def _follow(self, node: str) -> None:
        """Collect the daemon's events (with the daemon's own timestamps) in a thread.

        The request is sent before this returns; the daemon subscribes within a few ms."""
        from repctl.control import encode

        sink = self.events[node]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(self.sock[node]))
        sock.sendall(encode({"cmd": "events", "args": {}}))
        sock.settimeout(None)

        def run() -> None:
            try:
                with sock, sock.makefile("rb") as rfile:
                    for line in rfile:
                        reply = json.loads(line)
                        if "event" in reply:
                            sink.append(reply["event"])
                        elif reply.get("ok") is False:
                            raise BenchError(f"events: {reply.get('error')}")
            except Exception as e:  # noqa: BLE001 (recorded: the stream ended)
                sink.append({"what": "bench-follow-ended", "text": str(e), "time": time.time()})

        threading.Thread(target=run, name=f"events-{node}", daemon=True).start()
        time.sleep(0.5)

    def stop(self, node: str) -> None:
        p = self.procs.pop(node, None)
        if p is None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)
            self.sock[node].unlink(missing_ok=True)
            raise BenchError(f"{node}'s daemon did not stop within 60 s of SIGTERM") from None
        if p.returncode not in (0, -signal.SIGTERM):
            raise BenchError(f"{node}'s daemon exited {p.returncode} on SIGTERM")

    def stop_all(self) -> None:
        for node in ("alpha", "beta"):
            self.stop(node)

    def check_alive(self) -> None:
        for node, p in self.procs.items():
            if p.poll() is not None:
                raise BenchError(f"{node}'s daemon died (exit {p.returncode}): see "
                                 f"{self.results / f'daemon-{node}.log'}")

    def status(self, node: str = "alpha") -> dict[str, Any]:
        from repctl.control import ControlClient

        return ControlClient(self.sock[node], timeout=30).call("status")["resources"][0]

    def link(self) -> dict[str, Any]:
        return self.status()["targets"][0]

    def converged(self) -> bool:
        st = self.status()
        k = st["kernel"] or {}
        t = st["targets"][0]
        return (k.get("mode") == "streaming" and k.get("acked", -1) >= k.get("published", 0)
                and t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                and t["lag_records"] == 0)

    def wait_converged(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while True:
            self.check_alive()
            if self.converged():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"not converged within {timeout} s: {json.dumps(self.status())}")
            time.sleep(0.1)

    def events_since(self, node: str, t: float) -> list[dict[str, Any]]:
        return [e for e in self.events[node] if e.get("time", 0) >= t]


class Sampler:
    """Polls the source's status every `interval` s from this process (no CLI per poll)."""

    def __init__(self, cluster: Cluster, interval: float):
        self.cluster = cluster
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            try:
                st = self.cluster.status()
                link = st["targets"][0]
                k = st["kernel"] or {}
                self.samples.append({"t": t, "state": link["state"], "sync": link["sync"],
                                     "bytes_sent": link["bytes_sent"],
                                     "lag_records": link["lag_records"],
                                     "lag_bytes": link["lag_bytes"],
                                     "oos": link["out_of_sync_bytes"],
                                     "ring_used": k.get("ring_used"), "kmode": k.get("mode")})
            except Exception:  # noqa: BLE001 the daemon is starting or stopping: a missed sample
                self.errors += 1
            self._stop.wait(max(0.0, self.interval - (time.time() - t)))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def fmt_cpu(cpu: dict[str, Any]) -> str:
    # per process (the scheduler's runtime); /proc/stat's tick-based machine totals lose
    # ticks in the emulated VM and are only kept in the JSON
    top = ", ".join(f"{n} {v:.1f}" for n, v in cpu.get("top", [])[:5])
    return f"CPU s over {cpu['wall_s']:.1f} s: {top}"


def state_events(events: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{e.get('what')} {e.get('old', '')}->{e.get('new', '')} {e.get('text', '')}".strip()
        for e in events)


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results = Path(args.results).resolve()
        self.results.mkdir(parents=True, exist_ok=True)
        self.out: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                                    "kernel": os.uname().release, "cpus": os.cpu_count(),
                                    "runtime_s": args.runtime, "ring_size": args.ring_size,
                                    "aims": AIMS, "phases": {}, "notes": []}
        self.size = 0
        self.cluster: Cluster | None = None
        self.netns_made: list[str] = []
        self.dmesg_start = len(dmesg_lines())

    def note(self, text: str) -> None:
        self.out["notes"].append(text)
        say(f"NOTE: {text}")

    def check(self, a: str, b: str, what: str) -> dict[str, Any]:
        r = same_content(a, b, self.size, self.args.sha256)
        say(f"{what}: {b} vs {a}: {describe(r)}")
        if not r["equal"]:
            raise BenchError(f"{what}: {b} differs from {a}: {describe(r)}")
        return r

    # -- set-up / tear-down ------------------------------------------
    def preflight(self) -> None:
        # it overwrites /dev/ram0..3, loads nothing itself, but must not run on a real machine
        cmdline = Path("/proc/cmdline").read_text().split()
        if "repctl_vm=1" not in cmdline and not any(w.startswith("virtme") for w in cmdline):
            raise BenchError("refusing to run: not the test VM (no repctl_vm=1 or virtme "
                             "option on the kernel command line); see "
                             "docs/benchmarks-replication.md")
        if os.geteuid() != 0:
            raise BenchError("must run as root (in the test VM)")
        for tool in ("fio", "ip", "blkdiscard", "dd"):
            if not shutil.which(tool):
                raise BenchError(f"{tool} not found")
        if not Path("/sys/module/dm_repl").exists():
            raise BenchError("dm-repl is not loaded (insmod kmod/dm-repl.ko)")
        for d in (DATA, META, TDATA, SPARE):
            if not Path(d).is_block_device():
                raise BenchError(f"{d} is missing: modprobe brd rd_nr=4 rd_size=262144")
        self.size = device_bytes(DATA)
        for d in (TDATA, SPARE):
            if device_bytes(d) != self.size:
                raise BenchError(f"{d} and {DATA} differ in size")
        for name in (RES, LINEAR):
            if Path(f"/dev/mapper/{name}").exists():
                raise BenchError(f"/dev/mapper/{name} exists already")
        self.out["device_bytes"] = self.size
        git = sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD", check=False)
        kdiff = sh("git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "kmod", "pyctl",
                   check=False)
        ko = REPO / "kmod" / "dm-repl.ko"
        self.out["source"] = {
            "commit": git.stdout.strip(),
            "kmod_or_pyctl_changed_since_commit": kdiff.returncode == 1,
            "module_sha256": hashlib.sha256(ko.read_bytes()).hexdigest()[:12] if ko.exists()
            else None,
            "module_built": dt.datetime.fromtimestamp(ko.stat().st_mtime, dt.UTC)
            .isoformat(timespec="seconds") if ko.exists() else None}
        say(f"devices: {DATA} (data), {META} (metadata), {TDATA} (target), {SPARE} (second "
            f"raw copy), {self.size // MiB} MiB each; results in {self.results}")

    def make_net(self) -> None:
        for ns in (SRC_NS, DST_NS):
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "netns", "add", ns)
            self.netns_made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", SRC_IF, "netns", SRC_NS, "type", "veth", "peer", "name", DST_IF,
           "netns", DST_NS)
        sh("ip", "-n", SRC_NS, "addr", "add", f"{SRC_IP}/24", "dev", SRC_IF)
        sh("ip", "-n", DST_NS, "addr", "add", f"{DST_IP}/24", "dev", DST_IF)
        sh("ip", "-n", SRC_NS, "link", "set", SRC_IF, "up")
        sh("ip", "-n", DST_NS, "link", "set", DST_IF, "up")
        mtu = json.loads(sh("ip", "-n", SRC_NS, "-j", "link", "show", SRC_IF).stdout)[0]["mtu"]
        self.out["link"] = {"type": "veth", "mtu": mtu, "src": SRC_IP, "dst": DST_IP}

    def failed(self, e: Exception, say: Any) -> None:
        """A bench's run ended on `e`: recorded in the JSON and said (a traceback unless it is
        a BenchError, whose text says it all)."""
        self.out["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, BenchError):
            traceback.print_exc()
        say(f"FAILED: {e}")

    def finish(self, rc: int, t0: float, name: str, say: Any) -> int:
        """The end of a bench's run: tear down (a problem fails the run), the wall time since
        `t0`, self.out written to RESULTS/`name`; the exit status."""
        problems = self.teardown()
        for p in problems:
            say(f"teardown: {p}")
        rc = rc or (1 if problems else 0)
        self.out["wall_s"] = time.monotonic() - t0
        path = self.results / name
        path.write_text(json.dumps(self.out, indent=1, default=str) + "\n")
        say(f"results: {path}; {self.out['wall_s']:.0f} s; exit {rc}")
        return rc

    def teardown(self) -> list[str]:
        problems = []
        if self.cluster is not None:
            try:
                self.cluster.stop_all()
            except Exception as e:  # noqa: BLE001 (reported)
                problems.append(f"stopping the daemons: {e}")
        from repctl import dm

        for name in (LINEAR, RES):
            if Path(f"/dev/mapper/{name}").exists():
                try:
                    dm.remove_device(name, retries=50)
                except Exception as e:  # noqa: BLE001 (reported)
                    problems.append(f"removing {name}: {e}")
        for ns in self.netns_made:
            sh("ip", "netns", "del", ns, check=False)
        return problems

    # -- phases ---------------------------------------------------------
    def fill(self) -> None:
        say(f"filling {DATA} with incompressible data (fio, refill_buffers); zeroing "
            f"{TDATA} and {SPARE} (brd allocates its pages on the first write)")
        t0 = time.monotonic()
        sh("fio", "--name=fill", f"--filename={DATA}", "--rw=write", "--bs=1M", "--direct=1",
           "--ioengine=libaio", "--iodepth=4", f"--size={self.size}", "--refill_buffers",
           "--buffer_compress_percentage=0", "--randrepeat=0", "--output-format=terse",
           timeout=900)
        zero_device(TDATA)
        zero_device(SPARE)
        self.out["phases"]["fill"] = {"seconds": time.monotonic() - t0}

    def raw_copy(self, tag: str, dest: str, verify: bool) -> dict[str, Any]:
        drop_caches()
        cpu = CpuMeter(self.cluster.pids if self.cluster else {})
        srv = subprocess.Popen(["ip", "netns", "exec", DST_NS, PY, __file__, "--raw-server",
                                dest, DST_IP, str(RAW_PORT), str(self.size)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=CHILD_ENV)
        # both ends start at once (a Python start takes seconds here); the client retries
        # until the server listens, and times from its connection to the server's ack
        v0 = veth_bytes()
        cli = subprocess.Popen(["ip", "netns", "exec", SRC_NS, PY, __file__, "--raw-client",
                                DATA, DST_IP, str(RAW_PORT), str(self.size)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=CHILD_ENV)
        try:
            cout, cerr = cli.communicate(timeout=900)
            v1 = veth_bytes()
            if cli.returncode:
                raise BenchError(f"raw client exited {cli.returncode}: {cerr}")
            sout, serr = srv.communicate(timeout=120)
            if srv.returncode:
                raise BenchError(f"raw server exited {srv.returncode}: {serr}")
        finally:
            for proc in (cli, srv):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        c = json.loads(cout.strip().splitlines()[-1])
        s = json.loads(sout.strip().splitlines()[-1])
        r = {"dest": dest, "seconds": c["seconds"], "mib_s": c["bytes"] / MiB / c["seconds"],
             "client": c, "server": s, "wire_bytes": v1["tx_bytes"] - v0["tx_bytes"],
             "cpu": cpu.stop()}
        say(f"{tag}: raw socket copy of {c['bytes'] // MiB} MiB {DATA} -> {dest} in "
            f"{c['seconds']:.2f} s: {r['mib_s']:.1f} MiB/s (CPU s: client {c['cpu_s']:.1f}, "
            f"server {s['cpu_s']:.1f}; fdatasync {s['fdatasync_s']:.2f} s)")
        if verify:
            r["content"] = self.check(DATA, dest, tag)
        self.out["phases"][tag] = r
        return r

    def initial_sync(self) -> None:
        c = self.cluster = Cluster(self.results, self.args.ring_size)
        drop_caches()
        c.write_config("async")
        say("initial sync: create-md, then both daemons (alpha: source, beta: async target); "
            "alpha's veth end is down until its event stream is subscribed")
        c.repctl("alpha", "create-md", RES, "--node", "alpha", "--force")
        # alpha's link retries every second while the link is down: no sync can start before
        # this process follows alpha's events, and the 'syncing' event is always seen
        sh("ip", "-n", SRC_NS, "link", "set", SRC_IF, "down")
        t_start = time.time()
        try:
            c.start("alpha", "beta")
            cpu = CpuMeter(c.pids)
            v0 = veth_bytes()
        finally:
            sh("ip", "-n", SRC_NS, "link", "set", SRC_IF, "up")
        say(f"initial sync: daemons up in {c.start_s[-1]:.1f} s; link up")
        with Sampler(c, self.args.poll) as smp:
            deadline = time.monotonic() + 900
            while True:
                c.check_alive()
                if [e for e in c.events["alpha"] if e.get("what") == "state"
                        and e.get("old") == "syncing" and e.get("new") == "streaming"]:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"initial sync did not finish in 900 s: {c.status()}")
                time.sleep(0.05)
            time.sleep(self.args.poll + 0.2)  # one poll after the end, for the cross-check
        cpu_r = cpu.stop()
        v1 = veth_bytes()
        ev = c.events_since("alpha", t_start)
        began = [e for e in ev if e.get("what") == "state" and e.get("new") == "syncing"]
        ended = [e for e in ev if e.get("what") == "state" and e.get("old") == "syncing"
                 and e.get("new") == "streaming"]
        if not began:
            raise BenchError(f"no 'syncing' event from alpha: {ev}")
        if len(began) > 1 or [e for e in ev if e.get("new") == "connecting"]:
            self.note(f"the initial sync was interrupted: {state_events(ev)}")
        ev_s = ended[0]["time"] - began[0]["time"]
        polls = smp.samples
        p_sync = next((p for p in polls if p["state"] == "syncing"), None)
        p_end = next((p for p in polls if p_sync and p["t"] > p_sync["t"]
                      and p["state"] == "streaming"), None)
        poll_s = (p_end["t"] - p_sync["t"]) if p_sync and p_end else None
        last = [p for p in polls if p["state"] == "syncing" and p["sync"]]
        total = last[-1]["sync"]["total_bytes"] if last else None
        bev = c.events_since("beta", t_start)
        tb = [e for e in bev if e.get("what") == "state" and e.get("new") == "syncing"]
        te = [e for e in bev if e.get("what") == "state" and e.get("old") == "syncing"]
        r = {"seconds": ev_s, "mib_s": self.size / MiB / ev_s, "seconds_polled": poll_s,
             "target_side_seconds": (te[0]["time"] - tb[0]["time"]) if tb and te else None,
             "sync_total_bytes": total, "polls": len(polls), "poll_errors": smp.errors,
             "wire_bytes": v1["tx_bytes"] - v0["tx_bytes"], "cpu": cpu_r,
             "daemons_start_s": c.start_s[-1], "events": [e for e in ev if e.get("what") == "state"],
             "progress": [{"t": round(p["t"] - began[0]["time"], 2),
                           "done_bytes": p["sync"]["done_bytes"],
                           "rate_mib_s": round(p["sync"]["rate_bps"] / MiB, 1)}
                          for p in last[::5]]}
        ts = r["target_side_seconds"]
        say(f"initial sync: {self.size // MiB} MiB in {ev_s:.2f} s (daemon events; polls: "
            f"{'-' if poll_s is None else f'{poll_s:.2f}'} s; target side: "
            f"{'-' if ts is None else f'{ts:.2f}'} s)"
            f": {r['mib_s']:.1f} MiB/s; {r['wire_bytes'] / MiB:.1f} MiB on the wire; "
            f"{fmt_cpu(cpu_r)}")
        if total is not None and total != self.size:
            self.note(f"initial sync total_bytes {total} != device size {self.size}")
        r["converged_s"] = c.wait_converged()
        r["content"] = self.check(DEV, TDATA, "initial sync")
        self.out["phases"]["initial_sync"] = r

    def streaming(self, tag: str, mode: str) -> dict[str, Any]:
        from repctl import dm

        c = self.cluster
        assert c is not None
        c.wait_converged()
        with dm.DMControl() as ctl:
            kstatus = ctl.status(RES)[0].text
        link0 = c.link()
        if link0["mode"] != mode:
            raise BenchError(f"beta is {link0['mode']}, expected {mode}")
        say(f"{tag}: fio 1 MiB seq write QD4 on {DEV} for {self.args.runtime:g} s "
            f"(beta {mode}, {link0['state']})")
        t0 = time.time()
        v0 = veth_bytes()
        cpu = CpuMeter(c.pids)
        with Sampler(c, 0.5) as smp:
            f = fio(DEV, self.args.runtime, self.results, tag)
            t_fio = time.time()
            st_end = c.status()
        cpu_r = cpu.stop()
        v_end = veth_bytes()
        link1 = st_end["targets"][0]
        drain = c.wait_converged()
        v1 = veth_bytes()
        ev = [e for e in c.events_since("alpha", t0)
              if e.get("what") in ("state", "fell_behind", "error")]
        left = [e for e in ev if e.get("what") == "state" and e.get("new") != "streaming"]
        fell = [e for e in ev if e.get("what") == "fell_behind"]
        reconnects = [e for e in ev if e.get("what") == "state" and e.get("new") == "connecting"]
        r = {**f, "mode": mode, "kernel_status_before": kstatus, "cpu": cpu_r,
             "state_at_end": link1["state"], "lag_records_at_end": link1["lag_records"],
             "oos_bytes_at_end": link1["out_of_sync_bytes"],
             "stayed_streaming": not left and not fell and link1["state"] == "streaming",
             "fell_behind_events": len(fell), "reconnects": len(reconnects),
             "events": ev, "drain_s": drain,
             "max_lag_bytes": max((s["lag_bytes"] or 0 for s in smp.samples), default=0),
             "max_ring_used": max((s["ring_used"] or 0 for s in smp.samples), default=0),
             "wire_bytes_during_fio": v_end["tx_bytes"] - v0["tx_bytes"],
             "wire_bytes_total": v1["tx_bytes"] - v0["tx_bytes"],
             "fio_end_to_converged_s": time.time() - t_fio,
             "samples": [{"t": round(s["t"] - t0, 2), "state": s["state"],
                          "lag_bytes": s["lag_bytes"], "oos": s["oos"],
                          "ring_used": s["ring_used"]} for s in smp.samples]}
        # everything written has reached the target once converged: written / (fio + drain)
        # is the rate at which the replica keeps up with a writer going flat out
        r["replicated_mib_s"] = f["io_bytes"] / MiB / (f["runtime_s"] + drain)
        say(f"{tag}: {f['mib_s']:.1f} MiB/s (mean latency {f['lat_ms_mean']:.2f} ms; fio CPU "
            f"{f['cpu_s']:.1f} s); beta "
            f"{'stayed streaming' if r['stayed_streaming'] else 'LEFT streaming'} (at the "
            f"end: {link1['state']}, lag {link1['lag_records']} records, out of sync "
            f"{link1['out_of_sync_bytes'] // MiB} MiB; max ring used "
            f"{r['max_ring_used'] // MiB} MiB); converged {drain:.2f} s after fio; "
            f"{fmt_cpu(cpu_r)}")
        if ev:
            say(f"{tag}: events: {state_events(ev)}")
        r["content"] = self.check(DEV, TDATA, f"{tag}, quiesced")
        self.out["phases"][tag] = r
        return r

    def linear_fio(self, tag: str) -> dict[str, Any]:
        """The streaming fio job on dm-linear over DATA (no repl device may hold it)."""
        from repctl import dm

        sectors = self.size // 512
        dm.create_device(LINEAR, [dm.Target(0, sectors, "linear", f"{DATA} 0")])
        try:
            f = fio(f"/dev/mapper/{LINEAR}", self.args.runtime, self.results, tag)
        finally:
            dm.remove_device(LINEAR, retries=50)
        say(f"{tag}: {f['mib_s']:.1f} MiB/s (mean latency {f['lat_ms_mean']:.2f} ms; fio CPU "
            f"{f['cpu_s']:.1f} s)")
        self.out["phases"][tag] = f
        return f

    def linear_first(self) -> None:
        """A first dm-linear sample, minutes before the second: the baseline is their mean."""
        say(f"linear0: dm-linear over {DATA} before anything is replicated (the first of two "
            "baseline samples)")
        self.linear_fio("linear0")

    def linear(self) -> None:
        from repctl import dm

        c = self.cluster
        assert c is not None
        say(f"linear: stopping the daemons, removing r0, dm-linear over the same {DATA}")
        c.stop_all()
        dm.remove_device(RES, retries=50)
        f = self.linear_fio("linear")
        # the writes through dm-linear bypassed the repl target: put ram0 back as the replica
        # has it (verified identical before), so that the next phase needs no resync
        t0 = time.monotonic()
        sh("dd", f"if={TDATA}", f"of={DATA}", "bs=4M", "iflag=direct", "oflag=direct",
           "status=none", timeout=900)
        f["restore_s"] = time.monotonic() - t0

    def restart_sync_mode(self, mode: str = "sync") -> None:
        c = self.cluster
        assert c is not None
        say(f"syncmode: config rewritten (beta: {mode}); both daemons restarted, state kept")
        c.write_config(mode)
        t0 = time.time()
        v0 = veth_bytes()
        c.start("alpha", "beta")
        conv = c.wait_converged()
        v1 = veth_bytes()
        ev = [e for e in c.events_since("alpha", t0) if e.get("what") == "state"]
        resync = [e for e in ev if e.get("new") in ("syncing", "behind")]
        r = {"daemons_start_s": c.start_s[-1], "converged_s": conv,
             "wire_bytes": v1["tx_bytes"] - v0["tx_bytes"], "resync_events": resync,
             "events": ev}
        say(f"syncmode: daemons up in {c.start_s[-1]:.1f} s, streaming {conv:.2f} s later; "
            f"{r['wire_bytes'] / MiB:.2f} MiB on the wire for the restart"
            + (f" (resync: {resync[0].get('text')})" if resync else " (no resync)"))
        self.out["phases"]["restart_sync_mode"] = r

    # -- the report ----------------------------------------------------
    def report(self) -> list[str]:
        ph = self.out["phases"]
        raws = [ph[k]["mib_s"] for k in ("raw1", "raw2") if k in ph]
        raw = sum(raws) / len(raws)
        lins = [ph[k]["mib_s"] for k in ("linear0", "linear") if k in ph]
        lin = sum(lins) / len(lins)
        rows = [
            ("initial sync", "raw socket copy", raw, ph["initial_sync"]["mib_s"],
             AIMS["initial_sync"]),
            ("async streaming 1M QD4", "dm-linear", lin, ph["async"]["mib_s"], AIMS["async"]),
            ("  target at nice 19", "dm-linear", lin, ph["async_remote"]["mib_s"], AIMS["async"]),
            ("sync streaming 1M QD4", "dm-linear", lin, ph["syncmode"]["mib_s"], None),
            ("sync streaming 1M QD4", "raw socket copy", raw, ph["syncmode"]["mib_s"], None),
        ]
        table = []
        for test, base_name, base, val, aim in rows:
            ratio = val / base if base else 0.0
            verdict = "-" if aim is None else ("MET" if ratio >= aim else "MISSED")
            table.append({"test": test, "baseline_name": base_name, "baseline_mib_s": base,
                          "repctl_mib_s": val, "ratio": ratio, "aim": aim, "verdict": verdict})
        self.out["table"] = table
        w = [24, 16, 9, 9, 6, 6, 6]
        head = ["test (MiB/s)", "baseline", "baseline", "repctl", "ratio", "aim", "result"]
        lines = ["  ".join(h.ljust(n) for h, n in zip(head, w)).rstrip()]
        for t in table:
            cells = [t["test"], t["baseline_name"], f"{t['baseline_mib_s']:.1f}",
                     f"{t['repctl_mib_s']:.1f}", f"{t['ratio'] * 100:.0f}%",
                     "-" if t["aim"] is None else f">={t['aim'] * 100:.0f}%", t["verdict"]]
            lines.append("  ".join(c.ljust(n) for c, n in zip(cells, w)).rstrip())
        lines.append("")
        spread = (max(raws) / min(raws) - 1) if len(raws) > 1 else 0.0
        lines.append(f"raw copy: {', '.join(f'{x:.1f}' for x in raws)} MiB/s before and after "
                     f"the initial sync (baseline: their mean; spread {spread * 100:.0f}%)")
        lspread = (max(lins) / min(lins) - 1) if len(lins) > 1 else 0.0
        lines.append(f"dm-linear: {', '.join(f'{x:.1f}' for x in lins)} MiB/s before the initial "
                     f"sync and after the async runs (baseline: their mean; spread "
                     f"{lspread * 100:.0f}%)")
        mib = self.size / MiB
        raw_c = [ph[k]["client"]["cpu_s"] / mib for k in ("raw1", "raw2") if k in ph]
        raw_s = [ph[k]["server"]["cpu_s"] / mib for k in ("raw1", "raw2") if k in ph]
        sc = ph["initial_sync"]["cpu"]
        sync_s = ph["initial_sync"]["seconds"]
        cpu_line = (f"CPU per MiB copied: raw client {sum(raw_c) / len(raw_c) * 1000:.0f} ms, "
                    f"raw server {sum(raw_s) / len(raw_s) * 1000:.0f} ms; initial sync: alpha "
                    f"{sc.get('alpha_cpu_s', 0) / mib * 1000:.0f} ms "
                    f"({sc.get('alpha_cpu_s', 0) / sync_s * 100:.0f}% of one vCPU), beta "
                    f"{sc.get('beta_cpu_s', 0) / mib * 1000:.0f} ms "
                    f"({sc.get('beta_cpu_s', 0) / sync_s * 100:.0f}%)")
        lines.append(cpu_line)
        self.out["cpu_per_mib_ms"] = {
            "raw_client": sum(raw_c) / len(raw_c) * 1000, "raw_server": sum(raw_s) / len(raw_s) * 1000,
            "sync_alpha": sc.get("alpha_cpu_s", 0) / mib * 1000,
            "sync_beta": sc.get("beta_cpu_s", 0) / mib * 1000}
        if lspread > 0.25:
            self.note(f"the two dm-linear samples differ by {lspread * 100:.0f}%: the streaming "
                      "ratios are uncertain by as much")
        if spread > 0.25:
            self.note(f"the two raw copies differ by {spread * 100:.0f}%: the shared host "
                      "drifted; the initial sync ratio is uncertain by as much")
        for tag in ("async", "async_remote", "syncmode"):
            p = ph[tag]
            lines.append(
                f"{tag}: beta {'stayed streaming' if p['stayed_streaming'] else 'fell behind'}"
                f" ({p['fell_behind_events']} fell_behind events, {p['reconnects']} "
                f"reconnects); converged {p['drain_s']:.1f} s after fio; written / (fio + "
                f"drain) = {p['replicated_mib_s']:.1f} MiB/s; mean write latency "
                f"{p['lat_ms_mean']:.2f} ms (dm-linear {ph['linear']['lat_ms_mean']:.2f} ms)")
        print()
        for ln in lines:
            print(ln)
        print(flush=True)
        return lines

    def run(self) -> int:
        t0 = time.monotonic()
        rc = 0
        try:
            self.preflight()
            self.make_net()
            self.fill()
            self.out["calibration"] = cal = calibrate()
            say("in-memory speeds here: " + ", ".join(f"{k[:-5]} {v:.0f} MB/s"
                                                     for k, v in cal.items()))
            self.linear_first()
            self.raw_copy("raw1", TDATA, verify=True)
            zero_device(TDATA)  # the initial sync must find nothing there
            self.initial_sync()
            self.raw_copy("raw2", SPARE, verify=False)
            self.streaming("async", "async")
            # in production the target is another machine: here its daemon shares the
            # primary's two vCPUs with fio; at nice 19 it takes only the CPU fio leaves
            assert self.cluster is not None
            self.cluster.renice("beta", 19)
            self.streaming("async_remote", "async")
            self.cluster.renice("beta", 0)
            self.linear()
            self.restart_sync_mode()
            self.streaming("syncmode", "sync")
            table = self.report()
            (self.results / "replicate-bench.txt").write_text(
                f"{self.out['date']}  kernel {self.out['kernel']}, {self.out['cpus']} vCPUs\n"
                + "\n".join(table) + "\n")
        except Exception as e:  # noqa: BLE001 (reported, exit 1)
            rc = 1
            self.out["error"] = f"{type(e).__name__}: {e}"
            if not isinstance(e, BenchError):
                traceback.print_exc()
            say(f"FAILED: {e}")
        finally:
            problems = self.teardown()
            if problems:
                rc = 1
                self.out.setdefault("teardown_problems", problems)
                for p in problems:
                    say(f"teardown: {p}")
            new = dmesg_lines()[self.dmesg_start:]
            self.out["kernel_log"] = [ln for ln in new if "repl" in ln or "device-mapper" in ln
                                      or any(b in ln for b in KERNEL_BAD)]
            bad = [ln for ln in new if any(b in ln for b in KERNEL_BAD)]
            if bad:
                rc = 1
                say("kernel log problems:\n  " + "\n  ".join(bad[:40]))
            if self.cluster is not None:
                self.out["events"] = self.cluster.events
            self.out["wall_s"] = time.monotonic() - t0
            path = self.results / "replicate-bench.json"
            path.write_text(json.dumps(self.out, indent=1, default=str) + "\n")
            say(f"results: {path}; {self.out['wall_s']:.0f} s; exit {rc}")
        return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--results", default="/tmp/replbench-results", help="folder for the JSON, "
                    "the table, fio outputs and daemon logs")
    ap.add_argument("--runtime", type=float, default=8, help="seconds per fio run (default 8)")
    ap.add_argument("--ring-size", default="64MiB", help="the resource's ring_size (default "
                    "64MiB, as bench/target_bench.py)")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between status polls of "
                    "the source during the initial sync (default 0.5; the timing comes from "
                    "the daemon's events, the polls are a cross-check and cost the source CPU)")
    ap.add_argument("--sha256", action="store_true", help="check replicas with sha256 digests "
                    "instead of a byte-for-byte comparison (slow in the emulated VM)")
    ap.add_argument("--raw-server", nargs=4, metavar=("DEV", "ADDR", "PORT", "SIZE"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--raw-client", nargs=4, metavar=("DEV", "ADDR", "PORT", "SIZE"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.raw_server:
        d, addr, port, size = a.raw_server
        return raw_server(d, addr, int(port), int(size))
    if a.raw_client:
        d, addr, port, size = a.raw_client
        return raw_client(d, addr, int(port), int(size))
    return Bench(a).run()


if __name__ == "__main__":
    sys.exit(main())
