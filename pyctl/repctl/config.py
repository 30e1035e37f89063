"""The repctl configuration: one YAML file, the same on every node, validated at load time.

`load_config` returns a frozen `Config` or raises `ConfigError` naming the file, the key path
(``resources.r0.nodes.beta.device``), the line, what was expected and what was found. Nothing may
run on a configuration that failed to load. The schema is declared as data (the ``_*_KEYS`` tables
below, one per mapping); cross-key rules (the source is a node, targets are nodes other than the
source, ports are unique, a node's devices are distinct, a fenced resource has a fence-peer hook,
TLS on every node of a resource or on none, ...) are checked after every key parsed. docs/config.md documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import shlex
import socket
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from repctl.compress import ZSTD_DEFAULT_LEVEL, ZSTD_LEVELS
from repctl.errors import ConfigError

if TYPE_CHECKING:
    import yaml

DEFAULT_CONFIG_PATH = Path("/etc/repctl/repctl.yaml")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

MIN_CHUNK_SIZE = 4 * KiB  # mirrors REPL_MIN_CHUNK_SECTORS in kmod/dm-repl-uapi.h
MAX_CHUNK_SIZE = 1 * MiB  # mirrors REPL_MAX_CHUNK_SECTORS
MIN_RING_SIZE = 1 * MiB  # the kernel's ring_mb: a whole number of MiB, 1..4096 (REPL_MAX_RING_MB)
MAX_RING_SIZE = 4 * GiB
# The kernel's sync_timeout_ms range, 100..600000 (parse_features in kmod/dm-repl-target.c).
MIN_SYNC_TIMEOUT = 0.1  # seconds
MAX_SYNC_TIMEOUT = 600.0
MIN_MAX_LAG = 4 * KiB  # one page; the upper bound is the resource's ring_size (exclusive)
MIN_SECRET_BYTES = 16
MIN_HOOK_TIMEOUT = 1.0  # seconds
MAX_HOOK_TIMEOUT = 3600.0
DEFAULT_HOOK_TIMEOUT = 30.0
METRICS_LOOPBACK = "127.0.0.1"  # where a bare metrics port listens (docs/metrics.md)
# Resync pacing (docs/config.md, `resync`): a rate is bytes per second.
MIN_RESYNC_RATE = 64 * KiB  # the least a resync may be held to: it always finishes
MAX_RESYNC_RATE = 64 * GiB
MIN_FILL_TARGET = 64 * KiB
MAX_FILL_TARGET = 1 * GiB
MIN_PLAN_AHEAD = 0.1  # seconds
MAX_PLAN_AHEAD = 60.0
MAX_RESYNC_CONCURRENCY = 1024
DEFAULT_RESYNC_CONCURRENCY = 2

# Node names that the daemon's state files of a resource would clash with: in
# <state_dir>/<resource>/ the source keeps <target>.json and <target>.oos per target, and also
# generation.json; a target keeps target.json. Refused in any case (a case-insensitive state_dir).
RESERVED_NODE_NAMES = frozenset({"generation", "target"})


def default_max_lag(ring_size: int) -> int:
    """The max_lag of an async target that sets none: three quarters of the ring, in whole 4 KiB.

    The backlog is bytes of ring records, so it never exceeds `ring_size`: a max_lag must be below
    it to ever be reached.
    """
    return ring_size * 3 // 4 // (4 * KiB) * (4 * KiB)


class TargetMode(StrEnum):
    """How the source waits for a target (P4)."""

    SYNC = "sync"  # a write completes only when the target has it durable
    ASYNC = "async"  # the source never waits; past max_lag the target falls back to the bitmap


class Compression(StrEnum):
    """How the source compresses the data it sends a target (docs/config.md, docs/wan.md)."""

    NONE = "none"
    LZ4 = "lz4"  # fast, a modest ratio; no levels
    ZSTD = "zstd"  # a better ratio for more CPU, `compression_level` 1 to 19 (default 3)


class Fencing(StrEnum):
    """What a node must do about its peer before it is promoted (DRBD's ``fencing``)."""

    NONE = "none"  # nothing
    RESOURCE_AND_STONITH = "resource-and-stonith"  # the fence-peer hook must succeed first


class SplitBrainPolicy(StrEnum):
    """What the primary does on meeting a secondary whose data diverged from its own (DRBD's
    ``after-sb-0pri``/``after-sb-1pri``). The victim is always the secondary: a primary serving
    its device is never overwritten automatically (docs/failover.md, "Split brain")."""

    DISCONNECT = "disconnect"  # nothing changes; `repctl resolve` by hand
    DISCARD_ZERO_CHANGES = "discard-zero-changes"  # the secondary, if it wrote nothing since
    DISCARD_LEAST_CHANGES = "discard-least-changes"  # the secondary, if it changed fewer chunks
    DISCARD_YOUNGER_PRIMARY = "discard-younger-primary"  # the secondary, if promoted after us


class HookEvent(StrEnum):
    """The events that hook commands hang on: the keys of ``resources.NAME.hooks``.

    The value is also REPCTL_EVENT in a hook's environment. Declared here, beside the schema that
    reads it; `repctl.hooks` runs them.
    """

    FENCE_PEER = "fence-peer"
    BEFORE_PROMOTE = "before-promote"
    AFTER_PROMOTE = "after-promote"
    BEFORE_DEMOTE = "before-demote"
    AFTER_DEMOTE = "after-demote"
    BEFORE_RESYNC_TARGET = "before-resync-target"
    AFTER_RESYNC_TARGET = "after-resync-target"
    SPLIT_BRAIN = "split-brain"
    OUT_OF_SYNC = "out-of-sync"


Command = tuple[str, ...]  # an argv: the first word an absolute path; run without a shell


@dataclass(frozen=True)
class MountAction:
    """Mount the resource's device (/dev/mapper/NAME) on `mountpoint`; undone by unmounting."""

    mountpoint: Path
    fstype: str | None = None  # None: mount(8) probes it
    options: str | None = None  # mount(8)'s -o, e.g. "noatime,discard"


@dataclass(frozen=True)
class AddressAction:
    """Add a floating IP address (with its prefix length) to `interface`; undone by removing it."""

    ip: IPv4Interface | IPv6Interface
    interface: str


@dataclass(frozen=True)
class ServiceAction:
    """Start a systemd unit; undone by stopping it."""

    unit: str


Action = MountAction | AddressAction | ServiceAction


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files of a node's TLS (docs/config.md, `tls`): its certificate, its private key,
    and the CA certificate(s) that a peer's certificate must be signed by."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ResyncSettings:
    """How a target's resync is paced (docs/config.md, `resources.NAME.targets.NODE.resync`;
    repctl.daemon.resyncrate): rates in bytes per second (`max_rate` None: no upper bound),
    `fill_target` in bytes, `plan_ahead` in seconds, `app_busy` in bytes per second."""

    min_rate: int = 4 * MiB
    max_rate: int | None = None
    fill_target: int = 2 * MiB
    plan_ahead: float = 2.0
    app_busy: int = 64 * KiB


@dataclass(frozen=True)
class SchedulerSettings:
    """The daemon's resync scheduler (docs/config.md, `global.resync`): how many resyncs run at
    once (None: no limit) and the bytes per second the resyncs toward one peer node share (None:
    no limit)."""

    concurrency: int | None = DEFAULT_RESYNC_CONCURRENCY
    peer_rate: int | None = None


@dataclass(frozen=True)
class GlobalConfig:
    """Settings shared by every resource of this file."""

    control_socket: Path
    state_dir: Path
    secret_file: Path
    # where `repctl daemon` serves Prometheus metrics, (host, port); None: not served
    metrics: tuple[str, int] | None = None
    # TLS between the nodes, for every node that does not name its own; None: plain TCP
    tls: TLSFiles | None = None
    resync: SchedulerSettings = SchedulerSettings()


@dataclass(frozen=True)
class Node:
    """One machine of a resource: where it listens and which local device holds the replica."""

    name: str
    address: str  # IP literal (normalised) or host name
    device: Path
    metadata: Path | None  # required on the source; a target without one cannot become the source
    tls: TLSFiles | None = None  # the node's own `tls`, or the global one; None: plain TCP


@dataclass(frozen=True)
class Target:
    """A node that receives the source's writes, with its replication mode."""

    name: str
    mode: TargetMode
    max_lag: int | None  # bytes, below the resource's ring_size; async targets only (sync: None)
    compression: Compression = Compression.NONE
    compression_level: int | None = None  # zstd's level (default 3); None for lz4 and none
    resync: ResyncSettings = ResyncSettings()  # how its resyncs are paced


@dataclass(frozen=True)
class Resource:
    """One replicated device: its nodes, which of them is the source, and the targets."""

    name: str
    port: int
    chunk_size: int  # bytes, power of two
    ring_size: int  # bytes
    sync_timeout: float  # seconds
    source: str
    secret_file: Path  # the resource's own secret_file, or the global one
    nodes: Mapping[str, Node]
    targets: Mapping[str, Target]
    fencing: Fencing = Fencing.NONE
    after_split_brain: SplitBrainPolicy = SplitBrainPolicy.DISCONNECT
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT  # seconds, for each hook command and action step
    # event -> commands, run in order; an event without commands is absent
    hooks: Mapping[HookEvent, tuple[Command, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    actions: tuple[Action, ...] = ()  # done in this order on promote, undone in reverse on demote

    @property
    def source_node(self) -> Node:
        return self.nodes[self.source]

    @property
    def mapper_path(self) -> Path:
        """/dev/mapper/NAME: the replicated device on the primary."""
        return Path("/dev/mapper", self.name)

    def targets_for(self, primary: str) -> Mapping[str, Target]:
        """The nodes that `primary` replicates to, each with its mode, in the order of `targets`.

        Every target of the file other than `primary` keeps its entry; the file's `source` (when it
        is not `primary`) takes the place, mode, max_lag and compression of `primary`'s own
        entry. So
        ``targets_for(source) == targets``, and after beta (a sync target of alpha) is promoted,
        alpha is a sync target of beta. A node of `nodes` that is not in `targets` is never a
        target. ValueError if `primary` is neither the source nor a target.
        """
        if primary == self.source:
            return self.targets
        if primary not in self.targets:
            raise ValueError(
                f"{primary!r} cannot be the primary of {self.name}: it is neither the source "
                f"({self.source}) nor a target ({_names(self.targets)})"
            )
        out: dict[str, Target] = {}
        for name, target in self.targets.items():
            if name == primary:
                out[self.source] = dataclasses.replace(target, name=self.source)
            else:
                out[name] = target
        return MappingProxyType(out)


@dataclass(frozen=True)
class Config:
    """A validated configuration file. Compare two with ``==`` (the file name is not compared)."""

    global_: GlobalConfig
    resources: Mapping[str, Resource]
    file: str = field(default="<string>", compare=False)

    def resource(self, name: str) -> Resource:
        """The resource called `name`; ConfigError if the file has none of that name."""
        try:
            return self.resources[name]
        except KeyError:
            raise ConfigError(
                self.file, "resources", f"a resource named {name!r}", _names(self.resources)
            ) from None

    def local_node(self, resource: str, hostname: str | None = None) -> Node:
        """The node of `resource` that this machine is.

        The node's name must be `hostname` (default: ``socket.gethostname()``) or its first label
        (``alpha`` for ``alpha.example.com``). ConfigError if this host is not a node of the
        resource.
        """
        res = self.resource(resource)
        host = hostname if hostname is not None else socket.gethostname()
        for candidate in dict.fromkeys((host, host.split(".", 1)[0])):
            if candidate in res.nodes:
                return res.nodes[candidate]
        raise ConfigError(
            self.file,
            f"resources.{resource}.nodes",
            f"a node named after this host ({host!r})",
            _names(res.nodes),
        )

    def read_secret(self, resource: str) -> bytes:
        """The shared secret of `resource` (the file's content without trailing white space).

        ConfigError if the file is missing, shorter than 16 bytes, or readable by group or others.
        """
        res = self.resource(resource)
        key = f"resources.{resource}.secret_file"
        expected = (
            f"a secret file of at least {MIN_SECRET_BYTES} bytes, readable by its owner only "
            "(chmod 600)"
        )
        path = res.secret_file
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                secret = f.read().rstrip()
        except OSError as exc:
            raise ConfigError(self.file, key, expected, f"{path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(self.file, key, expected, f"{path} with mode {stat.filemode(mode)}")
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(self.file, key, expected, f"{path} with {len(secret)} bytes")
        return secret

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data in the file's own schema; loading it gives an equal
        Config."""
        g = self.global_
        resources: dict[str, Any] = {}
        for r in self.resources.values():
            out: dict[str, Any] = {
                "port": r.port,
                "chunk_size": format_size(r.chunk_size),
                "ring_size": format_size(r.ring_size),
                "sync_timeout": format_duration(r.sync_timeout),
                "source": r.source,
            }
            if r.secret_file != g.secret_file:
                out["secret_file"] = str(r.secret_file)
            out["nodes"] = {
                n.name: {
                    "address": n.address,
                    "device": str(n.device),
                    **({"metadata": str(n.metadata)} if n.metadata is not None else {}),
                    **({"tls": _tls_dict(n.tls)} if n.tls is not None and n.tls != g.tls else {}),
                }
                for n in r.nodes.values()
            }
            out["targets"] = {
                t.name: {
                    "mode": t.mode.value,
                    **({"max_lag": format_size(t.max_lag)} if t.max_lag is not None else {}),
                    **({"compression": t.compression.value}
                       if t.compression is not Compression.NONE else {}),
                    **({"compression_level": t.compression_level}
                       if t.compression_level is not None else {}),
                    **({"resync": _resync_dict(t.resync)} if t.resync != ResyncSettings() else {}),
                }
                for t in r.targets.values()
            }
            out["fencing"] = r.fencing.value
            out["after_split_brain"] = r.after_split_brain.value
            out["hook_timeout"] = format_duration(r.hook_timeout)
            if r.hooks:
                out["hooks"] = {
                    event.value: (
                        shlex.join(commands[0])
                        if len(commands) == 1
                        else [shlex.join(argv) for argv in commands]
                    )
                    for event, commands in r.hooks.items()
                }
            if r.actions:
                out["actions"] = [_action_dict(a) for a in r.actions]
            resources[r.name] = out
        glob: dict[str, Any] = {
            "control_socket": str(g.control_socket),
            "state_dir": str(g.state_dir),
            "secret_file": str(g.secret_file),
        }
        if g.metrics is not None:
            glob["metrics"] = format_host_port(*g.metrics)
        if g.tls is not None:
            glob["tls"] = _tls_dict(g.tls)
        if g.resync != SchedulerSettings():
            c = g.resync.concurrency
            glob["resync"] = {"concurrency": "unlimited" if c is None else c,
                              "peer_rate": format_rate(g.resync.peer_rate)}
        return {"global": glob, "resources": resources}

    def dump(self) -> str:
        """The configuration as YAML text (see `to_dict`)."""
        import yaml  # here, not at the top: the CLI imports this module for its paths (start time)

        text: str = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        return text


def _resync_dict(r: ResyncSettings) -> dict[str, Any]:
    return {"min_rate": format_rate(r.min_rate), "max_rate": format_rate(r.max_rate),
            "fill_target": format_size(r.fill_target),
            "plan_ahead": format_duration(r.plan_ahead), "app_busy": format_rate(r.app_busy)}


def _tls_dict(tls: TLSFiles) -> dict[str, str]:
    return {"cert": str(tls.cert), "key": str(tls.key), "ca": str(tls.ca)}


def _action_dict(action: Action) -> dict[str, Any]:
    """`action` in the file's own schema (one entry of ``actions``)."""
    match action:
        case MountAction(mountpoint, fstype, options):
            mount: dict[str, str] = {"mountpoint": str(mountpoint)}
            if fstype is not None:
                mount["fstype"] = fstype
            if options is not None:
                mount["options"] = options
            return {"mount": mount}
        case AddressAction(ip, interface):
            return {"address": {"ip": str(ip), "interface": interface}}
        case ServiceAction(unit):
            return {"service": unit}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate the configuration file at `path`. Raises ConfigError on any defect."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            path, None, "a readable configuration file", exc.strerror or str(exc)
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, None, "UTF-8 text", f"an invalid byte at offset {exc.start}"
        ) from None
    return parse_config(text, str(path))


def parse_config(text: str, file: str = "<string>") -> Config:
    """Validate configuration `text`; `file` is the name that error messages give."""
    import yaml  # start time, as in `Config.dump`

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        lines = _line_map(file, root) if root is not None else {}
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        got = f"a syntax error: {exc.problem or 'unreadable'}"
        if exc.context:
            where = exc.context_mark
            got += f" ({exc.context}" + (f" on line {where.line + 1})" if where else ")")
        raise ConfigError(
            file, None, "valid YAML", got, line=mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, None, "valid YAML", str(exc)) from None
    finally:
        loader.dispose()
    return _Validator(file, lines).config(data)


# --------------------------------------------------------------------------------------------
# Value parsers: each takes the YAML value and returns the parsed value or raises _Invalid.
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, expected: str, got: str | None = None, at: tuple[str, ...] = ()) -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got
        self.at = at  # where inside the value (a list index), appended to the key path


_SIZE_RE = re.compile(r"(\d+)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "m": MiB,
    "mib": MiB,
    "g": GiB,
    "gib": GiB,
    "t": TiB,
    "tib": TiB,
}
_SIZE_EXPECTED = "a size such as 512, 4KiB, 64K, 1MiB or 2GiB (binary units: MiB, not MB)"


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``512``, ``4KiB``, ``64K``, ``1MiB``, ``2GiB``.

    Units are binary (K = KiB = 1024); ``KB``/``MB`` are refused as ambiguous. Raises ValueError.
    """
    try:
        return _size(value)
    except _Invalid as exc:
        raise ValueError(f"expected {exc.expected}, got {value!r}") from None


def _size(value: object) -> int:
    if isinstance(value, bool):
        raise _Invalid(_SIZE_EXPECTED)
    if isinstance(value, int):
        if value < 0:
            raise _Invalid(_SIZE_EXPECTED)
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise _Invalid(_SIZE_EXPECTED)


def format_size(n: int) -> str:
    """The shortest exact form of `n` bytes that `parse_size` reads back (``4KiB``, ``1536``)."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION_EXPECTED = "a duration such as 500ms, 5s, 2m (a bare number is seconds)"


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as ``500ms``, ``5s``, ``1.5s``, ``2m``.

    Raises ValueError.
    """
    try:
        return _duration(value)
    except _Invalid as exc:
        raise ValueError(f"expected {exc.expected}, got {value!r}") from None


def _duration(value: object) -> float:
    if isinstance(value, bool):
        raise _Invalid(_DURATION_EXPECTED)
    if isinstance(value, int | float):
        if value < 0:
            raise _Invalid(_DURATION_EXPECTED)
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise _Invalid(_DURATION_EXPECTED)


def format_duration(seconds: float) -> str:
    """A form of `seconds` that `parse_duration` reads back exactly (``5s``, ``250ms``, ``2m``)."""
    for unit, mult in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= mult and float(seconds / mult).is_integer():
            return f"{int(seconds / mult)}{unit}"
    ms = seconds * 1000
    if ms == round(ms):
        return f"{round(ms)}ms"
    return f"{seconds:.9f}".rstrip("0") + "s"


def _bounded_size(
    lo: int, hi: int, *, power_of_two: bool = False, multiple: int = 1
) -> Callable[[object], int]:
    def parse(value: object) -> int:
        n = _size(value)
        what = "a power of two size " if power_of_two else "a size "
        what += f"from {format_size(lo)} to {format_size(hi)}"
        if multiple > 1:
            what += f", a multiple of {format_size(multiple)}"
        if not lo <= n <= hi or n % multiple or (power_of_two and n & (n - 1)):
            raise _Invalid(what)
        return n

    return parse


def _bounded_duration(lo: float, hi: float, why: str) -> Callable[[object], float]:
    def parse(value: object) -> float:
        t = _duration(value)
        if not lo <= t <= hi:
            bounds = f"from {format_duration(lo)} to {format_duration(hi)}"
            raise _Invalid(f"a duration {bounds} ({why})")
        return t

    return parse


_RATE_RE = re.compile(r"(\d+)\s*([A-Za-z]*)(?:\s*/\s*s)?")
_BIT_UNITS = {"kbit": 1000 // 8, "mbit": 1000**2 // 8, "gbit": 1000**3 // 8}
_RATE_EXPECTED = (
    "a rate in bytes per second such as 4MiB, 512KiB/s, or in bits per second (decimal) such "
    "as 100Mbit"
)


def parse_rate(value: object) -> int:
    """Bytes per second from a size per second (``4MiB``, ``512KiB/s``, ``1048576``) or a bit
    rate with decimal units (``100Mbit``, ``1Gbit/s``: a network's own units). Raises
    ValueError."""
    try:
        return _rate_value(value)
    except _Invalid as exc:
        raise ValueError(f"expected {exc.expected}, got {value!r}") from None


def _rate_value(value: object) -> int:
    if isinstance(value, str):
        m = _RATE_RE.fullmatch(value.strip())
        if m is None:
            raise _Invalid(_RATE_EXPECTED)
        unit = m.group(2).lower()
        if unit in _BIT_UNITS:
            return int(m.group(1)) * _BIT_UNITS[unit]
        value = m.group(1) + m.group(2)
    try:
        return _size(value)
    except _Invalid:
        raise _Invalid(_RATE_EXPECTED) from None


def _bounded_rate(lo: int, hi: int, *, unlimited: bool = False) -> Callable[[object], int | None]:
    """A rate from `lo` to `hi` bytes per second; with `unlimited`, also the word unlimited
    (None)."""

    def parse(value: object) -> int | None:
        if unlimited and isinstance(value, str) and value.strip().lower() == "unlimited":
            return None
        what = f"{_RATE_EXPECTED}, from {format_size(lo)}/s to {format_size(hi)}/s"
        if unlimited:
            what += ", or unlimited"
        try:
            n = _rate_value(value)
        except _Invalid:
            raise _Invalid(what) from None
        if not lo <= n <= hi:
            raise _Invalid(what)
        return n

    return parse


def format_rate(n: int | None) -> str:
    """A rate that `_bounded_rate` reads back (``4MiB/s``, ``unlimited``)."""
    return "unlimited" if n is None else f"{format_size(n)}/s"


def _concurrency(value: object) -> int | None:
    expected = f"an integer from 1 to {MAX_RESYNC_CONCURRENCY}, or unlimited"
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(expected)
    if not 1 <= value <= MAX_RESYNC_CONCURRENCY:
        raise _Invalid(expected)
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= 65535:
        raise _Invalid("a TCP port number from 1024 to 65535")
    return value


_METRICS_EXPECTED = (
    "a port (served on 127.0.0.1) or HOST:PORT, such as 9942, 127.0.0.1:9942, [::1]:9942 or "
    "10.0.0.1:9942, with a port from 1024 to 65535; or off"
)
_HOST_PORT = re.compile(r"(?:\[([^\]]+)\]|([^:\[\]]+)):(\d+)")


def _metrics(value: object) -> tuple[str, int] | None:
    """The metrics endpoint: None (off) for nothing, off or false; a bare port listens on the
    loopback address only; HOST:PORT where HOST is an IP address (IPv6 in brackets) or a name."""
    if value is None or value is False:
        return None
    if isinstance(value, bool):
        raise _Invalid(_METRICS_EXPECTED)
    host, port = METRICS_LOOPBACK, value
    if isinstance(value, str):
        text = value.strip()
        m = _HOST_PORT.fullmatch(text)
        if m:
            host, port = m.group(1) or m.group(2), int(m.group(3))
            if m.group(1) is not None and ":" not in host:
                raise _Invalid(_METRICS_EXPECTED)  # brackets are for IPv6 addresses only
            try:
                host = _address(host)
            except _Invalid:
                raise _Invalid(_METRICS_EXPECTED) from None
            if ":" in host and m.group(1) is None:
                raise _Invalid(_METRICS_EXPECTED)  # an IPv6 address needs its brackets
        elif text.isdigit():
            port = int(text)
        else:
            raise _Invalid(_METRICS_EXPECTED)
    try:
        return host, _port(port)
    except _Invalid:
        raise _Invalid(_METRICS_EXPECTED) from None


def format_host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 address in brackets: what `_metrics` reads back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _abs_path(value: object) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Invalid("an absolute path")
    return Path(value)


_TLS_FILES = {
    "cert": "the absolute path of this node's certificate (PEM)",
    "key": "the absolute path of its private key (PEM, not encrypted)",
    "ca": "the absolute path of the CA certificate(s) that signed the nodes' certificates (PEM)",
}


def _tls(value: object) -> TLSFiles | None:
    """`tls`: nothing (plain TCP), or the three PEM files. Whether they can be read, and whether
    the key is the certificate's, is checked where they are used (repctl.tls, at `up`): the file
    is the same on every node, and each node holds its own files only."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(f"a mapping with the keys {', '.join(_TLS_FILES)}")
    for k in value:
        if k not in _TLS_FILES:
            hint = difflib.get_close_matches(str(k), _TLS_FILES, n=1)
            got = f"unknown key {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            raise _Invalid(f"one of the keys {', '.join(_TLS_FILES)}", got, at=(str(k),))
    paths = {}
    for k, expected in _TLS_FILES.items():
        if k not in value:
            raise _Invalid(f"the required key {k!r} ({expected})", "nothing", at=(k,))
        try:
            paths[k] = _abs_path(value[k])
        except _Invalid:
            raise _Invalid(expected, _show(value[k]), at=(k,)) from None
    return TLSFiles(**paths)


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _address(value: object) -> str:
    expected = "an IP address or a host name"
    if not isinstance(value, str):
        raise _Invalid(expected)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if (
        len(value) > 253
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()  # 10.0.0.256 is a mistyped address, not a host name
    ):
        raise _Invalid(expected)
    return value


_RESOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
_RESOURCE_NAME_EXPECTED = "a resource name (letters, digits, '-', '_'; at most 63)"
_NODE_NAME_EXPECTED = (
    "a node name (the host's name: letters, digits, '-', '_', '.', starting with a letter or digit)"
)


def _node_name(value: object) -> str:
    if not isinstance(value, str) or not _NODE_NAME.fullmatch(value):
        raise _Invalid(_NODE_NAME_EXPECTED)
    return value


def _mode(value: object) -> TargetMode:
    if isinstance(value, str) and value in {m.value for m in TargetMode}:
        return TargetMode(value)
    raise _Invalid("a mode: sync or async")


def _compression(value: object) -> Compression:
    if isinstance(value, str) and value in {c.value for c in Compression}:
        return Compression(value)
    raise _Invalid(f"a compression: {' or '.join(c.value for c in Compression)}")


def _zstd_level(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ZSTD_LEVELS:
        raise _Invalid(f"a zstd level: an integer from {ZSTD_LEVELS.start} to "
                       f"{ZSTD_LEVELS.stop - 1}")
    return value


def _mapping(value: object) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _Invalid("a mapping")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid("a list")
    return value


def _split_brain_policy(value: object) -> SplitBrainPolicy:
    if isinstance(value, str) and value in {p.value for p in SplitBrainPolicy}:
        return SplitBrainPolicy(value)
    raise _Invalid(f"a split-brain policy: {' or '.join(p.value for p in SplitBrainPolicy)}")


def _fencing(value: object) -> Fencing:
    if isinstance(value, str) and value in {f.value for f in Fencing}:
        return Fencing(value)
    raise _Invalid(f"a fencing policy: {' or '.join(f.value for f in Fencing)}")


_COMMAND_EXPECTED = "a command: a string whose first word is an absolute path (run without a shell)"


def _command(value: object) -> Command:
    if not isinstance(value, str) or "\0" in value:
        raise _Invalid(_COMMAND_EXPECTED)
    try:
        argv = tuple(shlex.split(value))
    except ValueError as exc:  # unbalanced quotes
        raise _Invalid(_COMMAND_EXPECTED, f"{_show(value)} ({exc})") from None
    if not argv or not argv[0].startswith("/"):
        raise _Invalid(_COMMAND_EXPECTED)
    return argv


def _commands(value: object) -> tuple[Command, ...]:
    """One command (a string) or a non-empty list of them, run in order."""
    if not isinstance(value, list):
        if not isinstance(value, str):
            raise _Invalid(f"{_COMMAND_EXPECTED}, or a list of commands")
        return (_command(value),)
    if not value:
        raise _Invalid(f"{_COMMAND_EXPECTED}, or a list of commands", "an empty list")
    commands = []
    for i, item in enumerate(value):
        try:
            commands.append(_command(item))
        except _Invalid as exc:
            raise _Invalid(exc.expected, exc.got or _show(item), at=(str(i),)) from None
    return tuple(commands)


def _mountpoint(value: object) -> Path:
    path = _abs_path(value)
    if path == Path("/"):
        raise _Invalid("an absolute path other than /")
    return path


_FSTYPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _fstype(value: object) -> str:
    if not isinstance(value, str) or not _FSTYPE.fullmatch(value):
        raise _Invalid("a file system type such as ext4 or xfs")
    return value


_MOUNT_OPTIONS = re.compile(r"[^\s,-][^\s]*")


def _mount_options(value: object) -> str:
    if not isinstance(value, str) or not _MOUNT_OPTIONS.fullmatch(value) or "\0" in value:
        raise _Invalid("mount options such as noatime,discard (comma-separated, no spaces)")
    return value


def _floating_ip(value: object) -> IPv4Interface | IPv6Interface:
    expected = "an IP address with its prefix length, such as 10.0.0.100/24 or fd00::100/64"
    if not isinstance(value, str) or "/" not in value:
        raise _Invalid(expected)
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise _Invalid(expected) from None


_IFNAME = re.compile(r"[^\s/:]{1,15}")  # the kernel's dev_valid_name(); IFNAMSIZ is 16


def _ifname(value: object) -> str:
    if not isinstance(value, str) or not _IFNAME.fullmatch(value) or value in {".", ".."}:
        raise _Invalid("a network interface name (1 to 15 characters, no '/', ':' or spaces)")
    return value


_UNIT_TYPES = (
    "service", "socket", "target", "mount", "automount", "swap", "timer", "path", "slice", "scope",
)  # fmt: skip
_UNIT = re.compile(
    r"[A-Za-z0-9_:\\][A-Za-z0-9_:.\\-]*(?:@[A-Za-z0-9_:.\\-]*)?\.(?:" + "|".join(_UNIT_TYPES) + ")"
)


def _unit(value: object) -> str:
    if not isinstance(value, str) or len(value) > 255 or not _UNIT.fullmatch(value):
        raise _Invalid("a systemd unit name such as nginx.service or app@1.service")
    return value


# --------------------------------------------------------------------------------------------
# The schema: one table per mapping of the file. A key is required when it has no default.
# Nested mappings (resources, nodes, targets) are handled by the validator.
# --------------------------------------------------------------------------------------------

_REQUIRED = object()


@dataclass(frozen=True)
class _Key:
    parse: Callable[[object], Any]
    default: Any = _REQUIRED


_GLOBAL_KEYS = {
    "control_socket": _Key(_abs_path, Path("/run/repctl/repctl.sock")),
    "state_dir": _Key(_abs_path, Path("/var/lib/repctl")),
    "secret_file": _Key(_abs_path, Path("/etc/repctl/secret")),
    "metrics": _Key(_metrics, None),
    "tls": _Key(_tls, None),
    "resync": _Key(_mapping, {}),  # _SCHEDULER_KEYS
}

# global.resync: the daemon's resync scheduler.
_SCHEDULER_KEYS = {
    "concurrency": _Key(_concurrency, DEFAULT_RESYNC_CONCURRENCY),
    "peer_rate": _Key(_bounded_rate(MIN_RESYNC_RATE, MAX_RESYNC_RATE, unlimited=True), None),
}

# resources.NAME.targets.NODE.resync: how that target's resyncs are paced.
_RESYNC_KEYS = {
    "min_rate": _Key(_bounded_rate(MIN_RESYNC_RATE, MAX_RESYNC_RATE), ResyncSettings.min_rate),
    "max_rate": _Key(_bounded_rate(MIN_RESYNC_RATE, MAX_RESYNC_RATE, unlimited=True), None),
    "fill_target": _Key(
        _bounded_size(MIN_FILL_TARGET, MAX_FILL_TARGET), ResyncSettings.fill_target
    ),
    "plan_ahead": _Key(
        _bounded_duration(MIN_PLAN_AHEAD, MAX_PLAN_AHEAD, "how fast the rate follows the link"),
        ResyncSettings.plan_ahead,
    ),
    "app_busy": _Key(_bounded_rate(4 * KiB, MAX_RESYNC_RATE), ResyncSettings.app_busy),
}

_RESOURCE_KEYS = {
    "port": _Key(_port),
    "chunk_size": _Key(_bounded_size(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, power_of_two=True), 4 * KiB),
    "ring_size": _Key(_bounded_size(MIN_RING_SIZE, MAX_RING_SIZE, multiple=MiB), 32 * MiB),
    "sync_timeout": _Key(
        _bounded_duration(MIN_SYNC_TIMEOUT, MAX_SYNC_TIMEOUT, "the kernel's range"), 5.0
    ),
    "source": _Key(_node_name),
    "secret_file": _Key(_abs_path, None),
    "nodes": _Key(_mapping),
    "targets": _Key(_mapping),
    "fencing": _Key(_fencing, Fencing.NONE),
    "after_split_brain": _Key(_split_brain_policy, SplitBrainPolicy.DISCONNECT),
    "hook_timeout": _Key(
        _bounded_duration(MIN_HOOK_TIMEOUT, MAX_HOOK_TIMEOUT, "for one hook command or action"),
        DEFAULT_HOOK_TIMEOUT,
    ),
    "hooks": _Key(_mapping, {}),
    "actions": _Key(_list, []),
}

# resources.NAME.hooks: one optional key per event.
_HOOK_KEYS = {event.value: _Key(_commands, None) for event in HookEvent}

# An item of resources.NAME.actions: a mapping with exactly one of these keys.
_ACTION_KEYS = {
    "mount": _Key(_mapping, None),
    "address": _Key(_mapping, None),
    "service": _Key(_unit, None),
}

_MOUNT_KEYS = {
    "mountpoint": _Key(_mountpoint),
    "fstype": _Key(_fstype, None),
    "options": _Key(_mount_options, None),
}

_ADDRESS_KEYS = {
    "ip": _Key(_floating_ip),
    "interface": _Key(_ifname),
}

_NODE_KEYS = {
    "address": _Key(_address),
    "device": _Key(_abs_path),
    "metadata": _Key(_abs_path, None),
    "tls": _Key(_tls, None),
}

_TARGET_KEYS = {
    "mode": _Key(_mode),
    "max_lag": _Key(_bounded_size(MIN_MAX_LAG, MAX_RING_SIZE), None),  # and below ring_size
    "compression": _Key(_compression, Compression.NONE),
    "compression_level": _Key(_zstd_level, None),  # zstd only
    "resync": _Key(_mapping, {}),  # _RESYNC_KEYS
}

_TOP_KEYS = {
    "global": _Key(lambda value: {} if value is None else value, {}),  # checked by section()
    "resources": _Key(_mapping),
}


class _Validator:
    """Turns the loaded YAML data into a Config, raising ConfigError at the first defect."""

    def __init__(self, file: str, lines: dict[tuple[str, ...], int]) -> None:
        self.file = file
        self.lines = lines
        self.ids: dict[Path, dict[object, str]] = {}  # identities(): one stat per path

    def error(self, path: tuple[str, ...], expected: str, got: str) -> ConfigError:
        line = None
        for i in range(len(path), -1, -1):
            line = self.lines.get(path[:i])
            if line is not None:
                break
        return ConfigError(self.file, ".".join(path) or None, expected, got, line=line)

    def section(
        self, value: object, path: tuple[str, ...], keys: dict[str, _Key]
    ) -> dict[str, Any]:
        """Parse mapping `value` against `keys`: unknown keys, missing keys and bad values fail."""
        if not isinstance(value, dict):
            raise self.error(path, f"a mapping with keys {', '.join(keys)}", _show(value))
        for k in value:
            if k not in keys:
                hint = difflib.get_close_matches(str(k), keys, n=1)
                got = f"unknown key {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                raise self.error((*path, str(k)), f"one of the keys {', '.join(keys)}", got)
        out = {}
        for k, spec in keys.items():
            if k not in value:
                if spec.default is _REQUIRED:
                    raise self.error((*path, k), f"the required key {k!r}", "nothing")
                out[k] = spec.default
                continue
            try:
                out[k] = spec.parse(value[k])
            except _Invalid as exc:
                raise self.error(
                    (*path, k, *exc.at), exc.expected, exc.got or _show(value[k])
                ) from None
        return out

    def named(
        self,
        value: dict[Any, Any],
        path: tuple[str, ...],
        name_re: re.Pattern[str],
        what: str,
        noun: str,
    ) -> Iterator[tuple[str, tuple[str, ...], object]]:
        """Iterate a mapping of names (resources, nodes, targets), checking each key is a name."""
        if not value:
            raise self.error(path, f"at least one {noun}", "an empty mapping")
        for k, v in value.items():
            if not isinstance(k, str) or not name_re.fullmatch(k):
                got = _show(k)
                if not isinstance(k, str):
                    got += " (quote it: YAML reads some bare words as numbers or booleans)"
                raise self.error((*path, str(k)), what, got)
            yield k, (*path, k), v

    def config(self, data: object) -> Config:
        top = self.section(data if data is not None else {}, (), _TOP_KEYS)
        g = self.section(top["global"], ("global",), _GLOBAL_KEYS)
        g["resync"] = SchedulerSettings(
            **self.section(g["resync"], ("global", "resync"), _SCHEDULER_KEYS)
        )
        glob = GlobalConfig(**g)
        resources: dict[str, Resource] = {}
        ports: dict[int, str] = {}
        for name, path, value in self.named(
            top["resources"], ("resources",), _RESOURCE_NAME, _RESOURCE_NAME_EXPECTED, "resource"
        ):
            res = self.resource(name, path, value, glob)
            if res.port in ports:
                raise self.error(
                    (*path, "port"),
                    f"a port that no other resource uses ({ports[res.port]} uses {res.port})",
                    str(res.port),
                )
            ports[res.port] = name
            resources[name] = res
        self.devices_unshared(resources)
        return Config(glob, MappingProxyType(resources), self.file)

    def devices_unshared(self, resources: Mapping[str, Resource]) -> None:
        """No device of a node (data or metadata) serves two resources, in either role."""
        uses: dict[str, list[tuple[tuple[str, ...], Path]]] = {}  # node -> (key path, device)
        for res in resources.values():
            for node in res.nodes.values():
                mine = uses.setdefault(node.name, [])
                for role, path in (("device", node.device), ("metadata", node.metadata)):
                    if path is None:
                        continue
                    key = ("resources", res.name, "nodes", node.name, role)
                    for first, first_path in mine:
                        how = self.same_device(first_path, path)
                        if how is not None:
                            raise self.error(
                                key,
                                f"a device that no other resource uses on node {node.name} "
                                f"({'.'.join(first)} is {str(first_path)!r})",
                                f"{str(path)!r}, {how}",
                            )
                    mine.append((key, path))

    def same_device(self, a: Path, b: Path) -> str | None:
        """How `b` names the same device as `a` (words for a message), or None if it does not.

        The paths are compared as given and, where both exist on this machine, as the file they
        resolve to (symlinks, hard links) and, for block devices, by device number. A path that
        does not exist here (another machine's device) is compared as given only.
        """
        known = self.identities(a)
        for ident, how in self.identities(b).items():
            if ident in known:
                return how
        return None

    def identities(self, path: Path) -> dict[object, str]:
        """What `path` is, as keys to compare (see same_device), each with the words for it."""
        ids = self.ids.get(path)
        if ids is None:
            ids = {("path", path): "the same path"}
            try:
                st = os.stat(path)
            except (OSError, ValueError):
                pass
            else:
                real = os.path.realpath(path)
                how = "on this machine the same file" + (f" ({real})" if real != str(path) else "")
                ids[("file", st.st_dev, st.st_ino)] = how
                if stat.S_ISBLK(st.st_mode):
                    number = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                    ids[("rdev", st.st_rdev)] = f"on this machine the same block device {number}"
            self.ids[path] = ids
        return ids

    def resource(
        self, name: str, path: tuple[str, ...], value: object, glob: GlobalConfig
    ) -> Resource:
        r = self.section(value, path, _RESOURCE_KEYS)

        nodes: dict[str, Node] = {}
        addresses: dict[str, str] = {}
        for nname, npath, nvalue in self.named(
            r["nodes"], (*path, "nodes"), _NODE_NAME, _NODE_NAME_EXPECTED, "node"
        ):
            if nname.lower() in RESERVED_NODE_NAMES:
                raise self.error(
                    npath,
                    f"a node name other than {', '.join(sorted(RESERVED_NODE_NAMES))} (in "
                    f"{glob.state_dir / name}/ the daemon keeps <target>.json beside its own "
                    "generation.json and target.json)",
                    repr(nname),
                )
            n = self.section(nvalue, npath, _NODE_KEYS)
            if n["metadata"] is not None:
                how = self.same_device(n["device"], n["metadata"])
                if how is not None:
                    raise self.error(
                        (*npath, "metadata"),
                        "a metadata device other than the node's data device "
                        "(repctl create-md would format the data)",
                        f"{str(n['metadata'])!r}, {how} as device {str(n['device'])!r}",
                    )
            if n["address"] in addresses:
                raise self.error(
                    (*npath, "address"),
                    f"an address no other node of {name} has ({addresses[n['address']]} has it)",
                    repr(n["address"]),
                )
            addresses[n["address"]] = nname
            nodes[nname] = Node(
                nname, n["address"], n["device"], n["metadata"], n["tls"] or glob.tls
            )
        with_tls = [node for node in nodes.values() if node.tls is not None]
        if with_tls and len(with_tls) < len(nodes):
            plain = next(node.name for node in nodes.values() if node.tls is None)
            raise self.error(
                (*path, "nodes", plain, "tls"),
                f"tls on every node of {name} or on none ({with_tls[0].name} has it, and a node "
                "with TLS refuses one without)",
                "nothing",
            )

        source = r["source"]
        if source not in nodes:
            raise self.error(
                (*path, "source"), f"one of the nodes of {name} ({', '.join(nodes)})", repr(source)
            )
        if nodes[source].metadata is None:
            raise self.error(
                (*path, "nodes", source, "metadata"),
                "a metadata device path (the source node needs one for its dirty bitmap)",
                "nothing",
            )

        targets: dict[str, Target] = {}
        for tname, tpath, tvalue in self.named(
            r["targets"], (*path, "targets"), _NODE_NAME, _NODE_NAME_EXPECTED, "target"
        ):
            if tname not in nodes:
                raise self.error(
                    tpath, f"a node of {name} ({', '.join(nodes)})", f"{tname!r}, not a node"
                )
            if tname == source:
                raise self.error(
                    tpath, f"a node other than the source {source!r}", f"the source {tname!r}"
                )
            t = self.section(tvalue, tpath, _TARGET_KEYS)
            max_lag = t["max_lag"]
            if t["mode"] is TargetMode.SYNC and max_lag is not None:
                raise self.error(
                    (*tpath, "max_lag"),
                    "no max_lag on a sync target (it never lags; see sync_timeout)",
                    repr(tvalue["max_lag"]),  # type: ignore[index]
                )
            if max_lag is not None and max_lag >= r["ring_size"]:
                raise self.error(
                    (*tpath, "max_lag"),
                    f"a max_lag below the ring_size of {name}, {format_size(r['ring_size'])} (the "
                    "backlog is bytes of ring records: it never exceeds the ring)",
                    repr(tvalue["max_lag"]),  # type: ignore[index]
                )
            if t["mode"] is TargetMode.ASYNC and max_lag is None:
                max_lag = default_max_lag(r["ring_size"])
            level = t["compression_level"]
            if level is not None and t["compression"] is not Compression.ZSTD:
                raise self.error(
                    (*tpath, "compression_level"),
                    "a compression_level only with compression: zstd (lz4 has no levels here, "
                    "none compresses nothing)",
                    repr(level),
                )
            if t["compression"] is Compression.ZSTD and level is None:
                level = ZSTD_DEFAULT_LEVEL
            rs = self.section(t["resync"], (*tpath, "resync"), _RESYNC_KEYS)
            if rs["max_rate"] is not None and rs["max_rate"] < rs["min_rate"]:
                raise self.error(
                    (*tpath, "resync", "max_rate"),
                    f"a max_rate of at least the min_rate, {format_rate(rs['min_rate'])}",
                    repr(t["resync"]["max_rate"]),
                )
            targets[tname] = Target(
                tname, t["mode"], max_lag, t["compression"], level, ResyncSettings(**rs)
            )

        given = self.section(r["hooks"], (*path, "hooks"), _HOOK_KEYS)
        hooks = {HookEvent(k): v for k, v in given.items() if v is not None}
        if r["fencing"] is Fencing.RESOURCE_AND_STONITH and HookEvent.FENCE_PEER not in hooks:
            raise self.error(
                (*path, "hooks", HookEvent.FENCE_PEER.value),
                "a fence-peer hook (fencing is resource-and-stonith: a node is promoted only "
                "after this hook fenced its peer)",
                "nothing",
            )

        return Resource(
            name=name,
            port=r["port"],
            chunk_size=r["chunk_size"],
            ring_size=r["ring_size"],
            sync_timeout=r["sync_timeout"],
            source=source,
            secret_file=r["secret_file"] or glob.secret_file,
            nodes=MappingProxyType(nodes),
            targets=MappingProxyType(targets),
            fencing=r["fencing"],
            after_split_brain=r["after_split_brain"],
            hook_timeout=r["hook_timeout"],
            hooks=MappingProxyType(hooks),
            actions=self.actions(r["actions"], (*path, "actions"), nodes),
        )

    def actions(
        self, value: list[Any], path: tuple[str, ...], nodes: Mapping[str, Node]
    ) -> tuple[Action, ...]:
        """The built-in actions of a resource, in order; each names one mount point, floating
        address or unit that no other action of the list names."""
        actions: list[Action] = []
        seen: dict[object, int] = {}  # what an action acts on -> its index
        for i, item in enumerate(value):
            ipath = (*path, str(i))
            a = self.section(item, ipath, _ACTION_KEYS)
            kinds = [k for k, v in a.items() if v is not None]
            if len(kinds) != 1:
                raise self.error(
                    ipath,
                    f"one action per list item: a mapping with one key, {' or '.join(_ACTION_KEYS)}",
                    f"the keys {', '.join(kinds)}" if kinds else "no key",
                )
            kind = kinds[0]
            apath = (*ipath, kind)
            action: Action
            on: object  # what the action acts on
            if kind == "mount":
                action = MountAction(**self.section(a[kind], apath, _MOUNT_KEYS))
                on, key, shown = action.mountpoint, "mountpoint", str(action.mountpoint)
            elif kind == "address":
                action = AddressAction(**self.section(a[kind], apath, _ADDRESS_KEYS))
                on, key, shown = action.ip.ip, "ip", str(action.ip)
                owner = [n.name for n in nodes.values() if n.address == str(action.ip.ip)]
                if owner:
                    raise self.error(
                        (*apath, key),
                        f"a floating address that is not a node's own address ({owner[0]} "
                        "listens on it: removing it on demote would cut the node off)",
                        repr(shown),
                    )
            else:
                action = ServiceAction(a[kind])
                on, key, shown = action.unit, "", action.unit
            if (kind, on) in seen:
                raise self.error(
                    (*apath, key) if key else apath,
                    f"a {kind} that no other action of the list has (item {seen[kind, on]} has it)",
                    repr(shown),
                )
            seen[kind, on] = i
            actions.append(action)
        return tuple(actions)


def _line_map(file: str, root: yaml.Node) -> dict[tuple[str, ...], int]:
    """Line (1-based) of each key path of the YAML node tree; refuses duplicate keys."""
    import yaml  # start time, as in `Config.dump`

    lines: dict[tuple[str, ...], int] = {(): root.start_mark.line + 1}
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # an alias: already walked
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode) or knode.value == "<<":
                    continue
                line = knode.start_mark.line + 1
                if knode.value in first:
                    key = ".".join((*path, knode.value))
                    raise ConfigError(
                        file,
                        key,
                        "each key once in its mapping",
                        f"{knode.value!r} again (first on line {first[knode.value]})",
                        line=line,
                    )
                first[knode.value] = line
                lines[(*path, knode.value)] = line
                stack.append((vnode, (*path, knode.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault((*path, str(i)), item.start_mark.line + 1)
                stack.append((item, (*path, str(i))))
    return lines


def _show(value: object) -> str:
    text = repr(value)
    if isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list"
    elif value is None:
        text = "nothing"
    return text if len(text) <= 60 else text[:57] + "..."


def _names(mapping: Mapping[str, object]) -> str:
    return ", ".join(mapping) if mapping else "none"
