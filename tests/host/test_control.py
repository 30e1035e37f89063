"""The control socket: server and client over a real Unix socket, with a fake daemon."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from repctl.control import MAX_LINE, ControlClient, ControlServer
from repctl.errors import ReplError


class FakeDaemon:
    """Records every call; `fail` makes a command raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: dict[str, BaseException] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.unsubscribed = threading.Event()

    def _call(self, name: str, **kw: Any) -> Any:
        self.calls.append((name, kw))
        if name in self.fail:
            raise self.fail[name]
        return f"{name} done"

    def status(self) -> dict[str, Any]:
        self._call("status")
        return {"node": "alpha", "resources": []}

    def up(self, resource: str) -> Any:
        return self._call("up", resource=resource)

    def down(self, resource: str) -> Any:
        return self._call("down", resource=resource)

    def pause(self, resource: str, target: str | None = None) -> Any:
        return self._call("pause", resource=resource, target=target)

    def resume(self, resource: str, target: str | None = None) -> Any:
        return self._call("resume", resource=resource, target=target)

    def connect(self, resource: str, target: str | None = None) -> Any:
        return self._call("connect", resource=resource, target=target)

    def disconnect(self, resource: str, target: str | None = None) -> Any:
        return self._call("disconnect", resource=resource, target=target)

    def verify(self, resource: str, target: str, repair: bool = False) -> Any:
        self._call("verify", resource=resource, target=target, **({"repair": True} if repair
                                                                   else {}))
        return {"resource": resource, "target": target, "chunks": 4, "differing": [2]}

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        self._call("subscribe")
        return self.events

    def unsubscribe(self, q: object) -> None:
        assert q is self.events
        self.unsubscribed.set()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths have at most 107 bytes, pytest's tmp_path may be longer."""
    d = Path(tempfile.mkdtemp(prefix="repctl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def server(sockdir: Path, daemon: FakeDaemon) -> Iterator[ControlServer]:
    srv = ControlServer(sockdir / "run" / "repctl.sock", daemon)
    srv.start()
    yield srv
    srv.stop()


def raw(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, read reply lines until the server closes (or 2 s pass)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


@pytest.mark.parametrize(
    ("cmd", "args", "expect"),
    [
        ("up", {"resource": "r0"}, {"resource": "r0"}),
        ("down", {"resource": "r0"}, {"resource": "r0"}),
        ("pause", {"resource": "r0"}, {"resource": "r0", "target": None}),
        ("pause", {"resource": "r0", "target": "beta"}, {"resource": "r0", "target": "beta"}),
        ("resume", {"resource": "r0", "target": "beta"}, {"resource": "r0", "target": "beta"}),
        ("connect", {"resource": "r0"}, {"resource": "r0", "target": None}),
        ("disconnect", {"resource": "r0", "target": "gamma"},
         {"resource": "r0", "target": "gamma"}),
    ],
)
def test_each_command_reaches_the_handler(
    server: ControlServer, daemon: FakeDaemon, cmd: str, args: dict[str, Any],
    expect: dict[str, Any],
) -> None:
    assert ControlClient(server.path, 5).call(cmd, **args) == f"{cmd} done"
    assert daemon.calls == [(cmd, expect)]


def test_status_and_verify_return_data(server: ControlServer, daemon: FakeDaemon) -> None:
    client = ControlClient(server.path, 5)
    assert client.call("status") == {"node": "alpha", "resources": []}
    assert client.call("verify", resource="r0", target="beta")["differing"] == [2]
    assert daemon.calls[-1] == ("verify", {"resource": "r0", "target": "beta"})
    client.call("verify", resource="r0", target="beta", repair=True)
    assert daemon.calls[-1] == ("verify", {"resource": "r0", "target": "beta", "repair": True})


def test_socket_is_0600_in_a_0755_directory(server: ControlServer) -> None:
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o755


def test_repl_error_becomes_the_error_line(server: ControlServer, daemon: FakeDaemon) -> None:
    daemon.fail["up"] = ReplError("resource r0: no metadata device")
    assert raw(server.path, b'{"cmd": "up", "args": {"resource": "r0"}}\n') == [
        {"ok": False, "error": "resource r0: no metadata device"}
    ]
    with pytest.raises(ReplError, match=r"^resource r0: no metadata device$"):
        ControlClient(server.path, 5).call("up", resource="r0")


def test_a_bug_is_an_internal_error_and_logged(
    server: ControlServer, daemon: FakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    daemon.fail["down"] = RuntimeError("boom")
    with (
        caplog.at_level(logging.ERROR, logger="repctl.control"),
        pytest.raises(ReplError, match=r"^internal error: RuntimeError\('boom'\)$"),
    ):
        ControlClient(server.path, 5).call("down", resource="r0")
    assert any(r.exc_info for r in caplog.records), "the traceback is logged"
    # the server lives on
    assert ControlClient(server.path, 5).call("up", resource="r0") == "up done"


def test_unknown_command(server: ControlServer) -> None:
    assert raw(server.path, b'{"cmd": "x"}\n') == [{"ok": False, "error": "unknown command 'x'"}]
    with pytest.raises(ReplError, match="unknown command '__init__'"):
        ControlClient(server.path, 5).call("__init__")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"resource": "r0"}, "command 'verify' needs the argument 'target'"),
        ({"resource": "r0", "target": "b", "force": "1"}, "command 'verify' takes no argument"),
        ({"resource": 3, "target": "b"}, "argument 'resource' of 'verify' must be a string"),
        ({"resource": "r0", "target": "b", "repair": "yes"},
         "argument 'repair' of 'verify' must be true or false"),
    ],
)
def test_bad_arguments(
    server: ControlServer, daemon: FakeDaemon, args: dict[str, Any], error: str
) -> None:
    line = json.dumps({"cmd": "verify", "args": args}).encode() + b"\n"
    [reply] = raw(server.path, line)
    assert reply["ok"] is False and reply["error"].startswith(error)
    assert daemon.calls == []


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{not json\n", "malformed request: not JSON"),
        (b"[1, 2]\n", "malformed request: expected a JSON object"),
        (b'{"args": {}}\n', "malformed request: expected a string 'cmd'"),
        (b'{"cmd": "up", "args": [1]}\n', "malformed request: expected 'args' to be an object"),
        (b"\xff\xfe\n", "malformed request: not JSON"),
    ],
)
def test_malformed_request_gets_an_error_and_is_closed(
    server: ControlServer, line: bytes, error: str
) -> None:
    # the second request is never answered: the connection closes after the error
    replies = raw(server.path, line + b'{"cmd": "status"}\n')
    assert len(replies) == 1
    assert replies[0]["ok"] is False and replies[0]["error"].startswith(error)


def test_too_long_line_is_refused(server: ControlServer, daemon: FakeDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(server.path))
        # the server may close before we finish sending: its reply is there all the same
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b'{"cmd": "status", "pad": "' + b"x" * (MAX_LINE + 10))
        reply = s.makefile("rb").readline()
    assert json.loads(reply) == {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
    assert daemon.calls == []


def test_several_requests_on_one_connection(server: ControlServer) -> None:
    replies = raw(server.path, b'{"cmd": "up", "args": {"resource": "a"}}\n{"cmd": "status"}\n')
    assert [r["ok"] for r in replies] == [True, True]


def test_missing_socket_gives_the_clear_message(sockdir: Path) -> None:
    path = sockdir / "nothing.sock"
    with pytest.raises(ReplError) as exc:
        ControlClient(path, 1).call("status")
    assert str(exc.value) == (
        f"cannot reach the repctl daemon at {path}: no such socket "
        "(is it running? systemctl status repctl; start it: systemctl start repctl)"
    )


def test_permission_denied_says_to_run_as_root(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run as root, which no mode keeps out: the refusal is the kernel's EACCES."""

    def connect(self: socket.socket, address: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", connect)
    path = sockdir / "repctl.sock"
    with pytest.raises(ReplError) as exc:
        ControlClient(path, 1).call("status")
    assert str(exc.value) == (
        f"cannot reach the repctl daemon at {path}: permission denied: the control socket is "
        "root's only (run repctl as root: sudo repctl ...)"
    )  # and not "is it running?": it is


def test_refused_socket_gives_the_clear_message(sockdir: Path) -> None:
    path = sockdir / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: connect is refused
        with pytest.raises(ReplError, match="cannot reach the repctl daemon at .*: connection "
                                            r"refused \(is it running\?"):
            ControlClient(path, 1).call("status")


def test_stale_socket_is_replaced(sockdir: Path, daemon: FakeDaemon) -> None:
    path = sockdir / "repctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    assert path.exists()
    with ControlServer(path, daemon):
        assert ControlClient(path, 5).call("status")["node"] == "alpha"
    assert not path.exists(), "stop removes the socket"


def test_a_live_socket_is_not_stolen(server: ControlServer, daemon: FakeDaemon) -> None:
    with pytest.raises(ReplError, match="another repctl daemon is already listening"):
        ControlServer(server.path, daemon).start()
    assert ControlClient(server.path, 5).call("status")["node"] == "alpha"


def test_a_file_that_is_not_a_socket_is_left_alone(sockdir: Path, daemon: FakeDaemon) -> None:
    path = sockdir / "repctl.sock"
    path.write_text("important")
    with pytest.raises(ReplError, match="exists and is not a socket"):
        ControlServer(path, daemon).start()
    assert path.read_text() == "important"


def test_after_stop_clients_get_the_clear_message(
    sockdir: Path, daemon: FakeDaemon
) -> None:
    srv = ControlServer(sockdir / "repctl.sock", daemon)
    srv.start()
    srv.stop()
    with pytest.raises(ReplError, match="cannot reach the repctl daemon"):
        ControlClient(srv.path, 1).call("status")


def test_events_stream_until_the_client_closes(server: ControlServer, daemon: FakeDaemon) -> None:
    stream = ControlClient(server.path, 5).events()
    daemon.events.put({"resource": "r0", "what": "state", "old": "syncing", "new": "streaming"})
    daemon.events.put({"resource": "r0", "what": "down"})
    assert next(stream)["new"] == "streaming"
    assert next(stream) == {"resource": "r0", "what": "down"}
    stream.close()
    assert daemon.unsubscribed.wait(5), "the server notices the client left and unsubscribes"


def test_events_end_when_the_server_stops(sockdir: Path, daemon: FakeDaemon) -> None:
    srv = ControlServer(sockdir / "repctl.sock", daemon)
    srv.start()
    stream = ControlClient(srv.path, 5).events()
    daemon.events.put({"what": "up"})
    assert next(stream) == {"what": "up"}
    t0 = time.monotonic()
    srv.stop()
    assert list(stream) == []
    assert time.monotonic() - t0 < 5


def test_a_dropped_subscriber_gets_what_it_holds_then_an_error(
    server: ControlServer, daemon: FakeDaemon
) -> None:
    """A client that fell MAX_BACKLOG events behind is dropped by the bus: its stream delivers
    what was queued, then ends with an error saying events were lost (it used to go quiet)."""
    from repctl.daemon.events import MAX_BACKLOG, Events

    bus = Events()
    daemon.events = bus.subscribe()  # the queue the server streams from: the bus's own kind
    for i in range(MAX_BACKLOG + 5):  # the client reads nothing yet: the bus drops it
        bus.emit(resource="r0", what="progress", n=i)
    assert daemon.events.dropped
    stream = ControlClient(server.path, 5).events()
    got = []
    with pytest.raises(ReplError, match="fell too far behind and was dropped: events were lost"):
        for event in stream:
            got.append(event["n"])
    assert got == list(range(MAX_BACKLOG)), (len(got), got[-3:])


def test_events_subscribe_error(server: ControlServer, daemon: FakeDaemon) -> None:
    daemon.fail["subscribe"] = ReplError("no events on this node")
    with pytest.raises(ReplError, match=r"^no events on this node$"):
        next(ControlClient(server.path, 5).events())


def test_a_slow_handler_times_out_in_the_client(
    server: ControlServer, daemon: FakeDaemon
) -> None:
    release = threading.Event()
    daemon.up = lambda resource: release.wait(5)  # type: ignore[method-assign]
    try:
        with pytest.raises(ReplError, match=r"did not answer 'up' within 0\.2 s"):
            ControlClient(server.path, 0.2).call("up", resource="r0")
    finally:
        release.set()


def test_too_long_socket_path_is_a_clear_error(daemon: FakeDaemon) -> None:
    path = Path("/tmp/" + "x" * 120)
    with pytest.raises(ReplError, match="longer than 107 bytes"):
        ControlServer(path, daemon).start()
    with pytest.raises(ReplError, match="longer than 107 bytes"):
        ControlClient(path).call("status")
