"""The daemon's Prometheus metrics (docs/metrics.md), scraped over HTTP from live daemons.

Two daemons run in this process on loopback addresses: beta, a real `Daemon` whose target
resource writes into an image file, started as `repctl daemon` starts it; and alpha, the
primary, a real `Daemon` and `SourceResource` (engine, links, listener) whose kernel consumer
is an in-memory ring (`fakering.FakeRing`: no device-mapper on the host). Between them the real wire
protocol: a full sync, then records, acknowledged durable. Each daemon serves its metrics on
127.0.0.1, an ephemeral port; the test reads them as Prometheus does, parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from fakering import start_without_device_mapper
from prometheus_client.parser import text_string_to_metric_families
from repctl import __version__, cli
from repctl import protocol as P
from repctl.config import Config, load_config
from repctl.daemon import Daemon, SourceResource
from repctl.daemon.metrics import build
from repctl.daemon.state import LinkState
from repctl.daemon.stats import LATENCY_BUCKETS, Histogram, Stats
from repctl.errors import AuthError, HandshakeRefused, ProtocolError
from typer.testing import CliRunner

CHUNK = 4096
SIZE = 4 << 20
SECRET = "test-secret-0123456789abcdef"
ALPHA, BETA, GAMMA = "127.0.0.2", "127.0.0.3", "127.0.0.4"  # gamma: nothing listens there


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, *, metrics: Any = None) -> Path:
    for name in ("data.img", "replica.img"):
        with open(tmp / name, "wb") as f:
            f.truncate(SIZE)
    secret = tmp / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    path = tmp / "repctl.yaml"
    path.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp / "s.sock"), "state_dir": str(tmp / "st"),
                   "secret_file": str(secret), **({"metrics": metrics} if metrics else {})},
        "resources": {"r0": {
            "port": free_port(BETA), "source": "alpha", "chunk_size": CHUNK,
            "nodes": {"alpha": {"address": ALPHA, "device": str(tmp / "data.img"),
                                "metadata": str(tmp / "md.img")},
                      "beta": {"address": BETA, "device": str(tmp / "replica.img")},
                      "gamma": {"address": GAMMA, "device": str(tmp / "gamma.img")}},
            "targets": {"beta": {"mode": "sync"}, "gamma": {"mode": "async"}},
        }},
    }))
    return path


def with_metrics(config: Config) -> Config:
    """`config` serving metrics on 127.0.0.1, a port the kernel picks (the file cannot say 0)."""
    return dataclasses.replace(
        config, global_=dataclasses.replace(config.global_, metrics=("127.0.0.1", 0)))


def until(cond: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def scrape(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample the daemon serves now: (name, labels) -> value."""
    assert daemon.metrics is not None and daemon.metrics.bound is not None
    host, port = daemon.metrics.bound
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """The one sample `name` whose labels include `labels`."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def names(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {n for n, _ in samples}


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """alpha (primary) and beta (sync target), each a live daemon serving metrics."""
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    config = with_metrics(load_config(write_config(tmp_path)))
    beta = Daemon(config, "beta")
    alpha = Daemon(config, "alpha")
    try:
        beta.start()
        alpha.start()
        assert not alpha.failed and not beta.failed, (alpha.failed, beta.failed)
        src = alpha.resources["r0"]
        assert isinstance(src, SourceResource)
        yield SimpleNamespace(alpha=alpha, beta=beta, src=src, ring=src.consumer,
                              link=src.link("beta"), port=config.resource("r0").port,
                              tmp=tmp_path)
    finally:
        alpha.stop()
        beta.stop()


def test_a_live_daemon_serves_its_replication_metrics(cluster: SimpleNamespace) -> None:
    link, ring = cluster.link, cluster.ring
    until(lambda: link.state is LinkState.STREAMING, "beta to stream after its full sync")
    for i in range(20):
        ring.write(i * 8 * 3, bytes([i + 1]) * CHUNK)
    until(lambda: link.durable >= ring.next_seq - 1, "beta to hold every record durable")

    t0 = time.perf_counter()
    a = scrape(cluster.alpha)
    took = time.perf_counter() - t0
    print(f"scrape of alpha: {took * 1000:.1f} ms, {len(a)} samples")
    assert took < 2
    beta_t = {"node": "alpha", "resource": "r0", "target": "beta"}
    gamma_t = {**beta_t, "target": "gamma"}
    assert value(a, "repctl_daemon_info", node="alpha", version=__version__) == 1
    assert value(a, "repctl_resource_role", node="alpha", role="primary") == 1
    assert value(a, "repctl_resource_role", node="alpha", role="secondary") == 0
    assert value(a, "repctl_resource_failed", node="alpha") == 0
    assert value(a, "repctl_resource_kernel_mode", mode="streaming") == 1
    assert value(a, "repctl_resource_kernel_mode", mode="tracking") == 0
    assert value(a, "repctl_resource_size_bytes", resource="r0") == SIZE
    assert value(a, "repctl_resource_ring_size_bytes", resource="r0") == 32 << 20
    # one series per state, 1 for the current one
    for state in LinkState:
        assert value(a, "repctl_target_state", **beta_t, state=state) == (
            state is LinkState.STREAMING)
        assert value(a, "repctl_target_state", **gamma_t, state=state) == (
            state is LinkState.CONNECTING)
    assert value(a, "repctl_target_info", **beta_t, mode="sync",
                 address=f"{BETA}:{cluster.port}") == 1
    assert value(a, "repctl_target_connected", **beta_t) == 1
    assert value(a, "repctl_target_connected", **gamma_t) == 0
    # the full sync, then the 20 records: exactly
    assert value(a, "repctl_target_sent_bytes_total", **beta_t) == SIZE + 20 * CHUNK
    assert value(a, "repctl_target_resync_sent_bytes_total", **beta_t) == SIZE
    assert value(a, "repctl_target_sent_bytes_total", **gamma_t) == 0
    assert value(a, "repctl_target_out_of_sync_bytes", **beta_t) == 0
    assert value(a, "repctl_target_out_of_sync_bytes", **gamma_t) == SIZE  # never synced
    assert value(a, "repctl_target_lag_records", **beta_t) == 0
    assert value(a, "repctl_target_resync_rate_bytes_per_second", **beta_t) == 0
    # the sync target's acks were timed; the async one has no histogram
    count = value(a, "repctl_target_sync_ack_latency_seconds_count", **beta_t)
    assert count >= 1
    assert value(a, "repctl_target_sync_ack_latency_seconds_bucket", **beta_t, le="+Inf") == count
    assert 0 < value(a, "repctl_target_sync_ack_latency_seconds_sum", **beta_t) < 10 * count
    buckets = [value(a, "repctl_target_sync_ack_latency_seconds_bucket", **beta_t,
                     le=str(b)) for b in LATENCY_BUCKETS]
    assert buckets == sorted(buckets) and buckets[-1] <= count
    assert not [k for k in a if k[0].startswith("repctl_target_sync_ack")
                and ("target", "gamma") in k[1]]
    assert "process_resident_memory_bytes" in names(a)

    b = scrape(cluster.beta)
    mine = {"node": "beta", "resource": "r0"}
    assert value(b, "repctl_resource_role", **mine, role="secondary") == 1
    assert value(b, "repctl_resource_replica_state", **mine, state="streaming") == 1
    assert value(b, "repctl_resource_replica_state", **mine, state="syncing") == 0
    assert value(b, "repctl_resource_disk_state", **mine, state="UpToDate") == 1
    assert value(b, "repctl_resource_connected", **mine) == 1
    assert value(b, "repctl_resource_received_bytes_total", **mine) == SIZE + 20 * CHUNK
    assert not [n for n in names(b) if n.startswith("repctl_target_")
                and n != "repctl_target_info"]
    assert (cluster.tmp / "replica.img").read_bytes() == (cluster.tmp / "data.img").read_bytes()


def test_refusals_are_counted_by_reason_on_the_node_that_refused(
        cluster: SimpleNamespace) -> None:
    until(lambda: cluster.link.state is LinkState.STREAMING, "beta to stream")

    def handshake(host: str, node: str, secret: str, role: P.Role = P.Role.SOURCE,
                  expect: str = "beta") -> None:
        with socket.create_connection((host, cluster.port), timeout=5) as sock:
            conn = P.FramedConnection(sock)
            local = P.HandshakeInfo("r0", node, role, SIZE, CHUNK, P.Generations(7))
            P.handshake(conn, local, secret.encode(), P.Expect(frozenset({expect})), timeout=5)

    with pytest.raises(AuthError):  # a forged peer: another secret
        handshake(BETA, "alpha", "not-the-secret-0123456789")
    with pytest.raises(HandshakeRefused, match="UNEXPECTED_NODE"):  # a node not of r0
        handshake(BETA, "mallory", SECRET)
    with socket.create_connection((BETA, cluster.port), timeout=5) as sock:  # not the protocol
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n" + bytes(64))
        sock.recv(4096)
    with socket.create_connection((BETA, cluster.port), timeout=5):
        pass  # a port probe that only connects: no refusal
    # the primary tells a peer that would promote it is the primary
    with pytest.raises(HandshakeRefused, match="ROLE_CONFLICT"):
        handshake(ALPHA, "beta", SECRET, expect="alpha")

    beta = {"node": "beta", "resource": "r0", "by": "local"}
    wanted = {"auth_failed": 1, "unexpected_node": 1, "protocol": 1}

    def counted() -> dict[str, float]:
        return {dict(k[1])["reason"]: v for k, v in scrape(cluster.beta).items()
                if k[0] == "repctl_resource_refusals_total" and set(beta.items()) <= k[1]}
    until(lambda: counted() == wanted, f"beta to count {wanted} (has {counted()})", 10)
    a = scrape(cluster.alpha)
    assert value(a, "repctl_resource_refusals_total", node="alpha", reason="role_conflict",
                 by="local") == 1
    assert cluster.link.state is LinkState.STREAMING  # none of it touched the session


def test_a_fall_into_tracking_is_counted_with_the_kernels_reason(
        cluster: SimpleNamespace) -> None:
    link, ring = cluster.link, cluster.ring
    until(lambda: link.state is LinkState.STREAMING, "beta to stream")
    assert not [k for k in scrape(cluster.alpha) if k[0] == "repctl_resource_fallbacks_total"]
    ring.fall_behind("ring_full")
    until(lambda: cluster.alpha.stats.fallbacks, "the engine to see the fall")
    until(lambda: link.joined and link.state is LinkState.STREAMING, "beta to stream again")
    ring.write(0, b"x" * CHUNK)
    until(lambda: link.durable >= ring.next_seq - 1, "beta to hold the new record")
    a = scrape(cluster.alpha)
    assert value(a, "repctl_resource_fallbacks_total", node="alpha", resource="r0",
                 reason="ring_full") == 1
    assert value(a, "repctl_resource_kernel_mode", mode="streaming") == 1
    assert value(a, "repctl_target_state", target="beta", state="streaming") == 1


def test_the_endpoint_closes_with_the_daemon(tmp_path: Path) -> None:
    d = Daemon(with_metrics(load_config(write_config(tmp_path))), "beta")
    d.start()
    assert d.metrics is not None and d.metrics.bound is not None
    host, port = d.metrics.bound
    assert scrape(d)
    d.stop()
    assert d.metrics is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()
    d.stop()  # twice: nothing left to stop


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """`repctl daemon` points the root logger at CliRunner's stderr, closed afterwards: put
    back what was there, so that later tests do not log into a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("cli_logging")
def test_a_port_in_use_stops_repctl_daemon_before_anything_comes_up(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = write_config(tmp_path, metrics=port)  # a bare port: 127.0.0.1
        result = CliRunner().invoke(cli.app, ["-c", str(config), "daemon", "--node", "beta"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert (f"cannot serve metrics on 127.0.0.1:{port} (global.metrics in {config}): "
            "Address already in use: another process listens there") in result.stderr
    resource_port = load_config(config).resource("r0").port
    with pytest.raises(ConnectionRefusedError):  # beta's resource never listened
        socket.create_connection((BETA, resource_port), timeout=2).close()
    assert not (tmp_path / "s.sock").exists()  # and the control socket is gone again


@pytest.mark.usefixtures("cli_logging")
def test_a_bad_metrics_value_is_refused_by_the_daemon_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, metrics="localhost")
    result = CliRunner().invoke(cli.app, ["-c", str(config), "daemon", "--node", "beta"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert f"{config}:" in result.stderr and "global.metrics: expected a port" in result.stderr
    assert not (tmp_path / "st").exists()  # nothing ran


def test_without_metrics_the_daemon_never_imports_prometheus_client(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code = textwrap.dedent(f"""\
        import sys
        from repctl.config import load_config
        from repctl.daemon import Daemon
        d = Daemon(load_config({str(config)!r}), "beta")
        d.start()
        assert "r0" in d.resources and d.metrics is None
        d.stop()
        print(sorted(m for m in sys.modules if m.startswith(("prometheus", "repctl.daemon.met"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------------------- the families


def families_of(status: dict[str, Any], stats: Stats | None = None) -> dict[
        tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self) -> Any:
            return build(status, stats or Stats())

    reg = CollectorRegistry()
    reg.register(One())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_resync_shows_its_rate_and_time_left() -> None:
    target = {"name": "gamma", "mode": "async", "state": "syncing", "connection": "connected",
              "address": "192.0.2.7:7789", "out_of_sync_bytes": 3 << 30, "bytes_sent": 1 << 30,
              "resync_bytes": 1 << 30, "lag_records": 7, "lag_bytes": 1 << 20,
              "sync": {"done_bytes": 1 << 30, "total_bytes": 4 << 30, "rate_bps": 50e6,
                       "eta_s": 64.0}}
    starting = {**target, "name": "delta",
                "sync": {"done_bytes": 0, "total_bytes": 1 << 20, "rate_bps": 0.0, "eta_s": None}}
    status = {"node": "alpha", "resources": [{"name": "r0", "role": "primary",
                                               "disk": "UpToDate", "targets": [target, starting]}]}
    s = families_of(status)
    assert value(s, "repctl_target_resync_rate_bytes_per_second", target="gamma") == 50e6
    assert value(s, "repctl_target_resync_eta_seconds", target="gamma") == 64
    assert value(s, "repctl_target_resync_done_bytes", target="gamma") == 1 << 30
    assert value(s, "repctl_target_resync_total_bytes", target="gamma") == 4 << 30
    assert value(s, "repctl_target_lag_records", target="gamma") == 7
    assert value(s, "repctl_target_lag_bytes", target="gamma") == 1 << 20
    assert math.isnan(value(s, "repctl_target_resync_eta_seconds", target="delta"))
    assert value(s, "repctl_target_state", target="gamma", state="syncing") == 1


def test_a_failed_resource_and_the_counters() -> None:
    stats = Stats()
    stats.refusal("r0", HandshakeRefused(P.RefuseReason.BUSY, "busy", remote=True))
    stats.refusal("r0", HandshakeRefused(P.RefuseReason.BUSY, "busy", remote=True))
    stats.refusal("r0", HandshakeRefused(P.RefuseReason.SPLIT_BRAIN, "split"))
    stats.refusal("r0", HandshakeRefused(99, "a newer peer's reason", remote=True))
    stats.handshake_failed("r0", ProtocolError("handshake timed out"))
    stats.handshake_failed("r0", OSError("reset"))  # not a refusal
    stats.target_fell_behind("r0", "gamma")
    stats.fell_behind("r0", "sync_timeout")
    status = {"node": "alpha", "resources": [
        {"name": "r0", "role": "primary", "state": "failed", "last_error": "engine: boom",
         "targets": []},
        {"name": "r1", "role": "secondary", "state": "failed", "last_error": "no device",
         "targets": []}]}
    s = families_of(status, stats)
    assert value(s, "repctl_resource_failed", resource="r0") == 1
    assert value(s, "repctl_resource_failed", resource="r1") == 1
    assert value(s, "repctl_resource_replica_state", resource="r1", state="failed") == 1
    assert value(s, "repctl_resource_refusals_total", reason="busy", by="peer") == 2
    assert value(s, "repctl_resource_refusals_total", reason="split_brain", by="local") == 1
    assert value(s, "repctl_resource_refusals_total", reason="99", by="peer") == 1
    assert value(s, "repctl_resource_refusals_total", reason="protocol", by="local") == 1
    assert len([k for k in s if k[0] == "repctl_resource_refusals_total"]) == 4
    assert value(s, "repctl_target_fallbacks_total", target="gamma", reason="max_lag") == 1
    assert value(s, "repctl_resource_fallbacks_total", reason="sync_timeout") == 1


def test_the_histogram_counts_a_bound_in_its_bucket() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 5.0):
        h.observe(v)
    assert h.snapshot() == ([(0.001, 2), (0.01, 3)], 4, pytest.approx(5.0035))
