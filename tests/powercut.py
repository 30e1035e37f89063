#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""The power-cut test: two QEMU guests replicate to each other; the primary's power is cut.

    python tests/powercut.py                  3 cuts (make powercut, part of make test)
    python tests/powercut.py --cuts 20        make soak
    python tests/powercut.py --cuts 1 --seed 1234   again, with the same cut times

alpha and beta boot on their own disk images (raw files under build/powercut-results/disks/),
joined by a QEMU UDP link (tests/vmpair.py). Two resources replicate at once: r0 to a sync
target, r1 (ext4) to an async one (tests/vm/powercut_node.py runs in each guest). Then, for
each cut:

1. the primary writes and prints every acknowledged write on its console;
2. at a random moment (0.5-8 s into the writes) the host SIGKILLs its QEMU: a power cut, not a
   shutdown; its page cache is lost, what QEMU had written to an image file is kept;
3. the survivor notices, promotes itself (`repctl promote`), checks r1, writes changes of its
   own; the host checks its r0 image: every acknowledged write there, byte for byte; and r1:
   `e2fsck -fn` clean and the log a prefix of intact records (write-order fidelity);
4. the cut node boots again on the same images and comes back as a secondary; the resync must
   send exactly the union of both sides' changed chunks, and on r0 each side's changes must be
   exactly what it wrote since they parted;
5. the roles turn: the new primary writes and is cut next.

After the last cut both stop cleanly and the host compares their data images byte for byte.
It prints one line per cut and a tally, writes a junit report (a test case per cut and one for
the final comparison), and exits 0 only when all passed; 77 when the VMs cannot boot here
(skip), except under CI=true where that fails. It builds nothing: `make module` and `make venv`
first (the Makefile's powercut and soak targets do).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import shutil
import signal
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))
import vmpair
import vmrun
from powercut_node import CHUNK, OWN_BLOCKS, block

RESULTS = vmrun.REPO / "build" / "powercut-results"
DISKS = {"r0-data": 32 << 20, "r0-meta": 1 << 20, "r1-data": 32 << 20, "r1-meta": 1 << 20,
         "state": 16 << 20}
CUT_AFTER = (0.5, 8.0)       # seconds into the writes (uniform)
BOOT_TIMEOUT = 900           # a boot until it writes (boot, daemon, sync, promotion, resync)
STEP_TIMEOUT = 600           # from the cut until the survivor has promoted, and the like


def say(msg: str) -> None:
    print(f"powercut: {msg}", flush=True)


def make_disks(where: Path) -> dict[str, Path]:
    return {key: vmpair.make_image(where / f"{key}.img", size, ext4=(key == "state"))
            for key, size in DISKS.items()}


class Pair:
    """The two guests, booted again and again on the same disk images."""

    def __init__(self, root: Path, cuts: int, seed: int) -> None:
        self.root, self.cuts, self.seed = root, cuts, seed
        self.disks = {n: make_disks(root / "disks" / n) for n in ("alpha", "beta")}
        proto = vmpair.pair(root, ("alpha", "beta"), self.disks)
        self.index = {n: g.index for n, g in proto.items()}
        self.ports = {n: g.ports for n, g in proto.items()}
        self.boots = {"alpha": 0, "beta": 0}
        self.live: list[vmpair.Guest] = []

    def boot(self, name: str, start: str, cuts_before: int) -> vmpair.Guest:
        self.boots[name] += 1
        g = vmpair.Guest(name, self.index[name], self.root / f"{name}-{self.boots[name]}",
                         self.disks[name], self.ports[name])
        vmrun.fresh_dir(g.results)
        plan = {"name": name, "start": start, "cuts_before": cuts_before, "cuts": self.cuts,
                "seed": self.seed, "serials": {k: vmpair.SERIAL.format(k) for k in DISKS}}
        (g.results / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        g.start("node", ["python", "tests/vm/powercut_node.py", str(g.results)], "console.log")
        self.live.append(g)
        return g

    def kill_all(self) -> None:
        for g in self.live:
            if g.running():
                g.kill()


def marker(g: vmpair.Guest, name: str, timeout: float) -> dict | None:
    """The JSON after `name` on g's console (or {} for a bare marker), None if it never came."""
    m = g.wait_line(rf"^{name}(?: (.*))?$", timeout)
    if m is None:
        return None
    return json.loads(m.group(1)) if m.group(1) else {}


def killed_problems(g: vmpair.Guest) -> list[str]:
    """A guest whose power was cut never got to the end: its modules loaded and its live kernel
    log is clean, that is all one can ask."""
    problems = []
    if vmrun.read_int(g.results / "insmod_rc") != 0:
        problems.append(f"{g.results.name}: the modules did not load")
    try:
        trouble = vmrun.kernel_trouble((g.results / "dmesg-live.txt").read_text(errors="replace"))
    except OSError:
        trouble = ["no kernel log"]
    return problems + [f"{g.results.name}: kernel: {line}" for line in trouble[:20]]


def acked(lines: list[str]) -> dict[str, int]:
    """Per resource, how many writes the `PC-ACK RES N` lines acknowledge (0..N completed)."""
    top = {"r0": -1, "r1": -1}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "PC-ACK" and parts[1] in top and parts[2].isdigit():
            top[parts[1]] = max(top[parts[1]], int(parts[2]))
    return {r: n + 1 for r, n in top.items()}


def check_cut(p: Pair, survivor: str, k: int, acks: dict[str, int], promoted: dict) -> list[str]:
    """What the survivor holds after cut k, before anything resyncs."""
    problems = []
    lost = []
    with p.disks[survivor]["r0-data"].open("rb") as f:
        for i in range(acks["r0"]):
            f.seek(i * CHUNK)
            if f.read(CHUNK) != block(p.seed, f"r0-{k}", i):
                lost.append(i)
    if lost:
        problems.append(f"r0 (sync): {len(lost)} of {acks['r0']} acknowledged writes are not on "
                        f"{survivor}'s disk, byte for byte (first: {lost[:10]})")
    intact, size = promoted["records_intact"], promoted["log_bytes"]
    if promoted["fsck_rc"] != 0:
        problems.append(f"r1 (async): e2fsck -fn on the promoted copy exited "
                        f"{promoted['fsck_rc']}:\n{promoted['fsck_out']}")
    if size != intact * CHUNK:
        problems.append(f"r1 (async): log-{k} on {survivor} holds {size} bytes but only {intact} "
                        f"intact records in a row: not a prefix of the writes")
    if intact > acks["r1"] + 1:  # at most the one write in flight, never acknowledged
        problems.append(f"r1 (async): {survivor} holds {intact} records, {acks['r1']} were "
                        f"acknowledged")
    return problems


def chunks(hexbits: str) -> set[int]:
    n = int.from_bytes(bytes.fromhex(hexbits), "little")
    return {i for i in range(n.bit_length()) if n >> i & 1}


def check_resync(rejoin: dict, promoted: dict, resynced: dict, nr: int,
                 acks: dict[str, int]) -> tuple[list[str], dict]:
    """The resync after cut k sent exactly the union of both sides' changes, and on r0, where
    the writes are known, those changes are exactly what each side wrote since they parted: the
    survivor's own blocks, and a subset of the cut primary's last round (a bitmap kept from an
    earlier round would be resent at every resync)."""
    problems, union = [], {}
    own = chunks(promoted["changes"]["r0"])
    if own != set(OWN_BLOCKS):
        problems.append(f"r0: the survivor's changes are {len(own)} chunks, not the "
                        f"{len(OWN_BLOCKS)} it wrote (extra: {sorted(own - set(OWN_BLOCKS))[:10]})")
    theirs = chunks(rejoin["r0"])
    if not theirs <= set(range(acks["r0"] + 1)):
        problems.append(f"r0: the cut primary's changes hold chunks it did not write in its "
                        f"last round: {sorted(theirs - set(range(acks['r0'] + 1)))[:10]}")
    for r in ("r0", "r1"):
        union[r] = len(chunks(rejoin[r]) | chunks(promoted["changes"][r]))
        if resynced[r] != union[r] * CHUNK:
            problems.append(f"{r}: the resync sent {resynced[r]} bytes; the union of both sides' "
                            f"changes is {union[r]} chunks ({union[r] * CHUNK} bytes)")
        if union[r] * 4 > nr:
            problems.append(f"{r}: the union of changes is {union[r]} of {nr} chunks: far more "
                            f"than was written")
    return problems, union


def run(root: Path, cuts: int, seed: int) -> tuple[list[tuple[str, float, list[str]]], list[dict]]:
    """Boot the pair, cut the primary `cuts` times. Returns (junit cases, figures per cut)."""
    rng = random.Random(seed)
    p = Pair(root, cuts, seed)
    cases: list[tuple[str, float, list[str]]] = []
    figures: list[dict] = []
    nr = DISKS["r0-data"] // CHUNK
    primary = p.boot("alpha", "primary", 0)
    survivor = p.boot("beta", "secondary", 0)
    t0 = time.monotonic()
    try:
        for k in range(1, cuts + 1):
            fig: dict = {"cut": k, "primary": primary.name}
            problems: list[str] = []
            if primary.wait_line(r"^PC-WRITING$", BOOT_TIMEOUT) is None:
                cases.append((f"cut-{k}", time.monotonic() - t0, [
                    f"{primary.results.name} never started writing (see its console.log)"]))
                return cases, figures
            cut_after = rng.uniform(*CUT_AFTER)
            time.sleep(cut_after)
            primary.kill()
            acks = acked(primary.lines())
            fig.update(cut_after_s=round(cut_after, 2), acked_r0=acks["r0"], acked_r1=acks["r1"])
            problems += killed_problems(primary)
            say(f"cut {k}: {primary.name}'s power cut {cut_after:.2f} s into the writes; "
                f"acknowledged: r0 {acks['r0']} writes, r1 {acks['r1']} records")

            promoted = marker(survivor, "PC-PROMOTED", STEP_TIMEOUT)
            if promoted is None:
                cases.append((f"cut-{k}", time.monotonic() - t0, problems + [
                    f"{survivor.results.name} did not promote after the cut"]))
                return cases, figures
            problems += check_cut(p, survivor.name, k, acks, promoted)
            fig.update(promote_s=promoted["promote_s"], records_r1=promoted["records_intact"])

            back = p.boot(primary.name, "rejoin", k)
            rejoin = marker(back, "PC-REJOIN", BOOT_TIMEOUT)
            resynced = marker(survivor, "PC-RESYNCED", BOOT_TIMEOUT)
            if rejoin is None or resynced is None:
                cases.append((f"cut-{k}", time.monotonic() - t0, problems + [
                    f"{back.results.name} did not come back and resync"]))
                return cases, figures
            more, union = check_resync(rejoin, promoted, resynced, nr, acks)
            problems += more
            fig.update(resync_r0=resynced["r0"], resync_r1=resynced["r1"],
                       union_r0=union["r0"], union_r1=union["r1"])
            cases.append((f"cut-{k}", time.monotonic() - t0, problems))
            fig["passed"] = not problems
            fig["s"] = round(time.monotonic() - t0, 1)
            figures.append(fig)
            say(f"cut {k} {'passed' if not problems else 'FAILED'}: " +
                ", ".join(f"{key} {v}" for key, v in fig.items() if key != "passed"))
            for prob in problems:
                say(f"  {prob}")
            t0 = time.monotonic()
            primary, survivor = survivor, back

        # after the last cut both stop cleanly: their runs must have passed, the images agree
        t0 = time.monotonic()
        problems = []
        for g in (primary, survivor):
            _, timed_out = g.wait(STEP_TIMEOUT)
            problems += [f"{g.results.name}: {x}" for x in
                         vmrun.check_results(g.results, "node", timed_out)]
        for key in ("r0-data", "r1-data"):
            if not filecmp.cmp(p.disks["alpha"][key], p.disks["beta"][key], shallow=False):
                problems.append(f"{key}: alpha's and beta's images differ after the last resync")
        cases.append(("copies-equal", time.monotonic() - t0, problems))
        for prob in problems:
            say(f"  {prob}")
        return cases, figures
    finally:
        p.kill_all()


def junit(path: Path, cases: list[tuple[str, float, list[str]]]) -> None:
    suite = ET.Element("testsuite", name="powercut", tests=str(len(cases)),
                       failures=str(sum(1 for c in cases if c[2])), errors="0", skipped="0")
    for name, secs, problems in cases:
        case = ET.SubElement(suite, "testcase", classname="tests.powercut", name=name,
                             time=f"{secs:.1f}")
        if problems:
            ET.SubElement(case, "failure", message=problems[0][:200]).text = "\n".join(problems)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="powercut.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cuts", type=int, default=3, help="power cuts (default 3; make soak: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed (default random; printed)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--preflight", action="store_true",
                   help="only check that the VMs can boot here (exit 0, or 77: skip)")
    args = p.parse_args(argv)
    if args.cuts < 1:
        p.error("--cuts: at least 1")
    kver = vmrun.choose_kver(None)
    reasons = vmrun.missing_requirements(kver, need_headers=args.preflight)
    if args.preflight:
        return vmrun.skip_or_fail(reasons) if reasons else 0
    if not reasons and not vmrun.MODULE.is_file():
        reasons.append("kmod/dm-repl.ko not built (make module)")
    if reasons:
        return vmrun.skip_or_fail(reasons)

    root = vmrun.claim_results(args.results)
    vmrun.fresh_dir(root)
    seed = args.seed or random.SystemRandom().randrange(1, 2**31)
    say(f"{args.cuts} power cuts, seed {seed} (again: --seed {seed}); results in "
        f"{vmrun.rel(root)}/")
    started = time.monotonic()
    cases, figures = run(root, args.cuts, seed)
    junit(root / "junit.xml", cases)
    failed = sum(1 for c in cases if c[2])
    ok = sum(1 for f in figures if f.get("passed"))
    say(f"tally after {time.monotonic() - started:.0f} s: {ok} of {args.cuts} cuts passed")
    say(f"  sync (r0): {sum(f['acked_r0'] for f in figures)} writes acknowledged, "
        f"{sum(1 for f in figures if not f.get('passed'))} cuts with a problem (see above)")
    say(f"  async (r1): {sum(f['acked_r1'] for f in figures)} records acknowledged, "
        f"{sum(f['records_r1'] for f in figures)} on the promoted copy (a prefix: async may "
        f"lose the newest)")
    if failed:
        say(f"FAILED; disk images kept in {vmrun.rel(root / 'disks')}/; same run: --seed {seed}")
    else:
        shutil.rmtree(root / "disks", ignore_errors=True)
    print(f"powercut: {len(cases) - failed} passed, {failed} failed, 0 skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    # the guests run in sessions of their own: a SIGTERM must still reach run()'s cleanup
    for _sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, vmrun._raise_interrupted)
    try:
        sys.exit(main(sys.argv[1:]))
    except (KeyboardInterrupt, vmrun.Interrupted):
        sys.exit(130)
