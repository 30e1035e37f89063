"""A device-mapper client that speaks the DM ioctl interface on /dev/mapper/control.

No dmsetup, no libdevmapper: the kernel structures are declared below as data (a cffi
``cdef`` in ABI mode, so nothing is compiled) and libc's ``ioctl`` is called directly.

The structures mirror ``include/uapi/linux/dm-ioctl.h``, DM ioctl interface version 4.
Rules of that interface this module relies on:

* Every ioctl takes one buffer: a ``struct dm_ioctl`` header, then a data area at
  ``data_start`` (we always put it at ``sizeof(struct dm_ioctl)``, 8-byte aligned).
  ``data_size`` is the size of the whole buffer, header included.
* The header's ``name`` selects the device (we never look devices up by uuid: the kernel
  refuses a request that carries both).
* Table loads carry ``struct dm_target_spec`` records, each followed by its NUL-terminated
  parameter string and padded to 8 bytes; ``next`` is the offset from that spec to the next.
  Status replies use the same records, but there ``next`` counts from the *first* spec.
* When a reply does not fit, the kernel sets ``DM_BUFFER_FULL_FLAG`` and returns success:
  we double the buffer and ask again.
* The kernel says *why* a table load or a target message failed only in its log
  (``device-mapper: table: 253:0: linear: Device lookup failed (-ENODEV)``); the ioctl
  returns a bare errno. For those calls we read the new lines of /dev/kmsg after a
  failure and put the text into :class:`DMError`.

udev: the kernel takes a udev "cookie" in ``event_nr`` for resume/remove/rename (a semaphore
id that libdevmapper waits on, plus DM_UDEV_* flags in its top 16 bits). We send 0, no cookie:
nothing waits, and the ioctls work the same with or without udev. Where udev runs with
Debian's 55-dm.rules, the resume's "change" uevent still gets its /dev/mapper/<name> symlink
(the rules fall back to their database for the flags); a later coldplug "add" event leaves
the device alone, as the rules do for any device not activated through libdevmapper.
:func:`create_device` waits briefly for that symlink; where udev or its dm rules do not run,
it makes /dev/mapper/<name> itself with ``os.mknod``, as libdevmapper does without udev, and
:func:`remove_device` removes such a node again.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import cffi

from repctl.errors import ReplError

__all__ = [
    "CONTROL_PATH",
    "DMControl",
    "DMError",
    "DMFlag",
    "DeviceInfo",
    "Target",
    "TargetStatus",
    "TargetVersion",
    "create_device",
    "remove_device",
]

# --- The uapi header, as data ------------------------------------------------------------

# Sizes from include/uapi/linux/dm-ioctl.h.
DM_MAX_TYPE_NAME = 16
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_IOCTL = 0xFD

# The version we send. The kernel accepts any request whose major equals its own and whose
# minor is not newer than its own; nothing here needs more than the first 4.x.
DM_VERSION_SENT = (4, 0, 0)

_CDEF = f"""
    /* include/uapi/linux/dm-ioctl.h, DM ioctl interface version 4 */
    struct dm_ioctl {{
        uint32_t version[3];
        uint32_t data_size;
        uint32_t data_start;
        uint32_t target_count;
        int32_t  open_count;
        uint32_t flags;
        uint32_t event_nr;
        uint32_t padding;
        uint64_t dev;
        char name[{DM_NAME_LEN}];
        char uuid[{DM_UUID_LEN}];
        char data[7];
    }};

    struct dm_target_spec {{
        uint64_t sector_start;
        uint64_t length;
        int32_t  status;
        uint32_t next;
        char target_type[{DM_MAX_TYPE_NAME}];
    }};

    struct dm_target_deps {{
        uint32_t count;
        uint32_t padding;
        uint64_t dev[];
    }};

    struct dm_name_list {{
        uint64_t dev;
        uint32_t next;
        char name[];
    }};

    struct dm_target_versions {{
        uint32_t next;
        uint32_t version[3];
        char name[];
    }};

    struct dm_target_msg {{
        uint64_t sector;
        char message[];
    }};

    int ioctl(int fd, unsigned long request, ...);
"""

# cffi has no static types for the structs: its cdata are `Any` to the type checker.
ffi: Any = cffi.FFI()
ffi.cdef(_CDEF)
_libc: Any = None  # opened on first use, so that importing this module never needs libc


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ffi.dlopen(None)
    return _libc


HEADER_SIZE: int = ffi.sizeof("struct dm_ioctl")  # 312
SPEC_SIZE: int = ffi.sizeof("struct dm_target_spec")  # 40
_NAME_LIST_NAME_OFF: int = ffi.offsetof("struct dm_name_list", "name")  # 12
_VERSIONS_NAME_OFF: int = ffi.offsetof("struct dm_target_versions", "name")  # 16
_MSG_TEXT_OFF: int = ffi.offsetof("struct dm_target_msg", "message")  # 8


class Cmd(enum.IntEnum):
    """DM_*_CMD numbers (the enum in dm-ioctl.h). Fixed by the kernel ABI; never renumber."""

    VERSION = 0
    REMOVE_ALL = 1
    LIST_DEVICES = 2
    DEV_CREATE = 3
    DEV_REMOVE = 4
    DEV_RENAME = 5
    DEV_SUSPEND = 6
    DEV_STATUS = 7
    DEV_WAIT = 8
    TABLE_LOAD = 9
    TABLE_CLEAR = 10
    TABLE_DEPS = 11
    TABLE_STATUS = 12
    LIST_VERSIONS = 13
    TARGET_MSG = 14
    DEV_SET_GEOMETRY = 15
    DEV_ARM_POLL = 16
    GET_TARGET_VERSION = 17


def _IOWR(type_: int, nr: int, size: int) -> int:  # named after the C macro
    """The ioctl number _IOWR(type, nr, size) in the asm-generic layout (x86, arm, riscv)."""
    ioc_read_write = 3
    return (ioc_read_write << 30) | (size << 16) | (type_ << 8) | nr


def ioctl_number(cmd: Cmd) -> int:
    """The request number of a DM command, as the header's DM_* macros compute it."""
    return _IOWR(DM_IOCTL, int(cmd), HEADER_SIZE)


class DMFlag(enum.IntFlag):
    """Bits of dm_ioctl.flags, numbered as in dm-ioctl.h."""

    READONLY = 1 << 0
    SUSPEND = 1 << 1
    PERSISTENT_DEV = 1 << 3
    STATUS_TABLE = 1 << 4
    ACTIVE_PRESENT = 1 << 5
    INACTIVE_PRESENT = 1 << 6
    BUFFER_FULL = 1 << 8
    SKIP_BDGET = 1 << 9
    SKIP_LOCKFS = 1 << 10
    NOFLUSH = 1 << 11
    QUERY_INACTIVE_TABLE = 1 << 12
    UEVENT_GENERATED = 1 << 13
    UUID = 1 << 14
    SECURE_DATA = 1 << 15
    DATA_OUT = 1 << 16
    DEFERRED_REMOVE = 1 << 17
    INTERNAL_SUSPEND = 1 << 18
    IMA_MEASUREMENT = 1 << 19


_NO_FLAGS = DMFlag(0)

# dm_name_list: the word after event_nr says whether a uuid follows (kernel 4.45+).
DM_NAME_LIST_FLAG_HAS_UUID = 1
DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2

CONTROL_PATH = "/dev/mapper/control"
MAPPER_DIR = "/dev/mapper"

# Our own limits, not the kernel's: a reply buffer starts at 16 KiB and doubles up to 64 MiB;
# a target's parameter string may be up to 1 MiB.
DEFAULT_BUFFER_SIZE = 16 * 1024
MAX_BUFFER_SIZE = 64 * 1024 * 1024
MAX_PARAMS_LEN = 1024 * 1024

_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1


def _align8(n: int) -> int:
    return (n + 7) & ~7


# --- Values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One line of a table: `length` sectors (512 bytes) from `start`, mapped by `target_type`."""

    start: int
    length: int
    target_type: str
    params: str


@dataclass(frozen=True)
class TargetStatus:
    """One target's status line (DM_TABLE_STATUS without DM_STATUS_TABLE_FLAG)."""

    start: int
    length: int
    target_type: str
    text: str


@dataclass(frozen=True)
class TargetVersion:
    """A target type the kernel knows, with its version."""

    name: str
    version: tuple[int, int, int]


@dataclass(frozen=True)
class DeviceInfo:
    """What the kernel reports about one mapped device.

    `list_devices` fills only name, major, minor, event_nr and uuid (where the kernel gives
    it); the other fields are then 0.
    """

    name: str
    major: int
    minor: int
    uuid: str | None = None
    open_count: int = 0
    event_nr: int = 0
    target_count: int = 0
    flags: DMFlag = _NO_FLAGS

    @property
    def suspended(self) -> bool:
        return bool(self.flags & DMFlag.SUSPEND)

    @property
    def active_table(self) -> bool:
        return bool(self.flags & DMFlag.ACTIVE_PRESENT)

    @property
    def inactive_table(self) -> bool:
        return bool(self.flags & DMFlag.INACTIVE_PRESENT)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & DMFlag.READONLY)

    @property
    def path(self) -> str:
        """/dev/mapper/<name> (present once udev or :func:`create_device` made it)."""
        return os.path.join(MAPPER_DIR, self.name)


class DMError(ReplError):
    """A DM ioctl failed. `errno` is the kernel's error, `op` what we asked, `device` of whom.

    `kernel_text` is what the kernel logged about the failure (a target's ``ti->error``), or
    "" when there is none; the message includes it where there is one.
    """

    def __init__(self, err: int, op: str, device: str | None, kernel_text: str = "") -> None:
        self.errno = err
        self.op = op
        self.device = device
        self.kernel_text = kernel_text
        what = f"{op} for '{device}'" if device is not None else op
        why = kernel_text or os.strerror(err)
        super().__init__(f"{what} failed: {why} ({errno_mod.errorcode.get(err, str(err))})")


# --- Input validation ------------------------------------------------------------------------


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def check_name(name: str) -> bytes:
    """Return `name` encoded, or raise ValueError if the kernel could not take it as a name."""
    if not isinstance(name, str) or not name:
        raise ValueError("device name must be a non-empty string")
    raw = _encode(name)
    if b"\0" in raw:
        raise ValueError(f"device name {name!r} contains a NUL byte")
    if len(raw) >= DM_NAME_LEN:
        raise ValueError(
            f"device name {name!r} is {len(raw)} bytes; it must be shorter than {DM_NAME_LEN}"
        )
    if "/" in name:
        raise ValueError(f"device name {name!r} contains '/'")
    if name in (".", "..", "control"):
        raise ValueError(f"device name {name!r} is reserved")
    return raw


def check_uuid(uuid: str) -> bytes:
    """Return `uuid` encoded, or raise ValueError if it does not fit the header."""
    if not isinstance(uuid, str) or not uuid:
        raise ValueError("uuid must be a non-empty string (or None)")
    raw = _encode(uuid)
    if b"\0" in raw:
        raise ValueError(f"uuid {uuid!r} contains a NUL byte")
    if len(raw) >= DM_UUID_LEN:
        raise ValueError(f"uuid {uuid!r} is {len(raw)} bytes; it must be shorter than {DM_UUID_LEN}")
    return raw


def check_targets(targets: Sequence[Target]) -> None:
    """Raise ValueError unless `targets` is a table the kernel could accept in form.

    The kernel wants at least one target, each non-empty, contiguous from sector 0.
    """
    if not targets:
        raise ValueError("a table needs at least one target")
    expected = 0
    for i, t in enumerate(targets):
        if not isinstance(t, Target):
            raise TypeError(f"target {i} is {type(t).__name__}, not Target")
        for field in ("start", "length"):
            value = getattr(t, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64_MAX:
                raise ValueError(f"target {i}: {field} must be an integer in 0..2**64-1")
        if t.length == 0:
            raise ValueError(f"target {i}: length must be at least one sector")
        if t.start != expected:
            raise ValueError(
                f"target {i} starts at sector {t.start}; the table needs it at {expected} "
                "(targets must be contiguous from sector 0)"
            )
        expected = t.start + t.length
        type_raw = _encode(t.target_type) if isinstance(t.target_type, str) else b""
        if not type_raw or b"\0" in type_raw or b" " in type_raw:
            raise ValueError(f"target {i}: target type {t.target_type!r} must be a word")
        if len(type_raw) >= DM_MAX_TYPE_NAME:
            raise ValueError(
                f"target {i}: target type {t.target_type!r} must be shorter than "
                f"{DM_MAX_TYPE_NAME} bytes"
            )
        if not isinstance(t.params, str):
            raise TypeError(f"target {i}: params must be a string")
        params_raw = _encode(t.params)
        if b"\0" in params_raw:
            raise ValueError(f"target {i}: params contain a NUL byte")
        if len(params_raw) > MAX_PARAMS_LEN:
            raise ValueError(f"target {i}: params longer than {MAX_PARAMS_LEN} bytes")
    if expected - 1 > _U64_MAX:
        raise ValueError("table ends beyond sector 2**64-1")


def _check_message(sector: int, text: str) -> bytes:
    if not isinstance(sector, int) or isinstance(sector, bool) or not 0 <= sector <= _U64_MAX:
        raise ValueError("message sector must be an integer in 0..2**64-1")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("message text must be a non-empty string")
    raw = _encode(text)
    if b"\0" in raw:
        raise ValueError("message text contains a NUL byte")
    if len(raw) > MAX_PARAMS_LEN:
        raise ValueError(f"message longer than {MAX_PARAMS_LEN} bytes")
    return raw


# --- Packing and unpacking the data area -----------------------------------------------------


def decode_dev(dev: int) -> tuple[int, int]:
    """(major, minor) from a dm_ioctl/dm_name_list `dev` (the kernel's huge_encode_dev)."""
    major = (dev >> 8) & 0xFFF
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return major, minor


def _cstr(data: bytes, start: int, end: int) -> tuple[str, int]:
    """The NUL-terminated string at data[start:end] and the offset just past its NUL."""
    nul = data.find(b"\0", start, end)
    if nul < 0:
        raise ValueError(f"string at offset {start} is not NUL-terminated before {end}")
    return _decode(data[start:nul]), nul + 1


def pack_targets(targets: Sequence[Target]) -> bytes:
    """The DM_TABLE_LOAD data area: per target a dm_target_spec, its params and a NUL,
    padded to 8 bytes, with `next` the offset from this spec to the following one."""
    check_targets(targets)
    out = bytearray()
    for t in targets:
        params = _encode(t.params) + b"\0"
        record = _align8(SPEC_SIZE + len(params))
        spec = ffi.new("struct dm_target_spec *")
        spec.sector_start = t.start
        spec.length = t.length
        spec.status = 0
        spec.next = record
        type_raw = _encode(t.target_type)
        ffi.memmove(spec.target_type, type_raw, len(type_raw))
        out += bytes(ffi.buffer(spec))
        out += params
        out += b"\0" * (record - SPEC_SIZE - len(params))
    return bytes(out)


def unpack_specs(data: bytes, count: int) -> list[tuple[int, int, str, str]]:
    """(start, length, type, text) for `count` specs of a DM_TABLE_STATUS reply's data area,
    where each `next` counts from the first spec (offset 0 of `data`)."""
    specs = []
    view = ffi.from_buffer(data)
    offset = 0
    for i in range(count):
        if offset % 8 or offset + SPEC_SIZE > len(data):
            raise ValueError(f"target spec {i} at offset {offset} lies outside the reply")
        spec = ffi.cast("struct dm_target_spec *", view + offset)
        target_type = _decode(ffi.string(spec.target_type, DM_MAX_TYPE_NAME))
        text, _ = _cstr(data, offset + SPEC_SIZE, len(data))
        specs.append((int(spec.sector_start), int(spec.length), target_type, text))
        if i + 1 < count:
            if spec.next <= offset:
                raise ValueError(f"target spec {i}: next offset {spec.next} does not advance")
            offset = int(spec.next)
    return specs


def parse_name_list(data: bytes) -> list[DeviceInfo]:
    """Devices of a DM_LIST_DEVICES reply's data area (a chain of dm_name_list records)."""
    devices: list[DeviceInfo] = []
    if len(data) < 8:
        return devices
    view = ffi.from_buffer(data)
    offset = 0
    while True:
        if offset % 8 or offset + _NAME_LIST_NAME_OFF > len(data):
            raise ValueError(f"name list record at offset {offset} lies outside the reply")
        rec = ffi.cast("struct dm_name_list *", view + offset)
        if rec.dev == 0:  # the kernel's "no devices"
            break
        end = offset + rec.next if rec.next else len(data)
        if end > len(data):
            raise ValueError(f"name list record at offset {offset} runs past the reply")
        name, after = _cstr(data, offset + _NAME_LIST_NAME_OFF, end)
        event_nr, uuid = 0, None
        extra = _align8(after)
        if extra + 8 <= end:  # event_nr and flags words (kernels since 4.37)
            event_nr, list_flags = ffi.cast("uint32_t *", view + extra)[0:2]
            if list_flags & DM_NAME_LIST_FLAG_HAS_UUID:
                uuid, _ = _cstr(data, extra + 8, end)
        major, minor = decode_dev(int(rec.dev))
        devices.append(DeviceInfo(name=name, major=major, minor=minor, uuid=uuid,
                                  event_nr=int(event_nr)))
        if not rec.next:
            break
        offset += int(rec.next)
    return devices


def parse_versions(data: bytes) -> list[TargetVersion]:
    """Target types of a DM_LIST_VERSIONS reply's data area (dm_target_versions records)."""
    versions: list[TargetVersion] = []
    view = ffi.from_buffer(data)
    offset = 0
    while offset + _VERSIONS_NAME_OFF < len(data):
        if offset % 8:
            raise ValueError(f"version record at offset {offset} is not 8-byte aligned")
        rec = ffi.cast("struct dm_target_versions *", view + offset)
        end = offset + rec.next if rec.next else len(data)
        name, _ = _cstr(data, offset + _VERSIONS_NAME_OFF, min(end, len(data)))
        if name:
            v = rec.version
            versions.append(TargetVersion(name, (int(v[0]), int(v[1]), int(v[2]))))
        if not rec.next:
            break
        offset += int(rec.next)
    return versions


def pack_message(sector: int, text: str) -> bytes:
    """The DM_TARGET_MSG data area: a dm_target_msg (sector) then the NUL-terminated text."""
    raw = _check_message(sector, text)
    msg = ffi.new("struct dm_target_msg *")
    msg.sector = sector
    return bytes(ffi.buffer(msg, _MSG_TEXT_OFF)) + raw + b"\0"


# --- The kernel log ---------------------------------------------------------------------------

_TABLE_LINE = re.compile(r"^table: (\d+:\d+): (.*)$")
_ERRNO_TAIL = re.compile(r"(\s*\((-E[A-Z0-9]+|-\d+)\)|:\s*-E[A-Z0-9]+)$")
# dm core's own words that add nothing to the target's text.
_GENERIC = ("error adding target to table",)


class _KernelLog:
    """Lines the kernel logs from now on, read from /dev/kmsg; empty where it is unreadable."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self._fd = None

    def new_lines(self) -> list[str]:
        lines: list[str] = []
        while self._fd is not None:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno_mod.EPIPE:  # records overwritten under us: go on
                    continue
                break
            if not record:
                break
            # "prio,seq,usec,flags;text\n" then " KEY=value" continuation lines.
            _, _, text = _decode(record).partition(";")
            if text:
                lines.append(text.split("\n", 1)[0])
        return lines

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def kernel_text(lines: Iterable[str], dev: str | None = None) -> str:
    """The device-mapper part of new kernel log `lines`, for an error message.

    A table line about `dev` ("major:minor") wins: it carries the target's ``ti->error``.
    Otherwise every other device-mapper line, joined with "; ". The errno the kernel appends
    is dropped (DMError adds its own).
    """
    table_texts, other_texts = [], []
    for line in lines:
        if not line.startswith("device-mapper: "):
            continue
        text = line[len("device-mapper: "):]
        m = _TABLE_LINE.match(text)
        if m and (dev is None or m.group(1) == dev):
            table_texts.append(_ERRNO_TAIL.sub("", m.group(2)))
            continue
        text = text.removeprefix("ioctl: ")
        if text not in _GENERIC:
            other_texts.append(_ERRNO_TAIL.sub("", text))
    return "; ".join(table_texts or other_texts)


# --- The control device ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    info: DeviceInfo
    flags: DMFlag
    version: tuple[int, int, int]
    data: bytes


class DMControl:
    """An open /dev/mapper/control. Use as a context manager; safe to share between threads.

    Every method raises DMError when the kernel refuses, and ValueError (TypeError for a
    wrong type), before any ioctl, for arguments the kernel could not take.
    """

    def __init__(self, path: str = CONTROL_PATH, *, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        if buffer_size < HEADER_SIZE:
            raise ValueError(f"buffer_size must be at least {HEADER_SIZE}")
        self._buffer_size = _align8(buffer_size)
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DMError(e.errno or errno_mod.EIO, "open", path) from e

    def close(self) -> None:
        """Close the control device; further calls raise ValueError."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the one ioctl path --

    def _call(self, cmd: Cmd, op: str, name: str | None = None, *, uuid: str | None = None,
              flags: DMFlag = _NO_FLAGS, data: bytes = b"", target_count: int = 0,
              event_nr: int = 0, reply_size: int = 0, grow: bool = True,
              log_dev: bool = False, with_log: bool = False) -> _Reply:
        """Send one DM ioctl and return the header and data area of the reply.

        `reply_size` is the smallest data area to offer; with `grow` a reply that did not fit
        (DM_BUFFER_FULL_FLAG) is asked for again with twice the buffer. With `with_log` a
        failure carries the kernel log's text.
        """
        if self._fd is None:
            raise ValueError("DMControl is closed")
        name_raw = check_name(name) if name is not None else b""
        uuid_raw = check_uuid(uuid) if uuid is not None else b""
        size = _align8(HEADER_SIZE + max(len(data), reply_size))
        log = _KernelLog() if with_log else None
        try:
            while True:
                buf = ffi.new("uint64_t[]", size // 8)  # zeroed, 8-byte aligned
                hdr = ffi.cast("struct dm_ioctl *", buf)
                hdr.version = list(DM_VERSION_SENT)
                hdr.data_size = size
                hdr.data_start = HEADER_SIZE
                hdr.target_count = target_count
                hdr.flags = int(flags)
                hdr.event_nr = event_nr
                ffi.memmove(hdr.name, name_raw, len(name_raw))
                ffi.memmove(hdr.uuid, uuid_raw, len(uuid_raw))
                if data:
                    ffi.memmove(ffi.cast("char *", buf) + HEADER_SIZE, data, len(data))
                rc = _lib().ioctl(self._fd, ioctl_number(cmd), hdr)
                if rc < 0:
                    err = ffi.errno
                    if err == errno_mod.EINTR:  # a signal: its handler has run; ask again
                        continue
                    text = ""
                    if log is not None:
                        text = kernel_text(log.new_lines(), self._dev_of(name) if log_dev else None)
                    raise DMError(err, op, name, text)
                out_flags = DMFlag(hdr.flags)
                if grow and out_flags & DMFlag.BUFFER_FULL:
                    size *= 2
                    if size > MAX_BUFFER_SIZE:
                        raise DMError(errno_mod.ENOBUFS, op, name,
                                      f"reply larger than {MAX_BUFFER_SIZE} bytes")
                    continue
                return self._reply(hdr, buf)
        finally:
            if log is not None:
                log.close()

    @staticmethod
    def _reply(hdr: Any, buf: Any) -> _Reply:
        start, end = int(hdr.data_start), int(hdr.data_size)
        data = bytes(ffi.buffer(buf, end)[start:end]) if end > start else b""
        major, minor = decode_dev(int(hdr.dev))
        uuid = _decode(ffi.string(hdr.uuid, DM_UUID_LEN))
        flags = DMFlag(hdr.flags)
        info = DeviceInfo(
            name=_decode(ffi.string(hdr.name, DM_NAME_LEN)),
            major=major,
            minor=minor,
            uuid=uuid or None,
            open_count=int(hdr.open_count),
            event_nr=int(hdr.event_nr),
            target_count=int(hdr.target_count),
            flags=flags & (DMFlag.READONLY | DMFlag.SUSPEND | DMFlag.ACTIVE_PRESENT
                           | DMFlag.INACTIVE_PRESENT | DMFlag.DEFERRED_REMOVE
                           | DMFlag.INTERNAL_SUSPEND),
        )
        version = (int(hdr.version[0]), int(hdr.version[1]), int(hdr.version[2]))
        return _Reply(info, flags, version, data)

    def _dev_of(self, name: str | None) -> str | None:
        """ "major:minor" of `name` as the kernel log names it, or None."""
        if name is None:
            return None
        try:
            info = self.info(name)
        except DMError:
            return None
        return f"{info.major}:{info.minor}"

    # -- the commands --

    def version(self) -> tuple[int, int, int]:
        """The kernel's DM ioctl interface version (4, minor, patch)."""
        return self._call(Cmd.VERSION, "version").version

    def list_devices(self) -> list[DeviceInfo]:
        """All mapped devices: name, major, minor, event_nr and (kernel 4.45+) uuid."""
        reply = self._call(Cmd.LIST_DEVICES, "list devices", flags=DMFlag.UUID,
                           reply_size=self._buffer_size)
        return parse_name_list(reply.data)

    def create(self, name: str, uuid: str | None = None) -> DeviceInfo:
        """Create device `name` with no table: it exists, but has no size until a table is
        loaded and resumed. (dm-ioctl.h calls it suspended; 6.1 reports flags 0.)"""
        return self._call(Cmd.DEV_CREATE, "create", name, uuid=uuid, with_log=True).info

    def load_table(self, name: str, targets: Sequence[Target], *,
                   readonly: bool = False) -> DeviceInfo:
        """Load `targets` into the inactive slot of `name`; :meth:`resume` makes it live.

        A DMError carries the target's own error text (from the kernel log) where it has one.
        """
        check_name(name)
        data = pack_targets(targets)
        flags = DMFlag.READONLY if readonly else _NO_FLAGS
        return self._call(Cmd.TABLE_LOAD, "load table", name, flags=flags, data=data,
                          target_count=len(targets), with_log=True, log_dev=True).info

    def clear_table(self, name: str) -> DeviceInfo:
        """Drop the inactive table of `name`, if any."""
        return self._call(Cmd.TABLE_CLEAR, "clear table", name).info

    def suspend(self, name: str, *, noflush: bool = False, skip_lockfs: bool = False) -> None:
        """Suspend `name`: returns once its in-flight I/O is done; new I/O waits for resume.

        `noflush` keeps queued I/O queued instead of completing it; `skip_lockfs` does not
        freeze a filesystem mounted on the device.
        """
        flags = DMFlag.SUSPEND
        if noflush:
            flags |= DMFlag.NOFLUSH
        if skip_lockfs:
            flags |= DMFlag.SKIP_LOCKFS
        self._call(Cmd.DEV_SUSPEND, "suspend", name, flags=flags, with_log=True)

    def resume(self, name: str) -> int:
        """Resume `name`, first making its inactive table live if there is one.

        Returns the device's event number, which a resume does not change (no event: a
        waiter in :meth:`wait_event` sleeps on).
        """
        return self._call(Cmd.DEV_SUSPEND, "resume", name, with_log=True).info.event_nr

    def remove(self, name: str) -> None:
        """Remove device `name` and its tables. EBUSY while it is open, ENXIO if absent."""
        self._call(Cmd.DEV_REMOVE, "remove", name)

    def info(self, name: str) -> DeviceInfo:
        """The state of device `name`."""
        return self._call(Cmd.DEV_STATUS, "info", name).info

    def status(self, name: str) -> list[TargetStatus]:
        """Each target's status line for the live table of `name` ([] with no live table)."""
        reply = self._call(Cmd.TABLE_STATUS, "status", name, reply_size=self._buffer_size)
        return [TargetStatus(*spec) for spec in unpack_specs(reply.data, reply.info.target_count)]

    def table(self, name: str) -> list[Target]:
        """The live table of `name` as the targets print it ([] with no live table)."""
        reply = self._call(Cmd.TABLE_STATUS, "table", name, flags=DMFlag.STATUS_TABLE,
                           reply_size=self._buffer_size)
        return [Target(*spec) for spec in unpack_specs(reply.data, reply.info.target_count)]

    def message(self, name: str, sector: int, text: str) -> str:
        """Send `text` to the target of `name` that maps `sector`; return its reply ("" if none).

        dm core takes messages that start with '@' (e.g. "@stats_list") itself. A reply that
        overflows the buffer makes us send the message again with a bigger one, so a message
        with side effects should answer briefly. A DMError carries the kernel's text.
        """
        check_name(name)
        data = pack_message(sector, text)
        reply = self._call(Cmd.TARGET_MSG, "message", name, data=data,
                           reply_size=self._buffer_size, with_log=True)
        if not reply.flags & DMFlag.DATA_OUT:
            return ""
        return _decode(reply.data.split(b"\0", 1)[0])

    def wait_event(self, name: str, event_nr: int) -> DeviceInfo:
        """Block until the event number of `name` differs from `event_nr`; return its state.

        Events are raised by targets (dm_table_event) and by removing or renaming the
        device; a stale `event_nr` returns at once. Signals do not end the wait (their
        Python handlers run, and an exception they raise does).
        """
        if not isinstance(event_nr, int) or not 0 <= event_nr <= _U32_MAX:
            raise ValueError("event_nr must be an integer in 0..2**32-1")
        # No data area: the kernel's status lines for the caller are skipped (BUFFER_FULL).
        return self._call(Cmd.DEV_WAIT, "wait event", name, event_nr=event_nr,
                          grow=False).info

    def target_versions(self) -> list[TargetVersion]:
        """Target types registered in the kernel (loaded modules only), with versions."""
        reply = self._call(Cmd.LIST_VERSIONS, "list versions", reply_size=self._buffer_size)
        return parse_versions(reply.data)


# --- Whole devices ----------------------------------------------------------------------------


def _udev_running() -> bool:
    return os.path.exists("/run/udev/control")


def _is_node(path: str, rdev: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def ensure_node(info: DeviceInfo, udev_timeout: float = 2.0) -> str:
    """Make sure /dev/mapper/<name> opens `info`'s device; return that path.

    udev's dm rules make it as a symlink where they run: we wait up to `udev_timeout` for
    them. Without udev (or without its dm rules), we make a block node with os.mknod,
    replacing a stale node of ours left from an earlier device of the same name.
    """
    path = info.path
    rdev = os.makedev(info.major, info.minor)
    deadline = time.monotonic() + (udev_timeout if _udev_running() else 0.0)
    while not _is_node(path, rdev):
        if time.monotonic() >= deadline:
            try:  # a stale node or symlink of an earlier device of this name
                mode = os.lstat(path).st_mode
                if stat.S_ISBLK(mode) or stat.S_ISLNK(mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            try:
                os.mknod(path, stat.S_IFBLK | 0o600, rdev)
            except FileExistsError:  # udev was quicker after all
                if not _is_node(path, rdev):
                    raise
            break
        time.sleep(0.05)
    return path


def _drop_node(info: DeviceInfo, udev_timeout: float = 2.0) -> None:
    """Remove /dev/mapper/<name> if it is our block node of that device; if it is udev's
    symlink, give udev up to `udev_timeout` to remove it."""
    deadline = time.monotonic() + (udev_timeout if _udev_running() else 0.0)
    while True:
        try:
            st = os.lstat(info.path)
        except FileNotFoundError:
            return
        if stat.S_ISBLK(st.st_mode):
            if st.st_rdev == os.makedev(info.major, info.minor):
                os.unlink(info.path)
            return
        if not stat.S_ISLNK(st.st_mode) or time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def create_device(name: str, targets: Sequence[Target], uuid: str | None = None, *,
                  readonly: bool = False, ctl: DMControl | None = None) -> DeviceInfo:
    """Create `name`, load `targets`, resume it and make /dev/mapper/<name> (`.path`).

    All or nothing: if a step after the create fails, the device is removed again and the
    error raised. Uses `ctl` or opens the control device for the call.
    """
    check_name(name)
    if uuid is not None:
        check_uuid(uuid)
    check_targets(targets)
    if ctl is None:
        with DMControl() as own:
            return create_device(name, targets, uuid, readonly=readonly, ctl=own)
    ctl.create(name, uuid)
    try:
        ctl.load_table(name, targets, readonly=readonly)
        ctl.resume(name)
        info = ctl.info(name)
        ensure_node(info)
    except BaseException as e:
        try:
            ctl.remove(name)
        except DMError as undo:
            e.add_note(f"and removing the half-made device failed too: {undo}")
        raise
    return info


def remove_device(name: str, retries: int = 10, delay: float = 0.1, *,
                  ctl: DMControl | None = None) -> None:
    """Remove `name`, trying again up to `retries` times `delay` seconds apart while it is
    busy (EBUSY: a short-lived opener such as udev's blkid), and drop a node we made for it.

    Raises DMError (ENXIO) if there is no such device.
    """
    check_name(name)
    if ctl is None:
        with DMControl() as own:
            return remove_device(name, retries, delay, ctl=own)
    info = ctl.info(name)
    for attempt in range(retries + 1):
        try:
            ctl.remove(name)
            break
        except DMError as e:
            if e.errno != errno_mod.EBUSY or attempt == retries:
                raise
            time.sleep(delay)
    _drop_node(info)
