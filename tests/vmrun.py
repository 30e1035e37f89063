#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Run the VM test tier: boot Debian's kernel under QEMU (virtme-ng), load dm-repl.ko, run pytest.

    python tests/vmrun.py                                   all of tests/vm, then the crash test
    python tests/vmrun.py -k sanity                         pytest -k (no crash test)
    python tests/vmrun.py -- -x -k test_name tests/vm/test_x.py   anything after -- goes to pytest
    python tests/vmrun.py --crash                           only the crash test (two boots)
    python tests/vmrun.py --demo | --bench | --shell

The crash test boots twice on three disk images kept on the host: the first boot
(tests/vm/crash_workload.py) replicates a random-write workload and resets the guest with
sysrq b mid-workload; the second (tests/vm/crash_check.py) checks that the dirty bitmap covers
every chunk where the data disk differs from the replica. It runs with the whole tier (no
pytest selection given) unless --no-crash.

It builds nothing: `make module` builds kmod/dm-repl.ko and `make venv` the virtualenv (the
Makefile's test-vm, demo and bench targets do both). The guest sees the host's root file
system read-only, so it runs this repository's files and .venv in place; the results folder
is shared writable.

Exit status: 0 when the guest's run passed, the module unloaded and the kernel log is clean;
77 when QEMU, virtme-ng or the kernel is missing (the tier is skipped), except under CI=true,
where that is a failure (1), so that CI never passes without this tier; 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "kmod" / "dm-repl.ko"
GUEST_SCRIPT = REPO / "tests" / "vm" / "guest-run.sh"
# REPCTL_VM_RESULTS moves the test and crash results elsewhere, so that two runs can share a tree.
_VM_RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", REPO / "build" / "vm-results"))
RESULTS = {
    "test": _VM_RESULTS,
    "crash": _VM_RESULTS,
    "demo": REPO / "build" / "demo-results",
    "bench": REPO / "build" / "bench-results",
}
MEMORY = {"test": "2G", "crash": "2G", "demo": "2G", "bench": "4G"}
# What the guest runs instead of pytest in --demo and --bench (written by their owners).
SCRIPTS = {"demo": REPO / "tests" / "vm" / "demo.sh", "bench": REPO / "bench" / "run.sh"}

EXIT_SKIP = 77
DEFAULT_TIMEOUT = 45 * 60  # the whole pytest boot; CI allows 90 min in all

# The crash test's disks: sparse image files under RESULTS/crash/disks, attached as virtio-blk
# disks with these sizes and serial numbers (at most 20 bytes); the guest finds them by serial
# through RESULTS/crash/plan.json. The guest sees them as /dev/vdX.
CRASH_DISKS = {"data": 64 << 20, "meta": 1 << 20, "replica": 64 << 20}
CRASH_SERIAL = "repl-crash-{}"
# How the first boot ends: "sysrq" (the guest resets itself with sysrq b; QEMU runs with
# -no-reboot and exits) or "kill" (the guest prints CRASH_KILL_MARKER and the host SIGKILLs
# QEMU: a power cut).
CRASH_METHODS = ("sysrq", "kill")
CRASH_KILL_MARKER = "repctl-crash: cut the power now"
# Each crash boot's timeout (at most --timeout): a boot takes 20 s to 3 minutes here.
CRASH_TIMEOUT = 10 * 60

# Kernel log lines that fail a run. Only lines after the guest script's start marker
# count, so that boot messages (e.g. CPU mitigation notices) do not.
START_MARKER = "repctl-vm: guest-run start"
KERNEL_TROUBLE = re.compile(
    r"WARNING:|BUG:|Oops|general protection fault|KASAN|UBSAN|kernel BUG|Call Trace:"
    r"|Kernel panic|INFO: task .* blocked for more than|rcu: INFO:"
)
# Taint bits that a run must not add (Documentation/admin-guide/tainted-kernels.rst).
# O (out-of-tree) and E (unsigned) are expected from insmod of our module.
BAD_TAINTS = {4: "M (machine check)", 5: "B (bad page)", 7: "D (kernel died: oops or BUG)",
              9: "W (kernel warning)", 14: "L (soft lockup)"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def say(msg: str) -> None:
    print(f"vmrun: {msg}", flush=True)


# ---------------------------------------------------------------- environment


def newest_kver() -> str | None:
    """The newest kernel version under /lib/modules that has a `build` (headers) directory."""
    root = Path("/lib/modules")
    found = [d.name for d in root.glob("*") if (d / "build").is_dir()] if root.is_dir() else []
    if not found:
        return None

    def key(v: str) -> list[tuple[int, int | str]]:
        return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.-]", v)]

    return max(found, key=key)


def module_vermagic(ko: Path) -> str | None:
    """The kernel release a built module is for (first word of its vermagic), or None."""
    try:
        out = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out[0] if out else None


def choose_kver(requested: str | None) -> str | None:
    """--kver / $KVER, else the release the module was built for, else the newest headers."""
    if requested:
        return requested
    if os.environ.get("KVER"):
        return os.environ["KVER"]
    return (module_vermagic(MODULE) if MODULE.exists() else None) or newest_kver()


def find_vng() -> Path | None:
    """vng from this interpreter's venv, the repository's .venv, or PATH."""
    for cand in (Path(sys.executable).parent / "vng", REPO / ".venv" / "bin" / "vng"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("vng")
    return Path(found) if found else None


def missing_requirements(kver: str | None, need_headers: bool) -> list[str]:
    """Why the VM cannot be booted here (empty when it can)."""
    reasons = []
    if not shutil.which("qemu-system-x86_64"):
        reasons.append("qemu-system-x86_64 not found (Debian package qemu-system-x86)")
    if not find_vng():
        reasons.append("vng not found (virtme-ng: `make venv` installs it into .venv)")
    if not shutil.which("busybox"):
        reasons.append("busybox not found (virtme-ng needs it: Debian package busybox-static)")
    if not kver:
        reasons.append("no kernel found: no /lib/modules/*/build (linux-image-amd64 and "
                       "linux-headers-amd64)")
    else:
        if not Path(f"/boot/vmlinuz-{kver}").is_file():
            reasons.append(f"kernel image /boot/vmlinuz-{kver} not found (linux-image-amd64)")
        if not Path(f"/lib/modules/{kver}/kernel").is_dir():
            reasons.append(f"modules of {kver} not found in /lib/modules/{kver}")
        if need_headers and not Path(f"/lib/modules/{kver}/build").is_dir():
            reasons.append(f"headers of {kver} not found (linux-headers-amd64)")
    return reasons


def skip_or_fail(reasons: list[str]) -> int:
    """The VM tier cannot run here: skip (77), or fail under CI=true."""
    for r in reasons:
        say(f"cannot boot the test VM: {r}")
    say("install them as root with .ci/install-deps (or `make deps`)")
    if in_ci():
        say("CI=true: the VM tier must run in CI, so this is a FAILURE")
        return 1
    say("VM tier SKIPPED")
    return EXIT_SKIP


# ---------------------------------------------------------------- running the VM


def vng_command(vng: Path, kver: str, memory: str, cpus: int, results: Path | None,
                guest_cmd: str | None, kvm: bool, qemu_args: list[str] | None = None) -> list[str]:
    cmd = [str(vng), "--run", f"/boot/vmlinuz-{kver}", "--force-9p",
           "--memory", memory, "--cpus", str(cpus), "--cwd", str(REPO),
           # Marker that tests/vm/guest-run.sh checks before it touches any module.
           "--append", "repctl_vm=1"]
    if not kvm:
        cmd.append("--disable-kvm")
    if results is not None:
        cmd += ["--rwdir", str(results)]
    if guest_cmd is not None:
        cmd += ["--exec", guest_cmd]
    if qemu_args:
        # vng pastes --qemu-opts into a shell command line: quote each argument for it.
        cmd.append("--qemu-opts=" + " ".join(shlex.quote(a) for a in qemu_args))
    return cmd


def vng_env(vng: Path) -> dict[str, str]:
    # vng calls virtme-run and friends from its own bin directory.
    env = dict(os.environ)
    env["PATH"] = f"{vng.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def crash_qemu_args(disks: dict[str, Path]) -> list[str]:
    """QEMU arguments attaching the crash test's images as raw virtio-blk disks with serials.

    format=raw: no probing (QEMU would otherwise restrict writes to block 0). The default
    cache mode (writeback) keeps whatever QEMU wrote in the host's page cache, so the images
    hold every write the guest's disk completed when the guest is reset or QEMU killed.
    """
    args = []
    for role, path in disks.items():
        file = str(path).replace(",", ",,")  # QEMU's option syntax
        args += ["-drive", f"if=none,id=crash-{role},file={file},format=raw",
                 "-device", f"virtio-blk-pci,drive=crash-{role},serial={CRASH_SERIAL.format(role)}"]
    return args


def make_crash_disks(crash: Path, method: str = "sysrq", seed: int = 0) -> dict[str, Path]:
    """Fresh sparse images (all zeros) under crash/disks; crash/plan.json tells the guest
    their serials and sizes and how the first boot is to end."""
    (crash / "disks").mkdir(parents=True, exist_ok=True)
    disks = {}
    for role, size in CRASH_DISKS.items():
        path = crash / "disks" / f"{role}.img"
        path.unlink(missing_ok=True)
        with path.open("wb") as f:
            f.truncate(size)
        disks[role] = path
    plan = {"disks": {role: {"serial": CRASH_SERIAL.format(role), "bytes": size}
                      for role, size in CRASH_DISKS.items()},
            "method": method, "kill_marker": CRASH_KILL_MARKER, "seed": seed}
    (crash / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return disks


def guest_command(mode: str, results: Path, extra: list[str]) -> str:
    """The shell command the guest runs (vng --exec)."""
    parts = ["bash", str(GUEST_SCRIPT), mode, str(results), "--", *extra]
    prefix = f"CI={shlex.quote(os.environ['CI'])} " if "CI" in os.environ else ""
    return prefix + " ".join(shlex.quote(p) for p in parts)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop vng and the QEMU it started (they share the process group we created)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Interrupted(Exception):
    """vmrun.py got SIGTERM or SIGHUP: QEMU runs in its own session, so stop it ourselves."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_streaming(cmd: list[str], env: dict[str, str], log: Path, timeout: float,
                  kill_on: bytes | None = None) -> tuple[int, bool]:
    """Run cmd, copying its output live to stdout and to log. Returns (exit code, timed out).

    kill_on: when the output shows these bytes, SIGKILL the VM's process group at once (a
    power cut of the guest: QEMU gets no chance to finish what it was doing).
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    assert proc.stdout is not None
    out = proc.stdout

    def pump() -> None:
        seen = b""  # the end of the output so far, to find kill_on across reads
        with log.open("wb") as f:
            while chunk := os.read(out.fileno(), 65536):
                if kill_on is not None:
                    seen = seen[-len(kill_on):] + chunk
                    if kill_on in seen:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        seen = b""
                        chunk += f"\nvmrun: killed QEMU (SIGKILL) on {kill_on!r}\n".encode()
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                f.write(chunk)
                f.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        say(f"TIMEOUT: the VM ran longer than {timeout:.0f} s; killing QEMU")
        stop_group(proc)
    except (KeyboardInterrupt, Interrupted) as e:
        say(f"interrupted ({type(e).__name__} {e}); killing QEMU")
        stop_group(proc)
        raise
    reader.join(timeout=10)
    return proc.returncode, timed_out


# ---------------------------------------------------------------- reading the results


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.passed + other.passed, self.failed + other.failed,
                      self.skipped + other.skipped)

    def line(self, prefix: str) -> str:
        """The closing line CI reads: `prefix: N passed, N failed, N skipped`."""
        return f"{prefix}: {self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def junit_counts(path: Path) -> Counts | None:
    """Test counts from a pytest junit xml file, or None if it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = Counts()
    for s in suites:
        tests = int(s.get("tests", 0))
        failed = int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped = int(s.get("skipped", 0))
        total = total + Counts(tests - failed - skipped, failed, skipped)
    return total


def kernel_trouble(dmesg: str) -> list[str]:
    """Kernel log lines showing a warning, oops, BUG, ... after the guest script started."""
    lines = dmesg.splitlines()
    start = 0
    for i, line in enumerate(lines):
        if START_MARKER in line:
            start = i + 1
    return [line for line in lines[start:] if KERNEL_TROUBLE.search(line)]


def new_bad_taints(start: int, end: int) -> list[str]:
    added = end & ~start
    return [name for bit, name in sorted(BAD_TAINTS.items()) if added & (1 << bit)]


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def check_results(results: Path, mode: str, timed_out: bool) -> list[str]:
    """Everything that makes this run a failure, as sentences (empty: the run passed)."""
    problems = []
    if timed_out:
        problems.append("the VM timed out and was killed")
    insmod_rc = read_int(results / "insmod_rc")
    rc = read_int(results / "rc")
    if insmod_rc is None:
        problems.append("the guest script did not get to load the modules (see the output above)")
    elif insmod_rc != 0:
        problems.append(f"modprobe/insmod of kmod/dm-repl.ko failed (exit {insmod_rc})")
    else:
        if rc is None:
            problems.append(f"no exit code from the guest's {mode} run ({results / 'rc'} missing):"
                            " the guest script did not finish")
        elif rc != 0:
            problems.append(f"the guest's {mode} run exited {rc}")
        rmmod_rc = read_int(results / "rmmod_rc")
        if rmmod_rc is None:
            problems.append("rmmod dm_repl did not run")
        elif rmmod_rc != 0:
            problems.append(f"rmmod dm_repl failed (exit {rmmod_rc}): a reference or device leaked")

    log_file = results / "dmesg.txt"
    if not log_file.exists():
        log_file = results / "dmesg-live.txt"
    try:
        trouble = kernel_trouble(log_file.read_text(errors="replace"))
    except OSError:
        trouble = []
        problems.append("no kernel log from the guest")
    if trouble:
        problems.append(f"the kernel log has {len(trouble)} warning/oops line(s) ({log_file}):")
        problems.extend(f"    {line}" for line in trouble[:40])
    t0, t1 = read_int(results / "tainted-start"), read_int(results / "tainted-end")
    if t0 is not None and t1 is not None:
        bad = new_bad_taints(t0, t1)
        if bad:
            problems.append("the kernel got tainted: " + ", ".join(bad))
    return problems


def check_crash_write(results: Path, timed_out: bool) -> list[str]:
    """Problems of the crash test's first boot, which passes by being reset mid-workload.

    The guest never gets to write rc, rmmod_rc or dmesg.txt; crash.json (written just before
    the reset) says it got there, and the kernel log followed live must be clean up to it.
    """
    problems = []
    if timed_out:
        problems.append("the crash test's first boot timed out and was killed")
    insmod_rc = read_int(results / "insmod_rc")
    rc = read_int(results / "rc")
    if insmod_rc is None:
        problems.append("the guest script did not get to load the modules (see the output above)")
    elif insmod_rc != 0:
        problems.append(f"modprobe/insmod of kmod/dm-repl.ko failed (exit {insmod_rc})")
    elif rc is not None:
        problems.append(f"tests/vm/crash_workload.py exited {rc} instead of resetting the guest")
    elif not (results / "crash.json").is_file():
        problems.append("the guest did not get to the reset (no crash.json)")
    try:
        trouble = kernel_trouble((results / "dmesg-live.txt").read_text(errors="replace"))
    except OSError:
        trouble = []
        problems.append("no kernel log from the crash test's first boot")
    if trouble:
        problems.append(f"the kernel log has {len(trouble)} warning/oops line(s) "
                        f"({results / 'dmesg-live.txt'}):")
        problems.extend(f"    {line}" for line in trouble[:40])
    return problems


def tally(junit: Path, problems: list[str]) -> Counts:
    """Test counts of one boot: its junit report, with the runner's own checks as failures."""
    counts = junit_counts(junit)
    if counts is None:
        say(f"no junit report ({junit})")
        counts = Counts()
    runner_failures = sum(1 for p in problems if not p.startswith("    "))
    if counts.failed == 0 and runner_failures:
        counts.failed = runner_failures
    return counts


def report_problems(problems: list[str]) -> None:
    for p in problems:
        say(f"FAILED: {p}" if not p.startswith("    ") else p)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        own, passthrough = argv[:i], argv[i + 1:]
    else:
        own, passthrough = argv, []
    p = argparse.ArgumentParser(
        prog="vmrun.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to pytest (or to the demo/bench script).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_const", dest="mode", const="demo",
                      help="run tests/vm/demo.sh in the VM instead of the tests")
    mode.add_argument("--bench", action="store_const", dest="mode", const="bench",
                      help="run bench/run.sh in the VM (default memory 4G)")
    mode.add_argument("--crash", action="store_const", dest="mode", const="crash",
                      help="only the crash test (two boots: reset mid-workload, then check)")
    p.add_argument("--no-crash", action="store_true",
                   help="skip the crash test (it runs when no pytest selection is given)")
    p.add_argument("--crash-by", choices=CRASH_METHODS, default="sysrq",
                   help="how the crash test's first boot ends: sysrq b in the guest (default)"
                        " or SIGKILL of QEMU from the host")
    p.add_argument("--crash-seed", type=int, default=0, metavar="N",
                   help="seed of the crash test's workload and crash delay (default: random;"
                        " a failure prints it)")
    mode.add_argument("--shell", action="store_const", dest="mode", const="shell",
                      help="interactive shell in the VM (then: bash tests/vm/guest-run.sh setup)")
    p.add_argument("--preflight", action="store_true",
                   help="only check that the VM can boot here (77: skip) and clear old results")
    mode.add_argument("--report", nargs="+", metavar="JUNIT",
                      help="print one total line over these junit files and exit")
    p.add_argument("-k", metavar="EXPR", help="pytest -k EXPR")
    p.add_argument("--memory", help="guest memory (default 2G, 4G with --bench)")
    p.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    p.add_argument("--kver", help="kernel release to boot (default: the module's, else the newest"
                                  " with headers; env KVER)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds before QEMU is killed (default {DEFAULT_TIMEOUT})")
    p.add_argument("--kvm", action="store_true",
                   help="use KVM (default off: software emulation, which works everywhere)")
    args = p.parse_args(own)
    args.mode = args.mode or "test"
    if args.k:
        passthrough = ["-k", args.k, *passthrough]
    return args, passthrough


def report(files: list[str]) -> int:
    total = Counts()
    for f in files:
        c = junit_counts(Path(f))
        if c is None:
            print(f"report: no results in {f} (that tier did not run)")
        else:
            total = total + c
    print(total.line("total"), flush=True)
    return 1 if total.failed else 0


def fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


_held_locks: dict[Path, object] = {}


def rel(path: Path) -> str:
    """path relative to the repository when it is inside it, for messages."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def claim_results(path: Path) -> Path:
    """The results folder for this run: path, or path-PID if another run is using path.

    Several developers may run VMs from the same tree at once; each run locks its folder
    (for as long as this process lives) so that none wipes another's results.
    """
    if path in _held_locks:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (path.parent / f".{path.name}.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        alt = path.with_name(f"{path.name}-{os.getpid()}")
        say(f"{rel(path)}/ is in use by another run: this one uses {rel(alt)}/")
        return alt
    _held_locks[path] = lock
    return path


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    if args.report:
        return report(args.report)

    kver = choose_kver(args.kver)
    mode = args.mode
    results = RESULTS.get(mode)

    if args.preflight:
        if results is not None:
            fresh_dir(claim_results(results))
        reasons = missing_requirements(kver, need_headers=True)
        if reasons:
            return skip_or_fail(reasons)
        say(f"can boot {kver} here")
        return 0

    reasons = missing_requirements(kver, need_headers=False)
    if reasons:
        return skip_or_fail(reasons)
    assert kver is not None
    vng = find_vng()
    assert vng is not None

    if not MODULE.is_file():
        say(f"{rel(MODULE)} not found: build it with `make module`")
        if mode != "shell":
            return 1
    else:
        built_for = module_vermagic(MODULE)
        if built_for and built_for != kver:
            say(f"kmod/dm-repl.ko was built for {built_for}, not {kver}: "
                f"rebuild with `make module KVER={kver}` or pass --kver {built_for}")
            return 1

    script = SCRIPTS.get(mode)
    if script is not None and not script.is_file():
        say(f"{rel(script)} does not exist yet: nothing to run for --{mode}")
        return 1

    memory = args.memory or MEMORY.get(mode, "2G")

    if mode == "shell":
        if not sys.stdin.isatty():
            say("--shell needs a terminal")
            return 1
        say("booting a shell; inside, `bash tests/vm/guest-run.sh setup` loads dm-repl.ko; "
            "`exit` or Ctrl-D powers off")
        cmd = vng_command(vng, kver, memory, args.cpus, None, None, args.kvm)
        return subprocess.call(cmd, env=vng_env(vng))

    assert results is not None
    results = claim_results(results)
    fresh_dir(results)
    boot = Booter(vng, kver, memory, args.cpus, args.kvm, args.timeout, results)
    with_crash = mode == "crash" or (mode == "test" and not extra and not args.no_crash)

    problems: list[str] = []
    parts: list[tuple[str, Counts]] = []
    if mode != "crash":
        vng_rc, timed_out, elapsed = boot.run(guest_command(mode, results, extra),
                                              results / "console.log")
        say(f"VM run took {elapsed:.0f} s (vng exit {vng_rc})")
        problems = check_results(results, mode, timed_out)
        report_problems(problems)
        if mode == "test":
            # Runner checks (module unload, kernel log, ...) count as failures too.
            parts.append(("tests/vm", tally(results / "junit.xml", problems)))
        elif not problems:
            say(f"{mode} passed")
    if with_crash:
        crash_counts, crash_problems = run_crash(boot, extra if mode == "crash" else [],
                                                 args.crash_by, args.crash_seed)
        parts.append(("crash", crash_counts))
        problems += crash_problems
    if parts:
        total = Counts()
        for name, c in parts:
            total = total + c
            if len(parts) > 1:
                say(c.line(name))
        print(total.line("vm"), flush=True)
    return 1 if problems else 0


@dataclass
class Booter:
    """Boots the test VM with the same kernel, memory, CPUs and shared results folder."""

    vng: Path
    kver: str
    memory: str
    cpus: int
    kvm: bool
    timeout: float
    results: Path

    def run(self, guest_cmd: str, log: Path, qemu_args: list[str] | None = None,
            kill_on: bytes | None = None) -> tuple[int, bool, float]:
        """Boot, run guest_cmd, wait. Returns (vng exit code, timed out, seconds)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = vng_command(self.vng, self.kver, self.memory, self.cpus, self.results,
                          guest_cmd, self.kvm, qemu_args)
        say(f"booting {self.kver} under QEMU ({'KVM' if self.kvm else 'software emulation'}, "
            f"{self.memory}, {self.cpus} CPUs); results in {rel(log.parent)}/")
        started = time.monotonic()
        vng_rc, timed_out = run_streaming(cmd, vng_env(self.vng), log, self.timeout, kill_on)
        return vng_rc, timed_out, time.monotonic() - started


def crash_seed(boot1: Path) -> str:
    """The seed the first boot used (from its setup.json), for the failure message."""
    try:
        return str(json.loads((boot1 / "setup.json").read_text())["seed"])
    except (OSError, ValueError, KeyError):
        return "?"


def run_crash(boot: Booter, extra: list[str], method: str = "sysrq",
              seed: int = 0) -> tuple[Counts, list[str]]:
    """The crash test: boot 1 writes and is reset, boot 2 checks (pytest with extra).

    Returns (counts, problems)."""
    boot = dataclasses.replace(boot, timeout=min(boot.timeout, CRASH_TIMEOUT))
    crash = boot.results / "crash"
    boot1, boot2 = crash / "boot1", crash / "boot2"
    disks = make_crash_disks(crash, method, seed)
    qemu_args = crash_qemu_args(disks)
    started = time.monotonic()

    how = "sysrq b in the guest" if method == "sysrq" else "SIGKILL of QEMU from the host"
    say(f"crash test, boot 1: replicate a random-write workload, crash mid-workload ({how})")
    vng_rc, timed_out, elapsed = boot.run(
        guest_command("crash-write", boot1, []), boot1 / "console.log", qemu_args,
        kill_on=CRASH_KILL_MARKER.encode() if method == "kill" else None)
    say(f"crash test boot 1 took {elapsed:.0f} s (vng exit {vng_rc})")
    problems = check_crash_write(boot1, timed_out)
    if problems:
        report_problems(problems)
        say(f"crash test: the first boot failed, no second boot; disk images kept in "
            f"{rel(crash / 'disks')}/; same workload: --crash --crash-seed {crash_seed(boot1)}")
        return Counts(failed=1), problems

    say("crash test, boot 2: the bitmap must cover every chunk where data and replica differ")
    vng_rc, timed_out, elapsed = boot.run(guest_command("crash-check", boot2, extra),
                                          boot2 / "console.log", qemu_args)
    say(f"crash test boot 2 took {elapsed:.0f} s (vng exit {vng_rc})")
    problems = check_results(boot2, "crash-check", timed_out)
    report_problems(problems)
    counts = tally(boot2 / "junit.xml", problems)
    if counts.passed == 0 and counts.failed == 0:
        problems.append("the crash check did not run (skipped, or not collected)")
        report_problems(problems[-1:])
        counts.failed = 1
    try:
        summary = json.loads((boot2 / "summary.json").read_text())
        say(f"crash test: chunks differing {summary['chunks_differing']}, dirty "
            f"{summary['chunks_dirty']}, total {summary['chunks_total']}; written "
            f"{summary['chunks_written']}, of which clean (cleared by the consumer) "
            f"{summary['chunks_written_clean']}; not covered {summary['missed_count']}")
    except (OSError, ValueError, KeyError):
        pass
    if problems or counts.failed:
        say(f"crash test FAILED; disk images kept in {rel(crash / 'disks')}/; "
            f"same workload: --crash --crash-seed {crash_seed(boot1)}")
    else:
        shutil.rmtree(crash / "disks", ignore_errors=True)
    say(f"crash test took {time.monotonic() - started:.0f} s")
    return counts, problems


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (KeyboardInterrupt, Interrupted):
        sys.exit(130)
