#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""A real two-node Corosync + Pacemaker cluster in two QEMU guests, failed over by a power cut
(make test-cluster; not part of CI, which it would outlast):

    python tests/pcmk/run.py [--seed N] [--keep]

1. alpha and beta boot (tests/vmpair.py: one link, 10.79.0.1 and .2), each with three disk
   images on the host: data (64 MiB), metadata, and a small ext4 disk for repctl's state_dir
   (it must survive the power cut). Each runs tests/pcmk/node.py: the repctl daemon, the
   initial sync, then Corosync and Pacemaker by hand (no systemd in the guest); alpha pushes
   the CIB built offline with pcs: the promotable clone of ocf:repctl:repctl, **stonith
   disabled** (there is no fence device here; production needs fencing, docs/pacemaker.md).
2. The node Pacemaker promoted writes unique 4 KiB blocks, O_DIRECT|O_SYNC, and prints each
   acknowledged one. At a random moment the host SIGKILLs its QEMU: a power cut.
3. Pacemaker on the survivor promotes it (its agent runs `repctl promote`); the survivor
   checks that it holds every block the dead node acknowledged, then writes blocks of its own.
4. The dead node boots again on the same images: the repctl daemon brings r0 up as the new
   primary's secondary, Pacemaker starts the clone there unpromoted, the new primary resyncs
   what differs.
5. Both stop (Pacemaker stops the clone), power off; the host compares the two data images
   byte for byte, checks every acknowledged block in them, and that the resync sent far less
   than a full sync (the daemon's targets[].resync_bytes), at least every chunk that differed.

The machine's CPUs are shared: before each boot it waits, polling every 20 s, while two or more
QEMU guests run (its own included), and prints how long it waited.

Exit status 0 passed, 1 failed, 77 skipped (QEMU, the kernel or the cluster packages missing:
`.ci/install-deps cluster` installs the last). Results, consoles and logs in
build/pcmk-results/; a failed run keeps the disk images there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests"))
import vmpair
import vmrun

RESULTS = REPO / "build" / "pcmk-results"
NAMES = ("alpha", "beta")
BLOCK = 4096
SIZES = {"data": 64 << 20, "meta": 4 << 20, "state": 32 << 20}
WRITER_BLOCKS = 8000               # the writer's blocks are 0..7999 ...
OWN_BLOCKS = (12000, 100)          # ... the survivor's own 12000..12099
CLUSTER_TOOLS = ("corosync", "corosync-cfgtool", "pacemakerd", "crmadmin", "crm_mon",
                 "cibadmin", "pcs")
STEP = 15 * 60                     # the longest any one step may take under emulation


def say(msg: str) -> None:
    print(f"pcmk: {msg}", flush=True)


class Failed(Exception):
    pass


def block(i: int, who: str = "writer") -> bytes:
    """As tests/pcmk/node.py writes it."""
    return hashlib.sha256(f"pcmk-{who}-{i}".encode()).digest() * (BLOCK // 32)


WAITED = [0.0]  # seconds spent in wait_for_room, for the times line


def wait_for_room() -> None:
    """The machine's two CPUs are shared: boot nothing while two emulated guests run already
    (this run's own included)."""
    t = time.monotonic()
    while True:
        p = subprocess.run(["pgrep", "-c", "qemu-system"], capture_output=True, text=True,
                           check=False)
        running = int(p.stdout.strip() or 0)
        if running < 2:
            WAITED[0] += time.monotonic() - t
            return
        say(f"{running} QEMU guests running on this machine: waiting 20 s before booting")
        time.sleep(20)


def expect(guest: vmpair.Guest, pattern: str, what: str, timeout: float = STEP) -> re.Match[str]:
    m = guest.wait_line(pattern, timeout)
    if m is None:
        state = "still running" if guest.running() else "powered off"
        raise Failed(f"{guest.name} ({state}): no '{what}' within {timeout:.0f} s; "
                     f"its console is {guest.results}/console*.log")
    return m


def guest_args(results: Path) -> list[str]:
    return [str(REPO / ".venv" / "bin" / "python"), str(HERE / "node.py"), str(results)]


def plan(guest: vmpair.Guest, boot: int) -> None:
    (guest.results / "plan.json").write_text(json.dumps({
        "node": guest.name, "boot": boot, "writer_blocks": WRITER_BLOCKS,
        "own_blocks": list(OWN_BLOCKS)}, indent=2) + "\n")
    for f in ("write", "acked.txt", "stop"):
        (guest.results / f).unlink(missing_ok=True)


def differing_chunks(a: Path, b: Path) -> set[int]:
    """The chunks where two images differ."""
    out = set()
    i = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if not ca and not cb:
                break
            for off in range(0, max(len(ca), len(cb)), BLOCK):
                if ca[off:off + BLOCK] != cb[off:off + BLOCK]:
                    out.add(i + off // BLOCK)
            i += (1 << 20) // BLOCK
    return out


def read_block(image: Path, i: int) -> bytes:
    with image.open("rb") as f:
        f.seek(i * BLOCK)
        return f.read(BLOCK)


def scenario(guests: dict[str, vmpair.Guest], rng: random.Random, times: dict[str, float]
             ) -> list[str]:
    """The run; returns the problems found (empty: passed)."""
    problems: list[str] = []
    wait_for_room()
    t0 = time.monotonic()
    for g in guests.values():
        plan(g, 1)
        g.start("node", guest_args(g.results), "console-boot1.log")
    for g in guests.values():
        expect(g, r"^PCMK corosync and pacemaker running", "the cluster stack up")
    expect(guests["alpha"], r"^PCMK CIB pushed", "the CIB pushed")
    times["cluster up"] = time.monotonic() - t0

    # the node Pacemaker promoted (alpha, whose daemon brought r0 up as the source, unless
    # Pacemaker chose otherwise) becomes the writer
    deadline = time.monotonic() + STEP
    primary = None
    while primary is None:
        for g in guests.values():
            if g.wait_line(r"^PCMK PROMOTED ", 1):
                primary = g
                break
        if time.monotonic() > deadline:
            raise Failed("Pacemaker promoted no node")
    survivor = next(g for g in guests.values() if g is not primary)
    say(f"Pacemaker promoted {primary.name}: it writes; {survivor.name} is its sync target")
    (primary.results / "write").write_text("go\n")
    expect(primary, r"^PC-ACK 0$", "the first acknowledged write")
    cut = rng.uniform(5, 20)
    say(f"the power cut of {primary.name} comes in {cut:.1f} s")
    time.sleep(cut)
    primary.kill()
    killed = time.monotonic()
    acked = sorted(int(m.group(1)) for line in primary.lines()
                   if (m := re.match(r"^PC-ACK (\d+)$", line)))
    say(f"POWER CUT of {primary.name}: {len(acked)} writes acknowledged before it")
    if not acked:
        raise Failed("no write acknowledged before the power cut")
    (survivor.results / "acked.txt").write_text("\n".join(map(str, acked)) + "\n")

    m = expect(survivor, rf"^PCMK PROMOTED {survivor.name}", "the promotion of the survivor")
    times["kill to promoted"] = time.monotonic() - killed
    say(f"Pacemaker promoted {survivor.name} {times['kill to promoted']:.0f} s after the cut")
    m = expect(survivor, r"^PCMK CHECK (\S+)", "the check of the acknowledged writes")
    if m.group(1) != "ok":
        problems.append(f"{survivor.name} lacks acknowledged writes: {m.string}")
    expect(survivor, r"^PCMK WROTE ", "the survivor's own writes")

    # what differs now: what the dead node had that never reached the survivor (in flight)
    # and what the survivor wrote since; the resync must send at least these chunks
    diff = differing_chunks(primary.disks["data"], survivor.disks["data"])
    own = set(range(OWN_BLOCKS[0], OWN_BLOCKS[0] + OWN_BLOCKS[1]))
    say(f"{len(diff)} chunks differ between the images now ({len(diff - own)} not the "
        f"survivor's own writes)")

    wait_for_room()
    t_reboot = time.monotonic()
    plan(primary, 2)
    primary.start("node", guest_args(primary.results), "console-boot2.log")
    m = expect(primary, r"^PCMK REBOOTED r0 up as (\S+)", "r0 up after the reboot")
    if m.group(1) != "secondary":
        problems.append(f"{primary.name} came back as {m.group(1)}, not the secondary")
    expect(primary, r"^PCMK REJOINED ", "Pacemaker's clone unpromoted on the returning node")
    times["reboot to rejoined"] = time.monotonic() - t_reboot
    m = expect(survivor, r"^PCMK SYNCED \S+: resync_bytes (\d+)", "the resync")
    times["reboot to synced"] = time.monotonic() - t_reboot
    sent = int(m.group(1))
    full = SIZES["data"]
    say(f"resync: {sent} bytes sent ({sent / full:.2%} of a full sync of {full}); "
        f"{len(diff)} chunks = {len(diff) * BLOCK} bytes differed")
    if not len(diff) * BLOCK <= sent <= full // 10:
        problems.append(f"resync sent {sent} bytes: expected at least the {len(diff)} differing "
                        f"chunks ({len(diff) * BLOCK} bytes) and far below a full sync ({full})")
    expect(primary, r"^PCMK UPTODATE ", "the returning node UpToDate")

    # stop: the secondary first, then the primary (Pacemaker stops the clone on each)
    t_stop = time.monotonic()
    for g in (primary, survivor):
        (g.results / "stop").write_text("stop\n")
        m = expect(g, r"^PCMK STOPPED .*: (\S+)$", "a clean stop")
        if m.group(1) != "ok":
            problems.append(f"{g.name} did not stop cleanly: {m.string}")
        _, timed_out = g.wait(STEP)
        problems += [f"{g.name}: {p}" for p in vmrun.check_results(g.results, "node", timed_out)]
    times["stop"] = time.monotonic() - t_stop

    a, b = (g.disks["data"] for g in (primary, survivor))
    differ = differing_chunks(a, b)
    if differ:
        problems.append(f"the data images differ in {len(differ)} chunks: {sorted(differ)[:20]}")
    else:
        say(f"the data images of {primary.name} and {survivor.name} are identical "
            f"({full} bytes)")
    missing = [i for i in acked for img in (a, b) if read_block(img, i) != block(i)]
    if missing:
        problems.append(f"{len(missing)} acknowledged blocks missing from the final images: "
                        f"{missing[:20]}")
    lost_own = [i for i in own if read_block(a, i) != block(i, "survivor")]
    if lost_own:
        problems.append(f"the survivor's own blocks did not reach {primary.name}: {lost_own[:20]}")
    return problems


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="seed of the power cut's moment")
    ap.add_argument("--keep", action="store_true",
                    help="keep the disk images also when the run passed (a failed run keeps them)")
    args = ap.parse_args(argv)

    kver = vmrun.choose_kver(None)
    reasons = vmrun.missing_requirements(kver, need_headers=False)
    reasons += [f"{t} not found: the cluster packages are missing (run .ci/install-deps "
                f"cluster as root)" for t in CLUSTER_TOOLS
                if not shutil.which(t, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")]
    if not vmrun.MODULE.is_file():
        reasons.append(f"{vmrun.rel(vmrun.MODULE)} not built (make module)")
    if reasons:
        for r in reasons:
            say(f"cannot run: {r}")
        say("SKIPPED")
        return vmrun.EXIT_SKIP

    seed = args.seed if args.seed is not None else int(time.time())
    say(f"seed {seed} (--seed {seed} repeats this power cut's moment)")
    rng = random.Random(seed)
    vmrun.fresh_dir(vmrun.claim_results(RESULTS))
    key = os.urandom(256)
    secret = os.urandom(32).hex().encode()
    disks = {}
    for n in NAMES:
        d = RESULTS / n / "disks"
        disks[n] = {role: vmpair.make_image(d / f"{role}.img", size, ext4=(role == "state"))
                    for role, size in SIZES.items()}
        (RESULTS / n).mkdir(parents=True, exist_ok=True)
        (RESULTS / n / "authkey").write_bytes(key)
        (RESULTS / n / "secret").write_bytes(secret)
    guests = vmpair.pair(RESULTS, NAMES, disks, memory="1G")
    for g in guests.values():
        g.timeout = 90 * 60

    started = time.monotonic()
    times: dict[str, float] = {}
    try:
        problems = scenario(guests, rng, times)
    except Failed as e:
        problems = [str(e)]
    except KeyboardInterrupt:
        problems = ["interrupted"]
    finally:
        for g in guests.values():
            if g.running():
                say(f"powering off {g.name} (SIGKILL)")
                g.kill()
    times["total"] = time.monotonic() - started
    times["of which waiting for other guests"] = WAITED[0]
    say("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if not args.keep and not problems:
        for n in NAMES:
            shutil.rmtree(RESULTS / n / "disks", ignore_errors=True)
    for p in problems:
        say(f"FAILED: {p}")
    say("PASSED" if not problems else f"FAILED ({len(problems)} problems); logs in "
        f"{vmrun.rel(RESULTS)}/")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
