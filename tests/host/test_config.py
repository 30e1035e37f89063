"""Configuration loading and validation: every defect names the file, the key path and the line."""

from __future__ import annotations

import copy
import dataclasses
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


def test_every_key_is_documented():
    text = (ROOT / "docs" / "config.md").read_text()
    tables = (c._TOP_KEYS, c._GLOBAL_KEYS, c._RESOURCE_KEYS, c._NODE_KEYS, c._TARGET_KEYS)
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
     "a mapping with keys address, device, metadata, got '10.0.0.2'"),
    ("bad node name", _set(f"{R0}.nodes.be ta", {"address": "h", "device": "/d"}),
     f"{R0}.nodes.be ta", "a node name"),
    ("bad resource name", _set("resources.r/0", {}), "resources.r/0", "a resource name"),
    ("global not a mapping", _set("global", ["x"]), "global",
     "a mapping with keys control_socket, state_dir, secret_file, got a list"),
    # A node's metadata is never its data device: create-md --force would format the data.
    ("metadata is the device", _set(f"{R0}.nodes.beta.metadata", "/dev/vg0/data"),
     f"{R0}.nodes.beta.metadata", "expected a metadata device other than the node's data device "
     "(repctl create-md would format the data), got '/dev/vg0/data', the same path as device "
     "'/dev/vg0/data'"),
    ("metadata is the device spelt otherwise",
     _set(f"{R0}.nodes.alpha.metadata", "/dev//vg0/./data/"),
     f"{R0}.nodes.alpha.metadata", "got '/dev/vg0/data', the same path as device"),
    # Node names that the daemon's state files of the resource are named after.
    ("node named generation", _set(f"{R0}.nodes.generation", {"address": "h", "device": "/d"}),
     f"{R0}.nodes.generation", "expected a node name other than generation, target (in "
     "/var/lib/repctl/r0/ the daemon keeps <target>.json beside its own generation.json and "
     "target.json), got 'generation'"),
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
     f"{R0}.targets.gamma.max_lag", "expected a max_lag below the ring_size of r0, 32MiB (the "
     "backlog is bytes of ring records: it never exceeds the ring), got '32MiB'"),
    ("max_lag above the ring", _set(f"{R0}.targets.gamma.max_lag", "256MiB"),
     f"{R0}.targets.gamma.max_lag", "below the ring_size of r0, 32MiB"),
    ("max_lag tiny", _set(f"{R0}.targets.gamma.max_lag", 1024), f"{R0}.targets.gamma.max_lag",
     "a size from 4KiB to 4GiB, got 1024"),
    ("ring_size in whole MiB", _set(f"{R0}.ring_size", "1536KiB"), f"{R0}.ring_size",
     "a size from 1MiB to 4GiB, a multiple of 1MiB, got '1536KiB'"),
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
