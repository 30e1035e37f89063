"""Roles and the steps of a role change: the role file, probing the peers, what a promoted node
starts from, and whether a former primary may rejoin by itself (docs/failover.md).

The service (service.py) runs promote, demote and the start of a resource through these; every
check that can refuse runs before anything changes.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import dataclass
from enum import StrEnum, unique
from pathlib import Path
from typing import Any

from repctl import metadata
from repctl import protocol as P
from repctl.config import Resource
from repctl.daemon.base import local_changes, new_generation, set_aside, tune
from repctl.daemon.state import Role
from repctl.errors import HandshakeRefused, ReplError, TLSError
from repctl.statefile import StateError, atomic_write, load_json, save_json
from repctl.tls import Transport

log = logging.getLogger("repctl.daemon")

__all__ = ["Probe", "ProbeKind", "device_users", "load_role", "may_rejoin", "probe",
           "save_role", "start_as_primary"]

PROBE_TIMEOUT = 5.0  # seconds for one probe: connect and handshake


def load_role(state_dir: Path, cfg: Resource, node: str) -> Role:
    """This node's role for the resource: role.json, or, before the first role change, the
    config's `source` is the primary. A corrupt file is set aside and the node starts as a
    secondary: never two primaries by accident."""
    default = {"role": Role.PRIMARY if cfg.source == node else Role.SECONDARY}
    path = state_dir / "role.json"
    try:
        data = load_json(path, default, action="this node starts as a secondary",
                         check=lambda d: None if d.get("role") in set(Role)
                         else f"role {d.get('role')!r} is none of {', '.join(Role)}")
    except StateError as e:
        log.error("%s: %s", cfg.name, e)
        set_aside(path)
        return Role.SECONDARY
    return Role(data["role"])


def save_role(state_dir: Path, role: Role) -> None:
    save_json(state_dir / "role.json", {"role": role})


@unique
class ProbeKind(StrEnum):
    """What a peer said when this node connected to it as a would-be primary."""

    PRIMARY = "primary"          # it is the primary (it refused us: ROLE_CONFLICT)
    BUSY = "busy"                # a secondary connected to a primary now
    SECONDARY = "secondary"      # a secondary with no primary connected
    REFUSED = "refused"          # it refused us for another reason (the text says which)
    UNREACHABLE = "unreachable"  # no answer: down, or cut off


@dataclass(frozen=True)
class Probe:
    peer: str
    kind: ProbeKind
    text: str
    generations: P.Generations | None = None  # the peer's, once authenticated


def probe(cfg: Resource, node: str, peer: str, secret: bytes, local: P.HandshakeInfo,
          transport: Transport, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Connect to `peer` (over `transport`: TLS or plain TCP) and handshake as a primary would,
    to learn what it is; nothing of the session is used (a free secondary sees a connection
    that ends at once). A TLS failure is a refusal: the peer answered, and it could not be told
    whether it is primary."""
    seen: dict[str, P.PeerInfo] = {}
    address = (cfg.nodes[peer].address, cfg.port)
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        return Probe(peer, ProbeKind.UNREACHABLE, f"{address[0]}:{address[1]}: {e}")
    conn = P.FramedConnection(sock)
    try:
        tune(sock)
        conn = P.FramedConnection(transport.client(sock, peer, address))

        def note(info: P.PeerInfo) -> None:
            seen["p"] = info

        P.handshake(conn, local, secret, P.Expect(frozenset({peer}), note), timeout=timeout)
        return Probe(peer, ProbeKind.SECONDARY, "a secondary", seen["p"].generations)
    except HandshakeRefused as e:
        gens = seen["p"].generations if "p" in seen else None
        if e.remote and e.reason == P.RefuseReason.ROLE_CONFLICT:
            return Probe(peer, ProbeKind.PRIMARY, e.text, gens)
        if e.remote and e.reason == P.RefuseReason.BUSY:
            return Probe(peer, ProbeKind.BUSY, e.text, gens)
        return Probe(peer, ProbeKind.REFUSED, str(e), gens)
    except TLSError as e:
        return Probe(peer, ProbeKind.REFUSED, str(e))
    except (OSError, ReplError) as e:
        return Probe(peer, ProbeKind.UNREACHABLE, str(e))
    finally:
        conn.close()


def start_as_primary(state_dir: Path, cfg: Resource, node: str, old: P.Generations,
                     last_primary: str | None, md_uuid: str, *,
                     own_changes: bool = True) -> P.Generations:
    """What a promoted node starts from, written before its device exists: a new data
    generation descended from the one it holds, and per peer an out-of-sync bitmap with the
    generation it is kept against. The node it was syncing from (`last_primary`) differs from
    it only by that node's own changes, which it reports when it connects (OUT_OF_SYNC): an empty
    bitmap. Any other peer may lack anything: a full bitmap, resynced by checksums since it holds
    data of ours (Link._take_report; docs/failover.md).

    Without `own_changes` (a resync from its primary overwrote whatever this node wrote as an
    earlier primary) the dirty bitmap on its metadata speaks of writes no peer lacks any more:
    it is cleared, or every later resync would send those chunks again."""
    meta = cfg.nodes[node].metadata
    if not own_changes and meta is not None:
        metadata.clear_bitmap(meta)
    history = ([old.current] if old.current else []) + list(old.history)
    new = P.Generations(new_generation(), tuple(history[:P.MAX_HISTORY]))
    nr_chunks = -(-metadata.device_bytes(str(cfg.nodes[node].device)) // cfg.chunk_size)
    for peer in cfg.targets_for(node):
        known = peer == last_primary and old.current != 0
        save_json(state_dir / f"{peer}.json",
                  {"admin": "up", "peer_gen": old.current if known else None, "in_session": False})
        bits = bytes(-(-nr_chunks // 8)) if known else _all_set(nr_chunks)
        atomic_write(state_dir / f"{peer}.oos", bits)
    save_json(state_dir / "generation.json",
              {"current": new.current, "history": list(new.history), "md_uuid": md_uuid})
    return new


def may_rejoin(state_dir: Path, cfg: Resource, node: str, mine: P.Generations,
               primary: Probe) -> str | None:
    """Whether this node, a primary whose device is not up, may come back as a secondary of
    `primary` by itself (the old primary returns): None if so, else why not. Only when the
    peer's data descends from ours (our generation is in its history), and every change of ours
    the peer may lack was a write in flight: the peer was in session when we stopped, or we
    hold no change it lacks. Anything else may be a split brain: never resolved silently."""
    gens = primary.generations
    if gens is None or mine.current not in gens.history:
        rel = P.compare_generations(mine, gens).name.lower() if gens else "unknown"
        return (f"{primary.peer} is primary with data that does not descend from this node's "
                f"({rel}): split brain")
    try:
        link: dict[str, Any] = load_json(state_dir / f"{primary.peer}.json", {},
                                         action="taken as out of session")
    except StateError:
        link = {}
    if link.get("in_session"):
        return None
    nr_chunks = -(-metadata.device_bytes(str(cfg.nodes[node].device)) // cfg.chunk_size)
    mine_only = local_changes(state_dir, cfg.nodes[node].metadata, primary.peer, nr_chunks)
    count = int.from_bytes(mine_only, "little").bit_count()
    if count == 0:
        return None
    return (f"this node was primary out of touch with {primary.peer}, which has been promoted "
            f"since, and holds {count} chunks {primary.peer} may lack: a split brain. "
            f"`repctl resolve {cfg.name} --discard-local` makes this node a secondary of "
            f"{primary.peer} (those chunks are overwritten)")


def device_users(dev: str) -> list[str]:
    """Who holds `dev` open: mount points, and processes (`name[pid]`) with it open."""
    try:
        rdev = os.stat(dev).st_rdev
    except OSError:
        return []
    users = []
    major, minor = os.major(rdev), os.minor(rdev)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[2] == f"{major}:{minor}":
                    users.append(f"mounted on {fields[4]}")
    except OSError:
        pass
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                    with open(f"/proc/{pid}/comm") as f:
                        users.append(f"{f.read().strip()}[{pid}]")
                    break
        except OSError:
            continue
    return users


def _all_set(nr_chunks: int) -> bytes:
    nbytes = -(-nr_chunks // 8)
    return ((1 << nr_chunks) - 1).to_bytes(nbytes, "little")
