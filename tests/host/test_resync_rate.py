"""Resync pacing (daemon/resyncrate.py), the daemon's resync scheduler (daemon/scheduler.py),
their configuration (docs/config.md, `global.resync`, `targets.NODE.resync`), and, end to end,
three resources of one primary resyncing to one target daemon one at a time.

The controller and the scheduler read no clock: the tests pass `now`, so every number below is
arithmetic, not a measured speed.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from fakering import start_without_device_mapper
from repctl import config as c
from repctl.config import ResyncSettings, load_config, parse_config
from repctl.daemon import Daemon, SourceResource
from repctl.daemon.resyncrate import STEP, ResyncRate, TokenBucket
from repctl.daemon.scheduler import ResyncScheduler
from repctl.daemon.state import Admin, Event, LinkState
from repctl.errors import ConfigError
from test_metrics import ALPHA, BETA, SECRET, free_port, until

MiB = 1 << 20
KiB = 1 << 10

# -- the controller -----------------------------------------------------------------------


def run(ctl: ResyncRate, steps: int, *, t0: float, fill: int = 0, app_bps: float = 0,
        latency: float | None = None, waiting: int = 0,
        send: bool = True) -> tuple[float, list[float]]:
    """`steps` updates of `ctl`, STEP apart from `t0`; with `send`, each step the link sends
    what the rate allows in a step (and the network takes it: `fill` stays as given)."""
    rates = []
    t = t0
    for _ in range(steps):
        t += STEP
        if send:
            ctl.sent(int(ctl.rate * STEP), t)
        rates.append(ctl.update(t, fill=fill, app_bps=app_bps, app_latency=latency,
                                app_waiting=waiting))
    return t, rates


def test_an_idle_application_and_a_short_queue_ramp_the_rate_up_to_max_rate() -> None:
    s = ResyncSettings(min_rate=1 * MiB, max_rate=50 * MiB)
    ctl = ResyncRate(s, 0.0)
    assert ctl.rate == 1 * MiB  # a resync starts at its min_rate
    t, rates = run(ctl, 30, t0=0.0)
    assert rates == sorted(rates), "the rate only grows while the link takes everything"
    assert rates[0] > 1 * MiB
    for a, b in zip(rates, rates[1:]):
        assert b <= a * 1.5 + 1  # a step is at most x1.5
    assert rates[-1] == 50 * MiB, "clamped at max_rate"


def test_unlimited_max_rate_still_follows_what_is_sent() -> None:
    """Without max_rate, the ramp is bounded by twice what the network took plus min_rate:
    a resync that cannot send faster (CPU, disk) does not run up a rate of nothing."""
    ctl = ResyncRate(ResyncSettings(min_rate=1 * MiB), 0.0)
    t, _ = run(ctl, 10, t0=0.0, send=False)  # nothing sent: nothing drained
    assert ctl.rate <= 2 * ctl.drain + 1 * MiB + 1
    assert ctl.rate < 4 * MiB


def test_a_full_queue_slows_the_resync_below_what_the_link_takes() -> None:
    s = ResyncSettings(min_rate=256 * KiB, fill_target=1 * MiB, plan_ahead=2.0)
    ctl = ResyncRate(s, 0.0)
    t, _ = run(ctl, 20, t0=0.0)  # fast link: up we go
    fast = ctl.rate
    # the link slows down: 8 MiB queue, the network takes 2 MiB/s
    ctl.fill = 8 * MiB
    for _ in range(10):
        t += STEP
        ctl.sent(int(ctl.rate * STEP), t)
        took = int(2 * MiB * STEP)
        fill = max(ctl.fill + ctl.sent_since - took, 0)
        ctl.update(t, fill=fill, app_bps=0)
    assert ctl.rate < fast
    # the queue is above target: the rate is below the drain, so that the queue shrinks
    assert ctl.rate < ctl.drain or ctl.rate == s.min_rate
    assert ctl.rate >= s.min_rate


def test_at_the_fill_target_the_rate_is_what_the_network_takes() -> None:
    s = ResyncSettings(min_rate=64 * KiB, fill_target=1 * MiB, plan_ahead=1.0)
    ctl = ResyncRate(s, 0.0)
    ctl.drain = 3 * MiB
    ctl.rate = 3 * MiB
    ctl.fill = 1 * MiB
    ctl.sent(int(0.3 * MiB), 0.05)
    rate = ctl.update(STEP, fill=1 * MiB, app_bps=0)  # took exactly what was sent
    assert rate == pytest.approx(3 * MiB, rel=1e-5)
    # 1 MiB short of the target with plan_ahead 1 s: 1 MiB/s more than the drain
    ctl2 = ResyncRate(s, 0.0)
    ctl2.drain, ctl2.rate, ctl2.fill = 3 * MiB, 3 * MiB, 2 * MiB
    ctl2.sent(int(0.3 * MiB), 0.05)
    rate2 = ctl2.update(STEP, fill=int(1.5 * MiB), app_bps=0)
    assert rate2 < ctl2.drain  # above the target: below the drain


def test_a_busy_application_backs_the_resync_off_to_min_rate_never_below() -> None:
    s = ResyncSettings(min_rate=2 * MiB, max_rate=100 * MiB, app_busy=64 * KiB)
    ctl = ResyncRate(s, 0.0)
    t, _ = run(ctl, 30, t0=0.0)
    assert ctl.rate == 100 * MiB
    t, rates = run(ctl, 12, t0=t, app_bps=1 * MiB)
    assert ctl.busy
    assert rates[0] <= 50 * MiB, "the first busy step halves the rate"
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] == 2 * MiB, "down to min_rate"
    t, rates = run(ctl, 20, t0=t, app_bps=10 * MiB)
    assert set(rates) == {2 * MiB}, "never below min_rate: a resync always finishes"


def test_below_app_busy_the_application_does_not_count() -> None:
    s = ResyncSettings(min_rate=2 * MiB, max_rate=100 * MiB, app_busy=64 * KiB)
    ctl = ResyncRate(s, 0.0)
    run(ctl, 30, t0=0.0, app_bps=32 * KiB)
    assert not ctl.busy and ctl.rate == 100 * MiB


def test_the_resync_recovers_when_the_application_quietens() -> None:
    s = ResyncSettings(min_rate=1 * MiB, max_rate=64 * MiB)
    ctl = ResyncRate(s, 0.0)
    t, _ = run(ctl, 30, t0=0.0, app_bps=5 * MiB)
    assert ctl.rate == 1 * MiB
    t, rates = run(ctl, 15, t0=t)
    assert not ctl.busy
    assert rates == sorted(rates) and rates[-1] == 64 * MiB, "back to max_rate within 1.5 s"


def test_a_writer_starved_behind_the_resync_backs_it_off() -> None:
    """A sync writer behind a link full of resync data completes a write or two a second:
    8 KiB/s, below app_busy, and no latency in most steps. Its write in flight shows it."""
    s = ResyncSettings(min_rate=2 * MiB, max_rate=100 * MiB, app_busy=64 * KiB)
    ctl = ResyncRate(s, 0.0)
    t, _ = run(ctl, 30, t0=0.0, app_bps=8 * KiB)
    assert not ctl.busy and ctl.rate == 100 * MiB, "a starved writer shows no rate"
    t, rates = run(ctl, 12, t0=t, app_bps=8 * KiB, waiting=1)
    assert ctl.busy and rates[-1] == 2 * MiB
    t, rates = run(ctl, 15, t0=t)
    assert not ctl.busy and rates[-1] == 100 * MiB, "nothing waits: back to max_rate"


def test_a_rising_application_latency_backs_the_resync_off() -> None:
    s = ResyncSettings(min_rate=1 * MiB, max_rate=64 * MiB, app_busy=1 << 30)
    ctl = ResyncRate(s, 0.0)
    t, _ = run(ctl, 20, t0=0.0, latency=0.001)  # 1 ms: the baseline
    assert not ctl.busy and ctl.rate == 64 * MiB
    assert ctl.baseline == pytest.approx(0.001)
    t, rates = run(ctl, 10, t0=t, latency=0.005)  # five times the baseline
    assert ctl.busy and rates[-1] == 1 * MiB
    t, _ = run(ctl, 20, t0=t, latency=0.0011)  # back to normal
    assert not ctl.busy and ctl.rate == 64 * MiB


def test_pacing_spaces_the_runs_at_the_rate() -> None:
    ctl = ResyncRate(ResyncSettings(min_rate=1 * MiB, max_rate=1 * MiB), 0.0)
    assert ctl.delay(0.0) == 0
    ctl.sent(1 * MiB, 0.0)  # a whole run at once: into debt
    assert ctl.delay(0.0) == pytest.approx(1.0)
    assert ctl.delay(0.5) == pytest.approx(0.5)
    assert ctl.delay(1.0) == 0


def test_a_token_bucket_saves_at_most_a_burst() -> None:
    b = TokenBucket(1 * MiB, 0.0)
    assert b.delay(100.0) == 0
    b.take(1 * MiB, 100.0)  # 100 s idle saved only 0.1 s worth
    assert b.delay(100.0) == pytest.approx(0.9)
    assert TokenBucket(None, 0.0).delay(0.0) == 0


# -- the scheduler -------------------------------------------------------------------------


def test_the_concurrency_limit_holds_with_many_resyncs_and_slots_go_first_come_first_served(
        ) -> None:
    sched = ResyncScheduler(2, None)
    woken: list[str] = []
    keys = [f"r{i}" for i in range(6)]
    got = [sched.acquire(k, "beta", float(i), lambda k=k: woken.append(k))
           for i, k in enumerate(keys)]
    assert got == [True, True, False, False, False, False]
    assert sched.running() == ["r0", "r1"]
    assert [sched.position(k) for k in keys] == [None, None, 1, 2, 3, 4]
    # asking again keeps the place: no overtaking
    assert not sched.acquire("r5", "beta", 10.0)
    assert sched.position("r5") == 4
    order = []
    while sched.running():
        first = sched.running()[0]
        order.append(first)
        sched.release(first)
        assert len(sched.running()) <= 2
    assert order == keys
    assert woken == ["r2", "r3", "r4", "r5"], "each is woken when its slot comes"


def test_a_resync_that_stops_waiting_gives_its_place_up() -> None:
    sched = ResyncScheduler(1, None)
    for i, k in enumerate("abc"):
        sched.acquire(k, "beta", float(i))
    sched.release("b")  # b's session ended while it waited (a pause, a lost connection)
    assert sched.waiting() == ["c"] and sched.position("c") == 1
    sched.release("a")
    assert sched.running() == ["c"]
    assert sched.acquire("b", "beta", 9.0) is False  # it comes back: at the end of the queue
    assert sched.position("b") == 1
    sched.release("unknown")  # harmless
    assert sched.running() == ["c"]


def test_unlimited_concurrency_runs_everything() -> None:
    sched = ResyncScheduler(None, None)
    assert all(sched.acquire(i, "x", 0.0) for i in range(50))
    assert sched.waiting() == []


def test_the_peer_budget_is_shared_by_the_resyncs_toward_one_peer() -> None:
    sched = ResyncScheduler(None, 1 * MiB)
    now = 0.0
    sent = {"beta": 0, "gamma": 0}
    links = [("r0", "beta"), ("r1", "beta"), ("r2", "gamma")]
    while now < 10.0:
        for _key, peer in links:
            if sched.peer_delay(peer, now) == 0:
                sched.peer_take(peer, 64 * KiB, now)
                sent[peer] += 64 * KiB
        now += 0.01
    # two resyncs toward beta share 1 MiB/s; gamma has its own 1 MiB/s
    for peer in sent:
        assert 9.5 * MiB <= sent[peer] <= 10.5 * MiB, sent
    assert ResyncScheduler(None, None).peer_delay("beta", 0.0) == 0


# -- configuration -------------------------------------------------------------------------

BASE = {
    "resources": {"r0": {
        "port": 7000, "source": "a",
        "nodes": {"a": {"address": "10.0.0.1", "device": "/dev/x", "metadata": "/dev/y"},
                  "b": {"address": "10.0.0.2", "device": "/dev/x"}},
        "targets": {"b": {"mode": "async"}},
    }},
}


def _cfg(glob: Any = None, resync: Any = None) -> c.Config:
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(BASE))
    if glob is not None:
        data["global"] = {"resync": glob}
    if resync is not None:
        data["resources"]["r0"]["targets"]["b"]["resync"] = resync
    return parse_config(yaml.safe_dump(data), "repctl.yaml")


def test_the_resync_defaults() -> None:
    cfg = _cfg()
    assert cfg.global_.resync.concurrency == 2 and cfg.global_.resync.peer_rate is None
    r = cfg.resources["r0"].targets["b"].resync
    assert r == ResyncSettings(min_rate=4 * MiB, max_rate=None, fill_target=2 * MiB,
                               plan_ahead=2.0, app_busy=64 * KiB)


def test_resync_keys_are_parsed_with_their_units_and_survive_a_dump() -> None:
    cfg = _cfg({"concurrency": "unlimited", "peer_rate": "100Mbit"},
               {"min_rate": "512KiB/s", "max_rate": "8MiB", "fill_target": "256KiB",
                "plan_ahead": "500ms", "app_busy": "1Mbit/s"})
    assert cfg.global_.resync.concurrency is None
    assert cfg.global_.resync.peer_rate == 12_500_000
    r = cfg.resources["r0"].targets["b"].resync
    assert (r.min_rate, r.max_rate, r.fill_target, r.plan_ahead, r.app_busy) == (
        512 * KiB, 8 * MiB, 256 * KiB, 0.5, 125_000)
    assert parse_config(cfg.dump()) == cfg
    assert _cfg({"concurrency": 1}).global_.resync.concurrency == 1


@pytest.mark.parametrize(("glob", "resync", "key", "text"), [
    ({"concurrency": 0}, None, "global.resync.concurrency", "an integer from 1 to 1024"),
    ({"concurrency": True}, None, "global.resync.concurrency", "an integer from 1 to 1024"),
    ({"concurrency": "2"}, None, "global.resync.concurrency", "got '2'"),
    ({"peer_rate": "10MB"}, None, "global.resync.peer_rate", "a rate"),
    ({"peer_rate": 0}, None, "global.resync.peer_rate", "from 64KiB/s"),
    ({"peer_rate": "-1M"}, None, "global.resync.peer_rate", "a rate"),
    ({"peer_rates": 1}, None, "global.resync.peer_rates", "did you mean 'peer_rate'"),
    (None, {"min_rate": "unlimited"}, "resync.min_rate", "a rate"),
    (None, {"min_rate": "1K"}, "resync.min_rate", "from 64KiB/s"),
    (None, {"max_rate": "1MiB", "min_rate": "2MiB"}, "resync.max_rate", "at least the min_rate"),
    (None, {"fill_target": "1MiB/s"}, "resync.fill_target", "a size"),
    (None, {"plan_ahead": "10ms"}, "resync.plan_ahead", "from 100ms to 1m"),
    (None, {"app_busy": "fast"}, "resync.app_busy", "a rate"),
    (None, ["min_rate"], "targets.b.resync", "expected a mapping, got a list"),
])
def test_bad_resync_values_are_refused_with_the_key_and_what_was_expected(
        glob: Any, resync: Any, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(glob, resync)
    assert key in str(e.value) and text in str(e.value), str(e.value)
    assert str(e.value).startswith("repctl.yaml:")


def test_a_rate_parses_like_a_size_or_a_bit_rate() -> None:
    assert c.parse_rate("4MiB") == c.parse_rate("4MiB/s") == c.parse_rate(4 * MiB) == 4 * MiB
    assert c.parse_rate("1Gbit") == 125_000_000
    with pytest.raises(ValueError, match="expected a rate"):
        c.parse_rate("4 MB/s")


# -- end to end: three resources, one target daemon, one slot ---------------------------------

SIZE = 2 << 20


def write_three(tmp: Path) -> Path:
    """r0, r1, r2: alpha (primary, FakeRing) replicates each to beta; one resync at a time, each
    paced at 1 MiB/s so that the others are seen waiting."""
    secret = tmp / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    resources = {}
    for i in range(3):
        data = tmp / f"data{i}.img"
        data.write_bytes(os.urandom(SIZE))
        with open(tmp / f"replica{i}.img", "wb") as f:
            f.truncate(SIZE)
        resources[f"r{i}"] = {
            "port": free_port(BETA), "source": "alpha", "chunk_size": 4096,
            "nodes": {"alpha": {"address": ALPHA, "device": str(data),
                                "metadata": str(tmp / f"md{i}.img")},
                      "beta": {"address": BETA, "device": str(tmp / f"replica{i}.img")}},
            "targets": {"beta": {"mode": "async",
                                 "resync": {"min_rate": "256KiB", "max_rate": "1MiB"}}},
        }
    path = tmp / "repctl.yaml"
    path.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp / "s.sock"), "state_dir": str(tmp / "st"),
                   "secret_file": str(secret), "resync": {"concurrency": 1}},
        "resources": resources}))
    return path


@pytest.fixture
def three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    config = load_config(write_three(tmp_path))
    beta = Daemon(config, "beta")
    alpha = Daemon(config, "alpha")
    events = alpha.events.subscribe()
    try:
        beta.start()
        alpha.start()
        assert not alpha.failed and not beta.failed, (alpha.failed, beta.failed)
        yield SimpleNamespace(alpha=alpha, beta=beta, events=events, tmp=tmp_path)
    finally:
        alpha.stop()
        beta.stop()


def drain(q: queue.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_three_resources_resync_one_at_a_time_in_order_and_converge(
        three: SimpleNamespace) -> None:
    alpha, tmp = three.alpha, three.tmp
    sched = alpha.scheduler
    links = {name: res.link("beta") for name, res in alpha.resources.items()}
    until(lambda: len(sched.running()) == 1 and len(sched.waiting()) == 2,
          "one resync to run and two to wait", timeout=10)
    queued = sched.waiting()
    running = sched.running()[0]
    # status says who waits, and where
    st = {r["name"]: r["targets"][0] for r in alpha.status()["resources"]}
    assert st[running[0]]["resync_queued"] is None
    assert st[running[0]]["resync_rate_bps"] is not None
    assert [st[k[0]]["resync_queued"] for k in queued] == [1, 2]
    assert all(st[k[0]]["state"] == LinkState.SYNCING for k in queued)

    # a paused resync frees its slot: the head of the queue gets it
    alpha.pause(running[0], "beta")
    until(lambda: sched.running() == [queued[0]], "the first waiting resync to get the slot")
    assert sched.waiting() == [queued[1]]
    alpha.resume(running[0], "beta")  # it comes back at the end of the queue
    until(lambda: running in sched.waiting(), "the resumed resync to queue again")
    assert sched.waiting()[-1] == running  # behind queued[1] (unless that one runs already)

    seen_running: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 30
    while not all(link.state is LinkState.STREAMING for link in links.values()):
        assert time.monotonic() < deadline, {n: l.state for n, l in links.items()}
        now_running = sched.running()
        assert len(now_running) <= 1, now_running  # the limit holds throughout
        seen_running.update(now_running)
        time.sleep(0.02)
    assert sched.running() == [] and sched.waiting() == []

    events = drain(three.events)
    started = [e["resource"] for e in events if e["what"] == Event.RESYNC_STARTED]
    # FIFO: the slots went in the order in which the resyncs became due
    assert started == [queued[0][0], queued[1][0], running[0]], started
    assert {e["resource"] for e in events if e["what"] == Event.RESYNC_QUEUED} == {
        "r0", "r1", "r2"}
    for i in range(3):
        assert (tmp / f"replica{i}.img").read_bytes() == (tmp / f"data{i}.img").read_bytes()
    assert all(link.admin is Admin.UP for link in links.values())


def test_status_shows_a_waiting_resync_and_the_pace_of_a_running_one() -> None:
    from repctl import render

    status = {"resources": [{"name": "r0", "role": "primary", "disk": "UpToDate", "targets": [
        {"name": "beta", "mode": "async", "state": "syncing", "resync_queued": 2,
         "resync_rate_bps": None, "resync_app_busy": False},
        {"name": "gamma", "mode": "async", "state": "syncing", "resync_queued": None,
         "resync_rate_bps": 4 * MiB, "resync_app_busy": True}]}]}
    rows = render.status_rows(status)
    assert [r["state"] for r in rows] == ["syncing (queued 2)", "syncing"]
    assert render.state_text(rows[0]["state"]).style == render.state_text("syncing").style
    details = "\n".join(render.status_details(status))
    assert "r0 -> beta: resync waits for a slot: 2 in the queue" in details
    assert "r0 -> gamma: resync paced at 4.0 MiB/s (the application is busy)" in details
    assert "resync_queued" not in details  # not repeated raw as an unknown field


def test_a_resync_run_is_a_quarter_of_the_fill_target() -> None:
    from repctl.daemon.resyncrate import run_bytes

    assert run_bytes(ResyncSettings(), 1 * MiB) == 512 * KiB  # the default 2 MiB target
    assert run_bytes(ResyncSettings(fill_target=64 * MiB), 1 * MiB) == 1 * MiB  # the largest
    assert run_bytes(ResyncSettings(fill_target=64 * KiB), 1 * MiB) == 64 * KiB  # the least


def test_below_the_fill_target_the_rate_ramps_above_it_it_follows_the_drain() -> None:
    s = ResyncSettings(min_rate=1 * MiB, fill_target=2 * MiB, plan_ahead=2.0)
    ctl = ResyncRate(s, 0.0)
    ctl.drain, ctl.rate, ctl.fill = 8 * MiB, 8 * MiB, int(1.5 * MiB)
    ctl.sent(int(0.8 * MiB), 0.05)
    up = ctl.update(STEP, fill=int(1.5 * MiB), app_bps=0)  # below the target
    assert up == pytest.approx(12 * MiB, rel=0.01)  # x1.5
    ctl.sent(int(1.2 * MiB), 0.15)
    down = ctl.update(2 * STEP, fill=4 * MiB, app_bps=0)  # 2 MiB above it
    assert down < ctl.drain and down == pytest.approx(ctl.drain - 1 * MiB, rel=1e-6)
