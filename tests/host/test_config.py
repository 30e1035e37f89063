"""Configuration loading and validation: every defect names the file, the key path and the line."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import re
import stat
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from repctl import config as c
from repctl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

VALID: dict[str, Any] = {
    "global": {
        "control_socket": "/run/repctl/repctl.sock",
        "state_dir": "/var/lib/repctl",
        "secret_file": "/etc/repctl/secret",
    },
    "resources": {
        "r0": {
            "port": 7789,
            "chunk_size": "4KiB",
            "ring_size": "32MiB",
            "sync_timeout": "5s",
            "source": "alpha",
            "nodes": {
                "alpha": {
                    "address": "10.0.0.1",
                    "device": "/dev/vg0/data",
                    "metadata": "/dev/vg0/data-md",
                },
                "beta": {
                    "address": "10.0.0.2",
                    "device": "/dev/vg0/data",
                    "metadata": "/dev/vg0/data-md",
                },
                "gamma": {"address": "backup.example.com", "device": "/srv/backup/r0.img"},
            },
            "targets": {"beta": {"mode": "sync"}, "gamma": {"mode": "async", "max_lag": "16MiB"}},
        },
    },
}


def write(tmp_path: Path, data: Any, name: str = "repctl.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(tmp_path: Path, data: Any) -> ConfigError:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        c.load_config(path)
    assert str(path) in str(info.value)
    return info.value


def test_valid_config_loads():
    cfg = c.parse_config(yaml.safe_dump(VALID), "x.yaml")
    r0 = cfg.resource("r0")
    assert r0.port == 7789 and r0.chunk_size == 4096 and r0.ring_size == 32 << 20
    assert r0.sync_timeout == 5.0 and r0.source == "alpha"
    assert r0.source_node.metadata == Path("/dev/vg0/data-md")
    assert r0.nodes["gamma"] == c.Node(
        "gamma", "backup.example.com", Path("/srv/backup/r0.img"), None
    )
    assert r0.targets["beta"] == c.Target("beta", c.TargetMode.SYNC, None)
    assert r0.targets["gamma"] == c.Target("gamma", c.TargetMode.ASYNC, 16 << 20)
    assert r0.secret_file == Path("/etc/repctl/secret")


def test_valid_config_round_trips(tmp_path):
    cfg = c.load_config(write(tmp_path, VALID))
    again = c.load_config(write(tmp_path, cfg.dump(), "again.yaml"))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["resources"]["r0"]["chunk_size"] == "4KiB"


def test_defaults(tmp_path):
    data = copy.deepcopy(VALID)
    del data["global"]
    r0 = data["resources"]["r0"]
    for key in ("chunk_size", "ring_size", "sync_timeout"):
        del r0[key]
    del r0["targets"]["gamma"]["max_lag"]
    r0["secret_file"] = "/etc/repctl/r0.secret"
    cfg = c.load_config(write(tmp_path, data))
    assert cfg.global_ == c.GlobalConfig(
        Path("/run/repctl/repctl.sock"), Path("/var/lib/repctl"), Path("/etc/repctl/secret")
    )
    res = cfg.resource("r0")
    assert (res.chunk_size, res.ring_size, res.sync_timeout) == (4096, 32 << 20, 5.0)
    assert res.targets["gamma"].max_lag == 24 << 20  # three quarters of the 32 MiB ring
    assert res.secret_file == Path("/etc/repctl/r0.secret")
    assert c.parse_config(cfg.dump()) == cfg


def test_config_is_immutable():
    cfg = c.parse_config(yaml.safe_dump(VALID))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.resource("r0").port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.resource("r0").nodes["delta"] = None  # type: ignore[index]


def test_the_documented_example_is_valid():
    cfg = c.load_config(ROOT / "docs" / "examples" / "repctl.yaml")
    assert cfg.resources, "the example defines resources"


def test_the_backup_node_example_is_valid():
    """docs/examples/backup-node.yaml: four sources, each its own resource, port and secret,
    onto one node that keeps an image file per resource."""
    cfg = c.load_config(ROOT / "docs" / "examples" / "backup-node.yaml")
    assert len(cfg.resources) == 4
    assert len({r.port for r in cfg.resources.values()}) == 4
    assert len({r.secret_file for r in cfg.resources.values()}) == 4
    assert all(r.targets.keys() == {"vault"} for r in cfg.resources.values())
    assert len({r.nodes["vault"].device for r in cfg.resources.values()}) == 4


def test_every_key_is_documented():
    text = (ROOT / "docs" / "config.md").read_text()
    tables = (
        c._TOP_KEYS, c._GLOBAL_KEYS, c._RESOURCE_KEYS, c._NODE_KEYS, c._TARGET_KEYS,
        c._HOOK_KEYS, c._ACTION_KEYS, c._MOUNT_KEYS, c._ADDRESS_KEYS, c._SCHEDULER_KEYS,
        c._RESYNC_KEYS,
    )  # fmt: skip
    for keys in tables:
        for key in keys:
            assert f"`{key}`" in text, f"docs/config.md does not document {key}"


# One case per kind of defect: (change to VALID, key path in the message, text in the message).
def _set(path: str, value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            data = data[p]
        if value is _DELETE:
            del data[last]
        else:
            data[last] = value

    return change


def _node(name: str) -> Any:
    """Add a node called `name` to r0 (a name that _set cannot spell: it splits on dots)."""

    def change(data: dict[str, Any]) -> None:
        data["resources"]["r0"]["nodes"][name] = {"address": "h", "device": "/d"}

    return change


def _fenced(hooks: dict[str, Any]) -> Any:
    """r0 with fencing resource-and-stonith and `hooks`."""

    def change(data: dict[str, Any]) -> None:
        data["resources"]["r0"].update(fencing="resource-and-stonith", hooks=hooks)

    return change


_DELETE = object()
R0 = "resources.r0"

CASES = [
    ("port type", _set(f"{R0}.port", "7789"), f"{R0}.port", "TCP port number"),
    ("port range", _set(f"{R0}.port", 80), f"{R0}.port", "from 1024 to 65535, got 80"),
    ("port is no bool", _set(f"{R0}.port", True), f"{R0}.port", "got True"),
    ("unknown key", _set(f"{R0}.prot", 1), f"{R0}.prot",
     "unknown key 'prot' (did you mean 'port'?)"),
    ("unknown node key", _set(f"{R0}.nodes.beta.disk", "/dev/sdb"), f"{R0}.nodes.beta.disk",
     "unknown key 'disk'"),
    ("unknown global key", _set("global.statedir", "/x"), "global.statedir",
     "did you mean 'state_dir'"),
    ("unknown top key", _set("resource", {}), "resource", "did you mean 'resources'"),
    ("missing port", _set(f"{R0}.port", _DELETE), f"{R0}.port",
     "the required key 'port', got nothing"),
    ("missing device", _set(f"{R0}.nodes.beta.device", _DELETE), f"{R0}.nodes.beta.device",
     "required key 'device'"),
    ("missing resources", _set("resources", _DELETE), "resources", "required key"),
    ("no resources", _set("resources", {}), "resources", "at least one resource"),
    ("bad size", _set(f"{R0}.ring_size", "32MB"), f"{R0}.ring_size", "MiB, not MB"),
    ("size type", _set(f"{R0}.ring_size", [32]), f"{R0}.ring_size", "got a list"),
    ("ring size range", _set(f"{R0}.ring_size", "64K"), f"{R0}.ring_size",
     "a size from 1MiB to 4GiB"),
    ("chunk not power of two", _set(f"{R0}.chunk_size", "12KiB"), f"{R0}.chunk_size",
     "a power of two size from 4KiB to 1MiB"),
    ("chunk too big", _set(f"{R0}.chunk_size", "2MiB"), f"{R0}.chunk_size", "got '2MiB'"),
    ("bad duration", _set(f"{R0}.sync_timeout", "5 sec"), f"{R0}.sync_timeout", "500ms, 5s, 2m"),
    ("zero duration", _set(f"{R0}.sync_timeout", "0s"), f"{R0}.sync_timeout",
     "a duration from 100ms to 10m (the kernel's range), got '0s'"),
    ("source not a node", _set(f"{R0}.source", "delta"), f"{R0}.source",
     "one of the nodes of r0 (alpha, beta, gamma), got 'delta'"),
    ("source without metadata", _set(f"{R0}.source", "gamma"), f"{R0}.nodes.gamma.metadata",
     "the source node needs one"),
    ("target not a node", _set(f"{R0}.targets.delta", {"mode": "sync"}), f"{R0}.targets.delta",
     "a node of r0"),
    ("target is the source", _set(f"{R0}.targets.alpha", {"mode": "sync"}), f"{R0}.targets.alpha",
     "a node other than the source 'alpha'"),
    ("no targets", _set(f"{R0}.targets", {}), f"{R0}.targets", "at least one target"),
    ("bad mode", _set(f"{R0}.targets.beta.mode", "semi"), f"{R0}.targets.beta.mode",
     "sync or async, got 'semi'"),
    ("max_lag on sync", _set(f"{R0}.targets.beta.max_lag", "1GiB"), f"{R0}.targets.beta.max_lag",
     "no max_lag on a sync target"),
    ("bad address", _set(f"{R0}.nodes.beta.address", "10.0.0.300"), f"{R0}.nodes.beta.address",
     "an IP address or a host name"),
    ("address with a prefix", _set(f"{R0}.nodes.beta.address", "10.0.0.2/24"),
     f"{R0}.nodes.beta.address", "got '10.0.0.2/24'"),
    ("address type", _set(f"{R0}.nodes.beta.address", 10), f"{R0}.nodes.beta.address", "got 10"),
    ("same address twice", _set(f"{R0}.nodes.beta.address", "10.0.0.1"),
     f"{R0}.nodes.beta.address", "(alpha has it)"),
    ("relative device", _set(f"{R0}.nodes.beta.device", "dev/sdb"), f"{R0}.nodes.beta.device",
     "an absolute path, got 'dev/sdb'"),
    ("relative metadata", _set(f"{R0}.nodes.beta.metadata", "md"), f"{R0}.nodes.beta.metadata",
     "an absolute path"),
    ("relative socket", _set("global.control_socket", "repctl.sock"), "global.control_socket",
     "an absolute path"),
    ("node not a mapping", _set(f"{R0}.nodes.beta", "10.0.0.2"), f"{R0}.nodes.beta",
     "a mapping with keys address, device, metadata, tls, got '10.0.0.2'"),
    ("bad node name", _set(f"{R0}.nodes.be ta", {"address": "h", "device": "/d"}),
     f"{R0}.nodes.be ta", "a node name"),
    ("bad resource name", _set("resources.r/0", {}), "resources.r/0", "a resource name"),
    ("global not a mapping", _set("global", ["x"]), "global",
     "a mapping with keys control_socket, state_dir, secret_file, metrics, tls, resync, got a "
     "list"),
    # A node's metadata is never its data device: create-md --force would format the data.
    ("metadata is the device", _set(f"{R0}.nodes.beta.metadata", "/dev/vg0/data"),
     f"{R0}.nodes.beta.metadata", ("expected a metadata device other than the node's data device "
     "(repctl create-md would format the data), got '/dev/vg0/data', the same path as device "
     "'/dev/vg0/data'")),
    ("metadata is the device spelt otherwise",
     _set(f"{R0}.nodes.alpha.metadata", "/dev//vg0/./data/"),
     f"{R0}.nodes.alpha.metadata", "got '/dev/vg0/data', the same path as device"),
    # Node names that the daemon's state files of the resource are named after.
    ("node named generation", _set(f"{R0}.nodes.generation", {"address": "h", "device": "/d"}),
     f"{R0}.nodes.generation", ("expected a node name other than generation, target (in "
     "/var/lib/repctl/r0/ the daemon keeps <target>.json beside its own generation.json and "
     "target.json), got 'generation'")),
    ("node named target", _set(f"{R0}.nodes.target", {"address": "h", "device": "/d"}),
     f"{R0}.nodes.target", "a node name other than generation, target"),
    ("node named Target", _set(f"{R0}.nodes.Target", {"address": "h", "device": "/d"}),
     f"{R0}.nodes.Target", "got 'Target'"),
    ("hidden node name", _node(".beta"), f"{R0}.nodes..beta",
     "starting with a letter or digit), got '.beta'"),
    ("node name with a slash", _node("x/beta"), f"{R0}.nodes.x/beta", "a node name"),
    ("node name ..", _node(".."), f"{R0}.nodes...", "a node name"),
    # sync_timeout: the kernel's range, 100 ms to 10 min, nothing clamped.
    ("sync_timeout too short", _set(f"{R0}.sync_timeout", "99ms"), f"{R0}.sync_timeout",
     "expected a duration from 100ms to 10m (the kernel's range), got '99ms'"),
    ("sync_timeout bare seconds too short", _set(f"{R0}.sync_timeout", 0.05),
     f"{R0}.sync_timeout", "from 100ms to 10m"),
    ("sync_timeout too long", _set(f"{R0}.sync_timeout", "601s"), f"{R0}.sync_timeout",
     "from 100ms to 10m (the kernel's range), got '601s'"),
    ("sync_timeout an hour", _set(f"{R0}.sync_timeout", "1h"), f"{R0}.sync_timeout", "got '1h'"),
    # max_lag: the backlog never exceeds the ring, so a max_lag must be below ring_size.
    ("max_lag is the ring", _set(f"{R0}.targets.gamma.max_lag", "32MiB"),
     f"{R0}.targets.gamma.max_lag", ("expected a max_lag below the ring_size of r0, 32MiB (the "
     "backlog is bytes of ring records: it never exceeds the ring), got '32MiB'")),
    ("max_lag above the ring", _set(f"{R0}.targets.gamma.max_lag", "256MiB"),
     f"{R0}.targets.gamma.max_lag", "below the ring_size of r0, 32MiB"),
    ("max_lag tiny", _set(f"{R0}.targets.gamma.max_lag", 1024), f"{R0}.targets.gamma.max_lag",
     "a size from 4KiB to 4GiB, got 1024"),
    ("ring_size in whole MiB", _set(f"{R0}.ring_size", "1536KiB"), f"{R0}.ring_size",
     "a size from 1MiB to 4GiB, a multiple of 1MiB, got '1536KiB'"),
    # fencing, hook_timeout, hooks
    ("bad fencing", _set(f"{R0}.fencing", "stonith"), f"{R0}.fencing",
     "expected a fencing policy: none or resource-and-stonith, got 'stonith'"),
    ("bad split-brain policy", _set(f"{R0}.after_split_brain", "discard-secondary"),
     f"{R0}.after_split_brain", "expected a split-brain policy: disconnect or "
     "discard-zero-changes or discard-least-changes or discard-younger-primary, got "
     "'discard-secondary'"),
    ("fencing without a fence-peer hook", _set(f"{R0}.fencing", "resource-and-stonith"),
     f"{R0}.hooks.fence-peer", ("expected a fence-peer hook (fencing is resource-and-stonith: a "
     "node is promoted only after this hook fenced its peer), got nothing")),
    ("fencing with other hooks only", _fenced({"before-promote": "/bin/true"}),
     f"{R0}.hooks.fence-peer", "a fence-peer hook"),
    ("hook_timeout too short", _set(f"{R0}.hook_timeout", "500ms"), f"{R0}.hook_timeout",
     "expected a duration from 1s to 1h (for one hook command or action), got '500ms'"),
    ("hook_timeout too long", _set(f"{R0}.hook_timeout", "61m"), f"{R0}.hook_timeout",
     "got '61m'"),
    ("hooks not a mapping", _set(f"{R0}.hooks", "/bin/true"), f"{R0}.hooks",
     "expected a mapping, got '/bin/true'"),
    ("unknown event", _set(f"{R0}.hooks", {"before-promot": "/bin/true"}),
     f"{R0}.hooks.before-promot", "unknown key 'before-promot' (did you mean 'before-promote'?)"),
    ("event in DRBD's spelling", _set(f"{R0}.hooks", {"fence_peer": "/bin/true"}),
     f"{R0}.hooks.fence_peer", "(did you mean 'fence-peer'?)"),
    ("relative hook command", _set(f"{R0}.hooks", {"after-promote": "notify me"}),
     f"{R0}.hooks.after-promote", ("a string whose first word is an absolute path (run without a "
     "shell), got 'notify me'")),
    ("relative command in a list", _set(f"{R0}.hooks", {"after-promote": ["/bin/a", "b c"]}),
     f"{R0}.hooks.after-promote.1", "absolute path (run without a shell), got 'b c'"),
    ("unbalanced quote", _set(f"{R0}.hooks", {"split-brain": "/bin/echo 'x"}),
     f"{R0}.hooks.split-brain", "got \"/bin/echo 'x\" (No closing quotation)"),
    ("empty command", _set(f"{R0}.hooks", {"split-brain": "  "}), f"{R0}.hooks.split-brain",
     "got '  '"),
    ("no command", _set(f"{R0}.hooks", {"split-brain": None}), f"{R0}.hooks.split-brain",
     "or a list of commands, got nothing"),
    ("empty command list", _set(f"{R0}.hooks", {"split-brain": []}), f"{R0}.hooks.split-brain",
     "or a list of commands, got an empty list"),
    ("command as a list of words", _set(f"{R0}.hooks", {"split-brain": [["/bin/echo", "x"]]}),
     f"{R0}.hooks.split-brain.0", "got a list"),
    # actions
    ("actions not a list", _set(f"{R0}.actions", {"service": "a.service"}), f"{R0}.actions",
     "expected a list, got a mapping"),
    ("unknown action", _set(f"{R0}.actions", [{"mnt": {"mountpoint": "/srv"}}]),
     f"{R0}.actions.0.mnt", "unknown key 'mnt' (did you mean 'mount'?)"),
    ("action not a mapping", _set(f"{R0}.actions", ["a.service"]), f"{R0}.actions.0",
     "a mapping with keys mount, address, service, got 'a.service'"),
    ("two actions in one item", _set(f"{R0}.actions",
                                     [{"mount": {"mountpoint": "/srv"}, "service": "a.service"}]),
     f"{R0}.actions.0", ("expected one action per list item: a mapping with one key, mount or "
     "address or service, got the keys mount, service")),
    ("empty action", _set(f"{R0}.actions", [{}]), f"{R0}.actions.0", "got no key"),
    ("mount without mountpoint", _set(f"{R0}.actions", [{"mount": {"fstype": "ext4"}}]),
     f"{R0}.actions.0.mount.mountpoint", "the required key 'mountpoint', got nothing"),
    ("mount not a mapping", _set(f"{R0}.actions", [{"mount": "/srv"}]), f"{R0}.actions.0.mount",
     "expected a mapping, got '/srv'"),
    ("relative mountpoint", _set(f"{R0}.actions", [{"mount": {"mountpoint": "srv"}}]),
     f"{R0}.actions.0.mount.mountpoint", "an absolute path, got 'srv'"),
    ("mount on /", _set(f"{R0}.actions", [{"mount": {"mountpoint": "/"}}]),
     f"{R0}.actions.0.mount.mountpoint", "an absolute path other than /, got '/'"),
    ("unknown mount key",
     _set(f"{R0}.actions", [{"mount": {"mountpoint": "/s", "fs_type": "xfs"}}]),
     f"{R0}.actions.0.mount.fs_type", "(did you mean 'fstype'?)"),
    ("bad fstype", _set(f"{R0}.actions", [{"mount": {"mountpoint": "/s", "fstype": "ext 4"}}]),
     f"{R0}.actions.0.mount.fstype", "a file system type such as ext4 or xfs, got 'ext 4'"),
    ("mount options with a space",
     _set(f"{R0}.actions", [{"mount": {"mountpoint": "/s", "options": "noatime, ro"}}]),
     f"{R0}.actions.0.mount.options", "(comma-separated, no spaces), got 'noatime, ro'"),
    ("mount options like a flag",
     _set(f"{R0}.actions", [{"mount": {"mountpoint": "/s", "options": "--bind"}}]),
     f"{R0}.actions.0.mount.options", "got '--bind'"),
    ("address without prefix",
     _set(f"{R0}.actions", [{"address": {"ip": "10.0.0.100", "interface": "eth0"}}]),
     f"{R0}.actions.0.address.ip", ("an IP address with its prefix length, such as 10.0.0.100/24 "
     "or fd00::100/64, got '10.0.0.100'")),
    ("bad address", _set(f"{R0}.actions",
                         [{"address": {"ip": "10.0.0.300/24", "interface": "eth0"}}]),
     f"{R0}.actions.0.address.ip", "got '10.0.0.300/24'"),
    ("bad prefix", _set(f"{R0}.actions", [{"address": {"ip": "fd00::1/129", "interface": "e"}}]),
     f"{R0}.actions.0.address.ip", "got 'fd00::1/129'"),
    ("address without interface", _set(f"{R0}.actions", [{"address": {"ip": "10.0.0.100/24"}}]),
     f"{R0}.actions.0.address.interface", "the required key 'interface'"),
    ("interface name too long",
     _set(f"{R0}.actions", [{"address": {"ip": "10.0.0.100/24", "interface": "e" * 16}}]),
     f"{R0}.actions.0.address.interface", "a network interface name (1 to 15 characters"),
    ("interface name with a slash",
     _set(f"{R0}.actions", [{"address": {"ip": "10.0.0.100/24", "interface": "eth/0"}}]),
     f"{R0}.actions.0.address.interface", "no '/', ':' or spaces), got 'eth/0'"),
    ("floating address is a node's",
     _set(f"{R0}.actions", [{"address": {"ip": "10.0.0.2/24", "interface": "eth0"}}]),
     f"{R0}.actions.0.address.ip", ("expected a floating address that is not a node's own address "
     "(beta listens on it: removing it on demote would cut the node off), got '10.0.0.2/24'")),
    ("service without a type", _set(f"{R0}.actions", [{"service": "nginx"}]),
     f"{R0}.actions.0.service", ("a systemd unit name such as nginx.service or app@1.service, got "
     "'nginx'")),
    ("service like a flag", _set(f"{R0}.actions", [{"service": "--now.service"}]),
     f"{R0}.actions.0.service", "got '--now.service'"),
    ("service with a space", _set(f"{R0}.actions", [{"service": "my app.service"}]),
     f"{R0}.actions.0.service", "got 'my app.service'"),
    ("same mountpoint twice", _set(f"{R0}.actions", [{"mount": {"mountpoint": "/srv"}},
                                                     {"mount": {"mountpoint": "/srv/"}}]),
     f"{R0}.actions.1.mount.mountpoint", ("expected a mount that no other action of the list has "
     "(item 0 has it), got '/srv'")),
    ("same address twice", _set(f"{R0}.actions", [
        {"address": {"ip": "10.0.0.100/24", "interface": "eth0"}},
        {"address": {"ip": "10.0.0.100/16", "interface": "eth1"}}]),
     f"{R0}.actions.1.address.ip", "(item 0 has it), got '10.0.0.100/16'"),
    ("same unit twice", _set(f"{R0}.actions", [{"service": "a.service"}, {"service": "b.service"},
                                               {"service": "a.service"}]),
     f"{R0}.actions.2.service", "(item 0 has it), got 'a.service'"),
    # global.metrics: a port (loopback) or HOST:PORT, docs/metrics.md
    ("metrics port range", _set("global.metrics", 80), "global.metrics",
     "with a port from 1024 to 65535; or off, got 80"),
    ("metrics port too big", _set("global.metrics", "127.0.0.1:70000"), "global.metrics",
     "got '127.0.0.1:70000'"),
    ("metrics without port", _set("global.metrics", "127.0.0.1"), "global.metrics",
     "HOST:PORT, such as 9942"),
    ("metrics bad host", _set("global.metrics", "10.0.0.256:9942"), "global.metrics",
     "got '10.0.0.256:9942'"),
    ("metrics v6 without brackets", _set("global.metrics", "::1:9942"), "global.metrics",
     "got '::1:9942'"),
    ("metrics brackets around v4", _set("global.metrics", "[127.0.0.1]:9942"), "global.metrics",
     "got '[127.0.0.1]:9942'"),
    ("metrics true", _set("global.metrics", True), "global.metrics", "got True"),
    ("metrics a word", _set("global.metrics", "on"), "global.metrics", "got 'on'"),
    ("metrics a list", _set("global.metrics", [9942]), "global.metrics", "got a list"),
    # compression: a codec, and zstd's level only with zstd
    ("unknown compression", _set(f"{R0}.targets.gamma.compression", "gzip"),
     f"{R0}.targets.gamma.compression", "expected a compression: none or lz4 or zstd, got 'gzip'"),
    ("compression as a boolean", _set(f"{R0}.targets.gamma.compression", True),
     f"{R0}.targets.gamma.compression", "got True"),
    ("zstd level too high", _set(f"{R0}.targets.gamma", {"mode": "async", "compression": "zstd",
                                                         "compression_level": 22}),
     f"{R0}.targets.gamma.compression_level",
     "expected a zstd level: an integer from 1 to 19, got 22"),
    ("zstd level 0", _set(f"{R0}.targets.gamma", {"mode": "async", "compression": "zstd",
                                                  "compression_level": 0}),
     f"{R0}.targets.gamma.compression_level", "from 1 to 19, got 0"),
    ("zstd level a string", _set(f"{R0}.targets.gamma", {"mode": "async", "compression": "zstd",
                                                         "compression_level": "3"}),
     f"{R0}.targets.gamma.compression_level", "from 1 to 19, got '3'"),
    ("level with lz4", _set(f"{R0}.targets.gamma", {"mode": "async", "compression": "lz4",
                                                    "compression_level": 3}),
     f"{R0}.targets.gamma.compression_level",
     ("expected a compression_level only with compression: zstd (lz4 has no levels here, none "
      "compresses nothing), got 3")),
    ("level without compression", _set(f"{R0}.targets.beta.compression_level", 1),
     f"{R0}.targets.beta.compression_level", "only with compression: zstd"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "key", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_defect_names_file_key_and_expectation(tmp_path, change, key, text):
    data = copy.deepcopy(VALID)
    change(data)
    error = load_error(tmp_path, data)
    assert error.key == key
    assert f": {key}: expected " in str(error)
    assert text in str(error)
    assert error.line is not None and re.match(
        rf"{re.escape(str(tmp_path))}/repctl.yaml:\d+: ", str(error)
    )


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, None),
        (False, None),  # YAML's bare off
        (9942, ("127.0.0.1", 9942)),  # a bare port: loopback only
        ("9942", ("127.0.0.1", 9942)),
        ("127.0.0.1:9942", ("127.0.0.1", 9942)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("10.0.0.1:9942", ("10.0.0.1", 9942)),
        ("[::1]:9942", ("::1", 9942)),
        ("[fd00:0::2]:9942", ("fd00::2", 9942)),  # normalised, as node addresses are
        ("mon.example.com:9942", ("mon.example.com", 9942)),
    ],
)
def test_metrics_address(tmp_path, value, address):
    data = copy.deepcopy(VALID)
    data["global"]["metrics"] = value
    cfg = c.load_config(write(tmp_path, data))
    assert cfg.global_.metrics == address
    again = c.parse_config(cfg.dump())
    assert again == cfg and again.global_.metrics == address
    assert ("metrics" in cfg.to_dict()["global"]) is (address is not None)


def test_metrics_off_is_the_default_and_bare_off_reads_as_off(tmp_path):
    assert c.parse_config(yaml.safe_dump(VALID)).global_.metrics is None
    text = yaml.safe_dump(VALID).replace("global:\n", "global:\n  metrics: off\n", 1)
    assert c.parse_config(text).global_.metrics is None


def test_port_unique_across_resources(tmp_path):
    data = copy.deepcopy(VALID)
    data["resources"]["r1"] = copy.deepcopy(data["resources"]["r0"])
    error = load_error(tmp_path, data)
    assert error.key == "resources.r1.port"
    assert "a port that no other resource uses (r0 uses 7789)" in str(error)


def with_r1(**alpha: str) -> dict[str, Any]:
    """VALID plus a resource r1 whose node alpha has the devices `alpha` (beta is its source)."""
    data = copy.deepcopy(VALID)
    data["resources"]["r1"] = {
        "port": 7790,
        "source": "beta",
        "nodes": {
            "beta": {
                "address": "10.0.0.2", "device": "/dev/vg0/mail", "metadata": "/dev/vg0/mail-md"
            },
            "alpha": {"address": "10.0.0.1", **alpha},
        },
        "targets": {"alpha": {"mode": "sync"}},
    }
    return data


@pytest.mark.parametrize(
    ("alpha", "key", "first"),
    [
        ({"device": "/dev/vg0/data"}, "device", f"{R0}.nodes.alpha.device is '/dev/vg0/data'"),
        ({"device": "/dev/vg0/data-md"}, "device",
         f"{R0}.nodes.alpha.metadata is '/dev/vg0/data-md'"),
        ({"device": "/dev/vg0/mail", "metadata": "/dev/vg0/data-md"}, "metadata",
         f"{R0}.nodes.alpha.metadata is '/dev/vg0/data-md'"),
        ({"device": "/dev/vg0/mail", "metadata": "/dev/vg0/data"}, "metadata",
         f"{R0}.nodes.alpha.device is '/dev/vg0/data'"),
    ],
    ids=["data is data", "data is metadata", "metadata is metadata", "metadata is data"],
)  # fmt: skip
def test_a_device_serves_one_resource_of_a_node(tmp_path, alpha, key, first):
    data = with_r1(**alpha)
    text = yaml.safe_dump(data, sort_keys=False)
    error = load_error(tmp_path, text)
    assert error.key == f"resources.r1.nodes.alpha.{key}"
    path = alpha[key]
    assert str(error).endswith(
        f"expected a device that no other resource uses on node alpha ({first}), "
        f"got '{path}', the same path"
    )
    assert text.splitlines()[error.line - 1].strip() == f"{key}: {path}"


def test_the_same_paths_on_other_nodes_or_distinct_are_fine(tmp_path):
    # beta has r0's paths of alpha (another machine); alpha's r1 devices are its own.
    data = with_r1(device="/dev/vg0/mail", metadata="/dev/vg0/mail-md")
    cfg = c.load_config(write(tmp_path, data))
    assert cfg.resource("r1").nodes["alpha"].device == cfg.resource("r1").nodes["beta"].device


def test_devices_that_exist_are_compared_as_the_file_they_are(tmp_path):
    data_img = tmp_path / "data.img"
    data_img.write_bytes(b"")
    (tmp_path / "by-id").mkdir()
    link = tmp_path / "by-id" / "disk-1"
    link.symlink_to(data_img)
    hard = tmp_path / "hard.img"
    os.link(data_img, hard)
    for other in (link, hard, tmp_path / "by-id" / ".." / "data.img"):
        data = copy.deepcopy(VALID)
        data["resources"]["r0"]["nodes"]["alpha"].update(device=str(data_img), metadata=str(other))
        error = load_error(tmp_path, data)
        assert error.key == f"{R0}.nodes.alpha.metadata"
        real = "" if other == hard else f" ({data_img})"  # a hard link resolves to itself
        assert str(error).endswith(
            f"got '{other}', on this machine the same file{real} as device '{data_img}'"
        )
    # across resources too
    data = with_r1(device=str(link))
    data["resources"]["r0"]["nodes"]["alpha"]["device"] = str(data_img)
    error = load_error(tmp_path, data)
    assert error.key == "resources.r1.nodes.alpha.device"
    assert str(error).endswith(f"got '{link}', on this machine the same file ({data_img})")


def test_devices_that_do_not_exist_are_compared_as_written(tmp_path):
    data = copy.deepcopy(VALID)
    alpha = data["resources"]["r0"]["nodes"]["alpha"]
    alpha.update(device=str(tmp_path / "absent" / "data"), metadata=str(tmp_path / "absent" / "md"))
    assert c.load_config(write(tmp_path, data)).resource("r0").nodes["alpha"].metadata is not None
    (tmp_path / "md-only").write_bytes(b"")  # one of the two exists: still compared as written
    alpha["metadata"] = str(tmp_path / "md-only")
    c.load_config(write(tmp_path, data))


def test_block_devices_are_compared_by_device_number(tmp_path, monkeypatch):
    # Two device nodes of one disk (as /dev/mapper/vg0-data and /dev/dm-3): no symlink between.
    nodes = {"/dev/mapper/vg0-data": 11, "/dev/dm-3": 12}
    real_stat = os.stat

    def fake_stat(path, *args, **kwargs):
        if str(path) in nodes:
            return types.SimpleNamespace(
                st_mode=stat.S_IFBLK | 0o660, st_dev=5, st_ino=nodes[str(path)],
                st_rdev=os.makedev(253, 3),
            )  # fmt: skip
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(c.os, "stat", fake_stat)
    data = copy.deepcopy(VALID)
    data["resources"]["r0"]["nodes"]["alpha"].update(device="/dev/mapper/vg0-data",
                                                     metadata="/dev/dm-3")  # fmt: skip
    error = load_error(tmp_path, data)
    assert error.key == f"{R0}.nodes.alpha.metadata"
    assert str(error).endswith(
        "got '/dev/dm-3', on this machine the same block device 253:3 as device "
        "'/dev/mapper/vg0-data'"
    )


def test_sync_timeout_takes_the_whole_kernel_range(tmp_path):
    for text, seconds in (("100ms", 0.1), ("0.1", 0.1), ("10m", 600.0), ("600s", 600.0)):
        data = copy.deepcopy(VALID)
        data["resources"]["r0"]["sync_timeout"] = text
        cfg = c.load_config(write(tmp_path, data))
        assert cfg.resource("r0").sync_timeout == seconds
        assert c.parse_config(cfg.dump()) == cfg
    assert (c.MIN_SYNC_TIMEOUT, c.MAX_SYNC_TIMEOUT) == (0.1, 600.0)
    kmod = (ROOT / "kmod" / "dm-repl-target.c").read_text()
    assert '{100, 600000, "Invalid sync_timeout_ms (100..600000)"}' in kmod


@pytest.mark.parametrize(
    ("ring", "lag"),
    [("1MiB", 768 * 1024), ("32MiB", 24 << 20), ("3MiB", 2304 * 1024), ("4GiB", 3 << 30)],
)
def test_default_max_lag_is_three_quarters_of_the_ring(tmp_path, ring, lag):
    data = copy.deepcopy(VALID)
    data["resources"]["r0"]["ring_size"] = ring
    del data["resources"]["r0"]["targets"]["gamma"]["max_lag"]
    cfg = c.load_config(write(tmp_path, data))
    res = cfg.resource("r0")
    assert res.targets["gamma"].max_lag == lag < res.ring_size
    assert res.targets["beta"].max_lag is None
    assert c.parse_config(cfg.dump()) == cfg


def test_default_max_lag_rounds_down_to_4kib():
    assert c.default_max_lag(32 << 20) == 24 << 20
    assert c.default_max_lag((1 << 20) + 4096) == 786432  # 789504 rounded down
    assert all(c.default_max_lag(n) % 4096 == 0 for n in range(1 << 20, 1 << 21, 4096))


def test_max_lag_just_below_the_ring_is_accepted(tmp_path):
    data = copy.deepcopy(VALID)
    data["resources"]["r0"]["targets"]["gamma"]["max_lag"] = (32 << 20) - 4096
    assert c.load_config(write(tmp_path, data)).resource("r0").targets["gamma"].max_lag == (
        (32 << 20) - 4096
    )


def test_the_reserved_node_names_are_documented():
    text = (ROOT / "docs" / "config.md").read_text()
    for name in c.RESERVED_NODE_NAMES:
        assert f"`{name}`" in text and f"`{name}.json`" in text


def test_line_numbers_point_at_the_key(tmp_path):
    text = yaml.safe_dump(VALID, sort_keys=False).replace("mode: async", "mode: asink")
    error = load_error(tmp_path, text)
    line = text.splitlines()[error.line - 1]
    assert "asink" in line


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = "resources:\n  r0:\n    port: 7789\n    nodes: {alpha: [\n"
    error = load_error(tmp_path, text)
    assert error.line is not None
    assert str(error).startswith(f"{tmp_path}/repctl.yaml:{error.line}: expected valid YAML, got")
    tab = load_error(tmp_path, "resources:\n\tr0: {}\n")
    assert tab.line == 2


def test_duplicate_key_is_an_error(tmp_path):
    text = "resources:\n  r0:\n    port: 7789\n    port: 7790\n"
    error = load_error(tmp_path, text)
    assert (error.key, error.line) == ("resources.r0.port", 4)
    assert "'port' again (first on line 3)" in str(error)


def test_yaml_boolean_as_a_name_gets_a_hint(tmp_path):
    data = copy.deepcopy(VALID)
    data["resources"]["r0"]["nodes"][True] = {"address": "h", "device": "/d"}
    error = load_error(tmp_path, data)
    assert "quote it" in str(error)


def test_empty_file_and_non_mapping(tmp_path):
    assert "required key 'resources'" in str(load_error(tmp_path, ""))
    assert "a mapping with keys global, resources, got a list" in str(load_error(tmp_path, "- 1\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match=r"/nonexistent/repctl\.yaml: expected a readable"):
        c.load_config("/nonexistent/repctl.yaml")


def test_local_node(monkeypatch):
    cfg = c.parse_config(yaml.safe_dump(VALID), "x.yaml")
    assert cfg.local_node("r0", "beta").name == "beta"
    assert cfg.local_node("r0", "beta.example.com").name == "beta"
    monkeypatch.setattr(c.socket, "gethostname", lambda: "gamma")
    assert cfg.local_node("r0").name == "gamma"
    with pytest.raises(ConfigError) as info:
        cfg.local_node("r0", "zeta.example.com")
    assert str(info.value) == (
        "x.yaml: resources.r0.nodes: expected a node named after this host "
        "('zeta.example.com'), got alpha, beta, gamma"
    )
    with pytest.raises(ConfigError, match="expected a resource named 'r9', got r0"):
        cfg.local_node("r9", "alpha")


def secret_config(tmp_path: Path, content: bytes, mode: int) -> tuple[c.Config, Path]:
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    os.chmod(secret, mode)
    data = copy.deepcopy(VALID)
    data["global"]["secret_file"] = str(secret)
    return c.parse_config(yaml.safe_dump(data), "x.yaml"), secret


def test_read_secret(tmp_path):
    cfg, _ = secret_config(tmp_path, b"0123456789abcdef0123\n", 0o600)
    assert cfg.read_secret("r0") == b"0123456789abcdef0123"


@pytest.mark.parametrize(
    ("content", "mode", "text"),
    [
        (b"short\n", 0o600, "with 5 bytes"),
        (b"0123456789abcdef0123", 0o644, "with mode -rw-r--r--"),
    ],
)
def test_bad_secret(tmp_path, content, mode, text):
    cfg, secret = secret_config(tmp_path, content, mode)
    with pytest.raises(ConfigError) as info:
        cfg.read_secret("r0")
    assert info.value.key == "resources.r0.secret_file"
    assert f"{secret} {text}" in str(info.value)


def test_missing_secret(tmp_path):
    cfg, secret = secret_config(tmp_path, b"", 0o600)
    secret.unlink()
    with pytest.raises(ConfigError, match="No such file"):
        cfg.read_secret("r0")


@pytest.mark.parametrize(
    ("text", "size"),
    [(512, 512), ("512", 512), ("512B", 512), ("4KiB", 4096), ("64K", 65536), ("64k", 65536),
     ("1MiB", 1 << 20), ("1M", 1 << 20), ("2GiB", 2 << 30), ("1TiB", 1 << 40), (" 4 KiB ", 4096)],
)  # fmt: skip
def test_parse_size(text, size):
    assert c.parse_size(text) == size
    assert c.parse_size(c.format_size(size)) == size


@pytest.mark.parametrize("text", ["4KB", "1.5MiB", "-1", "MiB", True, None, "4 KiBs"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="expected a size"):
        c.parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), ("5", 5.0), (0.25, 0.25), ("500ms", 0.5), ("5s", 5.0), ("1.5s", 1.5), ("2m", 120.0),
     ("1h", 3600.0), ("1.1s", 1.1), ("1.5ms", 0.0015)],
)  # fmt: skip
def test_parse_duration(text, seconds):
    assert c.parse_duration(text) == pytest.approx(seconds)
    assert c.parse_duration(c.format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 sec", "-1s", True, "1d", "s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="expected a duration"):
        c.parse_duration(text)


# --------------------------------------------------------------------------------------------
# fencing, hook_timeout, hooks, actions; Resource.targets_for
# --------------------------------------------------------------------------------------------


def full() -> dict[str, Any]:
    """VALID with every failover key set."""
    data = copy.deepcopy(VALID)
    data["resources"]["r0"].update(
        fencing="resource-and-stonith",
        after_split_brain="discard-least-changes",
        hook_timeout="2m",
        hooks={
            "fence-peer": "/usr/local/sbin/fence-peer --ipmi",
            "after-promote": ["/usr/local/bin/notify 'r0 is up' \"it's me\"", "/bin/true"],
            "split-brain": ["/usr/local/bin/page"],
        },
        actions=[
            {"mount": {"mountpoint": "/srv/r0", "fstype": "ext4", "options": "noatime,discard"}},
            {"mount": {"mountpoint": "/srv/r0 logs"}},
            {"service": "postgresql@15-main.service"},
            {"address": {"ip": "10.0.0.100/255.255.255.0", "interface": "eth0"}},
            {"address": {"ip": "FD00::100/64", "interface": "eth0.20"}},
        ],
    )
    return data


def test_failover_keys_load(tmp_path):
    res = c.load_config(write(tmp_path, full())).resource("r0")
    assert res.fencing is c.Fencing.RESOURCE_AND_STONITH
    assert res.after_split_brain is c.SplitBrainPolicy.DISCARD_LEAST_CHANGES
    assert res.hook_timeout == 120.0
    assert dict(res.hooks) == {
        c.HookEvent.FENCE_PEER: (("/usr/local/sbin/fence-peer", "--ipmi"),),
        c.HookEvent.AFTER_PROMOTE: (
            ("/usr/local/bin/notify", "r0 is up", "it's me"),
            ("/bin/true",),
        ),
        c.HookEvent.SPLIT_BRAIN: (("/usr/local/bin/page",),),
    }
    assert res.hooks["split-brain"] == (("/usr/local/bin/page",),)  # a HookEvent is its name
    assert res.actions == (
        c.MountAction(Path("/srv/r0"), "ext4", "noatime,discard"),
        c.MountAction(Path("/srv/r0 logs")),
        c.ServiceAction("postgresql@15-main.service"),
        c.AddressAction(ipaddress.ip_interface("10.0.0.100/24"), "eth0"),
        c.AddressAction(ipaddress.ip_interface("fd00::100/64"), "eth0.20"),
    )
    assert res.mapper_path == Path("/dev/mapper/r0")
    with pytest.raises(TypeError):
        res.hooks[c.HookEvent.OUT_OF_SYNC] = ()  # type: ignore[index]


def test_failover_keys_round_trip(tmp_path):
    cfg = c.load_config(write(tmp_path, full()))
    text = cfg.dump()
    again = c.parse_config(text)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    r0 = cfg.to_dict()["resources"]["r0"]
    assert r0["fencing"] == "resource-and-stonith" and r0["hook_timeout"] == "2m"
    assert r0["after_split_brain"] == "discard-least-changes"
    assert r0["hooks"]["fence-peer"] == "/usr/local/sbin/fence-peer --ipmi"
    assert r0["actions"][3] == {"address": {"ip": "10.0.0.100/24", "interface": "eth0"}}
    assert r0["actions"][1] == {"mount": {"mountpoint": "/srv/r0 logs"}}


def test_failover_keys_default(tmp_path):
    res = c.load_config(write(tmp_path, VALID)).resource("r0")
    assert (res.fencing, res.hook_timeout, dict(res.hooks), res.actions) == (
        c.Fencing.NONE, 30.0, {}, ()
    )  # fmt: skip
    r0 = res.__class__(  # the fields before these keys are enough to make a Resource
        res.name, res.port, res.chunk_size, res.ring_size, res.sync_timeout, res.source,
        res.secret_file, res.nodes, res.targets,
    )  # fmt: skip
    assert r0 == res


def test_hook_timeout_bounds(tmp_path):
    for text, seconds in (("1s", 1.0), ("1h", 3600.0), (45, 45.0), ("60m", 3600.0)):
        data = copy.deepcopy(VALID)
        data["resources"]["r0"]["hook_timeout"] = text
        assert c.load_config(write(tmp_path, data)).resource("r0").hook_timeout == seconds


def test_every_hook_event_is_a_key():
    assert list(c._HOOK_KEYS) == [
        "fence-peer", "before-promote", "after-promote", "before-demote", "after-demote",
        "before-resync-target", "after-resync-target", "split-brain", "out-of-sync",
    ]  # fmt: skip
    assert [e.value for e in c.HookEvent] == list(c._HOOK_KEYS)


def test_the_example_shows_every_failover_key():
    cfg = c.load_config(ROOT / "docs" / "examples" / "repctl.yaml")
    res = cfg.resource("r0")
    assert res.fencing is c.Fencing.RESOURCE_AND_STONITH and c.HookEvent.FENCE_PEER in res.hooks
    assert {type(a) for a in res.actions} == {c.MountAction, c.AddressAction, c.ServiceAction}


def topology(targets: dict[str, Any], extra_nodes: tuple[str, ...] = ()) -> c.Resource:
    data = copy.deepcopy(VALID)
    r0 = data["resources"]["r0"]
    for i, name in enumerate(extra_nodes):
        r0["nodes"][name] = {"address": f"10.0.1.{i + 1}", "device": "/dev/x"}
    r0["targets"] = targets
    return c.parse_config(yaml.safe_dump(data)).resource("r0")


def test_targets_for_the_source_are_the_targets():
    res = topology({"beta": {"mode": "sync"}, "gamma": {"mode": "async", "max_lag": "16MiB"}})
    assert res.targets_for("alpha") == res.targets


def test_targets_for_a_promoted_target():
    res = topology({"beta": {"mode": "sync"}, "gamma": {"mode": "async", "max_lag": "16MiB"}})
    sync, lagging = c.TargetMode.SYNC, c.TargetMode.ASYNC
    beta = res.targets_for("beta")
    # the source takes beta's place and mode; gamma keeps its entry
    assert list(beta.items()) == [
        ("alpha", c.Target("alpha", sync, None)),
        ("gamma", c.Target("gamma", lagging, 16 << 20)),
    ]
    gamma = res.targets_for("gamma")
    assert list(gamma.items()) == [
        ("beta", c.Target("beta", sync, None)),
        ("alpha", c.Target("alpha", lagging, 16 << 20)),
    ]
    with pytest.raises(TypeError):
        beta["delta"] = c.Target("delta", sync, None)  # type: ignore[index]


def test_compression_per_target_defaults_and_round_trips():
    res = topology({"beta": {"mode": "sync", "compression": "lz4"},
                    "gamma": {"mode": "async", "compression": "zstd"}}, extra_nodes=("delta",))
    assert res.targets["beta"].compression is c.Compression.LZ4
    assert res.targets["beta"].compression_level is None
    assert res.targets["gamma"].compression is c.Compression.ZSTD
    assert res.targets["gamma"].compression_level == 3  # zstd's default, made explicit
    cfg = c.parse_config(yaml.safe_dump(VALID))
    assert all(t.compression is c.Compression.NONE and t.compression_level is None
               for t in cfg.resource("r0").targets.values())  # the default: none
    assert "compression" not in yaml.safe_dump(cfg.to_dict())
    data = copy.deepcopy(VALID)
    data["resources"]["r0"]["targets"]["gamma"].update(compression="zstd", compression_level=19)
    cfg = c.parse_config(yaml.safe_dump(data))
    assert cfg.resource("r0").targets["gamma"].compression_level == 19
    assert c.parse_config(cfg.dump()) == cfg
    assert cfg.to_dict()["resources"]["r0"]["targets"]["gamma"] == {
        "mode": "async", "max_lag": "16MiB", "compression": "zstd", "compression_level": 19}


def test_targets_for_keeps_the_compression_of_the_promoted_node():
    res = topology({"beta": {"mode": "sync", "compression": "zstd", "compression_level": 1},
                    "gamma": {"mode": "async", "compression": "lz4"}})
    assert res.targets_for("beta")["alpha"] == c.Target(
        "alpha", c.TargetMode.SYNC, None, c.Compression.ZSTD, 1)
    assert res.targets_for("beta")["gamma"] == res.targets["gamma"]


def test_targets_for_an_ha_pair_is_symmetric():
    res = topology({"beta": {"mode": "async", "max_lag": "8MiB"}})
    assert dict(res.targets_for("beta")) == {
        "alpha": c.Target("alpha", c.TargetMode.ASYNC, 8 << 20)
    }


def test_targets_for_leaves_out_nodes_that_are_no_target():
    res = topology({"beta": {"mode": "sync"}}, extra_nodes=("delta",))
    assert set(res.nodes) == {"alpha", "beta", "gamma", "delta"}
    assert list(res.targets_for("beta")) == ["alpha"]
    for node in ("gamma", "delta", "zeta"):
        with pytest.raises(ValueError, match=f"'{node}' cannot be the primary of r0: it is "
                           r"neither the source \(alpha\) nor a target \(beta\)"):  # fmt: skip
            res.targets_for(node)
