#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""What a resync costs the application, without and with the resync rate controller.

Runs INSIDE the test VM, as root, with dm-mod, kmod/dm-repl.ko and brd (256 MiB RAM disks)
loaded: bench/run.sh --resync-only (or `make bench-resync`). Two network namespaces joined by
one veth pair, real `repctl daemon` processes in each (bench/replicate_bench.py's Cluster):

    /dev/ram0  source data (incompressible data first)     /dev/ram1  source metadata
    /dev/ram2  target data

The link is shaped like a WAN link that the application's replication shares with the
resync: netem on the source's end of the veth (--link, default `rate 100mbit`; "" for none).
The target is synchronous (--mode, default sync): each application write waits for its
record to cross that link, so a resync that fills the link makes the application wait behind
megabytes of resync data. On RAM disks over a bare veth nothing is shared but the emulated
CPUs, and the controller has nothing to protect (docs/wan.md gives such a run).

The application is fio on /dev/mapper/r0: 4 KiB random writes, O_DIRECT, queue depth 1
(psync), for --runtime seconds. Three runs, in one VM boot, printed side by side:

    idle        fio with the target streaming: no resync (the baseline), after the first
                resync, and again at the end (idle_after: the emulated VM's speed drifts)
    unlimited   a full resync of the 256 MiB device (fresh metadata: a new generation, a
                target that holds nothing) with the controller out of the way
                (`resync: {min_rate: 64GiB}`: no rate is below the floor), fio started as the
                link goes `syncing`
    controlled  the same with the defaults (docs/config.md, `targets.NODE.resync`)

For each: fio's IOPS and its completion latency p50 / p99 (and the mean), and for the two
resyncs their duration (the daemon's own `syncing` -> `streaming` events) and whether the
replica ended identical (byte for byte, O_DIRECT). Absolute speeds under emulation mean
nothing; the runs are comparable side by side.

    resync_bench.py [--results DIR] [--runtime S] [--mode sync|async] [--link NETEM]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicate_bench as rb  # noqa: E402  (sets the pycache prefix before repctl is imported)

MiB = rb.MiB
UNLIMITED = "{min_rate: 64GiB}"  # the controller's floor above any link: it never holds back
RUNS = ("idle", "unlimited", "controlled", "idle_after")


def say(msg: str) -> None:
    print(f"resyncbench: {msg}", flush=True)


def fio_qd1(dev: str, runtime: float, results: Path, tag: str) -> dict[str, Any]:
    """fio: 4 KiB random writes, O_DIRECT, QD1, for `runtime` s; IOPS and latency in ms."""
    cmd = ["fio", f"--name={tag}", f"--filename={dev}", "--rw=randwrite", "--bs=4k",
           "--direct=1", "--ioengine=psync", "--iodepth=1", "--numjobs=1", "--time_based",
           f"--runtime={runtime:g}", f"--size={rb.device_bytes(dev)}", "--randrepeat=0",
           "--output-format=json"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=runtime + 180)
    (results / f"fio-{tag}.json").write_text(p.stdout)
    start = p.stdout.find("{")
    if p.returncode or start < 0:
        raise rb.BenchError(f"fio failed (exit {p.returncode}): {p.stderr}\n{p.stdout[:2000]}")
    w = json.loads(p.stdout[start:])["jobs"][0]["write"]
    pct = w.get("clat_ns", {}).get("percentile", {})
    return {"iops": w["iops"], "lat_ms_mean": w["lat_ns"]["mean"] / 1e6,
            "clat_ms_p50": pct.get("50.000000", 0) / 1e6,
            "clat_ms_p99": pct.get("99.000000", 0) / 1e6, "runtime_s": w["runtime"] / 1000}


class ResyncBench(rb.Bench):
    """replicate_bench's setup (namespaces, devices, daemons), with resync runs."""

    def __init__(self, args: argparse.Namespace):
        args.ring_size = "64MiB"
        args.poll = 0.5
        args.sha256 = False
        super().__init__(args)
        self.out["bench"] = "resync"
        self.runs: dict[str, dict[str, Any]] = {}

    def configure(self, resync: str | None) -> None:
        """Both nodes' configs, with beta async and its `resync` mapping (None: defaults)."""
        c = self.cluster
        assert c is not None
        mode = self.args.mode
        c.write_config(mode)
        if resync is not None:
            for node in c.ns:
                text = c.cfg[node].read_text()
                new = text.replace(f"beta: {{mode: {mode}}}",
                                   f"beta: {{mode: {mode}, resync: {resync}}}")
                if new == text:
                    raise rb.BenchError("tests/vm/cluster.py's config_text changed: no target line")
                c.cfg[node].write_text(new)

    def fresh(self) -> None:
        """Daemons stopped, r0 removed, state folders gone, new metadata, target zeroed: the
        next start is a full resync of the whole device."""
        from repctl import dm

        c = self.cluster
        assert c is not None
        c.stop_all()
        if Path(rb.DEV).exists():
            dm.remove_device(rb.RES, retries=50)
        for node in c.ns:
            rb.sh("rm", "-rf", str(rb.ROOT / node / "state"))
        rb.zero_device(rb.TDATA)
        c.repctl("alpha", "create-md", rb.RES, "--node", "alpha", "--force")

    def resync_run(self, tag: str, resync: str | None) -> dict[str, Any]:
        c = self.cluster
        assert c is not None
        self.configure(resync)  # first: fresh() runs create-md with it
        self.fresh()
        t_start = time.time()
        # alpha's link is down until its events are followed: the `syncing` event is seen
        rb.sh("ip", "-n", rb.SRC_NS, "link", "set", rb.SRC_IF, "down")
        try:
            c.start("beta", "alpha")
        finally:
            rb.sh("ip", "-n", rb.SRC_NS, "link", "set", rb.SRC_IF, "up")
        deadline = time.monotonic() + 300
        while not [e for e in c.events_since("alpha", t_start)
                   if e.get("what") == "state" and e.get("new") == "syncing"]:
            c.check_alive()
            if time.monotonic() > deadline:
                raise rb.BenchError(f"{tag}: the link never went syncing: {c.status()}")
            time.sleep(0.05)
        say(f"{tag}: resync began; fio QD1 4 KiB for {self.args.runtime:g} s")
        v0 = rb.veth_bytes()
        app = fio_qd1(rb.DEV, self.args.runtime, self.results, tag)
        deadline = time.monotonic() + 900
        while True:
            ev = c.events_since("alpha", t_start)
            began = [e for e in ev if e.get("what") == "state" and e.get("new") == "syncing"]
            ended = [e for e in ev if e.get("what") == "state" and e.get("old") == "syncing"
                     and e.get("new") == "streaming"]
            if ended:
                break
            c.check_alive()
            if time.monotonic() > deadline:
                raise rb.BenchError(f"{tag}: the resync did not end within 900 s")
            time.sleep(0.1)
        seconds = ended[0]["time"] - began[0]["time"]
        converged = c.wait_converged()
        v1 = rb.veth_bytes()
        behind = [e for e in c.events_since("alpha", t_start) if e.get("what") == "fell_behind"]
        r = {**app, "resync_s": seconds, "fell_behind": len(behind),
             "resync_mib_s": self.size / MiB / seconds,
             "fio_during_resync": app["runtime_s"] <= seconds,
             "wire_mib": (v1["tx_bytes"] - v0["tx_bytes"]) / MiB,
             "converged_after_s": converged, "resync_config": resync or "defaults",
             "content": self.check(rb.DEV, rb.TDATA, tag)}
        say(f"{tag}: {app['iops']:.0f} IOPS, p50 {app['clat_ms_p50']:.2f} ms, p99 "
            f"{app['clat_ms_p99']:.2f} ms; resync {seconds:.1f} s")
        return r

    def shape(self) -> None:
        """netem on the source's end of the veth: the WAN link's rate (and delay, loss)."""
        self.out["mode"], self.out["link"] = self.args.mode, self.args.link
        if self.args.link:
            rb.sh("modprobe", "sch_netem")
            rb.sh("ip", "netns", "exec", rb.SRC_NS, "tc", "qdisc", "add", "dev", rb.SRC_IF,
                  "root", "netem", *self.args.link.split())

    def idle_run(self, tag: str) -> dict[str, Any]:
        c = self.cluster
        assert c is not None
        c.wait_converged()
        app = fio_qd1(rb.DEV, self.args.runtime, self.results, tag)
        c.wait_converged()
        say(f"{tag}: {app['iops']:.0f} IOPS, p50 {app['clat_ms_p50']:.2f} ms, p99 "
            f"{app['clat_ms_p99']:.2f} ms")
        return app

    def table(self) -> list[str]:
        rows = [f"{'':28}" + "".join(f"{t:>14}" for t in RUNS)]

        def row(label: str, key: str, fmt: str) -> str:
            cells = []
            for t in RUNS:
                v = self.runs.get(t, {}).get(key)
                cells.append(f"{'-' if v is None else format(v, fmt):>14}")
            return f"{label:28}" + "".join(cells)
        rows.append(row("fio QD1 4 KiB write IOPS", "iops", ".0f"))
        rows.append(row("latency p50 (ms)", "clat_ms_p50", ".3f"))
        rows.append(row("latency p99 (ms)", "clat_ms_p99", ".3f"))
        rows.append(row("latency mean (ms)", "lat_ms_mean", ".3f"))
        rows.append(row("resync of 256 MiB (s)", "resync_s", ".1f"))
        rows.append(row("resync rate (MiB/s)", "resync_mib_s", ".1f"))
        rows.append(row("fell_behind events", "fell_behind", "d"))
        return rows

    def run(self) -> int:
        t0 = time.monotonic()
        rc = 0
        try:
            self.preflight()
            self.make_net()
            self.shape()
            self.fill()
            self.cluster = rb.Cluster(self.results, self.args.ring_size)
            self.runs["unlimited"] = self.resync_run("unlimited", UNLIMITED)
            self.runs["idle"] = self.idle_run("idle")
            self.runs["controlled"] = self.resync_run("controlled", None)
            self.runs["idle_after"] = self.idle_run("idle_after")  # the emulated VM drifts
            self.out["runs"] = self.runs
            lines = self.table()
            say(f"beta {self.args.mode}, link netem `{self.args.link or 'none'}`; fio "
                f"{self.args.runtime:g} s per run, started as the resync begins:")
            for ln in lines:
                print(ln, flush=True)
            for t in ("unlimited", "controlled"):
                if not self.runs[t]["fio_during_resync"]:
                    self.note(f"{t}: the resync ended before fio: its figures include time "
                              "without a resync")
            (self.results / "resync-bench.txt").write_text("\n".join(lines) + "\n")
        except Exception as e:  # noqa: BLE001 (reported, exit 1)
            rc = 1
            self.failed(e, say)
        finally:
            rc = self.finish(rc, t0, "resync-bench.json", say)
        return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--results", default="/tmp/resyncbench-results")
    ap.add_argument("--runtime", type=float, default=6, help="seconds of fio per run (6)")
    ap.add_argument("--mode", choices=("sync", "async"), default="sync",
                    help="beta's replication mode (sync: the application waits for the link)")
    ap.add_argument("--link", default="rate 100mbit",
                    help="netem arguments for the source's end of the link ('': not shaped)")
    return ResyncBench(ap.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
