"""The local control socket between the `repctl` CLI and the node daemon.

An AF_UNIX stream socket (``global.control_socket``, by default ``/run/repctl/repctl.sock``, mode
0600: only root talks to the daemon). The protocol is JSON, one object per line (UTF-8, ``\\n``
terminated, at most 1 MiB a line):

    request   {"cmd": "pause", "args": {"resource": "r0", "target": "beta"}}
    reply     {"ok": true, "result": ...}
              {"ok": false, "error": "one line a human can read"}

A connection may carry several requests, one after the other. A malformed line (not JSON, not an
object, longer than 1 MiB) gets an error reply and the connection is closed. The streaming command
``events`` answers with ``{"event": {...}}`` lines until the client closes the connection (or with
one error reply if the daemon cannot subscribe).

The commands and their arguments are declared in `COMMANDS`; the server calls the handler's method
of the same name with those keyword arguments and nothing else (see docs/cli.md for the contract
the daemon implements).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import logging
import os
import queue
import select
import selectors
import socket
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from repctl.errors import ReplError

__all__ = [
    "COMMANDS",
    "DEFAULT_SOCKET",
    "MAX_LINE",
    "ControlClient",
    "ControlServer",
    "Handler",
]

log = logging.getLogger("repctl.control")

DEFAULT_SOCKET = Path("/run/repctl/repctl.sock")

#: Longest request or reply line, newline excluded.
MAX_LINE = 1 << 20

#: Longest AF_UNIX path Linux accepts (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


@dataclasses.dataclass(frozen=True)
class Command:
    """A command of the control protocol: its required and optional string arguments."""

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


#: Every command the server dispatches. Names and arguments are the handler's method signatures.
COMMANDS: Mapping[str, Command] = {
    "status": Command(),
    "up": Command(("resource",)),
    "down": Command(("resource",)),
    "pause": Command(("resource",), ("target",)),
    "resume": Command(("resource",), ("target",)),
    "connect": Command(("resource",), ("target",)),
    "disconnect": Command(("resource",), ("target",)),
    "verify": Command(("resource", "target"), ("repair",)),
    "cancel_verify": Command(("resource", "target")),
    "promote": Command(("resource",), ("force",)),
    "demote": Command(("resource",)),
    "resolve": Command(("resource",), ("discard_local",)),
    "events": Command(),  # streaming: handler.subscribe()
}


#: Arguments that are booleans (JSON true/false); every other argument is a string.
FLAGS = frozenset({"force", "discard_local", "repair"})


class EventQueue(Protocol):
    def get(self, block: bool = ..., timeout: float | None = ...) -> Any: ...


class Handler(Protocol):
    """What the daemon provides to the control socket (repctl.daemon.Daemon).

    Methods may be called concurrently from several connection threads. A `ReplError` becomes the
    error reply's text; any other exception is a bug, logged with its traceback.
    ``unsubscribe(queue)`` is optional: when present it is called once an event stream ends.
    """

    def status(self) -> dict[str, Any]: ...
    def up(self, resource: str) -> Any: ...
    def down(self, resource: str) -> Any: ...
    def pause(self, resource: str, target: str | None = None) -> Any: ...
    def resume(self, resource: str, target: str | None = None) -> Any: ...
    def connect(self, resource: str, target: str | None = None) -> Any: ...
    def disconnect(self, resource: str, target: str | None = None) -> Any: ...
    def verify(self, resource: str, target: str, repair: bool = False) -> dict[str, Any]: ...
    def cancel_verify(self, resource: str, target: str) -> Any: ...
    def promote(self, resource: str, force: bool = False) -> Any: ...
    def demote(self, resource: str) -> Any: ...
    def resolve(self, resource: str, discard_local: bool = False) -> Any: ...
    def subscribe(self) -> EventQueue: ...


class _BadRequest(Exception):
    """The request line cannot be parsed: reply with the error and close the connection."""


def _jsonable(obj: object) -> object:
    """JSON encoder fallback: paths and enums as their value, dataclasses as dicts."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode(message: Mapping[str, Any]) -> bytes:
    """One protocol line: compact JSON and a newline."""
    return json.dumps(message, default=_jsonable, separators=(",", ":")).encode() + b"\n"


def _check_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ReplError(
            f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "set a shorter global.control_socket"
        )


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class ControlServer:
    """Serves the control protocol on a Unix socket, one thread per connection.

    `start` creates the socket (mode 0600; the parent directory, 0755, if missing), replacing a
    stale socket file that nobody listens on; it raises ReplError if another process listens on
    the path or the path is something other than a socket. `stop` closes every connection, removes
    the socket file (if it is still ours) and returns within about a second.
    """

    EVENT_POLL = 0.5  # seconds between checks that an events client is still there

    def __init__(self, path: str | Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """`bind`, then `serve`."""
        self.bind()
        self.serve()

    def bind(self) -> None:
        """Create the socket and listen; clients that connect now wait until `serve`.

        ReplError if the path is too long, is not a socket, or another process listens on it.
        """
        _check_path(self.path)
        self._make_parent()
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
            try:
                sock.bind(os.fspath(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ReplError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        self._listener = sock
        self._wake_r, self._wake_w = os.pipe()
        self._stopping.clear()

    def serve(self) -> None:
        """Accept connections in a background thread, one more thread per connection."""
        if self._listener is None:
            raise RuntimeError("ControlServer.serve() before bind()")
        self._acceptor = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._acceptor.start()
        log.info("control socket listening on %s", self.path)

    def stop(self) -> None:
        """Stop accepting, end every connection (event streams too), remove the socket file.

        Safe to call twice, and from another thread than `start`.
        """
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._acceptor is not None:
            self._acceptor.join(5)
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in conns.values():
            thread.join(2)  # a handler call in progress (verify) may outlive us: daemon threads
        listener.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._unlink_if_ours()
        log.info("control socket %s closed", self.path)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_parent(self) -> None:
        parent = self.path.parent
        if parent.is_dir():
            return
        try:
            parent.mkdir(mode=0o755, parents=True)
            os.chmod(parent, 0o755)  # mkdir's mode is masked by the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise ReplError(f"cannot create {parent}: {exc.strerror or exc}") from None

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ReplError(
                f"{self.path} exists and is not a socket; remove it or set global.control_socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(os.fspath(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as exc:
            raise ReplError(f"cannot check {self.path}: {exc.strerror or exc}") from None
        finally:
            probe.close()
        raise ReplError(f"another repctl daemon is already listening on {self.path}")

    def _unlink_if_ours(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    # -- connections --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fd == self._wake_r or self._stopping.is_set():
                        return
                    try:
                        conn, _ = listener.accept()
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                            log.error("control socket: accept failed: %s", exc)
                        continue
                    thread = threading.Thread(
                        target=self._serve, args=(conn,), name="control-conn", daemon=True
                    )
                    with self._lock:
                        self._conns[conn] = thread
                    thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as rfile:
                while not self._stopping.is_set():
                    line = rfile.readline(MAX_LINE + 1)
                    if not line:
                        return
                    try:
                        cmd, args = self._parse(line)
                    except _BadRequest as exc:
                        self._send(conn, {"ok": False, "error": str(exc)})
                        return
                    if cmd == "events":
                        self._stream_events(conn)
                        return
                    self._send(conn, self._dispatch(cmd, args))
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self._conns.pop(conn, None)

    @staticmethod
    def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
        try:
            data = encode(message)
        except (TypeError, ValueError) as exc:
            log.error("control socket: cannot encode reply %r: %s", message, exc)
            data = encode({"ok": False, "error": f"internal error: reply not JSON: {exc}"})
        conn.sendall(data, socket.MSG_NOSIGNAL)

    @staticmethod
    def _parse(line: bytes) -> tuple[str, dict[str, Any]]:
        """(command, arguments) of one request line; _BadRequest if it is not a request."""
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            raise _BadRequest(f"request longer than {MAX_LINE} bytes")
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadRequest(f"malformed request: not JSON ({exc})") from None
        if not isinstance(request, dict):
            raise _BadRequest("malformed request: expected a JSON object")
        cmd = request.get("cmd")
        args = request.get("args", {})
        if not isinstance(cmd, str):
            raise _BadRequest("malformed request: expected a string 'cmd'")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise _BadRequest("malformed request: expected 'args' to be an object")
        return cmd, args

    @staticmethod
    def _check_args(cmd: str, args: dict[str, Any]) -> str | None:
        """The error text if `args` do not fit command `cmd`, else None."""
        spec = COMMANDS[cmd]
        for name in args:
            if name not in spec.required + spec.optional:
                return f"command '{cmd}' takes no argument '{name}'"
        for name in spec.required:
            if args.get(name) is None:
                return f"command '{cmd}' needs the argument '{name}'"
        for name, value in args.items():
            if name in FLAGS:
                if value is not None and not isinstance(value, bool):
                    return f"argument '{name}' of '{cmd}' must be true or false"
            elif value is not None and not isinstance(value, str):
                return f"argument '{name}' of '{cmd}' must be a string"
        return None

    def _dispatch(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd not in COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        problem = self._check_args(cmd, args)
        if problem:
            return {"ok": False, "error": problem}
        method = getattr(self.handler, cmd, None)
        if method is None:
            return {"ok": False, "error": f"command '{cmd}' is not supported by this daemon"}
        kwargs = {k: v for k, v in args.items() if v is not None}
        log.log(logging.DEBUG if cmd == "status" else logging.INFO, "control: %s %s", cmd, kwargs)
        try:
            return {"ok": True, "result": method(**kwargs)}
        except ReplError as exc:
            log.info("control: %s %s: %s", cmd, kwargs, exc)
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        except Exception as exc:
            log.exception("control: %s %s failed", cmd, kwargs)
            return {"ok": False, "error": f"internal error: {exc!r}"}

    def _stream_events(self, conn: socket.socket) -> None:
        """Send {"event": ...} lines until the client closes, the server stops or get() fails."""
        try:
            events = self.handler.subscribe()
        except ReplError as exc:
            self._send(conn, {"ok": False, "error": str(exc)})
            return
        except Exception as exc:
            log.exception("control: events: subscribe failed")
            self._send(conn, {"ok": False, "error": f"internal error: {exc!r}"})
            return
        try:
            while not self._stopping.is_set():
                if _peer_closed(conn):
                    return
                try:
                    event = events.get(timeout=self.EVENT_POLL)
                except queue.Empty:
                    if getattr(events, "dropped", False):  # daemon/events.py Subscription
                        self._send(conn, {"ok": False, "error": (
                            "this event stream fell too far behind and was dropped: events "
                            "were lost; run `repctl events` again (status shows the state now)")})
                        return
                    continue
                except ReplError as exc:
                    self._send(conn, {"ok": False, "error": str(exc)})
                    return
                if event is not None:
                    self._send(conn, {"event": event})
        finally:
            unsubscribe = getattr(self.handler, "unsubscribe", None)
            if unsubscribe is not None:
                try:
                    unsubscribe(events)
                except Exception:
                    log.exception("control: events: unsubscribe failed")


def _peer_closed(conn: socket.socket) -> bool:
    """True if the client has closed its end (anything it sends on a stream is ignored)."""
    while True:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        try:
            data = conn.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------

#: What to do next, after the reason, when the daemon is not there to answer.
NOT_RUNNING = "(is it running? systemctl status repctl; start it: systemctl start repctl)"

#: Why the socket cannot be reached, and what to do next.
_REASONS = {
    errno.ENOENT: f"no such socket {NOT_RUNNING}",
    errno.ECONNREFUSED: f"connection refused {NOT_RUNNING}",
    errno.EACCES: "permission denied: the control socket is root's only (run repctl as root: "
                  "sudo repctl ...)",
    errno.EPERM: "permission denied: the control socket is root's only (run repctl as root: "
                 "sudo repctl ...)",
}


class ControlClient:
    """Talks to the daemon's control socket; every failure is a ReplError with one clear line.

    `timeout` (seconds, None for no limit) bounds connecting and waiting for each reply.
    """

    def __init__(self, path: str | Path = DEFAULT_SOCKET, timeout: float | None = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        _check_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.path))
        except TimeoutError:
            sock.close()
            raise self._unreachable("timed out: the daemon does not accept connections (its "
                                    "log: journalctl -u repctl; systemctl restart repctl)") from None
        except OSError as exc:
            sock.close()
            reason = _REASONS.get(exc.errno or 0) or (
                f"{(exc.strerror or str(exc)).lower()} {NOT_RUNNING}")
            raise self._unreachable(reason) from None
        return sock

    def _unreachable(self, reason: str) -> ReplError:
        return ReplError(f"cannot reach the repctl daemon at {self.path}: {reason}")

    def _read(self, rfile: Any, cmd: str) -> dict[str, Any] | None:
        """The next reply line as a dict; None at the end of the stream."""
        try:
            line = rfile.readline(MAX_LINE + 1)
        except TimeoutError:
            raise ReplError(
                f"the repctl daemon at {self.path} did not answer '{cmd}' within "
                f"{self.timeout:g} s (busy or hung? its log: journalctl -u repctl)"
            ) from None
        except OSError as exc:
            raise ReplError(
                f"lost the connection to the repctl daemon at {self.path}: "
                f"{exc.strerror or exc} (did it stop? systemctl status repctl)"
            ) from None
        if not line:
            return None
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise ReplError(f"the repctl daemon at {self.path} sent a malformed reply to '{cmd}'")
        return reply

    def call(self, cmd: str, **args: Any) -> Any:
        """Run `cmd` on the daemon and return its result; ReplError with the daemon's text if it
        failed. Arguments that are None are left out."""
        request = {"cmd": cmd, "args": {k: v for k, v in args.items() if v is not None}}
        with self._connect() as sock, sock.makefile("rb") as rfile:
            try:
                sock.sendall(encode(request), socket.MSG_NOSIGNAL)
            except OSError as exc:
                raise self._unreachable(f"{exc.strerror or exc} {NOT_RUNNING}") from None
            reply = self._read(rfile, cmd)
        if reply is None:
            raise ReplError(
                f"the repctl daemon at {self.path} closed the connection without answering "
                f"'{cmd}' (did it stop? systemctl status repctl)"
            )
        if reply.get("ok") is True:
            return reply.get("result")
        raise ReplError(str(reply.get("error") or f"'{cmd}' failed without a reason"))

    def events(self) -> Iterator[dict[str, Any]]:
        """Yield the daemon's events as they happen; ends when the daemon closes the stream.

        Closing the iterator (or leaving the loop) closes the connection.
        """
        with self._connect() as sock, sock.makefile("rb") as rfile:
            sock.sendall(encode({"cmd": "events", "args": {}}), socket.MSG_NOSIGNAL)
            sock.settimeout(None)  # events may be hours apart
            while True:
                reply = self._read(rfile, "events")
                if reply is None:
                    return
                if "event" in reply:
                    event = reply["event"]
                    yield event if isinstance(event, dict) else {"event": event}
                elif reply.get("ok") is False:
                    raise ReplError(str(reply.get("error") or "the event stream failed"))
