# SPDX-License-Identifier: GPL-2.0-only
"""Host-tier tests of the VM tier's plumbing (tests/vmrun.py, tests/vm/guest-run.sh).

They need no privileges and boot nothing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_vmrun():
    spec = importlib.util.spec_from_file_location("vmrun", REPO / "tests" / "vmrun.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vmrun"] = mod
    spec.loader.exec_module(mod)
    return mod


vmrun = _load_vmrun()

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10" time="1.0">
</testsuite></testsuites>"""


def test_junit_counts(tmp_path: Path) -> None:
    f = tmp_path / "junit.xml"
    f.write_text(JUNIT)
    c = vmrun.junit_counts(f)
    assert (c.passed, c.failed, c.skipped) == (4, 3, 3)
    assert c.line("vm") == "vm: 4 passed, 3 failed, 3 skipped"


def test_junit_counts_missing_file(tmp_path: Path) -> None:
    assert vmrun.junit_counts(tmp_path / "nope.xml") is None


def test_report_sums_and_notes_missing_tier(tmp_path: Path, capsys) -> None:
    f = tmp_path / "junit.xml"
    f.write_text(JUNIT)
    assert vmrun.main(["--report", str(f), str(f), str(tmp_path / "missing.xml")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "total: 8 passed, 6 failed, 6 skipped"
    assert any("did not run" in line for line in out)


def test_kernel_trouble_ignores_boot_noise() -> None:
    log = "\n".join([
        "[    0.1] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable",
        f"[    9.0] {vmrun.START_MARKER} mode=test",
        "[   10.0] loop0: detected capacity change",
        "[   11.0] WARNING: CPU: 1 PID: 42 at drivers/md/dm-repl-target.c:100 repl_map+0x1",
        "[   11.1] Call Trace:",
        "[   12.0] BUG: unable to handle page fault for address: 0000000000000008",
    ])
    found = vmrun.kernel_trouble(log)
    assert len(found) == 3
    assert "RETBleed" not in " ".join(found)


def test_kernel_trouble_without_marker_scans_everything() -> None:
    assert vmrun.kernel_trouble("general protection fault, probably for non-canonical address")


def test_new_bad_taints() -> None:
    out_of_tree_unsigned = (1 << 12) | (1 << 13)
    assert vmrun.new_bad_taints(0, out_of_tree_unsigned) == []
    assert vmrun.new_bad_taints(0, 1 << 9) == ["W (kernel warning)"]
    assert vmrun.new_bad_taints(1 << 9, 1 << 9) == []  # already there before the run


def _results(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_check_results_clean_run(tmp_path: Path) -> None:
    r = _results(tmp_path, insmod_rc="0", rc="0", rmmod_rc="0",
                 **{"tainted-start": "0", "tainted-end": "12288"})
    (r / "dmesg.txt").write_text(f"{vmrun.START_MARKER}\nall fine\n")
    assert vmrun.check_results(r, "test", timed_out=False) == []


@pytest.mark.parametrize("files, expect", [
    ({"insmod_rc": "0", "rc": "0", "rmmod_rc": "1"}, "rmmod dm_repl failed"),
    ({"insmod_rc": "0", "rmmod_rc": "0"}, "no exit code"),
    ({"insmod_rc": "0", "rc": "1", "rmmod_rc": "0"}, "exited 1"),
    ({"insmod_rc": "1"}, "insmod"),
    ({}, "did not get to load"),
])
def test_check_results_failures(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    r = _results(tmp_path, **files)
    (r / "dmesg.txt").write_text(f"{vmrun.START_MARKER}\n")
    problems = vmrun.check_results(r, "test", timed_out=False)
    assert any(expect in p for p in problems), problems


def test_check_results_kernel_warning_fails(tmp_path: Path) -> None:
    r = _results(tmp_path, insmod_rc="0", rc="0", rmmod_rc="0")
    (r / "dmesg.txt").write_text(f"{vmrun.START_MARKER}\nkernel BUG at x.c:1!\n")
    problems = vmrun.check_results(r, "test", timed_out=False)
    assert any("kernel BUG at x.c:1!" in p for p in problems)


def test_missing_qemu_skips_or_fails_under_ci(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert vmrun.skip_or_fail(["qemu-system-x86_64 not found"]) == vmrun.EXIT_SKIP
    monkeypatch.setenv("CI", "true")
    assert vmrun.skip_or_fail(["qemu-system-x86_64 not found"]) == 1


def test_preflight_with_nothing_installed(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vmrun.shutil, "which", lambda name: None)
    monkeypatch.setattr(vmrun, "find_vng", lambda: None)
    monkeypatch.setattr(vmrun, "RESULTS", {"test": tmp_path / "res"})
    monkeypatch.delenv("CI", raising=False)
    assert vmrun.main(["--preflight", "--kver", "0.0-none"]) == vmrun.EXIT_SKIP
    monkeypatch.setenv("CI", "true")
    assert vmrun.main(["--preflight", "--kver", "0.0-none"]) == 1


def test_args_passthrough() -> None:
    args, extra = vmrun.parse_args(["-k", "sanity", "--memory", "3G", "--", "-x", "tests/vm/t.py"])
    assert extra == ["-k", "sanity", "-x", "tests/vm/t.py"]
    assert args.memory == "3G" and args.mode == "test"
    args, _ = vmrun.parse_args(["--bench"])
    assert args.mode == "bench"


def test_guest_command_quotes_arguments(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    cmd = vmrun.guest_command("test", Path("/r"), ["-k", "a and not b"])
    assert cmd.startswith("CI=true bash ")
    assert cmd.endswith("test /r -- -k 'a and not b'")


def test_vng_command_has_guard_marker_and_no_network() -> None:
    cmd = vmrun.vng_command(Path("/x/vng"), "6.1.0-1-amd64", "2G", 2, Path("/r"), "true", False)
    assert "repctl_vm=1" in cmd and "--disable-kvm" in cmd
    assert "--network" not in cmd  # vng's default is no network device


def test_guest_script_refuses_to_run_on_a_host() -> None:
    if "repctl_vm=1" in Path("/proc/cmdline").read_text():
        pytest.skip("running inside the test VM")
    p = subprocess.run(["bash", str(REPO / "tests" / "vm" / "guest-run.sh"), "test", "/nonexistent"],
                       capture_output=True, text=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2
    assert "refusing to run" in p.stderr


def test_results_folder_in_use_gets_its_own(monkeypatch, tmp_path: Path) -> None:
    import fcntl

    monkeypatch.setattr(vmrun, "REPO", tmp_path)
    wanted = tmp_path / "build" / "vm-results"
    wanted.parent.mkdir(parents=True)
    with (wanted.parent / ".vm-results.lock").open("w") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        got = vmrun.claim_results(wanted)
    assert got == wanted.with_name(f"vm-results-{os.getpid()}")


@pytest.mark.parametrize("mode", ["--demo", "--bench"])
def test_preflight_combines_with_modes(mode: str) -> None:
    args, _ = vmrun.parse_args(["--preflight", mode])
    assert args.preflight and args.mode == mode[2:]
