"""The repctl CLI through typer's CliRunner, against a fake daemon behind a real control socket."""

from __future__ import annotations

import copy
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from repctl import cli, follow, metadata, render
from repctl.control import ControlClient, ControlServer
from repctl.errors import ReplError
from rich.console import Console
from typer.testing import CliRunner

STATUS: dict[str, Any] = {
    "node": "alpha",
    "resources": [
        {
            "name": "r0", "role": "source", "device": "/dev/mapper/r0",
            "kernel": {"mode": "streaming", "reason": "started", "dirty_chunks": 12,
                       "chunk_size": 4096, "ring_used": 0, "ring_bytes": 33554432},
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
        {"name": "r1", "role": "target", "device": "/srv/r1.img", "source": "beta",
         "connection": "connected", "state": "paused", "consistent": True,
         "bytes_received": 456, "targets": []},
    ],
}


class FakeDaemon:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: dict[str, BaseException] = {}
        self.status_doc: dict[str, Any] = copy.deepcopy(STATUS)
        self.status_docs: list[dict[str, Any]] = []  # the next status answers, then status_doc
        self.verify_result: dict[str, Any] = {}
        self.verify_hook: Any = None  # called before verify answers (it may block)
        self.cancelled = threading.Event()  # set by cancel_verify
        self.events: queue.Queue[Any] = queue.Queue()

    def _call(self, name: str, result: Any = None, **kw: Any) -> Any:
        self.calls.append((name, kw))
        if name in self.fail:
            raise self.fail[name]
        return result

    def status(self) -> Any:
        if self.status_docs:
            self.status_doc = self.status_docs.pop(0)
        return self._call("status", self.status_doc)

    def up(self, resource: str) -> Any:
        return self._call("up", f"{resource} is up as source", resource=resource)

    def down(self, resource: str) -> Any:
        return self._call("down", None, resource=resource)

    def pause(self, resource: str, target: str | None = None) -> Any:
        return self._call("pause", "paused", resource=resource, target=target)

    def resume(self, resource: str, target: str | None = None) -> Any:
        return self._call("resume", "resumed", resource=resource, target=target)

    def connect(self, resource: str, target: str | None = None) -> Any:
        return self._call("connect", "connecting", resource=resource, target=target)

    def disconnect(self, resource: str, target: str | None = None) -> Any:
        return self._call("disconnect", "disconnected", resource=resource, target=target)

    def verify(self, resource: str, target: str, repair: bool = False) -> Any:
        if self.verify_hook is not None:
            self.verify_hook()
        return self._call("verify", self.verify_result, resource=resource, target=target,
                          **({"repair": True} if repair else {}))

    def cancel_verify(self, resource: str, target: str) -> Any:
        self.cancelled.set()
        return self._call("cancel_verify", f"{resource}/{target}: verify cancelled",
                          resource=resource, target=target)

    def subscribe(self) -> Any:
        return self._call("subscribe", self.events)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="repctl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(tmp_path: Path, sock: Path) -> Path:
    doc = {
        "global": {"control_socket": str(sock), "state_dir": str(tmp_path / "state"),
                   "secret_file": str(tmp_path / "secret")},
        "resources": {
            "r0": {
                "port": 7789, "chunk_size": "64KiB", "source": "alpha",
                "nodes": {
                    "alpha": {"address": "10.0.0.1", "device": str(tmp_path / "data.img"),
                              "metadata": str(tmp_path / "md.img")},
                    "beta": {"address": "10.0.0.2", "device": str(tmp_path / "data.img"),
                             "metadata": str(tmp_path / "missing-md.img")},
                    "gamma": {"address": "192.0.2.7", "device": str(tmp_path / "gamma.img")},
                },
                "targets": {"beta": {"mode": "sync"}, "gamma": {"mode": "async"}},
            },
            "r1": {
                "port": 7790, "source": "beta",
                "nodes": {"beta": {"address": "10.0.0.2", "device": "/dev/vg0/mail",
                                   "metadata": "/dev/vg0/mail-md"},
                          "alpha": {"address": "10.0.0.1", "device": "/srv/r1.img"}},
                "targets": {"alpha": {"mode": "sync"}},
            },
        },
    }
    path = tmp_path / "repctl.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def config(tmp_path: Path, sockdir: Path) -> Path:
    return write_config(tmp_path, sockdir / "repctl.sock")


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def server(config: Path, sockdir: Path, daemon: FakeDaemon) -> Iterator[ControlServer]:
    srv = ControlServer(sockdir / "repctl.sock", daemon)
    srv.start()
    yield srv
    srv.stop()


def run(config: Path, *args: str) -> Any:
    result = CliRunner().invoke(cli.app, ["-c", str(config), *args])
    assert "Traceback" not in result.output, result.output
    return result


# ---------------------------------------------------------------------------- status


def test_status_json_is_one_document(config: Path, server: ControlServer) -> None:
    result = run(config, "status", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == STATUS
    assert result.stderr == ""


def test_status_json_of_one_resource(config: Path, server: ControlServer) -> None:
    result = run(config, "status", "r1", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["name"] for r in doc["resources"]] == ["r1"]


def test_status_table(config: Path, server: ControlServer) -> None:
    result = run(config, "status")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ("Resource", "Role", "Target", "Mode", "State", "Connection", "Out of sync",
                   "Sync", "Lag", "Sent"):
        assert header in out
    lines = out.splitlines()
    beta = next(line for line in lines if " beta " in line and "sync" in line)
    assert "streaming" in beta and "connected" in beta and "123 B" in beta
    gamma = next(line for line in lines if " gamma " in line and "async" in line)
    assert "syncing" in gamma and "3.0 GiB" in gamma and "25.0%" in gamma
    assert "47.7 MiB/s" in gamma and "ETA 1m04s" in gamma and "1.0 MiB (7 writes)" in gamma
    r1 = next(line for line in lines if line.startswith("r1 "))
    assert "target" in r1 and "<- beta" in r1 and "paused" in r1 and "recv 456 B" in r1
    # fields without a column are shown below the table
    assert "r0: /dev/mapper/r0, kernel streaming (started), 12 dirty chunks of 4.0 KiB" in out
    assert "r0 -> gamma: at 192.0.2.7:7789, last error: connection reset by peer" in out
    assert "r1: /srv/r1.img, consistent" in out


def test_status_tolerates_missing_optional_fields(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    daemon.status_doc = {"node": "alpha", "resources": [
        {"name": "r0", "role": "source", "targets": [{"name": "beta", "state": "connecting"}]},
        {"name": "r2", "role": "source", "targets": [], "future_field": 1},
    ]}
    result = run(config, "status")
    assert result.exit_code == 0, result.output
    assert "beta" in result.stdout and "connecting" in result.stdout
    assert "future_field 1" in result.stdout


def test_status_of_a_resource_that_is_not_up(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    result = run(config, "status", "r0", "--json")
    assert result.exit_code == 0
    result = CliRunner().invoke(cli.app, ["-c", str(config), "status", "nope"])
    assert result.exit_code == 1
    assert result.stderr == (f"repctl: error: unknown resource 'nope': {config} has r0, r1; "
                             "check the name\n")
    daemon.status_doc = target_doc("streaming")  # r0 only
    result = run(config, "status", "r1")  # in the file, not up: says how to bring it up
    assert result.exit_code == 1
    assert result.stderr == ("repctl: error: resource r1 is not up on alpha (repctl up r1; "
                             "repctl status shows what is up)\n")


def test_status_table_shows_a_bar_while_syncing(config: Path, server: ControlServer) -> None:
    result = run(config, "status")
    assert result.exit_code == 0, result.output
    gamma = next(line for line in result.stdout.splitlines() if " gamma " in line)
    assert "██░░░░░░░░ 25.0% 47.7 MiB/s ETA 1m04s" in gamma  # a pipe: no colour, still a bar
    assert "\x1b" not in result.stdout
    beta = next(line for line in result.stdout.splitlines() if " beta " in line)
    assert "█" not in beta and "░" not in beta  # streaming: no sync, no bar


def test_render_sync_cell() -> None:
    assert render.text_bar(0.25) == "██░░░░░░░░"
    assert render.text_bar(1.0, 4, ascii=True) == "####"
    assert render.text_bar(0.999, 4) == "███░"  # full only when done
    assert render.sync_text(SYNCING) == ("██░░░░░░░░", "25.0% 47.7 MiB/s ETA 1m04s")
    assert render.sync_text({"done_bytes": 0, "total_bytes": 0, "rate_bps": 0.0,
                             "eta_s": None}) == ("", "0 B/s")
    assert render.sync_text(None) == ("", "-")
    # a console that cannot print the blocks (LANG=C) gets an ASCII bar
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    con = Console(file=out, width=200, force_terminal=False)
    assert con.options.ascii_only
    con.print(render.table([{"sync": SYNCING}], [render.Column("sync", "Sync",
                                                              render.STATUS_COLUMNS[8].fmt)]))
    out.seek(0)
    assert "##-------- 25.0% 47.7 MiB/s ETA 1m04s" in out.read()


def test_status_interval_without_watch_is_a_usage_error(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    result = run(config, "status", "--interval", "1")
    assert result.exit_code == 2
    assert "--interval goes with --watch" in result.output
    result = run(config, "status", "--watch", "2")  # as it was once spelt: 2 is no resource
    assert result.exit_code == 2
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # out of typer's box
    assert "--watch takes no value; say --watch --interval 2" in said
    assert daemon.calls == []


def snapshots_of(out: str) -> list[str]:
    """The snapshots `status --watch` printed in a pipe, each after its clock line."""
    return re.split(r"^\d\d:\d\d:\d\d, every ", out, flags=re.MULTILINE)[1:]


class Ticks:
    """Replaces the CLI's sleep in `status --watch`: records each wait, and after `n` of them
    does what Ctrl-C does (or what `then` does)."""

    def __init__(self, n: int, then: Any = None) -> None:
        self.n, self.then, self.waits = n, then, []  # type: ignore[var-annotated]

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) > self.n:
            raise KeyboardInterrupt
        if self.then is not None:
            self.then(len(self.waits))


def test_status_watch_prints_a_snapshot_per_interval_in_a_pipe(
    config: Path, server: ControlServer, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = Ticks(2)
    monkeypatch.setattr(cli, "_sleep", ticks)
    daemon.status_docs = [target_doc("syncing", sync=SYNCING), target_doc("syncing", sync={
        **SYNCING, "done_bytes": 3 << 30}), target_doc("streaming")]
    result = run(config, "status", "--watch", "--interval", "0.5")
    assert result.exit_code == 0, result.output  # Ctrl-C ends it: exit 0
    assert ticks.waits == [0.5, 0.5, 0.5]
    assert [c for c, _ in daemon.calls] == ["status"] * 3
    out = result.stdout
    assert "\x1b" not in out  # a pipe: no cursor movements, one snapshot after the other
    snapshots = snapshots_of(out)
    assert len(snapshots) == 3, out
    assert "25.0%" in snapshots[0] and "75.0%" in snapshots[1]
    assert "streaming" in snapshots[2] and "%" not in snapshots[2]
    assert all(s.startswith("0.5 s (Ctrl-C stops)\nrepctl on alpha\n") for s in snapshots), out
    assert all(s.endswith("\n\n") for s in snapshots), "a blank line after each"


def test_status_watch_redraws_in_place_on_a_terminal(
    config: Path, server: ControlServer, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(render, "console", lambda *, stderr=False: Console(
        file=screen, force_terminal=True, width=160, height=40, highlight=False))
    ticks = Ticks(1)
    monkeypatch.setattr(cli, "_sleep", ticks)
    daemon.status_docs = [target_doc("syncing", sync=SYNCING), target_doc("streaming")]
    result = run(config, "status", "--watch")
    assert result.exit_code == 0, result.output
    assert ticks.waits == [cli.WATCH_INTERVAL] * 2
    drawn = screen.getvalue()
    first, _, second = drawn.partition("\x1b[2K")  # the redraw erases the first table's lines
    assert "25.0%" in first and "syncing" in first
    assert "streaming" in second and "25.0%" not in second


def test_status_watch_json_prints_one_document_per_line(
    config: Path, server: ControlServer, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_sleep", Ticks(2))
    docs = [{**target_doc("syncing", sync=SYNCING), "version": 1},
            {**target_doc("streaming"), "version": 1}]
    daemon.status_docs = copy.deepcopy(docs)
    result = run(config, "status", "--watch", "--json", "-i", "1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [json.loads(line) for line in lines] == [docs[0], docs[1], docs[1]]
    assert result.stderr == ""


def test_status_watch_fails_when_the_daemon_goes_away(
    config: Path, server: ControlServer, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_sleep", Ticks(5, then=lambda n: n == 2 and server.stop()))
    result = run(config, "status", "--watch", "--json")
    assert result.exit_code == 1
    assert len(result.stdout.splitlines()) == 2  # what it saw before
    assert result.stderr.startswith("repctl: error: stopped watching: cannot reach the repctl "
                                    "daemon at "), result.stderr
    assert "systemctl start repctl" in result.stderr


def test_status_watch_without_a_daemon_fails_at_once(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = Ticks(5)
    monkeypatch.setattr(cli, "_sleep", ticks)
    result = run(config, "status", "--watch")
    assert result.exit_code == 1
    assert result.stdout == "" and ticks.waits == []
    assert result.stderr.startswith("repctl: error: cannot reach the repctl daemon at ")


def test_status_watch_of_a_resource_that_goes_down(
    config: Path, server: ControlServer, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_sleep", Ticks(1))
    daemon.status_docs = [target_doc("streaming"), {"node": "alpha", "resources": []}]
    result = run(config, "status", "r0", "--watch")
    assert result.exit_code == 0, result.output
    first, second = snapshots_of(result.stdout)
    assert "streaming" in first
    assert "repctl on alpha: r0 is not up on this node" in second


def test_render_status_rows_one_per_target() -> None:
    rows = render.status_rows(STATUS)
    assert [(r["resource"], r["target"]) for r in rows] == [
        ("r0", "beta"), ("r0", "gamma"), ("r1", "<- beta")
    ]


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3 << 30, "3.0 GiB"), (None, "-"),
])
def test_human_bytes(n: Any, text: str) -> None:
    assert render.human_bytes(n) == text


# ---------------------------------------------------------------------------- errors


def test_daemon_not_running(config: Path) -> None:
    result = run(config, "status")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("repctl: error: cannot reach the repctl daemon at ")
    assert "(is it running? systemctl status repctl; start it: systemctl start repctl)" in (
        result.stderr)
    assert len(result.stderr.splitlines()) == 1


def test_daemon_error_is_one_line(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    daemon.fail["up"] = ReplError("resource r0: node alpha has no metadata")
    result = run(config, "up", "r0")
    assert result.exit_code == 1
    assert result.stderr == "repctl: error: resource r0: node alpha has no metadata\n"


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: {r0: {port: 1}}\n")
    result = run(bad, "status")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"repctl: error: {bad}:")


def test_config_from_the_environment(config: Path, server: ControlServer) -> None:
    result = CliRunner().invoke(cli.app, ["status", "--json"], env={"REPCTL_CONFIG": str(config)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["node"] == "alpha"


@pytest.mark.parametrize("args", [["verify", "r0"], ["up"], ["pause"], ["status", "--bogus"]])
def test_bad_usage_exits_2(config: Path, args: list[str]) -> None:
    assert run(config, *args).exit_code == 2


# ---------------------------------------------------------------------------- simple commands


@pytest.mark.parametrize(
    ("args", "call", "out"),
    [
        (["up", "r0"], ("up", {"resource": "r0"}), "r0 is up as source\n"),
        (["down", "r0"], ("down", {"resource": "r0"}), "r0: down: done\n"),
        (["pause", "r0", "beta"], ("pause", {"resource": "r0", "target": "beta"}), "paused\n"),
        (["pause", "r0"], ("pause", {"resource": "r0", "target": None}), "paused\n"),
        (["resume", "r0", "gamma"], ("resume", {"resource": "r0", "target": "gamma"}),
         "resumed\n"),
        (["connect", "r0"], ("connect", {"resource": "r0", "target": None}), "connecting\n"),
        (["disconnect", "r0", "beta"], ("disconnect", {"resource": "r0", "target": "beta"}),
         "disconnected\n"),
    ],
)
def test_simple_commands(
    config: Path, server: ControlServer, daemon: FakeDaemon, args: list[str],
    call: tuple[str, dict[str, Any]], out: str,
) -> None:
    result = run(config, *args)
    assert result.exit_code == 0, result.output
    assert daemon.calls == [call]
    assert result.stdout == out


# ---------------------------------------------------------------------------- verify


def test_verify_identical_exits_0(config: Path, server: ControlServer, daemon: FakeDaemon) -> None:
    daemon.verify_result = {"resource": "r0", "target": "beta", "chunks": 16,
                            "chunk_size": 4096, "differing": []}
    result = run(config, "verify", "r0", "beta")
    assert result.exit_code == 0, result.output
    assert result.stdout == "r0/beta: identical (16 chunks compared)\n"
    assert daemon.calls == [("verify", {"resource": "r0", "target": "beta"})]


def test_verify_differing_exits_3_and_lists_20(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    daemon.verify_result = {"resource": "r0", "target": "beta", "chunks": 100,
                            "chunk_size": 4096, "differing": list(range(50, 75))}
    result = run(config, "verify", "r0", "beta")
    assert result.exit_code == cli.EXIT_DIFFERS == 3
    out = result.stdout
    assert "r0/beta: 25 of 100 chunks differ" in out
    assert "204800" in out  # offset of chunk 50
    assert " 69 " in out and " 70 " not in out
    assert out.rstrip().endswith("... and 5 more")


def test_verify_json(config: Path, server: ControlServer, daemon: FakeDaemon) -> None:
    daemon.verify_result = {"chunks": 4, "chunk_size": 4096, "differing": [1]}
    result = run(config, "verify", "r0", "beta", "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout) == daemon.verify_result


def test_verify_error_exits_1(config: Path, server: ControlServer, daemon: FakeDaemon) -> None:
    daemon.fail["verify"] = ReplError("r0/beta: not streaming (paused): cannot verify now")
    result = run(config, "verify", "r0", "beta")
    assert result.exit_code == 1
    assert result.stderr == "repctl: error: r0/beta: not streaming (paused): cannot verify now\n"


def test_verify_repair_says_what_it_marked(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    daemon.verify_result = {"resource": "r0", "target": "beta", "chunks": 100,
                            "chunk_size": 4096, "differing": [7, 9], "marked_out_of_sync": 2}
    result = run(config, "verify", "r0", "beta", "--repair")
    assert result.exit_code == cli.EXIT_DIFFERS, result.output
    assert daemon.calls == [("verify", {"resource": "r0", "target": "beta", "repair": True})]
    assert "r0/beta: 2 of 100 chunks differ" in result.stdout
    assert result.stdout.splitlines()[-1] == (
        "r0/beta: 2 chunks marked out of sync: repairing (repctl status r0 shows the resync)")


def test_verify_repair_of_an_identical_target_marks_nothing(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    daemon.verify_result = {"chunks": 16, "chunk_size": 4096, "differing": [],
                            "marked_out_of_sync": 0}
    result = run(config, "verify", "r0", "beta", "--repair", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout == "r0/beta: identical (16 chunks compared)\n"
    assert [c for c, _ in daemon.calls] == ["verify"], "nothing to wait for"


def test_verify_repair_wait_follows_the_resync(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    daemon.verify_result = {"chunks": 100, "chunk_size": 4096, "differing": [7],
                            "marked_out_of_sync": 1}
    # streaming with the chunk marked (the sender has not started yet), syncing, done
    daemon.status_docs = [target_doc("streaming", oos=4096),
                          target_doc("syncing", oos=4096, sync=SYNCING), target_doc("streaming")]
    result = run(config, "verify", "r0", "gamma", "--repair", "--wait", "--json")
    assert result.exit_code == cli.EXIT_DIFFERS, result.output
    assert json.loads(result.stdout) == daemon.verify_result  # --json: the result only
    assert [c for c, _ in daemon.calls] == ["verify", "status", "status", "status"]


def test_verify_repair_wait_fails_when_the_target_is_paused(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    daemon.verify_result = {"chunks": 100, "chunk_size": 4096, "differing": [7],
                            "marked_out_of_sync": 1}
    daemon.status_doc = target_doc("paused", admin="paused", oos=4096)
    result = run(config, "verify", "r0", "gamma", "--repair", "--wait")
    assert result.exit_code == 1
    assert "r0/gamma: paused by the administrator while waiting" in result.stderr


@pytest.mark.parametrize(("args", "error"), [
    (["--wait"], "--wait goes with --repair"),
    (["--repair", "--timeout", "5"], "--timeout goes with --wait"),
])
def test_verify_wait_needs_repair(config: Path, server: ControlServer, daemon: FakeDaemon,
                                  args: list[str], error: str) -> None:
    result = run(config, "verify", "r0", "beta", *args)
    assert result.exit_code == 2 and error in result.output
    assert daemon.calls == []


# ---------------------------------------------------------------------------- progress


def target_doc(state: str, *, admin: str = "up", sync: Any = None, verify: Any = None,
               oos: int = 0, last_error: str | None = None,
               connection: str = "connected") -> dict[str, Any]:
    """A status document whose r0 has one target, gamma, in `state`."""
    return {"node": "alpha", "resources": [{
        "name": "r0", "role": "source", "device": "/dev/mapper/r0",
        "targets": [{"name": "gamma", "mode": "async", "state": state, "admin": admin,
                     "connection": connection, "out_of_sync_bytes": oos, "sync": sync,
                     "verify": verify, "last_error": last_error}],
    }]}


SYNCING = {"done_bytes": 1 << 30, "total_bytes": 4 << 30, "rate_bps": 50e6, "eta_s": 64.0}
VERIFYING = {"pass": 1, "done_chunks": 4096, "total_chunks": 16384, "differing_chunks": 2,
             "chunk_size": 4096, "started": 0.0, "rate_cps": 4096.0, "eta_s": 3.0}


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "POLL_INTERVAL", 0.02)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """stderr is a terminal: what the CLI draws there lands in the returned buffer."""
    screen = io.StringIO()
    plain = render.console

    def console(*, stderr: bool = False) -> Console:
        if stderr:
            return Console(file=screen, force_terminal=True, width=120, highlight=False)
        return plain(stderr=stderr)

    monkeypatch.setattr(render, "console", console)
    return screen


def test_verify_without_a_terminal_prints_no_progress(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    daemon.verify_result = {"chunks": 16, "chunk_size": 4096, "differing": []}
    daemon.verify_hook = lambda: time.sleep(0.2)  # long enough for several polls
    result = run(config, "verify", "r0", "beta")
    assert result.exit_code == 0, result.output
    assert result.stdout == "r0/beta: identical (16 chunks compared)\n"
    assert result.stderr == ""
    assert [c for c, _ in daemon.calls] == ["verify"], "no status polls when nobody sees a bar"


def test_verify_on_a_terminal_shows_the_daemons_progress(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None,
    terminal: io.StringIO,
) -> None:
    doc = copy.deepcopy(STATUS)
    doc["resources"][0]["targets"][0]["verify"] = VERIFYING
    daemon.status_doc = doc
    polled = threading.Event()
    daemon.verify_result = {"chunks": 16384, "chunk_size": 4096, "differing": []}

    def slow() -> None:
        while sum(c == "status" for c, _ in daemon.calls) < 3:
            time.sleep(0.01)
        polled.set()

    daemon.verify_hook = slow
    result = run(config, "verify", "r0", "beta")
    assert result.exit_code == 0, result.output
    assert polled.is_set()
    assert result.stdout == "r0/beta: identical (16384 chunks compared)\n"  # stdout stays clean
    drawn = terminal.getvalue()
    assert "r0/beta" in drawn and "25.0%" in drawn
    assert "4096 of 16384 chunks  16.0 MiB/s  ETA 3s  2 differ" in drawn


def test_verify_error_with_progress_is_one_line(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None,
    terminal: io.StringIO,
) -> None:
    daemon.verify_hook = lambda: time.sleep(0.1)
    daemon.fail["verify"] = ReplError("r0/beta: no checksum reply within 60 s")
    result = run(config, "verify", "r0", "beta")
    assert result.exit_code == 1
    assert result.stderr == "repctl: error: r0/beta: no checksum reply within 60 s\n"


def test_resume_wait_until_streaming(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    daemon.status_docs = [
        target_doc("paused"),  # the link has not seen the resume yet: admin is already up
        target_doc("connecting"),
        target_doc("syncing", sync=SYNCING, oos=3 << 30),
        target_doc("streaming"),
    ]
    result = run(config, "resume", "r0", "gamma", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout == "resumed\nr0/gamma: streaming\n"
    assert result.stderr == "" and "\x1b" not in result.stdout  # no bar without a terminal
    assert [c for c, _ in daemon.calls] == ["resume"] + ["status"] * 4


def test_connect_wait_of_every_target(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    syncing = copy.deepcopy(STATUS)
    streaming = copy.deepcopy(syncing)
    streaming["resources"][0]["targets"][1].update(state="streaming", sync=None)
    daemon.status_docs = [syncing, streaming]
    result = run(config, "connect", "r0", "--wait", "--timeout", "10")
    assert result.exit_code == 0, result.output
    assert result.stdout == "connecting\nr0/beta: streaming\nr0/gamma: streaming\n"
    assert daemon.calls[0] == ("connect", {"resource": "r0", "target": None})


def test_wait_shows_the_resync_on_a_terminal(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None,
    terminal: io.StringIO,
) -> None:
    daemon.status_docs = [target_doc("syncing", sync=SYNCING)] * 8 + [target_doc("streaming")]
    result = run(config, "resume", "r0", "gamma", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout == "resumed\nr0/gamma: streaming\n"
    drawn = terminal.getvalue()
    assert "r0/gamma" in drawn and "25.0%" in drawn
    assert "syncing 1.0 GiB of 4.0 GiB  47.7 MiB/s  ETA 1m04s" in drawn


def test_wait_fails_when_the_target_is_disconnected(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    daemon.status_docs = [target_doc("syncing", sync=SYNCING),
                          target_doc("disconnected", admin="disconnected")]
    result = run(config, "connect", "r0", "gamma", "--wait")
    assert result.exit_code == 1
    assert result.stdout == "connecting\n"
    assert result.stderr == (
        "repctl: error: r0/gamma: disconnected by the administrator while waiting for it to "
        "stream (repctl connect r0 gamma)\n"
    )


def test_wait_times_out_with_one_line(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    daemon.status_doc = target_doc("syncing", sync=SYNCING)
    started = time.monotonic()
    result = run(config, "resume", "r0", "gamma", "--wait", "--timeout", "0.3")
    assert 0.3 <= time.monotonic() - started < 5
    assert result.exit_code == 1
    assert result.stderr == (
        "repctl: error: timed out after 0.3 s waiting to stream: r0/gamma syncing, 25.0% done "
        "(it goes on in the background: repctl status r0)\n"
    )


def test_wait_fails_when_the_daemon_goes_away(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    daemon.status_doc = target_doc("connecting")

    def stop_soon() -> None:
        time.sleep(0.2)
        server.stop()

    threading.Thread(target=stop_soon, daemon=True).start()
    result = run(config, "resume", "r0", "gamma", "--wait")
    assert result.exit_code == 1
    # the daemon went away between two polls, or during one
    assert re.match(r"repctl: error: (cannot reach|lost the connection to) the repctl daemon at ",
                    result.stderr), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_wait_fails_at_once_when_the_target_refuses(
    config: Path, server: ControlServer, daemon: FakeDaemon, fast_polls: None
) -> None:
    why = ("peer refused the connection (AUTH_FAILED): the peer's proof does not match the "
           "shared secret")
    daemon.status_docs = [
        target_doc("paused"),  # the link has not seen the connect yet
        target_doc("connecting", connection="refused: AUTH_FAILED", last_error=why),
        target_doc("streaming"),  # never asked for: the wait ended before
    ]
    result = run(config, "connect", "r0", "gamma", "--wait")
    assert result.exit_code == 1
    assert [c for c, _ in daemon.calls] == ["connect", "status", "status"]
    assert result.stdout == "connecting\n"
    assert result.stderr == (
        f"repctl: error: r0/gamma: refused while waiting for it to stream: {why}; the two nodes "
        "have different secrets: give both the same global.secret_file (the daemon keeps "
        "retrying: repctl status r0)\n"
    )


def test_wait_streaming_on_refusals() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    # a split brain: at once, with what to do
    split = target_doc("connecting", connection="refused: SPLIT_BRAIN")
    with pytest.raises(ReplError, match=r"^r0/gamma: refused while waiting for it to stream: "
                                        r"refused: SPLIT_BRAIN; the copies diverged: `repctl "
                                        r"resolve r0 --discard-local` on the node"):
        follow.wait_streaming(lambda: split, "r0", sleep=lambda s: pytest.fail("it waited"))
    # BUSY may be the target not yet seeing its last connection end: waited out a while
    busy = target_doc("connecting", connection="refused: BUSY", last_error=(
        "peer refused the connection (BUSY): resource r0 on gamma is already connected to its "
        "primary beta"))
    docs = iter([busy] * 5 + [target_doc("syncing", sync=SYNCING), busy, busy,
                              target_doc("streaming")])
    assert follow.wait_streaming(lambda: next(docs), "r0", clock=lambda: now[0], sleep=sleep,
                                 interval=1) == ["gamma"]
    now[0] = 0.0
    with pytest.raises(ReplError, match=r"already connected to its primary beta; the target is "
                                        r"connected to another primary"):
        follow.wait_streaming(lambda: busy, "r0", clock=lambda: now[0], sleep=sleep, interval=1)
    assert now[0] == follow.BUSY_GRACE
    # an unknown reason still fails, with the daemon's text
    odd = target_doc("connecting", connection="refused: 42", last_error="refused for 42")
    with pytest.raises(ReplError, match=r"refused for 42; fix what the text says"):
        follow.wait_streaming(lambda: odd, "r0", sleep=lambda s: None)


def test_timeout_without_wait_is_a_usage_error(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    result = run(config, "resume", "r0", "--timeout", "5")
    assert result.exit_code == 2
    assert "--timeout goes with --wait" in result.output
    assert daemon.calls == [], "nothing was resumed"


def test_wait_streaming_rules() -> None:
    docs = iter([target_doc("paused"), target_doc("syncing", sync=SYNCING),
                 target_doc("streaming")])
    seen: list[list[str]] = []
    names = follow.wait_streaming(lambda: next(docs), "r0", ["gamma"], sleep=lambda s: None,
                                  show=lambda ts: seen.append([t["state"] for t in ts]))
    assert names == ["gamma"] and seen == [["paused"], ["syncing"], ["streaming"]]
    # paused by the administrator while waiting: it will not stream by itself
    with pytest.raises(ReplError, match=r"^r0/gamma: paused by the administrator .*"
                                        r"\(repctl resume r0 gamma\)$"):
        follow.wait_streaming(lambda: target_doc("paused", admin="paused"), "r0",
                              sleep=lambda s: None)
    # a daemon that does not report admin: its connection says "down"
    old = target_doc("disconnected")
    del old["resources"][0]["targets"][0]["admin"]
    old["resources"][0]["targets"][0]["connection"] = "down"
    with pytest.raises(ReplError, match="disconnected by the administrator"):
        follow.wait_streaming(lambda: old, "r0", sleep=lambda s: None)
    # the timeout, on a fake clock
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(ReplError, match=r"timed out after 2 s .* r0/gamma connecting, last "
                                        r"error: connection refused"):
        follow.wait_streaming(
            lambda: target_doc("connecting", last_error="connection refused"), "r0",
            timeout=2, clock=lambda: now[0], sleep=sleep,
        )
    assert now[0] == 2.0
    with pytest.raises(ReplError, match="has no target 'delta'"):
        follow.wait_streaming(lambda: target_doc("streaming"), "r0", ["delta"])
    with pytest.raises(ReplError, match="resource r9 is no longer up"):
        follow.wait_streaming(lambda: target_doc("streaming"), "r9")


def test_call_with_progress_returns_or_raises_the_calls_outcome() -> None:
    polls: list[int] = []

    def poll() -> dict[str, Any]:
        polls.append(1)
        if len(polls) == 2:
            raise ReplError("a slow status is skipped")
        return {}

    def call() -> str:
        time.sleep(0.2)
        return "done"

    shown: list[Any] = []
    assert follow.call_with_progress(call, poll, shown.append, 0.02) == "done"
    assert len(polls) >= 3 and len(shown) == len(polls) - 1

    def broken() -> str:
        raise ReplError("r0/beta: not streaming")

    with pytest.raises(ReplError, match="not streaming"):
        follow.call_with_progress(broken, poll, shown.append, 0.02)


def test_render_progress_bars() -> None:
    assert render.verify_bar(VERIFYING) == render.Bar(
        4096, 16384, "4096 of 16384 chunks  16.0 MiB/s  ETA 3s  2 differ")
    assert render.verify_bar({"pass": 2, "done_chunks": 1, "total_chunks": 3}) == render.Bar(
        1, 3, "1 of 3 chunks re-checked")
    assert render.sync_bar({"state": "syncing", "sync": SYNCING}) == render.Bar(
        1 << 30, 4 << 30, "syncing 1.0 GiB of 4.0 GiB  47.7 MiB/s  ETA 1m04s")
    assert render.sync_bar({"state": "streaming"}) == render.Bar(1, 1, "streaming")
    assert render.sync_bar({"state": "behind", "out_of_sync_bytes": 1 << 20}) == render.Bar(
        0, None, "behind, 1.0 MiB out of sync")
    con = Console(file=io.StringIO(), width=120, force_terminal=False)
    con.print(render.progress_view({"r0/gamma": render.sync_bar({"state": "syncing",
                                                                 "sync": SYNCING})}))
    line = con.file.getvalue()  # type: ignore[attr-defined]
    assert line.startswith("r0/gamma ") and " 25.0% syncing 1.0 GiB of 4.0 GiB" in line


def test_verify_ctrl_c_cancels_it_in_the_daemon(
    config: Path, server: ControlServer, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_verify_call", interrupted)
    result = run(config, "verify", "r0", "beta", "--json")
    assert result.exit_code == cli.EXIT_INTERRUPTED == 130
    assert daemon.calls == [("cancel_verify", {"resource": "r0", "target": "beta"})]
    assert result.stdout == ""
    assert result.stderr == "r0/beta: verify cancelled\n"
    # it had ended meanwhile, or the daemon cannot cancel: say so
    daemon.fail["cancel_verify"] = ReplError("r0/beta: no verify is running")
    result = run(config, "verify", "r0", "beta")
    assert result.exit_code == 130
    assert result.stderr == (
        "repctl: error: r0/beta: interrupted, but the verify could not be cancelled: r0/beta: "
        "no verify is running (repctl status r0 shows whether it still runs)\n")


#: Runs the CLI as the `repctl` script does, with Ctrl-C raising KeyboardInterrupt even if
#: this process was started with SIGINT ignored (a background job).
DRIVER = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "sys.argv = ['repctl', *sys.argv[1:]]; from repctl.cli import app; app()")


def test_verify_ctrl_c_stops_both_sides(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    """A real SIGINT to a real `repctl verify`: the daemon's verify ends, the CLI exits 130."""
    started, ended = threading.Event(), threading.Event()

    def until_cancelled() -> None:
        started.set()
        try:
            if daemon.cancelled.wait(30):
                raise ReplError("r0/beta: verify cancelled")
        finally:
            ended.set()

    daemon.verify_hook = until_cancelled
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "-c", str(config), "verify", "r0",
                             "beta"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert started.wait(60), "the CLI never asked for the verify"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err == "r0/beta: verify cancelled\n" and out == ""
    assert ended.wait(10), "the daemon's verify stopped"
    assert daemon.calls == [("cancel_verify", {"resource": "r0", "target": "beta"})]


def test_status_shows_a_running_verify(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    daemon.status_doc = target_doc("streaming", verify=VERIFYING)
    result = run(config, "status")
    assert result.exit_code == 0, result.output
    assert ("r0 -> gamma: verifying: 4096 of 16384 chunks  16.0 MiB/s  ETA 3s  2 differ"
            in result.stdout)
    assert "admin" not in result.stdout  # the State column says it already
    result = run(config, "status", "--json")
    assert json.loads(result.stdout)["resources"][0]["targets"][0]["verify"] == VERIFYING


# ---------------------------------------------------------------------------- events


def test_events_lines_and_json(
    config: Path, server: ControlServer, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = [{"time": 0, "resource": "r0", "target": "beta", "what": "state", "old": "syncing",
           "new": "streaming", "text": "caught up"},
          {"time": 0, "resource": "r1", "what": "down"}]

    def fake_events(self: ControlClient) -> Iterator[dict[str, Any]]:
        yield from ev
        raise KeyboardInterrupt  # Ctrl-C

    monkeypatch.setattr(ControlClient, "events", fake_events)
    result = run(config, "events")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith(" r0/beta state: syncing -> streaming (caught up)")
    assert lines[1].endswith(" r1 down")
    result = run(config, "events", "--json")
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.stdout.splitlines()] == ev


def test_events_over_the_socket_end_with_an_error_when_the_daemon_stops(
    config: Path, server: ControlServer, daemon: FakeDaemon
) -> None:
    daemon.events.put({"resource": "r0", "what": "up"})

    def stop_soon() -> None:
        import time
        time.sleep(0.5)
        server.stop()

    threading.Thread(target=stop_soon, daemon=True).start()
    result = run(config, "events", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"resource": "r0", "what": "up"}
    assert "closed the event stream" in result.stderr


# ---------------------------------------------------------------------------- create-md

DATA_BYTES = 64 << 20  # 1024 chunks of 64 KiB: one bitmap block


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    data, md = tmp_path / "data.img", tmp_path / "md.img"
    with open(data, "wb") as f:
        f.truncate(DATA_BYTES)
    with open(md, "wb") as f:
        f.truncate(1 << 20)
    return data, md


def test_create_md_formats(config: Path, images: tuple[Path, Path]) -> None:
    _, md = images
    result = run(config, "create-md", "r0", "--node", "alpha")
    assert result.exit_code == 0, result.output
    sb = metadata.read_superblock(md)
    assert sb is not None
    assert sb.data_sectors == DATA_BYTES // 512
    assert sb.chunk_sectors == 128 and sb.nr_chunks == 1024 and sb.bitmap_blocks == 1
    out = result.stdout
    assert out.startswith(f"formatted {md} for r0 on alpha\n")
    assert f"uuid      {sb.uuid}" in out
    assert "1024 of 64.0 KiB, all clean" in out
    assert "bitmap    1 blocks (4.0 KiB)" in out
    assert not any(metadata.read_bitmap(md)[1])


def test_create_md_refuses_formatted_without_force(
    config: Path, images: tuple[Path, Path]
) -> None:
    _, md = images
    assert run(config, "create-md", "r0", "-n", "alpha").exit_code == 0
    first = metadata.read_superblock(md)
    assert first is not None
    result = run(config, "create-md", "r0", "-n", "alpha")
    assert result.exit_code == 1
    assert result.stderr == (
        f"repctl: error: {md}: already holds dm-repl metadata (uuid {first.uuid}); "
        "use --force to overwrite it\n"
    )
    assert metadata.read_superblock(md) == first
    result = run(config, "create-md", "r0", "-n", "alpha", "--force", "--all-dirty")
    assert result.exit_code == 0, result.output
    assert f"replaced  dm-repl metadata (uuid {first.uuid})" in result.stdout
    sb, bitmap = metadata.read_bitmap(md)
    assert sb.uuid != first.uuid
    assert bitmap == b"\xff" * 128


def test_create_md_refuses_foreign_data(config: Path, images: tuple[Path, Path]) -> None:
    _, md = images
    with open(md, "r+b") as f:
        f.write(b"XFSB")
    result = run(config, "create-md", "r0", "-n", "alpha")
    assert result.exit_code == 1
    assert "already holds data that is not dm-repl metadata; use --force" in result.stderr


def test_create_md_refuses_a_small_device(config: Path, images: tuple[Path, Path]) -> None:
    _, md = images
    with open(md, "r+b") as f:
        f.truncate(4096)
    result = run(config, "create-md", "r0", "-n", "alpha")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"repctl: error: {md}: the metadata device holds 4.0 KiB")
    assert "needs 8.0 KiB" in result.stderr
    assert md.read_bytes() == bytes(4096)


def test_create_md_refuses_a_missing_device(config: Path, images: tuple[Path, Path]) -> None:
    result = run(config, "create-md", "r0", "-n", "beta")
    assert result.exit_code == 1
    assert "missing-md.img: cannot open the metadata device " in result.stderr
    assert "(resources.r0.nodes.beta.metadata): No such file or directory" in result.stderr


def test_create_md_refuses_a_node_without_metadata(
    config: Path, images: tuple[Path, Path]
) -> None:
    result = run(config, "create-md", "r0", "-n", "gamma")
    assert result.exit_code == 1
    assert "resources.r0.nodes.gamma.metadata: expected a metadata device" in result.stderr


def test_create_md_unknown_node(config: Path, images: tuple[Path, Path]) -> None:
    result = run(config, "create-md", "r0", "-n", "delta")
    assert result.exit_code == 1
    assert "expected a node named 'delta'" in result.stderr


def test_create_md_this_host(config: Path, images: tuple[Path, Path],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "alpha.example.com")
    assert run(config, "create-md", "r0", "--dry-run").exit_code == 0
    monkeypatch.setattr("socket.gethostname", lambda: "omega")
    result = run(config, "create-md", "r0")
    assert result.exit_code == 1
    assert "a node named after this host ('omega')" in result.stderr


def test_create_md_dry_run_writes_nothing(config: Path, images: tuple[Path, Path]) -> None:
    _, md = images
    result = run(config, "create-md", "r0", "-n", "alpha", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"would format {md} for r0 on alpha\n")
    assert "1024 of 64.0 KiB" in result.stdout
    assert md.read_bytes() == bytes(1 << 20)
    result = run(config, "create-md", "r0", "-n", "alpha", "--dry-run", "--json")
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is True and doc["nr_chunks"] == 1024 and doc["existing"] is None


# ---------------------------------------------------------------------------- daemon


def test_daemon_serves_until_sigterm(
    config: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    class Daemon(FakeDaemon):
        def __init__(self, cfg: Any, node: str | None) -> None:
            super().__init__()
            seen["node"] = node
            seen["resources"] = list(cfg.resources)

        def start(self) -> None:
            seen["started"] = True
            threading.Thread(target=self.poke, daemon=True).start()

        def poke(self) -> None:
            try:
                seen["status"] = ControlClient(sockdir / "repctl.sock", 10).call("status")
            finally:
                os.kill(os.getpid(), signal.SIGTERM)

        def stop(self) -> None:
            seen["stopped"] = True

    monkeypatch.setitem(sys.modules, "repctl.daemon", types.SimpleNamespace(Daemon=Daemon))
    before = signal.getsignal(signal.SIGTERM)
    result = run(config, "daemon", "--node", "alpha", "--log-level", "debug")
    assert result.exit_code == 0, result.output
    assert seen["node"] == "alpha" and seen["resources"] == ["r0", "r1"]
    assert seen["started"] and seen["stopped"]
    assert seen["status"]["node"] == "alpha"
    assert not (sockdir / "repctl.sock").exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_daemon_refuses_a_second_instance(
    config: Path, server: ControlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[bool] = []

    class Daemon(FakeDaemon):
        def __init__(self, cfg: Any, node: str | None) -> None:
            super().__init__()

        def start(self) -> None:
            started.append(True)

        def stop(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "repctl.daemon", types.SimpleNamespace(Daemon=Daemon))
    result = run(config, "daemon")
    assert result.exit_code == 1
    assert "another repctl daemon is already listening" in result.stderr
    assert started == [], "nothing is started before the socket is ours"
