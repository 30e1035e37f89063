"""What the source and the target side of a resource share: its folder, secret and events, and
the socket and state-file helpers both use. Imports nothing else of the daemon."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from repctl.config import Resource

if TYPE_CHECKING:
    from repctl.daemon.service import Daemon

__all__ = ["READ_PIECE", "SECTOR", "SEND_TIMEOUT_MS", "ResourceBase", "readable", "set_aside",
           "tune"]

SECTOR = 512
READ_PIECE = 16 << 20    # the most one read of a device or store asks for
SEND_TIMEOUT_MS = 30_000  # TCP_USER_TIMEOUT: a peer that takes nothing for this long is dropped


class ResourceBase:
    """What a resource needs on either side: its config, secret, state folder and events."""

    def __init__(self, daemon: Daemon, cfg: Resource):
        self.daemon = daemon
        self.cfg = cfg
        self.name = cfg.name
        self.node = daemon.node
        self.events = daemon.events
        self.secret = daemon.config.read_secret(cfg.name)
        self.state_dir = daemon.state_dir / cfg.name
        self.state_dir.mkdir(parents=True, exist_ok=True)


def set_aside(path: Path) -> None:
    """Keep a corrupt state file for the administrator, out of the daemon's way."""
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))


def readable(sock: socket.socket) -> bool:
    """Whether a recv on `sock` would not block now."""
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
