"""The daemon's service layer: every resource of this node, and the commands the control socket
dispatches to (`up`, `down`, `pause`, ..., `status`)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repctl import dm, metadata
from repctl import protocol as P
from repctl import tls as T
from repctl.config import Config, Fencing, MountAction, Resource, SplitBrainPolicy
from repctl.daemon.base import new_generation
from repctl.daemon.events import Events
from repctl.daemon.failover import (
    Probe,
    ProbeKind,
    device_users,
    load_role,
    may_rejoin,
    probe,
    save_role,
    start_as_primary,
)
from repctl.daemon.link import Link
from repctl.daemon.scheduler import ResyncScheduler
from repctl.daemon.source import SourceResource, check_generation, mapping_of
from repctl.daemon.state import Admin, DiskState, Event, LinkState, Role, transition_refusal
from repctl.daemon.stats import Stats
from repctl.daemon.target import TargetResource
from repctl.errors import ReplError
from repctl.hooks import Executor, HookEvent, apply_actions, run_hooks, undo_actions
from repctl.statefile import StateError, load_json, save_json

if TYPE_CHECKING:
    from repctl.daemon.metrics import MetricsServer

log = logging.getLogger("repctl.daemon")

__all__ = ["Daemon"]

DRAIN_TIMEOUT = 60.0  # seconds a demote waits for the targets in session to hold every write
BUSY_RETRIES = 3  # a peer connected to a primary is asked again this often, a second apart
#: The status document's schema version (docs/cli.md): fields are only added within a version;
#: a field renamed, removed or changed in meaning or unit gets a new version.
STATUS_VERSION = 1


class Daemon:
    """The service layer the control socket dispatches to."""

    def __init__(self, config: Config, node: str | None = None,
                 executor: Executor | None = None):
        self.config = config
        self.executor = executor or Executor()  # every hook and action runs through it
        self.state_dir = Path(config.global_.state_dir)
        self.events = Events()
        self.node = self._find_node(config, node)
        self.resources: dict[str, SourceResource | TargetResource] = {}
        self.failed: dict[str, str] = {}  # resources that could not come up, and why
        self.stats = Stats()  # what the metrics count beyond `status` (stats.py)
        # resync slots and per-peer budgets, shared by every resource (scheduler.py)
        self.scheduler = ResyncScheduler(config.global_.resync.concurrency,
                                         config.global_.resync.peer_rate)
        self.metrics: MetricsServer | None = None  # serving while `global.metrics` is set

    @staticmethod
    def _find_node(config: Config, node: str | None) -> str:
        errors = []
        for name in config.resources:
            try:
                return config.local_node(name, node).name
            except ReplError as e:
                errors.append(str(e))
        raise ReplError(errors[0] if errors else f"{config.file}: no resources")

    def _make(self, name: str) -> SourceResource | TargetResource | None:
        cfg = self.config.resource(name)
        if self.node != cfg.source and self.node not in cfg.targets:
            return None  # a node of the file that takes no part in this resource
        folder = self.state_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        role = load_role(folder, cfg, self.node)
        if role is Role.PRIMARY and self._returning(cfg) is Role.SECONDARY:
            role = Role.SECONDARY
        return SourceResource(self, cfg) if role is Role.PRIMARY else TargetResource(self, cfg)

    def _returning(self, cfg: Resource) -> Role:
        """A primary whose device is not up yet (a reboot, a crash, `down`) looks for another
        primary before it exposes its device. If a peer was promoted meanwhile and may take this
        node back as a secondary (failover.may_rejoin), it does; if the two may have diverged,
        the resource stays down with the reason (never resolved silently)."""
        folder = self.state_dir / cfg.name
        try:
            gen = load_json(folder / "generation.json", {}, action="see `repctl status`",
                            check=check_generation)
        except StateError:
            return Role.PRIMARY  # SourceResource reports the corrupt file
        if "current" not in gen:
            return Role.PRIMARY  # never was primary with data: nothing to protect
        try:
            if mapping_of(cfg.name, str(cfg.nodes[self.node].device)):
                return Role.PRIMARY  # up already (a daemon restart): the role stands
        except ReplError as e:  # another device holds the name: ours is not up; start says why
            log.warning("%s: %s", cfg.name, e)
        mine = P.Generations(int(gen["current"]), tuple(gen.get("history", ())))
        primaries = [p for p in self._probe(cfg, mine).values() if p.kind is ProbeKind.PRIMARY]
        if not primaries:
            return Role.PRIMARY
        peer = primaries[0].peer
        why = may_rejoin(folder, cfg, self.node, mine, primaries[0])
        if why is None:
            self._become_secondary(cfg, mine, f"{peer} was promoted: this node, the former "
                                   "primary, returns as its secondary")
            return Role.SECONDARY
        self._split_brain(cfg, peer, why)
        if cfg.after_split_brain is SplitBrainPolicy.DISCONNECT:
            raise ReplError(f"resource {cfg.name}: {why}")
        # the policy decides on the primary, which alone knows its own changes: this node waits
        # as its secondary, its data untouched, under a generation of its own that tells the
        # primary these are changes made apart from it (Link._settle_split_brain)
        ours = P.Generations(new_generation(), (mine.current, *mine.history)[:P.MAX_HISTORY])
        self._become_secondary(cfg, ours, f"{peer} was promoted while this node was primary "
                               f"apart from it; after_split_brain {cfg.after_split_brain} on "
                               f"{peer} decides whether this node's changes are discarded")
        return Role.SECONDARY

    def _probe(self, cfg: Resource, gens: P.Generations) -> dict[str, Probe]:
        """What every other node of the resource is now, asked over the network."""
        local = P.HandshakeInfo(resource=cfg.name, node=self.node, role=P.Role.SOURCE,
                                device_size=metadata.device_bytes(str(cfg.nodes[self.node].device)),
                                chunk_size=cfg.chunk_size, generations=gens)
        secret = self.config.read_secret(cfg.name)
        transport = T.transport(self.config, cfg.name, self.node)
        found = {peer: probe(cfg, self.node, peer, secret, local, transport)
                 for peer in cfg.targets_for(self.node)}
        for _ in range(BUSY_RETRIES):
            # a secondary may not have seen its primary's connection end yet (a demote just
            # before): ask again before taking BUSY for a live primary
            busy = [p for p, r in found.items() if r.kind is ProbeKind.BUSY]
            if not busy:
                break
            time.sleep(1)
            found |= {p: probe(cfg, self.node, p, secret, local, transport) for p in busy}
        return found

    def _become_secondary(self, cfg: Resource, gens: P.Generations, why: str,
                          *, discard: bool = False) -> None:
        """Persist this node as a secondary holding `gens`, whose own changes as a primary the
        next primary resyncs (`local_changes`). With `discard`, its data counts for nothing: it
        takes no generation and gets a full sync."""
        folder = self.state_dir / cfg.name
        save_json(folder / "target.json", {
            "current": 0 if discard else gens.current, "history": [] if discard else list(gens.history),
            "consistent": True, "source": None, "local_changes": not discard})
        save_role(folder, Role.SECONDARY)
        log.warning("%s: %s", cfg.name, why)
        self.events.emit(resource=cfg.name, what=Event.ROLE, old=Role.PRIMARY,
                         new=Role.SECONDARY, text=why)

    def _split_brain(self, cfg: Resource, peer: str, why: str) -> None:
        """As SourceResource.split_brain, for a resource that stays down."""
        log.error("%s: split brain with %s: %s", cfg.name, peer, why)
        self.events.emit(resource=cfg.name, what=Event.SPLIT_BRAIN, peer=peer, text=why)
        try:
            run_hooks(cfg, HookEvent.SPLIT_BRAIN, node=self.node, peer=peer,
                      role=Role.PRIMARY, executor=self.executor)
        except ReplError as e:
            log.error("%s: %s", cfg.name, e)

    def start(self) -> None:
        """Serve the metrics (if configured: ReplError, nothing started, if they cannot be),
        then bring up every resource of this node."""
        self.start_metrics()
        for name, cfg in self.config.resources.items():
            if self.node in cfg.nodes:
                try:
                    self.up(name)
                except Exception as e:  # one resource's trouble never keeps the others down
                    if not isinstance(e, ReplError):
                        log.exception("%s: cannot bring up", name)
                    log.error("%s: cannot bring up: %s", name, e)
                    self.failed[name] = str(e)
                    self.events.emit(resource=name, what=Event.FAILED, text=str(e))

    def stop(self) -> None:
        for res in list(self.resources.values()):
            res.stop()
        self.resources.clear()
        self.stop_metrics()

    def start_metrics(self) -> None:
        """Serve Prometheus metrics on `global.metrics` (docs/metrics.md); nothing if unset.
        prometheus_client is loaded here only: a daemon without metrics never imports it."""
        address = self.config.global_.metrics
        if address is None or self.metrics is not None:
            return
        try:
            from repctl.daemon.metrics import MetricsServer
        except ImportError as e:
            raise ReplError(f"global.metrics is set in {self.config.file} but the metrics "
                            f"cannot be loaded: {e} (is prometheus-client installed?)") from None
        server = MetricsServer(self, address)
        server.start()
        self.metrics = server

    def stop_metrics(self) -> None:
        server, self.metrics = self.metrics, None
        if server is not None:
            server.stop()

    # -- commands ------------------------------------------------------
    def _res(self, name: str) -> SourceResource | TargetResource:
        if name not in self.config.resources:
            raise ReplError(f"unknown resource {name!r}: {self.config.file} has "
                            f"{', '.join(self.config.resources) or 'none'}; check the name "
                            "(`repctl status` lists those up on this node)")
        try:
            return self.resources[name]
        except KeyError:
            raise ReplError(f"resource {name} is down on {self.node}: `repctl up {name}`") from None

    def _source(self, name: str) -> SourceResource:
        res = self._res(name)
        if not isinstance(res, SourceResource):
            where = f" ({res.peer})" if res.peer else ""
            raise ReplError(f"resource {name}: {self.node} is a secondary; run this on the "
                            f"primary{where}")
        return res

    def up(self, resource: str) -> str:
        if resource in self.resources:
            return f"{resource} is already up"
        res = self._make(resource)
        if res is None:
            raise ReplError(f"resource {resource}: node {self.node} is neither its source nor "
                            "one of its targets in the configuration")
        try:
            res.start()
        except BaseException:
            with contextlib.suppress(Exception):
                res.stop()
            raise
        self.resources[resource] = res
        self.failed.pop(resource, None)
        return f"{resource} is up as {_role_of(res)}"

    # -- role changes (docs/failover.md) ------------------------------------
    def promote(self, resource: str, force: bool = False) -> str:
        """Make this secondary the primary. Every check runs before anything changes: the
        transition rules (state.transition_refusal), a peer still primary or connected to one,
        the fence-peer hook for unreachable peers when fencing is on, the before-promote hook.
        Then a new generation, the device, the actions, the after-promote hook."""
        cfg = self.config.resource(resource)
        res = self._res(resource)
        if isinstance(res, SourceResource):
            raise ReplError(f"{resource}: this node ({self.node}) is already the primary")
        why = transition_refusal(Role.SECONDARY, Role.PRIMARY, res.disk_state(), force=force)
        if why:
            raise ReplError(f"{resource}: cannot promote {self.node}: {why}")
        node = cfg.nodes[self.node]
        if node.metadata is None:
            raise ReplError(f"{resource}: cannot promote {self.node}: it has no metadata device "
                            f"(resources.{resource}.nodes.{self.node}.metadata in "
                            f"{self.config.file}): it can only be a secondary")
        if res.peer is not None:
            raise ReplError(f"{resource}: cannot promote {self.node}: {res.peer} is connected as "
                            f"the primary; run `repctl demote {resource}` on {res.peer} first")
        probes = self._probe(cfg, res.generations())
        for p in probes.values():
            if p.kind is ProbeKind.PRIMARY:
                raise ReplError(f"{resource}: cannot promote {self.node}: {p.peer} is reachable "
                                f"and primary; run `repctl demote {resource}` on {p.peer} first")
            if p.kind is ProbeKind.BUSY:
                raise ReplError(f"{resource}: cannot promote {self.node}: {p.peer} is connected "
                                f"to a primary ({p.text})")
            if p.kind is ProbeKind.REFUSED:
                raise ReplError(f"{resource}: cannot promote {self.node}: {p.peer} answered but "
                                f"refused this node ({p.text}); it could not say whether it is "
                                "primary: fix that first")
        if not stat.S_ISBLK(os.stat(node.device).st_mode):
            raise ReplError(f"{resource}: cannot promote {self.node}: its copy {node.device} is an "
                            "image file; only a block device can carry /dev/mapper/"
                            f"{resource}")
        sb = self._metadata_for_promote(cfg)  # checked now, formatted (if blank) once decided
        if cfg.fencing is Fencing.RESOURCE_AND_STONITH:
            for p in probes.values():
                if p.kind is ProbeKind.UNREACHABLE:
                    try:
                        run_hooks(cfg, HookEvent.FENCE_PEER, node=self.node, peer=p.peer,
                                  role=Role.SECONDARY, executor=self.executor)
                    except ReplError as e:
                        raise ReplError(f"{resource}: cannot promote {self.node}: {p.peer} is "
                                        f"unreachable and fencing it failed: {e}") from None
        run_hooks(cfg, HookEvent.BEFORE_PROMOTE, node=self.node, peer=None,
                  role=Role.SECONDARY, executor=self.executor)
        if force and res.disk_state() is not DiskState.UP_TO_DATE:
            log.warning("%s: promoting %s by force with data %s", resource, self.node,
                        res.disk_state())
        # from here on the node changes: a new generation before the device can be written
        if sb is None:
            assert node.metadata is not None
            sb = metadata.format_metadata(node.metadata,
                                          metadata.device_bytes(str(node.device)) // 512,
                                          cfg.chunk_size // 512)
        old, last = res.generations(), res.saved.get("source")
        res.stop()
        del self.resources[resource]
        start_as_primary(self.state_dir / resource, cfg, self.node, old, last, sb.uuid,
                         own_changes=bool(res.saved.get("local_changes")))
        save_role(self.state_dir / resource, Role.PRIMARY)
        self.events.emit(resource=resource, what=Event.ROLE, old=Role.SECONDARY, new=Role.PRIMARY,
                         text="promoted" + (" by force" if force else ""))
        self.up(resource)
        try:
            apply_actions(cfg, self.executor)
            run_hooks(cfg, HookEvent.AFTER_PROMOTE, node=self.node, peer=None,
                      role=Role.PRIMARY, executor=self.executor)
        except ReplError as e:
            raise ReplError(f"{resource}: {self.node} is primary and /dev/mapper/{resource} is up, "
                            f"but {e}") from None
        return f"{resource}: {self.node} is the primary"

    def _metadata_for_promote(self, cfg: Resource) -> metadata.Superblock | None:
        """This node's metadata superblock; None if the device holds none yet and is large
        enough for one (promote formats it once every check passed). Refuses metadata of
        another geometry, or a device too small."""
        node = cfg.nodes[self.node]
        assert node.metadata is not None
        size = metadata.device_bytes(str(node.device))
        sb = metadata.read_superblock(node.metadata)
        if sb is None:
            need = metadata.metadata_bytes(size // 512, cfg.chunk_size // 512)
            if metadata.device_bytes(node.metadata) < need:
                raise ReplError(f"{cfg.name}: cannot promote {self.node}: its metadata device "
                                f"{node.metadata} holds fewer than the {need} bytes it needs")
        elif sb.data_sectors != size // 512 or sb.chunk_sectors != cfg.chunk_size // 512:
            raise ReplError(f"{cfg.name}: cannot promote {self.node}: the metadata on "
                            f"{node.metadata} was made for another device size or chunk size; "
                            f"`repctl create-md {cfg.name} --force` formats it anew")
        return sb

    def demote(self, resource: str) -> str:
        """Make this primary a secondary: before-demote hook, the actions undone, the device
        closed by everyone, the writes drained to the targets in session, the device removed."""
        cfg = self.config.resource(resource)
        res = self._source(resource)
        mounts = {str(a.mountpoint) for a in cfg.actions if isinstance(a, MountAction)}
        users = [u for u in device_users(res.dev_path)
                 if not (u.startswith("mounted on ") and u[len("mounted on "):] in mounts)]
        if users:
            raise ReplError(f"{resource}: cannot demote {self.node}: {res.dev_path} is in use "
                            f"({', '.join(users)}); stop those first")
        run_hooks(cfg, HookEvent.BEFORE_DEMOTE, node=self.node, peer=None, role=Role.PRIMARY,
                  executor=self.executor)
        undo_actions(cfg, self.executor)
        with dm.DMControl() as ctl:
            opened = ctl.info(resource).open_count - 1  # the daemon's own resync reader
        if opened > 0:
            users = device_users(res.dev_path)
            raise ReplError(f"{resource}: cannot demote {self.node}: {res.dev_path} is still "
                            f"open ({', '.join(users) or f'{opened} opener(s)'}); the actions "
                            "were undone; close it and run demote again")
        late = res.drain(DRAIN_TIMEOUT)
        gens = res.generations()
        res.stop(remove=True)
        del self.resources[resource]
        self._become_secondary(cfg, gens, "demoted")
        self.up(resource)
        try:
            run_hooks(cfg, HookEvent.AFTER_DEMOTE, node=self.node, peer=None,
                      role=Role.SECONDARY, executor=self.executor)
        except ReplError as e:
            raise ReplError(f"{resource}: {self.node} is a secondary now, but {e}") from None
        text = f"{resource}: {self.node} is a secondary"
        if late:
            text += (f"; {', '.join(late)} did not hold every write: the next primary resyncs "
                     "them from this node's bitmap")
        return text

    def resolve(self, resource: str, discard_local: bool = False) -> str:
        """Settle a split brain on its victim: this node becomes a secondary whose own changes
        since the split are overwritten by the primary's data (DRBD's --discard-my-data)."""
        if not discard_local:
            raise ReplError(f"{resource}: resolve needs --discard-local, run on the node whose "
                            "changes since the split are to be overwritten")
        cfg = self.config.resource(resource)
        res = self.resources.get(resource)
        # the split-brain hook first (a snapshot of the victim's data, say): if it fails,
        # nothing has changed
        run_hooks(cfg, HookEvent.SPLIT_BRAIN, node=self.node, peer=None,
                  role=Role.PRIMARY if isinstance(res, SourceResource) else Role.SECONDARY,
                  executor=self.executor)
        if isinstance(res, SourceResource):
            self.demote(resource)
            res = self.resources.get(resource)
        if isinstance(res, TargetResource):
            gens = res.generations()
            res.stop()
            del self.resources[resource]
        else:
            try:
                gen = load_json(self.state_dir / resource / "generation.json", {},
                                action="taken as no generation: a full sync")
                gens = P.Generations(int(gen["current"]), tuple(gen.get("history", ())))
            except (StateError, KeyError, ValueError):
                gens = P.Generations(0)
        # the primary resyncs only the union of both sides' changes if its data descends from
        # a generation of ours: we present the newest such one, our changes since reported
        primary = next((p.generations for p in self._probe(cfg, gens).values()
                         if p.kind is ProbeKind.PRIMARY and p.generations is not None), None)
        known = {primary.current, *primary.history} if primary is not None else set()
        mine = (gens.current, *gens.history)
        common = next((i for i, g in enumerate(mine) if g and g in known), None)
        if common is not None:
            gens = P.Generations(mine[common], mine[common + 1:])
        self._become_secondary(cfg, gens, "split brain resolved: this node's changes are "
                               "discarded", discard=common is None)
        self.up(resource)
        how = "its changed chunks" if common is not None else "everything (no common generation)"
        return f"{resource}: {self.node} is a secondary; the primary resyncs {how}"

    def down(self, resource: str) -> str:
        res = self._res(resource)
        if isinstance(res, SourceResource):
            with dm.DMControl() as ctl:
                users = ctl.info(resource).open_count - 1  # the daemon's own resync reader
            if users > 0:
                raise ReplError(f"{res.dev_path} is in use ({users} opener(s): mounted?); "
                                "unmount it first")
        res.stop(remove=isinstance(res, SourceResource))
        del self.resources[resource]
        return f"{resource} is down"

    def _targets(self, resource: str, target: str | None) -> list[Link]:
        res = self._source(resource)
        return [res.link(target)] if target else list(res.links.values())

    def _set_admin(self, resource: str, target: str | None, admin: Admin) -> None:
        for link in self._targets(resource, target):
            link.set_admin(admin)

    def pause(self, resource: str, target: str | None = None) -> str:
        self._set_admin(resource, target, Admin.PAUSED)
        return "paused"

    def resume(self, resource: str, target: str | None = None) -> str:
        self._set_admin(resource, target, Admin.UP)
        return "resumed"

    def disconnect(self, resource: str, target: str | None = None) -> str:
        self._set_admin(resource, target, Admin.DISCONNECTED)
        return "disconnected"

    def connect(self, resource: str, target: str | None = None) -> str:
        self._set_admin(resource, target, Admin.UP)
        return "connecting"

    def verify(self, resource: str, target: str, repair: bool = False) -> dict[str, Any]:
        return self._source(resource).verify(target, repair=repair)

    def cancel_verify(self, resource: str, target: str) -> str:
        return self._source(resource).cancel_verify(target)

    def status(self) -> dict[str, Any]:
        failed = [{"name": name, "role": self._role(name), "state": LinkState.FAILED,
                   "last_error": why,
                   "targets": []} for name, why in list(self.failed.items())
                  if name not in self.resources]
        # copies: a scrape or a control-socket status may run while `up` or `down` changes them
        return {"version": STATUS_VERSION, "node": self.node,
                "resources": [r.status() for r in list(self.resources.values())] + failed}

    def _role(self, name: str) -> Role:
        return load_role(self.state_dir / name, self.config.resource(name), self.node)

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        return self.events.subscribe()

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        self.events.unsubscribe(q)



def _role_of(res: SourceResource | TargetResource) -> Role:
    return Role.PRIMARY if isinstance(res, SourceResource) else Role.SECONDARY
