"""The daemon's service layer: every resource of this node, and the commands the control socket
dispatches to (`up`, `down`, `pause`, ..., `status`)."""

from __future__ import annotations

import contextlib
import logging
import queue
from pathlib import Path
from typing import Any

from repctl import dm
from repctl.config import Config
from repctl.daemon.events import Events
from repctl.daemon.link import Link
from repctl.daemon.source import SourceResource
from repctl.daemon.state import Admin, Event, LinkState, Role
from repctl.daemon.target import TargetResource
from repctl.errors import ReplError

log = logging.getLogger("repctl.daemon")

__all__ = ["Daemon"]


class Daemon:
    """The service layer the control socket dispatches to."""

    def __init__(self, config: Config, node: str | None = None):
        self.config = config
        self.state_dir = Path(config.global_.state_dir)
        self.events = Events()
        self.node = self._find_node(config, node)
        self.resources: dict[str, SourceResource | TargetResource] = {}
        self.failed: dict[str, str] = {}  # resources that could not come up, and why

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
        if self.node == cfg.source:
            return SourceResource(self, cfg)
        if self.node in cfg.targets:
            return TargetResource(self, cfg)
        return None

    def start(self) -> None:
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

    # -- commands ------------------------------------------------------
    def _res(self, name: str) -> SourceResource | TargetResource:
        if name not in self.config.resources:
            raise ReplError(f"unknown resource {name!r}")
        try:
            return self.resources[name]
        except KeyError:
            raise ReplError(f"resource {name} is down on {self.node}: `repctl up {name}`") from None

    def _source(self, name: str) -> SourceResource:
        res = self._res(name)
        if not isinstance(res, SourceResource):
            raise ReplError(f"resource {name}: {self.node} is a target; run this on the source "
                            f"({self.config.resource(name).source})")
        return res

    def up(self, resource: str) -> str:
        if resource in self.resources:
            return f"{resource} is already up"
        res = self._make(resource)
        if res is None:
            raise ReplError(f"resource {resource}: node {self.node} is neither its source nor a target")
        try:
            res.start()
        except BaseException:
            with contextlib.suppress(Exception):
                res.stop()
            raise
        self.resources[resource] = res
        self.failed.pop(resource, None)
        return f"{resource} is up as {Role.SOURCE if isinstance(res, SourceResource) else Role.TARGET}"

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

    def verify(self, resource: str, target: str) -> dict[str, Any]:
        return self._source(resource).verify(target)

    def status(self) -> dict[str, Any]:
        failed = [{"name": name, "role": self._role(name), "state": LinkState.FAILED,
                   "last_error": why,
                   "targets": []} for name, why in self.failed.items() if name not in self.resources]
        return {"node": self.node, "resources": [r.status() for r in self.resources.values()] + failed}

    def _role(self, name: str) -> Role:
        return Role.SOURCE if self.config.resource(name).source == self.node else Role.TARGET

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        return self.events.subscribe()

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        self.events.unsubscribe(q)

