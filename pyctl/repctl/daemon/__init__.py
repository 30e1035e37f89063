"""The node daemon: serves every resource of this node, as source or as target.

One module per concern, each importing only those above it in this list:

* `state`: every named state, role and event kind (enums; imports nothing of the daemon);
* `events`: the event bus behind `repctl events`;
* `stats`: the counters the metrics need beyond `status` (ack latency, fallbacks, refusals);
* `base`: what both sides of a resource share, and the socket and state-file helpers;
* `verify`: the progress of a running `verify`;
* `resyncrate`: the controller that paces one link's resync (fill target, min/max rate, yields
  to the application);
* `scheduler`: the daemon's resync slots (FIFO) and per-peer byte budgets;
* `link`: the source's view of one target (connection, stream position, OOS bitmap);
* `source`: a resource this node is the source of: device, engine, links;
* `target`: a resource this node is a target of: listener, apply, acknowledge;
* `failover`: roles and the steps of a role change (role file, probes, the returning primary);
* `metrics`: the Prometheus endpoint (loaded only when `global.metrics` is set);
* `service`: the `Daemon`, the service layer the control socket dispatches to.

Nothing outside this package imports it but the CLI's `daemon` verb and the tests. The names
below load their module on first use, so that ``repctl.daemon.state`` stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from repctl.daemon.link import Link
    from repctl.daemon.service import Daemon
    from repctl.daemon.source import SourceResource
    from repctl.daemon.target import TargetResource
    from repctl.daemon.verify import VerifyProgress

__all__ = ["Daemon", "Link", "SourceResource", "TargetResource", "VerifyProgress"]

_HOME = {"Daemon": "service", "Link": "link", "SourceResource": "source",
         "TargetResource": "target", "VerifyProgress": "verify"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"repctl.daemon.{_HOME[name]}"), name)
    raise AttributeError(f"module 'repctl.daemon' has no attribute {name!r}")
