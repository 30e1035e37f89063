"""The dm-repl user-space API, read from the one header the kernel module uses.

Mirrors ``kmod/dm-repl-uapi.h`` (shipped beside this module as
``dm-repl-uapi.h``): the cffi ``cdef`` is generated from the header's struct
definitions and every constant, ioctl numbers included, is computed from its
``#define`` lines.  Nothing here is written a second time by hand;
``tests/host/test_uapi.py`` compiles the header with the C compiler and checks
that the two agree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cffi

HEADER = Path(__file__).with_name("dm-repl-uapi.h")

_TYPES = {
    "__u8": "uint8_t",
    "__u16": "uint16_t",
    "__u32": "uint32_t",
    "__u64": "uint64_t",
    "__le16": "uint16_t",
    "__le32": "uint32_t",
    "__le64": "uint64_t",
}

# asm-generic/ioctl.h: nr 8 bits, type 8 bits, size 14 bits, dir 2 bits
_IOC_DIR = {"_IO": 0, "_IOW": 1, "_IOR": 2, "_IOWR": 3}

_DEFINE = re.compile(r"^#define\s+(\w+)\s+(.+?)\s*$", re.M)
_STRUCT = re.compile(r"struct\s+(\w+)\s*\{(.*?)\};", re.S)
_IOCTL = re.compile(r"(_IOWR|_IOR|_IOW|_IO)\(\s*(\w+)\s*,\s*(\w+)\s*(?:,\s*struct\s+(\w+))?\s*\)")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _int(token: str, consts: dict[str, Any]) -> int:
    if token in consts:
        return int(consts[token])
    return int(token, 0)


def parse_header(text: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Return (cdef, {struct: cdef body}, constants) parsed from the header text.

    Raises ValueError on a #define this parser does not understand, so that the
    header cannot grow a constant that Python silently lacks.
    """
    text = _strip_comments(text)
    structs: dict[str, str] = {}
    for name, body in _STRUCT.findall(text):
        for kernel_type, c_type in _TYPES.items():
            body = re.sub(rf"\b{kernel_type}\b", c_type, body)
        structs[name] = body
    cdef = "".join(f"struct {name} {{{body}}};\n" for name, body in structs.items())

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    consts: dict[str, Any] = {}
    for name, value in _DEFINE.findall(text):
        if name.startswith("_") and name.endswith("_H"):
            continue
        if value.startswith('"') and value.endswith('"'):
            consts[name] = value[1:-1]
            continue
        m = _IOCTL.fullmatch(value)
        if m:
            macro, kind, nr, struct = m.groups()
            size = ffi.sizeof(f"struct {struct}") if struct else 0
            consts[name] = (_IOC_DIR[macro] << 30) | (size << 16) | (_int(kind, consts) << 8) | _int(nr, consts)
            continue
        m = re.fullmatch(r"\(?\s*(\w+)\s*<<\s*(\w+)\s*\)?", value)
        if m:
            consts[name] = _int(m.group(1), consts) << _int(m.group(2), consts)
            continue
        try:
            consts[name] = _int(value, consts)
        except ValueError:
            raise ValueError(f"{HEADER.name}: cannot parse #define {name} {value}") from None
    return cdef, structs, consts


CDEF, STRUCTS, CONSTS = parse_header(HEADER.read_text())

ffi = cffi.FFI()
ffi.cdef(CDEF)

globals().update(CONSTS)


def names(prefix: str) -> dict[int, str]:
    """Map the values of the constants named PREFIX_* to their lower-case suffix."""
    return {v: k[len(prefix):].lower() for k, v in CONSTS.items() if k.startswith(prefix)}


MODE_NAMES = names("REPL_MODE_")
REASON_NAMES = names("REPL_REASON_")
OP_NAMES = names("REPL_OP_")
