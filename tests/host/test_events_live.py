"""Live events, and the engine that the kernel wakes (docs/architecture.md, "The engine's
wake-ups"; docs/cli.md, `repctl events`).

As in test_metrics.py: beta, a real target daemon writing into an image file, and alpha, a real
source daemon whose kernel consumer is `fakering.FakeRing`, with the poll() of the real file
(POLLPRI on a mode change, POLLIN on a record). The engine under test is the real one: it must
sleep while nothing happens, wake at once on a mode change or an ack, and the links must report
connection changes and a resync's progress as events, which `repctl events --json` prints.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakering import FakeRing, start_without_device_mapper
from repctl import render
from repctl.config import load_config
from repctl.control import ControlServer
from repctl.daemon import Daemon, SourceResource, link, source
from repctl.daemon.source import Wakeup
from repctl.daemon.state import Connection, Event, LinkState
from test_cli_start import NEVER, RICH, loaded, modules_after_ctrl_c
from test_daemon_safety import make_source
from test_metrics import SIZE, until, write_config

ENGINE = "engine-r0"  # the engine thread's name: FakeRing counts its GET_STATEs


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    yield from live_daemons(tmp_path, monkeypatch)


def live_daemons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """alpha (primary, FakeRing) and beta (sync target), with alpha's events followed from
    before it came up; gamma (async) never answers."""
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    config = load_config(write_config(tmp_path))
    beta = Daemon(config, "beta")
    alpha = Daemon(config, "alpha")
    events = alpha.events.subscribe()
    seen: list[dict[str, Any]] = []

    def collect(what: Any = None, until_: Any = None, timeout: float = 20) -> list[
            dict[str, Any]]:
        """Events received so far (and until `until_` holds for one), of kind `what`."""
        deadline = time.monotonic() + timeout
        while until_ is not None and not any(until_(e) for e in seen):
            try:
                seen.append(events.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                break
        while not events.empty():
            seen.append(events.get_nowait())
        return [e for e in seen if what is None or e["what"] == what]

    try:
        beta.start()
        alpha.start()
        src = alpha.resources["r0"]
        assert isinstance(src, SourceResource)
        ring = src.consumer
        assert isinstance(ring, FakeRing)
        yield SimpleNamespace(alpha=alpha, beta=beta, src=src, ring=ring, link=src.link("beta"),
                              collect=collect, config=config)
    finally:
        alpha.stop()
        beta.stop()


def streaming(live: SimpleNamespace) -> None:
    until(lambda: live.link.state is LinkState.STREAMING
          and live.link.durable >= live.ring.next_seq - 1
          and live.ring.acked >= live.ring.next_seq - 1, "beta to stream, every record acked")


def test_an_idle_engine_sleeps_and_a_mode_change_wakes_it_at_once(live: SimpleNamespace) -> None:
    ring = live.ring
    streaming(live)
    time.sleep(0.5)  # the last look after the final ack
    before = ring.gets[ENGINE]
    time.sleep(2.0)
    looks = ring.gets[ENGINE] - before
    print(f"idle engine: {looks / 2:.1f} GET_STATE per second (20 with a 50 ms poll)")
    assert looks <= 6, f"the idle engine read the kernel state {looks} times in 2 s"

    # the kernel falls behind: POLLPRI wakes the engine, long before any timeout would
    t0 = time.monotonic()
    ring.fall_behind("ring_full")
    until(lambda: live.alpha.stats.fallbacks, "the engine to see the fall", timeout=5)
    took = time.monotonic() - t0
    print(f"mode change seen after {took * 1000:.1f} ms")
    assert took < 0.5
    assert live.collect(Event.FELL_BEHIND, lambda e: e["what"] == Event.FELL_BEHIND)[0][
        "text"] == "ring_full"
    streaming(live)


def test_a_change_read_first_by_another_thread_still_wakes_the_engine(
        live: SimpleNamespace) -> None:
    """A link's GET_STATE moves the file's baseline: the kernel's POLLPRI is gone before the
    engine looked. `kernel_state` passes the change on."""
    ring, src = live.ring, live.src
    streaming(live)
    time.sleep(0.5)
    t0 = time.monotonic()
    with ring.cond:  # the kernel falls behind, and a link reads the state before the engine
        ring.streaming, ring.reason = False, "sync_timeout"
        ring.events += 1
        src.kernel_state()
        assert ring.seen_events == ring.events  # no POLLPRI left for the engine
    until(lambda: live.alpha.stats.fallbacks, "the engine to see the fall", timeout=5)
    assert time.monotonic() - t0 < 0.5
    streaming(live)


def test_an_ack_wakes_the_engine(live: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the ring's poll out of the way (LAG_POLL of 10 s), the kernel gets its ACK as soon
    as beta acknowledges: the receiver's wake-up, not a timeout."""
    ring, src = live.ring, live.src
    streaming(live)
    monkeypatch.setattr(source, "LAG_POLL", 10.0)
    wakers: list[str] = []
    real_set = src.engine_wake.set

    def counted_set() -> None:
        wakers.append(threading.current_thread().name)
        real_set()

    monkeypatch.setattr(src.engine_wake, "set", counted_set)
    time.sleep(0.2)  # the engine sleeps its idle sleep now
    for i in range(5):
        t0 = time.monotonic()
        seq = ring.write(i * 8, bytes([i + 1]) * 4096)
        until(lambda seq=seq: ring.acked >= seq, f"record {seq} acked to the kernel", timeout=5)
        assert time.monotonic() - t0 < 1.0
    assert any(w.startswith("recv-r0-beta") for w in wakers), wakers
    streaming(live)


def test_with_no_target_joined_a_record_wakes_the_engine(live: SimpleNamespace) -> None:
    """No link reads the ring (beta paused, gamma away): the engine itself acks what is
    published, woken by POLLIN, not by its idle timeout (IDLE_WAIT, 10 s)."""
    ring = live.ring
    streaming(live)
    live.alpha.pause("r0", "beta")
    until(lambda: live.link.state is LinkState.PAUSED and not live.link.joined, "beta paused")
    time.sleep(0.3)
    t0 = time.monotonic()
    seq = ring.write(0, b"p" * 4096)
    until(lambda: ring.acked >= seq, "the engine to ack the record itself", timeout=5)
    assert time.monotonic() - t0 < 0.5


def test_the_engine_looks_again_soon_only_while_records_wait(tmp_path: Path) -> None:
    """`_cycle` says busy while an async target holds records back (the max_lag check must see
    the ring grow), and once more after an ACK; then idle."""
    res = make_source(tmp_path, target={"mode": "async", "max_lag": "64KiB"})
    link_ = res.link("beta")
    link_.joined, link_.ack, link_.sent_max = True, 4, 4
    res.last_clean = time.monotonic()
    assert res._cycle() is True  # acked 4 of 10
    link_.ack = 10
    assert res._cycle() is True  # acked the rest: one more look
    assert res._cycle() is False  # nothing in the ring, nothing moved


def test_progress_events_during_a_resync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """beta's full sync of 4 MiB, slowed to about 2.5 s: a progress event at most every second,
    the last one 100 %, then the state streaming; the connection's change before."""
    monkeypatch.setattr(link, "RESYNC_RUN", 16)  # 64 KiB runs ...
    monkeypatch.setattr(link, "RESYNC_WINDOW", 64 << 10)  # ... each confirmed by itself
    real_read = SourceResource.read_chunks

    def slow_read(self: SourceResource, run: range, buf: Any = None) -> memoryview:
        time.sleep(0.04)
        return real_read(self, run, buf)

    monkeypatch.setattr(SourceResource, "read_chunks", slow_read)
    gen = live_daemons(tmp_path, monkeypatch)
    live = next(gen)
    try:
        final = live.collect(Event.PROGRESS, lambda e: e["what"] == Event.PROGRESS
                             and e.get("percent") == 100.0, timeout=30)
        progress = [e for e in final if e.get("target") == "beta"]
        assert progress and progress[-1]["percent"] == 100.0, progress
        for e in progress:
            print(render.event_line(e))
        assert len(progress) >= 2, "a resync of 2.5 s reports its progress on the way"
        last = progress[-1]
        assert last["done_bytes"] == last["total_bytes"] == SIZE and last["eta_s"] == 0.0
        times = [e["time"] for e in progress]
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(times[:-1])), times
        assert times[0] - min(e["time"] for e in live.collect()) >= 0.9  # not before 1 s
        percents = [e["percent"] for e in progress]
        assert percents == sorted(percents) and 0 < percents[0] < 100
        assert all(e["rate_bps"] > 0 and e["total_bytes"] == SIZE for e in progress)
        assert all(e["eta_s"] is not None for e in progress)
        until(lambda: live.link.state is LinkState.STREAMING, "beta to stream")
        everything = live.collect()
        kinds = [(e["what"], e.get("target")) for e in everything]
        assert kinds.index((Event.CONNECTION, "beta")) < kinds.index((Event.PROGRESS, "beta"))
        conn = next(e for e in everything if e["what"] == Event.CONNECTION
                    and e.get("target") == "beta")
        assert (conn["old"], conn["new"]) == (Connection.CONNECTING, Connection.CONNECTED)
        done = [e for e in everything if e["what"] == Event.STATE and e.get("target") == "beta"
                and e["new"] == LinkState.STREAMING]
        assert done and done[0]["time"] >= last["time"]
    finally:
        next(gen, None)


def test_connection_events_follow_a_pause_and_a_resume(live: SimpleNamespace) -> None:
    """On the source, each change of the target's `connection` as `status` shows it; on the
    target, its source coming and going."""
    streaming(live)
    on_beta = live.beta.events.subscribe()
    live.alpha.pause("r0", "beta")
    until(lambda: live.link.state is LinkState.PAUSED, "beta paused")
    live.alpha.resume("r0", "beta")
    streaming(live)

    def beta_conn(e: dict[str, Any]) -> bool:
        return e["what"] == Event.CONNECTION and e.get("target") == "beta"

    live.collect(until_=lambda e: beta_conn(e) and e["old"] == Connection.DOWN)
    conns = [(e["old"], e["new"], e["text"]) for e in live.collect(Event.CONNECTION)
             if beta_conn(e)]
    assert conns == [
        (Connection.CONNECTING, Connection.CONNECTED, conns[0][2]),
        (Connection.CONNECTED, Connection.DOWN, "paused by the administrator"),
        (Connection.DOWN, Connection.CONNECTING, "the administrator asked to connect"),
        (Connection.CONNECTING, Connection.CONNECTED, conns[0][2])], conns
    mine = []
    while not on_beta.empty():
        e = on_beta.get_nowait()
        if e["what"] == Event.CONNECTION:
            assert e["peer"] == "alpha" and e["target"] == "beta"
            mine.append((e["old"], e["new"]))
    assert mine == [(Connection.CONNECTED, Connection.WAITING),
                    (Connection.WAITING, Connection.CONNECTED)], mine


def test_a_wakeup_set_while_the_sleeper_works_is_not_lost() -> None:
    w = Wakeup()
    p = select.poll()
    p.register(w.fileno(), select.POLLIN)
    assert p.poll(0) == []
    w.set()
    w.set()
    assert p.poll(0)
    w.clear()  # the sleeper woke and clears before it works ...
    assert p.poll(0) == []
    w.set()  # ... an ack comes during its work: its next sleep returns at once
    assert p.poll(1000)
    w.clear()
    w.close()
    w.set()  # after close: nothing, never a write to a reused descriptor
    assert w.fileno() == -1


def test_progress_and_connection_lines() -> None:
    progress = {"time": 0, "resource": "r0", "target": "gamma", "what": "progress",
                "done_bytes": 3 << 29, "total_bytes": 4 << 30, "percent": 37.5,
                "rate_bps": 12.0 * 2**20, "eta_s": 64.0}
    assert render.event_line(progress).endswith(
        " r0/gamma progress: 37.5% 12.0 MiB/s ETA 1m04s (1.5 GiB of 4.0 GiB)")
    start = {**progress, "done_bytes": 0, "percent": 0.0, "rate_bps": 0.0, "eta_s": None}
    assert render.event_line(start).endswith(
        " r0/gamma progress: 0.0% 0 B/s (0 B of 4.0 GiB)")
    conn = {"time": 0, "resource": "r0", "target": "gamma", "what": "connection",
            "old": "connecting", "new": "refused: SPLIT_BRAIN", "text": "peer refused"}
    assert render.event_line(conn).endswith(
        " r0/gamma connection: connecting -> refused: SPLIT_BRAIN (peer refused)")


#: Runs `repctl` as its script does, with Ctrl-C as KeyboardInterrupt even in a background job.
DRIVER = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "sys.argv[0] = 'repctl'; from repctl.cli import app; app()")


def test_repctl_events_json_over_a_live_daemon(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`repctl events --json` in its own process, following alpha from before it comes up:
    beta's connection, its full sync's final progress, then Ctrl-C: exit 0, nothing on stderr."""
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    path = write_config(tmp_path)
    config = load_config(path)
    beta = Daemon(config, "beta")
    alpha = Daemon(config, "alpha")
    server = ControlServer(config.global_.control_socket, alpha)
    server.bind()
    server.serve()
    env = {**os.environ, "REPCTL_CONFIG": str(path)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "events", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        until(lambda: alpha.events._subs, "repctl events to subscribe", timeout=60)
        beta.start()
        alpha.start()
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the event stream ended"
            lines.append(line)
            event = json.loads(line)
            if event["what"] == "progress" and event["percent"] == 100.0:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.stop()
        alpha.stop()
        beta.stop()
    assert proc.returncode == 0, err
    assert err == ""
    events = [json.loads(line) for line in lines + rest.splitlines()]
    assert all(isinstance(e["time"], float) and e["resource"] == "r0" for e in events)
    connection = [e for e in events if e["what"] == "connection" and e.get("target") == "beta"]
    assert connection and connection[0]["old"] == "connecting"
    assert connection[0]["new"] == "connected"
    assert connection[0]["text"].startswith("connected to 127.0.0.3:")
    final = [e for e in events if e["what"] == "progress"][-1]
    assert final == {"time": final["time"], "resource": "r0", "target": "beta",
                     "what": "progress", "done_bytes": SIZE, "total_bytes": SIZE,
                     "percent": 100.0, "rate_bps": final["rate_bps"], "eta_s": 0.0}


TWO_EVENTS: list[dict[str, Any]] = [
    {"time": 1795000868.2, "resource": "r0", "target": "gamma", "what": "connection",
     "old": "connecting", "new": "connected", "text": "connected to 192.0.2.7:7789"},
    {"time": 1795000869.2, "resource": "r0", "target": "gamma", "what": "progress",
     "done_bytes": 12 << 20, "total_bytes": 3 << 30, "percent": 0.4,
     "rate_bps": 12.0 * 2**20, "eta_s": 255.0}]


class TwoEvents:
    """A control socket handler with two events to stream."""

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        for e in TWO_EVENTS:
            q.put(e)
        return q


@pytest.mark.parametrize("json_", [False, True])
def test_repctl_events_loads_neither_rich_nor_the_daemon(tmp_path: Path, json_: bool) -> None:
    sockdir = Path(tempfile.mkdtemp(prefix="repctl-", dir="/tmp"))  # short: an AF_UNIX path
    path = tmp_path / "repctl.yaml"
    path.write_text(
        f"global: {{control_socket: {sockdir}/s.sock, state_dir: {tmp_path}/st, "
        f"secret_file: {tmp_path}/secret}}\n"
        "resources:\n  r0:\n    port: 7789\n    source: alpha\n    nodes:\n"
        f"      alpha: {{address: 10.0.0.1, device: {tmp_path}/d.img, metadata: {tmp_path}/m}}\n"
        f"      gamma: {{address: 10.0.0.3, device: {tmp_path}/d.img}}\n"
        "    targets: {gamma: {mode: async}}\n")
    server = ControlServer(sockdir / "s.sock", TwoEvents())  # type: ignore[arg-type]
    server.start()
    try:
        modules, printed, err = modules_after_ctrl_c(
            tmp_path, "events", *(["--json"] if json_ else []), config=path)
    finally:
        server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert err == ""
    assert loaded(modules, NEVER | RICH) == []
    if json_:
        assert [json.loads(line) for line in printed.splitlines()] == TWO_EVENTS
    else:
        lines = printed.splitlines()
        assert lines[0].endswith(" r0/gamma connection: connecting -> connected "
                                 "(connected to 192.0.2.7:7789)")
        assert lines[1].endswith(" r0/gamma progress: 0.4% 12.0 MiB/s ETA 4m15s "
                                 "(12.0 MiB of 3.0 GiB)")
