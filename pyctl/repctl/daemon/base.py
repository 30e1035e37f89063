"""What the source and the target side of a resource share: its folder, secret and events, and
the socket and state-file helpers both use. Imports nothing else of the daemon."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from repctl import metadata
from repctl import protocol as P
from repctl import tls as T
from repctl.config import Resource
from repctl.errors import ReplError

if TYPE_CHECKING:
    from repctl.daemon.service import Daemon

log = logging.getLogger("repctl.daemon")

__all__ = ["MAX_PENDING_HANDSHAKES", "READ_PIECE", "SECTOR", "SEND_TIMEOUT_MS", "Listener",
           "ResourceBase", "local_changes", "new_generation", "readable", "set_aside", "tune"]

SECTOR = 512
READ_PIECE = 16 << 20    # the most one read of a device or store asks for
SEND_TIMEOUT_MS = 30_000  # TCP_USER_TIMEOUT: a peer that takes nothing for this long is dropped
MAX_PENDING_HANDSHAKES = 8  # unauthenticated connections a listener serves at once; more are shed


class ResourceBase:
    """What a resource needs on either side: its config, secret, transport (plain TCP or TLS,
    repctl.tls), state folder and events."""

    def __init__(self, daemon: Daemon, cfg: Resource):
        self.daemon = daemon
        self.cfg = cfg
        self.name = cfg.name
        self.node = daemon.node
        self.events = daemon.events
        self.secret = daemon.config.read_secret(cfg.name)
        # its TLS files are read and checked here, at `up`: ConfigError naming the file
        self.transport = T.transport(daemon.config, cfg.name, self.node)
        self.state_dir = daemon.state_dir / cfg.name
        self.state_dir.mkdir(parents=True, exist_ok=True)


def new_generation() -> int:
    """A fresh data generation: random, never 0 ("no data")."""
    return secrets.randbits(63) | 1


def set_aside(path: Path) -> None:
    """Keep a corrupt state file for the administrator, out of the daemon's way."""
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))


def readable(sock: P.Stream) -> bool:
    """Whether a recv on `sock` would not block now (TLS: bytes it already holds count too)."""
    if isinstance(sock, T.TLSSocket) and sock.pending():
        return True
    r, _, _ = select.select([sock], [], [], 0)
    return bool(r)


def tune(sock: socket.socket) -> None:
    """No Nagle delay for acks; keepalives so that a dead peer is noticed within ~10 s; a send
    timeout (TCP_USER_TIMEOUT) for a peer that stops reading."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 4)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    # a peer that takes no data (dead, or alive and not reading: zero window) ends the
    # connection after this long, so a blocked send never holds a link's lock forever
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, SEND_TIMEOUT_MS)


class Listener:
    """A resource's TCP port on this node. The listener thread only accepts; each connection
    runs ``handle(sock, peer)`` in a thread of its own, so that a peer that never finishes its
    handshake holds nothing but its own thread, for at most the handshake's deadline. At most
    MAX_PENDING_HANDSHAKES connections may be in their handshake at once: more are closed at
    once. `handle` must call `handshake_over` once its handshake ended, however it ended."""

    def __init__(self, name: str, address: tuple[str, int],
                 handle: Callable[[socket.socket, tuple[str, int]], None]) -> None:
        self.name = name
        self.address = address
        self.handle = handle
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.pending = 0  # connections still in their handshake
        self.handlers: set[threading.Thread] = set()
        self.sock: socket.socket | None = None
        self.thread = threading.Thread(target=self._listen, name=f"listen-{name}", daemon=True)

    def start(self) -> None:
        self.sock = socket.create_server(self.address, reuse_port=False)
        self.sock.settimeout(0.5)
        self.thread.start()

    def stop(self) -> None:
        """Stop accepting and wait (5 s at most each) for the connection threads to end; the
        caller closes the connections it holds first."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        for t in list(self.handlers):
            t.join(5)
        if self.sock is not None:
            self.sock.close()

    def handshake_over(self) -> None:
        with self.lock:
            self.pending -= 1

    def _listen(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            try:
                sock, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.1)  # EMFILE and the like: never end the listener
                continue
            with self.lock:
                if self.pending >= MAX_PENDING_HANDSHAKES:
                    sock.close()  # a flood of unauthenticated connections: shed them
                    log.warning("%s: %d handshakes pending: closed a connection from %s",
                                self.name, self.pending, peer[0])
                    continue
                self.pending += 1
            t = threading.Thread(target=self._run, args=(sock, peer), daemon=True,
                                 name=f"conn-{self.name}-{peer[0]}:{peer[1]}")
            self.handlers.add(t)
            t.start()

    def _run(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            self.handle(sock, peer)
        finally:
            self.handlers.discard(threading.current_thread())


def local_changes(state_dir: Path, meta: Path | None, peer: str, nr_chunks: int) -> bytes:
    """The chunks (a bitmap of `nr_chunks` bits) where this node's data may differ from `peer`'s,
    by what this node wrote as a primary: its out-of-sync bitmap for `peer` (what `peer` had not
    got) ORed with the dirty bitmap on its metadata device (writes not yet known to be on every
    target). Where either cannot be read, every chunk: never less than the truth."""
    nbytes = -(-nr_chunks // 8)
    full = (1 << nr_chunks) - 1
    bits = 0
    # The dirty bitmap first, then the OOS file: a running engine moves bits from the one to
    # the other (it saves the OOS before it CLEANs), so a bit is always in one of the two
    # reads; in the other order a CLEAN between the reads could hide it from both.
    if meta is not None:
        try:
            _sb, dirty = metadata.read_bitmap(meta)
            bits |= int.from_bytes(dirty[:nbytes], "little")
            if len(dirty) * 8 < nr_chunks:
                bits |= full & ~((1 << len(dirty) * 8) - 1)
        except (OSError, ReplError) as e:
            log.warning("%s: cannot read the dirty bitmap on %s (%s): every chunk may differ",
                        state_dir.name, meta, e)
            bits = full
    if bits != full:
        try:
            oos = (state_dir / f"{peer}.oos").read_bytes()
            bits |= int.from_bytes(oos[:nbytes], "little")
            if len(oos) * 8 < nr_chunks:
                bits |= full & ~((1 << len(oos) * 8) - 1)  # chunks the file does not cover
        except OSError as e:
            log.warning("%s: no out-of-sync bitmap for %s (%s): every chunk may differ",
                        state_dir.name, peer, e)
            bits = full
    return (bits & full).to_bytes(nbytes, "little")
