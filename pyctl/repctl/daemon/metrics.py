"""Prometheus metrics of the daemon, served over HTTP (`global.metrics`, docs/metrics.md).

One collector builds every family at scrape time from what `repctl status` shows
(`Daemon.status`) and the daemon's counters (`stats`): nothing is updated on the I/O path for
the metrics' sake. The server is prometheus_client's own, on a registry of its own (never the
process-wide default one). Only this module imports prometheus_client, and the service imports
this module only when metrics are on: the CLI and a daemon without metrics never load it.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from repctl import __version__
from repctl.config import format_host_port
from repctl.daemon.state import DiskState, LinkState, ReplicaState, Role
from repctl.daemon.stats import Stats
from repctl.errors import ReplError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from repctl.daemon.service import Daemon

log = logging.getLogger("repctl.daemon")

__all__ = ["MetricsServer", "RepctlCollector"]

KERNEL_MODES = ("streaming", "tracking")  # the kernel's modes (dm-repl-uapi.h, REPL_MODE_*)
RES = ["node", "resource"]
TGT = ["node", "resource", "target"]


class RepctlCollector(Collector):
    """Every repctl family, from the daemon's status document and counters at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        try:
            families = build(self.daemon.status(), self.daemon.stats.snapshot())
        except Exception:
            log.exception("metrics: cannot build the families (the scrape fails)")
            raise
        yield from families


def _one_per(family: GaugeMetricFamily, labels: list[str], values: Iterable[str],
             current: object) -> None:
    """A state as one series per possible value, 1 for the current one (drbd-reactor's way)."""
    for value in map(str, values):
        family.add_metric([*labels, value], 1.0 if str(current) == value else 0.0)


def _num(value: Any) -> float:
    """A status number as a sample value: NaN for a number not known (null)."""
    return math.nan if value is None else float(value)


def build(status: dict[str, Any], stats: Stats) -> list[Metric]:
    """The families of one scrape."""
    node = str(status.get("node", ""))
    g = GaugeMetricFamily
    c = CounterMetricFamily

    info = InfoMetricFamily("repctl_daemon", "The repctl daemon serving these metrics.",
                            labels=["node"])
    info.add_metric([node], {"version": __version__})
    role = g("repctl_resource_role", "The role of this node for the resource: 1 for its role, "
             "0 for the others.", labels=[*RES, "role"])
    failed = g("repctl_resource_failed", "1 if the resource failed on this node (it could "
               "not come up, or its engine stopped): last_error in `repctl status` says why.",
               labels=RES)
    disk = g("repctl_resource_disk_state", "What this node's copy is worth (DRBD's disk "
             "states): 1 for the current one, 0 for the others.", labels=[*RES, "state"])
    replica = g("repctl_resource_replica_state", "A secondary's own state of its copy: 1 for "
                "the current one, 0 for the others.", labels=[*RES, "state"])
    connected = g("repctl_resource_connected", "A secondary: 1 while its primary is connected.",
                  labels=RES)
    received = c("repctl_resource_received_bytes", "A secondary: bytes of records and resync "
                 "chunks received since the resource came up.", labels=RES)
    size = g("repctl_resource_size_bytes", "The primary: the size of the replicated device.",
             labels=RES)
    kmode = g("repctl_resource_kernel_mode", "The primary: the kernel target's mode: 1 for the "
              "current one (streaming: writes go to the ring; tracking: only to the bitmap).",
              labels=[*RES, "mode"])
    dirty = g("repctl_resource_dirty_bytes", "The primary: bytes of the chunks marked in the "
              "kernel's dirty bitmap (writes not yet known to be on every target).", labels=RES)
    ring_used = g("repctl_resource_ring_used_bytes", "The primary: bytes of the kernel's ring "
                  "held by records not yet acknowledged by every target.", labels=RES)
    ring_size = g("repctl_resource_ring_size_bytes", "The primary: the size of the kernel's "
                  "ring.", labels=RES)
    fallbacks = c("repctl_resource_fallbacks", "The primary: times the kernel fell into bitmap "
                  "tracking (stopped its ring), by the kernel's reason.", labels=[*RES, "reason"])
    refusals = c("repctl_resource_refusals", "Handshakes refused, by reason; by=local: this node "
                 "refused the peer, by=peer: the peer refused this node.",
                 labels=[*RES, "reason", "by"])

    t_info = InfoMetricFamily("repctl_target", "A target of a resource this node is the primary "
                              "of: its mode and address.", labels=TGT)
    t_state = g("repctl_target_state", "The target's mirror state: 1 for the current one, 0 for "
                "the others.", labels=[*TGT, "state"])
    t_connected = g("repctl_target_connected", "1 while a session with the target is up.",
                    labels=TGT)
    t_lag_rec = g("repctl_target_lag_records", "Ring records published and not yet acknowledged "
                  "by the target.", labels=TGT)
    t_lag_bytes = g("repctl_target_lag_bytes", "Ring bytes not yet acknowledged, while the "
                    "target lags (the ring in use: its upper bound).", labels=TGT)
    t_oos = g("repctl_target_out_of_sync_bytes", "Bytes of the chunks the target lacks (its "
              "out-of-sync bitmap on this node): what a resync would send.", labels=TGT)
    t_done = g("repctl_target_resync_done_bytes", "Bytes the running resync has confirmed on "
               "the target (0 when none runs).", labels=TGT)
    t_total = g("repctl_target_resync_total_bytes", "Bytes the running resync started with (0 "
                "when none runs).", labels=TGT)
    t_rate = g("repctl_target_resync_rate_bytes_per_second", "The running resync's average "
               "rate (0 when none runs).", labels=TGT)
    t_eta = g("repctl_target_resync_eta_seconds", "The running resync's time left at its "
              "average rate (0 when none runs, NaN before a first window is confirmed).",
              labels=TGT)
    t_sent = c("repctl_target_sent_bytes", "Bytes of records and resync chunks sent to the "
               "target since the resource came up.", labels=TGT)
    t_resync = c("repctl_target_resync_sent_bytes", "Of repctl_target_sent_bytes_total, the "
                 "resync chunks.", labels=TGT)
    t_comp_raw = c("repctl_target_compression_raw_bytes", "Records (data and heads) and resync "
                   "chunks sent while a codec was negotiated with the target, before compression.",
                   labels=TGT)
    t_comp_wire = c("repctl_target_compression_wire_bytes", "What went on the wire for "
                    "repctl_target_compression_raw_bytes_total: compressed, or as it was where "
                    "compression did not pay.", labels=TGT)
    t_comp_skip = c("repctl_target_compression_skipped_bytes", "Of "
                    "repctl_target_compression_raw_bytes_total, the data sent uncompressed "
                    "because it did not compress to 7/8 of its size or less.", labels=TGT)
    t_fallbacks = c("repctl_target_fallbacks", "Times an async target passed its max_lag and "
                    "fell into its bitmap.", labels=[*TGT, "reason"])
    t_latency = HistogramMetricFamily(
        "repctl_target_sync_ack_latency_seconds", "A sync target: seconds from sending a batch "
        "of records until the target acknowledged them durable.", labels=TGT)

    for res in status.get("resources", []):
        name = str(res.get("name"))
        rl = [node, name]
        _one_per(role, rl, Role, res.get("role"))
        failed.add_metric(rl, 1.0 if res.get("state") == LinkState.FAILED else 0.0)
        if res.get("disk") is not None:
            _one_per(disk, rl, DiskState, res.get("disk"))
        if res.get("role") == Role.SECONDARY:
            _one_per(replica, rl, ReplicaState, res.get("state"))
            if "connection" in res:
                connected.add_metric(rl, 1.0 if res["connection"] == "connected" else 0.0)
            if "bytes_received" in res:
                received.add_metric(rl, float(res["bytes_received"]))
        if res.get("size") is not None:
            size.add_metric(rl, float(res["size"]))
        kernel = res.get("kernel")
        if kernel:
            _one_per(kmode, rl, KERNEL_MODES, kernel.get("mode"))
            dirty.add_metric(rl, float(kernel.get("dirty_chunks", 0) * kernel.get("chunk_size", 0)))
            ring_used.add_metric(rl, float(kernel.get("ring_used", 0)))
            ring_size.add_metric(rl, float(kernel.get("ring_bytes", 0)))
        for t in res.get("targets", []):
            tl = [node, name, str(t.get("name"))]
            t_info.add_metric(tl, {"mode": str(t.get("mode", "")),
                                   "address": str(t.get("address", ""))})
            _one_per(t_state, tl, LinkState, t.get("state"))
            t_connected.add_metric(tl, 1.0 if t.get("connection") == "connected" else 0.0)
            t_lag_rec.add_metric(tl, float(t.get("lag_records", 0)))
            t_lag_bytes.add_metric(tl, float(t.get("lag_bytes", 0)))
            t_oos.add_metric(tl, float(t.get("out_of_sync_bytes", 0)))
            sync = t.get("sync") or {}
            t_done.add_metric(tl, float(sync.get("done_bytes", 0)))
            t_total.add_metric(tl, float(sync.get("total_bytes", 0)))
            t_rate.add_metric(tl, float(sync.get("rate_bps", 0)))
            t_eta.add_metric(tl, _num(sync.get("eta_s")) if sync else 0.0)
            t_sent.add_metric(tl, float(t.get("bytes_sent", 0)))
            t_resync.add_metric(tl, float(t.get("resync_bytes", 0)))
            t_comp_raw.add_metric(tl, float(t.get("compression_raw_bytes", 0)))
            t_comp_wire.add_metric(tl, float(t.get("compression_wire_bytes", 0)))
            t_comp_skip.add_metric(tl, float(t.get("compression_skipped_bytes", 0)))

    for (resource, reason), n in sorted(stats.fallbacks.items()):
        fallbacks.add_metric([node, resource, reason], float(n))
    for (resource, reason, by), n in sorted(stats.refusals.items()):
        refusals.add_metric([node, resource, reason, by], float(n))
    for (resource, target), n in sorted(stats.target_fallbacks.items()):
        t_fallbacks.add_metric([node, resource, target, "max_lag"], float(n))
    for (resource, target), hist in sorted(stats.ack_latency.items()):
        cumulative, count, total = hist.snapshot()
        buckets = [(floatToGoString(bound), float(n)) for bound, n in cumulative]
        buckets.append(("+Inf", float(count)))
        t_latency.add_metric([node, resource, target], buckets, total)

    return [info, role, failed, disk, replica, connected, received, size, kmode, dirty,
            ring_used, ring_size, fallbacks, refusals, t_info, t_state, t_connected, t_lag_rec,
            t_lag_bytes, t_oos, t_done, t_total, t_rate, t_eta, t_sent, t_resync, t_comp_raw,
            t_comp_wire, t_comp_skip, t_fallbacks, t_latency]


class MetricsServer:
    """The HTTP endpoint: started before the resources come up, stopped after they went."""

    def __init__(self, daemon: Daemon, address: tuple[str, int]) -> None:
        self.daemon = daemon
        self.address = address  # as configured; `bound` is where it listens (port 0: any)
        self.bound: tuple[str, int] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RepctlCollector(daemon))
        ProcessCollector(registry=self.registry)  # process_*: memory, CPU, file descriptors
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen; ReplError (nothing started) if the address cannot be had."""
        host, port = self.address
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as e:
            raise ReplError(
                f"cannot serve metrics on {format_host_port(host, port)} (global.metrics in "
                f"{self.daemon.config.file}): {e.strerror or e}"
                + (": another process listens there" if e.errno == errno.EADDRINUSE else "")
            ) from None
        self._thread.name = "metrics-http"
        bound_host, bound_port = self._server.server_address[:2]
        self.bound = (str(bound_host), int(bound_port))
        log.info("metrics: serving Prometheus metrics on http://%s/metrics",
                 format_host_port(*self.bound))

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
