"""The DM ioctl structures of repctl.dm against the real header, and the data-area codecs.

Needs no privileges and no device-mapper: the layouts are checked against a C program
compiled with the host's <linux/dm-ioctl.h>, the codecs on synthetic buffers laid out the
way drivers/md/dm-ioctl.c lays them out.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from repctl import dm
from repctl.dm import Cmd, DMError, DMFlag, Target

HEADER = Path("/usr/include/linux/dm-ioctl.h")

# (struct, fields) whose sizeof and offsetof the C side prints.
LAYOUT = {
    "dm_ioctl": ["version", "data_size", "data_start", "target_count", "open_count", "flags",
                 "event_nr", "padding", "dev", "name", "uuid", "data"],
    "dm_target_spec": ["sector_start", "length", "status", "next", "target_type"],
    "dm_target_deps": ["count", "padding", "dev"],
    "dm_name_list": ["dev", "next", "name"],
    "dm_target_versions": ["next", "version", "name"],
    "dm_target_msg": ["sector", "message"],
}
IOCTLS = {
    "DM_VERSION": Cmd.VERSION, "DM_REMOVE_ALL": Cmd.REMOVE_ALL,
    "DM_LIST_DEVICES": Cmd.LIST_DEVICES, "DM_DEV_CREATE": Cmd.DEV_CREATE,
    "DM_DEV_REMOVE": Cmd.DEV_REMOVE, "DM_DEV_RENAME": Cmd.DEV_RENAME,
    "DM_DEV_SUSPEND": Cmd.DEV_SUSPEND, "DM_DEV_STATUS": Cmd.DEV_STATUS,
    "DM_DEV_WAIT": Cmd.DEV_WAIT, "DM_DEV_ARM_POLL": Cmd.DEV_ARM_POLL,
    "DM_TABLE_LOAD": Cmd.TABLE_LOAD, "DM_TABLE_CLEAR": Cmd.TABLE_CLEAR,
    "DM_TABLE_DEPS": Cmd.TABLE_DEPS, "DM_TABLE_STATUS": Cmd.TABLE_STATUS,
    "DM_LIST_VERSIONS": Cmd.LIST_VERSIONS, "DM_GET_TARGET_VERSION": Cmd.GET_TARGET_VERSION,
    "DM_TARGET_MSG": Cmd.TARGET_MSG, "DM_DEV_SET_GEOMETRY": Cmd.DEV_SET_GEOMETRY,
}
FLAGS = {f"DM_{flag.name}_FLAG": flag for flag in DMFlag}
FLAGS["DM_DEFERRED_REMOVE"] = FLAGS.pop("DM_DEFERRED_REMOVE_FLAG")  # the header's spelling
CONSTANTS = {
    "DM_NAME_LEN": dm.DM_NAME_LEN, "DM_UUID_LEN": dm.DM_UUID_LEN,
    "DM_MAX_TYPE_NAME": dm.DM_MAX_TYPE_NAME, "DM_IOCTL": dm.DM_IOCTL,
    "DM_VERSION_MAJOR": dm.DM_VERSION_SENT[0],
    "DM_NAME_LIST_FLAG_HAS_UUID": dm.DM_NAME_LIST_FLAG_HAS_UUID,
    "DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID": dm.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID,
}


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """name -> value for every layout fact, ioctl number and flag, as C sees them."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is missing (install linux-libc-dev)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/ioctl.h>',
             '#include <linux/dm-ioctl.h>',
             'int main(void) {']
    for struct_name, fields in LAYOUT.items():
        lines.append(f'printf("sizeof {struct_name} %zu\\n", sizeof(struct {struct_name}));')
        for field in fields:
            lines.append(f'printf("offsetof {struct_name}.{field} %zu\\n", '
                         f'offsetof(struct {struct_name}, {field}));')
    for name in [*IOCTLS, *FLAGS, *CONSTANTS]:
        lines.append(f'printf("{name} %lu\\n", (unsigned long)({name}));')
    lines += ['return 0;', '}']
    tmp = tmp_path_factory.mktemp("dmc")
    (tmp / "layout.c").write_text("\n".join(lines) + "\n")
    cc = subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(tmp / "layout"),
                         str(tmp / "layout.c")], check=False, capture_output=True, text=True,
                        timeout=60)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(tmp / "layout")], check=True, capture_output=True, text=True,
                         timeout=10).stdout
    values = {}
    for line in out.splitlines():
        key, value = line.rsplit(" ", 1)
        values[key] = int(value)
    return values


@pytest.mark.parametrize("struct_name", list(LAYOUT))
def test_struct_layout_matches_header(c_values: dict[str, int], struct_name: str) -> None:
    assert dm.ffi.sizeof(f"struct {struct_name}") == c_values[f"sizeof {struct_name}"]
    for field in LAYOUT[struct_name]:
        assert (dm.ffi.offsetof(f"struct {struct_name}", field)
                == c_values[f"offsetof {struct_name}.{field}"]), field


def test_ioctl_numbers_match_header(c_values: dict[str, int]) -> None:
    for name, cmd in IOCTLS.items():
        assert dm.ioctl_number(cmd) == c_values[name], name


def test_flags_and_constants_match_header(c_values: dict[str, int]) -> None:
    for name, flag in FLAGS.items():
        assert int(flag) == c_values[name], name
    for name, value in CONSTANTS.items():
        assert value == c_values[name], name


def test_known_values() -> None:
    """Facts that hold whatever the host's header: a guard if the C side is skipped."""
    assert dm.HEADER_SIZE == 312
    assert dm.SPEC_SIZE == 40
    assert dm.ioctl_number(Cmd.VERSION) == 0xC138FD00
    assert dm.ioctl_number(Cmd.TABLE_LOAD) == 0xC138FD09


# --- Packing a table -----------------------------------------------------------------------------


def _walk_like_kernel(data: bytes, count: int) -> list[tuple[int, int, str, str]]:
    """populate_table()'s walk: first spec at 0, each `next` relative to the current spec."""
    out, offset, nxt = [], 0, 0
    for _ in range(count):
        offset += nxt
        start, length, _status, nxt, ttype = struct.unpack_from("<QQiI16s", data, offset)
        params_end = data.index(b"\0", offset + 40)
        out.append((start, length, ttype.rstrip(b"\0").decode(),
                    data[offset + 40:params_end].decode()))
    return out


def test_pack_targets_layout_and_alignment() -> None:
    targets = [Target(0, 8, "linear", "/dev/loop0 0"),
               Target(8, 100, "zero", ""),
               Target(108, 4, "error", "x" * 13)]
    data = dm.pack_targets(targets)
    assert len(data) % 8 == 0
    # Record 1: 40 + len("/dev/loop0 0") + NUL = 53 -> 56; record 2: 40 + 1 -> 48.
    assert struct.unpack_from("<I", data, 20)[0] == 56
    assert struct.unpack_from("<I", data, 56 + 20)[0] == 48
    assert data[40:53] == b"/dev/loop0 0\0"
    assert data[53:56] == b"\0\0\0"  # padding
    assert len(data) == 56 + 48 + 56
    assert _walk_like_kernel(data, 3) == [(0, 8, "linear", "/dev/loop0 0"), (8, 100, "zero", ""),
                                          (108, 4, "error", "x" * 13)]


def test_pack_target_exact_multiple_of_8() -> None:
    # 40 + 7 + NUL = 48: no padding, next = 48.
    data = dm.pack_targets([Target(0, 1, "linear", "1234567")])
    assert len(data) == 48
    assert struct.unpack_from("<I", data, 20)[0] == 48


def test_unpack_status_specs_next_relative_to_first() -> None:
    """retrieve_status() lays specs out with `next` counted from the first spec."""
    def spec(start: int, length: int, ttype: str, nxt: int) -> bytes:
        return struct.pack("<QQiI16s", start, length, 0, nxt, ttype.encode())

    rec0 = spec(0, 8, "linear", 56) + b"7:0 0\0".ljust(16, b"\0")
    rec1 = spec(8, 16, "striped", 56 + 48) + b"\0".ljust(8, b"\0")
    rec2 = spec(24, 1, "error", 0) + b"\0"
    data = rec0 + rec1 + rec2
    assert dm.unpack_specs(data, 3) == [(0, 8, "linear", "7:0 0"), (8, 16, "striped", ""),
                                        (24, 1, "error", "")]
    assert dm.unpack_specs(b"", 0) == []


def test_unpack_specs_rejects_bad_offsets() -> None:
    rec = struct.pack("<QQiI16s", 0, 8, 0, 0, b"zero") + b"\0" * 8
    with pytest.raises(ValueError, match="does not advance"):
        dm.unpack_specs(rec + rec, 2)
    with pytest.raises(ValueError, match="outside"):
        dm.unpack_specs(rec[:30], 1)


def test_pack_message() -> None:
    data = dm.pack_message(2048, "@stats_list")
    assert data == struct.pack("<Q", 2048) + b"@stats_list\0"


# --- Unpacking replies ---------------------------------------------------------------------------


def _name_record(dev: int, name: str, event_nr: int | None, uuid: str | None,
                 flags: int = 0) -> bytes:
    """One dm_name_list record as list_devices() writes it, padded to 8, `next` left 0."""
    body = struct.pack("<QI", dev, 0) + name.encode() + b"\0"
    body = body.ljust(dm._align8(len(body)), b"\0")
    if event_nr is not None:
        body += struct.pack("<II", event_nr, flags)
        if uuid is not None:
            body += uuid.encode() + b"\0"
            body = body.ljust(dm._align8(len(body)), b"\0")
    return body


def _chain(records: list[bytes]) -> bytes:
    out = bytearray()
    for i, rec in enumerate(records):
        rec = bytearray(rec)
        if i + 1 < len(records):
            struct.pack_into("<I", rec, 8, len(rec))
        out += rec
    return bytes(out)


def test_parse_name_list_with_uuids() -> None:
    dev0 = (253 << 8) | 0
    dev1 = (253 << 8) | 0x34 | (0x12 << 20)  # minor 0x1234: huge_encode_dev splits it
    data = _chain([
        _name_record(dev0, "r0", 3, "REPL-abc", dm.DM_NAME_LIST_FLAG_HAS_UUID),
        _name_record(dev1, "a-much-longer-name", 0, None, dm.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID),
    ])
    devices = dm.parse_name_list(data)
    assert [(d.name, d.major, d.minor, d.event_nr, d.uuid) for d in devices] == [
        ("r0", 253, 0, 3, "REPL-abc"),
        ("a-much-longer-name", 253, 0x1234, 0, None),
    ]


def test_parse_name_list_old_kernel_without_event_nr() -> None:
    data = _chain([_name_record(253 << 8, "abcdefghijk", None, None),
                   _name_record((253 << 8) | 1, "b", None, None)])
    devices = dm.parse_name_list(data)
    assert [(d.name, d.minor, d.event_nr, d.uuid) for d in devices] == [
        ("abcdefghijk", 0, 0, None), ("b", 1, 0, None)]


def test_parse_name_list_empty() -> None:
    assert dm.parse_name_list(b"") == []
    assert dm.parse_name_list(b"\0" * 16) == []  # dev == 0: "no devices"


def test_parse_versions() -> None:
    def rec(name: str, version: tuple[int, int, int]) -> bytes:
        body = struct.pack("<4I", 0, *version) + name.encode() + b"\0"
        return body.ljust(dm._align8(len(body)), b"\0")

    recs = [bytearray(rec("striped", (1, 6, 0))), bytearray(rec("linear", (1, 4, 0))),
            bytearray(rec("error", (1, 5, 0)))]
    for r in recs[:-1]:
        struct.pack_into("<I", r, 0, len(r))
    versions = dm.parse_versions(b"".join(recs))
    assert [(v.name, v.version) for v in versions] == [
        ("striped", (1, 6, 0)), ("linear", (1, 4, 0)), ("error", (1, 5, 0))]


def test_decode_dev() -> None:
    assert dm.decode_dev((253 << 8) | 7) == (253, 7)
    # new_encode_dev: minor's high bits live above bit 20.
    assert dm.decode_dev((259 << 8) | 0x45 | (0x123 << 20)) == (259, 0x12345)


def test_kernel_text_prefers_the_device_table_line() -> None:
    lines = [
        "loop0: detected capacity change",
        "device-mapper: table: 253:1: linear: other device (-EINVAL)",
        "device-mapper: table: 253:0: repl: Invalid chunk size (-EINVAL)",
        "device-mapper: ioctl: error adding target to table",
    ]
    assert dm.kernel_text(lines, "253:0") == "repl: Invalid chunk size"
    assert dm.kernel_text(["device-mapper: table: 253:0: repl: bad: -EINVAL"]) == "repl: bad"
    assert (dm.kernel_text(["device-mapper: ioctl: Target type does not support messages"])
            == "Target type does not support messages")
    assert dm.kernel_text(["EXT4-fs (dm-0): mounted"]) == ""


def test_dmerror_message() -> None:
    e = DMError(22, "load table", "r0", "repl: Invalid chunk size")
    assert str(e) == "load table for 'r0' failed: repl: Invalid chunk size (EINVAL)"
    assert (e.errno, e.op, e.device) == (22, "load table", "r0")
    assert str(DMError(6, "remove", "nope")) == (
        "remove for 'nope' failed: No such device or address (ENXIO)")


# --- Input validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, match", [
    ("", "non-empty"),
    ("a" * 128, "shorter than 128"),
    ("a\0b", "NUL"),
    ("a/b", "'/'"),
    ("..", "reserved"),
    ("control", "reserved"),
])
def test_bad_names(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dm.check_name(name)


def test_longest_name_and_uuid_fit() -> None:
    assert len(dm.check_name("a" * 127)) == 127
    assert len(dm.check_uuid("u" * 128)) == 128
    with pytest.raises(ValueError, match="shorter than 129"):
        dm.check_uuid("u" * 129)
    # Length counts bytes, not characters.
    with pytest.raises(ValueError, match="128 bytes"):
        dm.check_name("é" * 64)


@pytest.mark.parametrize("targets, match", [
    ([], "at least one"),
    ([Target(1, 8, "zero", "")], "contiguous"),
    ([Target(0, 8, "zero", ""), Target(9, 8, "zero", "")], "contiguous"),
    ([Target(0, 0, "zero", "")], "at least one sector"),
    ([Target(0, -1, "zero", "")], "length"),
    ([Target(0, 8, "", "")], "word"),
    ([Target(0, 8, "a b", "")], "word"),
    ([Target(0, 8, "x" * 16, "")], "shorter than 16"),
    ([Target(0, 8, "zero", "a\0b")], "NUL"),
    ([Target(0, 8, "zero", "x" * (dm.MAX_PARAMS_LEN + 1))], "longer than"),
])
def test_bad_tables(targets: list[Target], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dm.check_targets(targets)


def test_bad_messages() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        dm.pack_message(0, "  ")
    with pytest.raises(ValueError, match="NUL"):
        dm.pack_message(0, "a\0")
    with pytest.raises(ValueError, match="sector"):
        dm.pack_message(-1, "x")


def test_validation_happens_before_the_kernel(tmp_path: Path) -> None:
    """Bad input raises ValueError even when no ioctl could be made: the kernel is never asked."""
    fake = tmp_path / "control"
    fake.write_bytes(b"")
    with dm.DMControl(str(fake)) as ctl:
        with pytest.raises(ValueError, match="'/'"):
            ctl.create("a/b")
        with pytest.raises(ValueError, match="contiguous"):
            ctl.load_table("r0", [Target(4, 8, "zero", "")])
        with pytest.raises(ValueError, match="NUL"):
            ctl.message("r0", 0, "a\0")
        with pytest.raises(ValueError, match="event_nr"):
            ctl.wait_event("r0", -1)
    with pytest.raises(ValueError, match="closed"):
        ctl.info("r0")


def test_ioctl_error_on_a_file_is_a_dmerror(tmp_path: Path) -> None:
    """The ioctl path end to end, on a plain file: the kernel answers ENOTTY."""
    fake = tmp_path / "control"
    fake.write_bytes(b"")
    with dm.DMControl(str(fake)) as ctl, pytest.raises(DMError) as err:
        ctl.info("r0")
    assert err.value.errno == 25  # ENOTTY
    assert err.value.op == "info" and err.value.device == "r0"


def test_open_missing_control_is_a_dmerror(tmp_path: Path) -> None:
    with pytest.raises(DMError) as err:
        dm.DMControl(str(tmp_path / "nope"))
    assert err.value.errno == 2
