"""The repctl CLI through typer's CliRunner, against a fake daemon behind a real control socket."""

from __future__ import annotations

import copy
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from repctl import cli, metadata, render
from repctl.control import ControlClient, ControlServer
from repctl.errors import ReplError
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
        self.verify_result: dict[str, Any] = {}
        self.events: queue.Queue[Any] = queue.Queue()

    def _call(self, name: str, result: Any = None, **kw: Any) -> Any:
        self.calls.append((name, kw))
        if name in self.fail:
            raise self.fail[name]
        return result

    def status(self) -> Any:
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

    def verify(self, resource: str, target: str) -> Any:
        return self._call("verify", self.verify_result, resource=resource, target=target)

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


def test_status_of_a_resource_that_is_not_up(config: Path, server: ControlServer) -> None:
    result = run(config, "status", "r0", "--json")
    assert result.exit_code == 0
    result = CliRunner().invoke(cli.app, ["-c", str(config), "status", "nope"])
    assert result.exit_code == 1
    assert result.stderr.startswith("repctl: error: ")
    assert "a resource named 'nope'" in result.stderr


def test_status_json_and_watch_is_a_usage_error(config: Path, server: ControlServer) -> None:
    assert run(config, "status", "--json", "--watch", "1").exit_code == 2


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
    assert "(is it running? systemctl status repctl)" in result.stderr
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
