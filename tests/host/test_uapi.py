"""The cffi view of dm-repl-uapi.h must agree with the C compiler's."""

import shutil
import subprocess
from pathlib import Path

import pytest

from repctl import uapi

KMOD = Path(__file__).resolve().parents[2] / "kmod"


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "dm-repl-uapi.h"', "int main(void) {"]
    for name, value in uapi.CONSTS.items():
        if isinstance(value, str):
            lines.append(f'printf("{name} %s\\n", {name});')
        else:
            lines.append(f'printf("{name} %llu\\n", (unsigned long long)({name}));')
    for struct in uapi.STRUCTS:
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        for field in uapi.ffi.typeof(f"struct {struct}").fields:
            fname = field[0]
            lines.append(f'printf("offsetof {struct}.{fname} %zu\\n", offsetof(struct {struct}, {fname}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def _python_view() -> dict[str, str]:
    view = {name: str(value) for name, value in uapi.CONSTS.items()}
    for struct in uapi.STRUCTS:
        view[f"sizeof {struct}"] = str(uapi.ffi.sizeof(f"struct {struct}"))
        for fname, field in uapi.ffi.typeof(f"struct {struct}").fields:
            view[f"offsetof {struct}.{fname}"] = str(field.offset)
    return view


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_cffi_matches_c_compiler(tmp_path):
    src = tmp_path / "uapi_check.c"
    src.write_text(_c_program())
    exe = tmp_path / "uapi_check"
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(KMOD), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    c_view = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert c_view == _python_view()


def test_structs_are_padded_to_eight_bytes():
    for struct in uapi.STRUCTS:
        assert uapi.ffi.sizeof(f"struct {struct}") % 8 == 0, struct


def test_ring_record_is_64_bytes():
    assert uapi.ffi.sizeof("struct repl_rec") == 64


def test_ioctl_numbers_are_distinct_and_use_the_magic():
    iocs = {k: v for k, v in uapi.CONSTS.items() if k.startswith("REPL_IOC_") and k != "REPL_IOC_MAGIC"}
    assert len(set(iocs.values())) == len(iocs)
    for value in iocs.values():
        assert (value >> 8) & 0xFF == uapi.REPL_IOC_MAGIC


def test_unknown_define_is_rejected():
    with pytest.raises(ValueError, match="cannot parse"):
        uapi.parse_header("#define REPL_WEIRD (1 + foo())\n")


def test_drift_is_detected():
    """A struct changed on the C side only must change the comparison."""
    cdef, structs, consts = uapi.parse_header(uapi.HEADER.read_text().replace("__u32 len;\n\t__u16 op;", "__u64 len;\n\t__u16 op;"))
    ffi = uapi.cffi.FFI()
    ffi.cdef(cdef)
    assert ffi.offsetof("struct repl_rec", "op") != uapi.ffi.offsetof("struct repl_rec", "op")
