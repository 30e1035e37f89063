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


# ---------------------------------------------------------------- the crash test's plumbing


def test_crash_disks_are_sparse_and_described(tmp_path: Path) -> None:
    import json

    disks = vmrun.make_crash_disks(tmp_path / "crash", "kill", 7)
    assert set(disks) == {"data", "meta", "replica"}
    for role, path in disks.items():
        assert path.stat().st_size == vmrun.CRASH_DISKS[role]
        assert path.stat().st_blocks == 0  # sparse: all zeros, nothing allocated
    plan = json.loads((tmp_path / "crash" / "plan.json").read_text())
    assert plan["method"] == "kill" and plan["kill_marker"] == vmrun.CRASH_KILL_MARKER
    assert plan["seed"] == 7
    serials = [d["serial"] for d in plan["disks"].values()]
    assert len(set(serials)) == 3
    assert all(len(s.encode()) <= 20 for s in serials)  # virtio-blk keeps 20 bytes
    assert {r: d["bytes"] for r, d in plan["disks"].items()} == vmrun.CRASH_DISKS


def test_crash_qemu_args_attach_raw_disks_by_serial() -> None:
    args = vmrun.crash_qemu_args({"data": Path("/a,b/data.img"), "meta": Path("/m.img")})
    assert args == [
        "-drive", "if=none,id=crash-data,file=/a,,b/data.img,format=raw",
        "-device", "virtio-blk-pci,drive=crash-data,serial=repl-crash-data",
        "-drive", "if=none,id=crash-meta,file=/m.img,format=raw",
        "-device", "virtio-blk-pci,drive=crash-meta,serial=repl-crash-meta",
    ]


def test_vng_command_passes_qemu_args_quoted_for_its_shell() -> None:
    import shlex

    qemu = ["-drive", "if=none,id=d,file=/x y/d.img,format=raw"]
    cmd = vmrun.vng_command(Path("/x/vng"), "6.1.0-1-amd64", "2G", 2, Path("/r"), "true",
                            False, qemu)
    opts = [a for a in cmd if a.startswith("--qemu-opts=")]
    assert len(opts) == 1
    # vng pastes the value into a shell command line, which splits it back
    assert shlex.split(opts[0].removeprefix("--qemu-opts=")) == qemu
    assert not any(a.startswith("--qemu-opts") for a in vmrun.vng_command(
        Path("/x/vng"), "6.1.0-1-amd64", "2G", 2, Path("/r"), "true", False))


def test_crash_args() -> None:
    args, extra = vmrun.parse_args(["--crash", "--crash-by", "kill", "--crash-seed", "7"])
    assert (args.mode, args.crash_by, args.crash_seed, extra) == ("crash", "kill", 7, [])
    args, _ = vmrun.parse_args([])
    assert (args.mode, args.crash_by, args.no_crash) == ("test", "sysrq", False)
    assert vmrun.parse_args(["--no-crash"])[0].no_crash
    with pytest.raises(SystemExit):
        vmrun.parse_args(["--crash", "--bench"])


def _crash_boot1(tmp_path: Path, **files: str) -> Path:
    r = _results(tmp_path, **files)
    (r / "dmesg-live.txt").write_text(f"{vmrun.START_MARKER} mode=crash-write\nloop: loaded\n")
    return r


def test_check_crash_write_passes_when_reset_after_crash_json(tmp_path: Path) -> None:
    r = _crash_boot1(tmp_path, insmod_rc="0", **{"crash.json": "{}"})
    assert vmrun.check_crash_write(r, timed_out=False) == []


@pytest.mark.parametrize("files, expect", [
    ({"insmod_rc": "0", "rc": "1", "crash.json": "{}"}, "exited 1 instead of resetting"),
    ({"insmod_rc": "0"}, "did not get to the reset"),
    ({"insmod_rc": "1"}, "insmod"),
    ({}, "did not get to load"),
])
def test_check_crash_write_failures(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    problems = vmrun.check_crash_write(_crash_boot1(tmp_path, **files), timed_out=False)
    assert any(expect in p for p in problems), problems


def test_check_crash_write_kernel_warning_fails(tmp_path: Path) -> None:
    r = _crash_boot1(tmp_path, insmod_rc="0", **{"crash.json": "{}"})
    with (r / "dmesg-live.txt").open("a") as f:
        f.write("WARNING: CPU: 0 PID: 1 at dm-repl-target.c:1 repl_map\n")
    problems = vmrun.check_crash_write(r, timed_out=False)
    assert any("warning/oops" in p for p in problems)
    assert vmrun.check_crash_write(r, timed_out=True)[0].startswith("the crash test's first boot")


def test_run_streaming_kills_on_marker(tmp_path: Path, capsys) -> None:
    import time

    marker = vmrun.CRASH_KILL_MARKER
    cmd = ["bash", "-c", f"echo before; echo '{marker}'; sleep 60; echo after"]
    t0 = time.monotonic()
    rc, timed_out = vmrun.run_streaming(cmd, dict(os.environ), tmp_path / "log", 30,
                                        kill_on=marker.encode())
    assert time.monotonic() - t0 < 20
    assert rc == -9 and not timed_out
    log = (tmp_path / "log").read_text()
    assert "before" in log and "killed QEMU" in log and "after" not in log


def test_run_streaming_without_marker_runs_to_the_end(tmp_path: Path) -> None:
    rc, timed_out = vmrun.run_streaming(["bash", "-c", "echo hi; exit 3"], dict(os.environ),
                                        tmp_path / "log", 30, kill_on=b"never printed")
    assert (rc, timed_out) == (3, False)
    assert (tmp_path / "log").read_text() == "hi\n"


def _fake_boots(monkeypatch, tmp_path: Path, boot_problems: list[str],
                crash_result: tuple) -> tuple[list, list]:
    booted: list = []
    crashed: list = []
    monkeypatch.setattr(vmrun, "missing_requirements", lambda kver, need_headers: [])
    monkeypatch.setattr(vmrun, "find_vng", lambda: Path("/x/vng"))
    monkeypatch.setattr(vmrun, "MODULE", tmp_path / "dm-repl.ko")
    (tmp_path / "dm-repl.ko").write_text("")
    monkeypatch.setattr(vmrun, "module_vermagic", lambda ko: "6.1.0-1-amd64")
    res = tmp_path / "vm-results"
    monkeypatch.setattr(vmrun, "RESULTS", {"test": res, "crash": res})
    monkeypatch.setattr(vmrun.Booter, "run",
                        lambda self, cmd, log, *a, **k: booted.append(cmd) or (0, False, 1.0))
    monkeypatch.setattr(vmrun, "check_results", lambda results, mode, timed_out: boot_problems)
    monkeypatch.setattr(vmrun, "junit_counts", lambda path: vmrun.Counts(passed=5))

    def fake_crash(boot, extra, method, seed):
        crashed.append((extra, method, seed))
        return crash_result

    monkeypatch.setattr(vmrun, "run_crash", fake_crash)
    return booted, crashed


@pytest.mark.parametrize("boot_problems, crash_result, last", [
    (["rmmod dm_repl failed"], (vmrun.Counts(passed=1), []), "vm: 6 passed, 1 failed, 0 skipped"),
    ([], (vmrun.Counts(failed=1), ["no crash.json"]), "vm: 5 passed, 1 failed, 0 skipped"),
])
def test_any_failure_fails_the_run(monkeypatch, tmp_path: Path, capsys, boot_problems,
                                   crash_result, last) -> None:
    _fake_boots(monkeypatch, tmp_path, boot_problems, crash_result)
    assert vmrun.main(["--kver", "6.1.0-1-amd64"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == last
    assert "vmrun: crash: " + crash_result[0].line("x").split(": ")[1] in out


@pytest.mark.parametrize("argv, pytest_boot, crash", [
    ([], True, True),
    (["--no-crash"], True, False),
    (["-k", "sanity"], True, False),
    (["--", "tests/vm/test_x.py"], True, False),
    (["--crash"], False, True),
])
def test_which_boots_run(monkeypatch, tmp_path: Path, capsys, argv, pytest_boot, crash) -> None:
    booted, crashed = _fake_boots(monkeypatch, tmp_path, [], (vmrun.Counts(passed=1), []))
    assert vmrun.main(["--kver", "6.1.0-1-amd64", "--crash-by", "kill", *argv]) == 0
    assert bool(booted) == pytest_boot and bool(crashed) == crash
    if crash:
        assert crashed[0][1] == "kill"
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"vm: {5 * pytest_boot + crash} passed, 0 failed, 0 skipped"


def test_guest_script_parses() -> None:
    p = subprocess.run(["bash", "-n", str(REPO / "tests" / "vm" / "guest-run.sh")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_crash_check_runs_only_when_named() -> None:
    # tests/vm/crash_check.py only makes sense in the boot after the crash: the ordinary run
    # (pytest tests/vm) must not collect it, guest-run.sh crash-check names it.
    def collect(*where: str) -> str:
        # (other files' collection errors are not this test's business)
        p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                            "--continue-on-collection-errors", *where],
                           capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "REPCTL_IN_VM": "0"})
        return p.stdout

    ordinary = collect("tests/vm")
    assert "test_guest_sanity.py::" in ordinary and "crash_check.py" not in ordinary
    assert "crash_check.py::test_bitmap_after_crash_covers_every_difference" in collect(
        "tests/vm/crash_check.py")
