"""ocf-tester (resource-agents) against the Pacemaker agent ocf/repctl, on a real repctl pair.

Not collected by the VM tier (the name does not start with test_): it takes about 25 minutes
under emulation. Run it by hand: .venv/bin/python tests/vmrun.py --no-crash -- -s
tests/vm/ocf_tester_vm.py

Real here: the repctl CLI, two repctl daemon processes (alpha and beta, each in its own network
namespace joined by a veth pair, as in test_failover_procs.py), the dm-repl kernel module, the
loop devices and /dev/mapper/r0, and the OCF shell functions of resource-agents (OCF_ROOT is
/usr/lib/ocf, read-only in the guest, which is all they need).

A STAND-IN: Pacemaker does not run in this test, so the agent's promotion-score calls
(crm_master) go to a small script first in PATH that only records its arguments, as in
tests/host/test_ocf.py. What Pacemaker does with the scores is tested by the two-guest cluster
test (make test-cluster, tests/pcmk/), not here.

ocf-tester runs every action on alpha, the configured source, in alpha's namespace: the probe,
demote and stop of the primary it finds, start, three rounds of promote and demote (with a
demote of the secondary and a promote of the primary in between), stop, start twice, stop
twice. The test checks that it passes, and that the agent's promote and demote
changed alpha's real role: the daemon's own role events, followed over its control socket for
the whole run, and the device, followed by a poller.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from cluster import ROOT, config_text, wait_for, write_secret
from repctl import metadata
from repctl.control import ControlClient, encode
from repctl.errors import ReplError

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "ocf" / "repctl"
REPCTL = REPO / ".venv" / "bin" / "repctl"
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
HERE = ROOT / "ocf"  # this test's daemons' sockets, state and configs
SIZE_MB = 16
NS = {"alpha": "rp-oa", "beta": "rp-ob"}
VETH = {"alpha": ("oa0", "10.78.2.1"), "beta": ("ob0", "10.78.2.2")}
# ocf-tester runs some 35 actions, each a few repctl CLI calls of seconds to a minute each
# under emulation (docs/testing.md has the figures)
TESTER_TIMEOUT = 45 * 60

# The stand-in for Pacemaker's crm_master: records the score calls, changes nothing.
FAKE_CRM_MASTER = """#!/bin/sh
echo "$OCF_RESOURCE_INSTANCE $*" >> "$(dirname "$0")/crm.log"
"""


def sh(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def sock(node: str) -> Path:
    return HERE / node / "repctl.sock"


def status(node: str) -> dict[str, Any] | None:
    """The node's r0 from its daemon's status, None when r0 is down there."""
    found = ControlClient(sock(node)).call("status")["resources"]
    return found[0] if found else None


class Recorder:
    """Follows alpha for the whole ocf-tester run: the daemon's role events (exact, in order,
    over the control socket's event stream) and, polled, what the node looks like: its role
    ("down" when r0 is down) and whether /dev/mapper/r0 exists."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.seen: list[tuple[str, bool]] = []
        self._stop = threading.Event()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(str(sock("alpha")))
        self._conn.sendall(encode({"cmd": "events", "args": {}}))
        time.sleep(1)  # the daemon subscribes us when it reads the request
        self._threads = [threading.Thread(target=self._follow, daemon=True),
                         threading.Thread(target=self._poll, daemon=True)]
        for t in self._threads:
            t.start()

    def _follow(self) -> None:
        with self._conn.makefile("rb") as lines:
            for line in lines:
                msg = json.loads(line)
                if "event" in msg:
                    self.events.append(msg["event"])

    def _poll(self) -> None:
        while not self._stop.is_set():
            before = os.path.exists("/dev/mapper/r0")
            try:
                st = status("alpha")
            except ReplError:  # the daemon busy past the client's timeout: ask again
                continue
            # a sample taken while the device came or went is not kept
            if before == os.path.exists("/dev/mapper/r0"):
                now = (st["role"] if st else "down", before)
                if not self.seen or self.seen[-1] != now:
                    self.seen.append(now)
            time.sleep(1)  # each state lasts seconds: the emulated CPU is better spent elsewhere

    def stop(self) -> None:
        self._stop.set()
        self._threads[1].join(30)
        self._conn.shutdown(socket.SHUT_RDWR)
        self._threads[0].join(30)
        self._conn.close()

    def roles(self) -> list[tuple[str, str]]:
        return [(e["old"], e["new"]) for e in self.events if e.get("what") == "role"]


def test_ocf_tester_against_the_real_module(cleanup, loopdev):
    started = time.monotonic()
    sh("rm", "-rf", str(HERE))
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        cleanup.netns(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", VETH["alpha"][0], "netns", NS["alpha"], "type", "veth", "peer",
       "name", VETH["beta"][0], "netns", NS["beta"])
    for node, (dev, ip) in VETH.items():
        sh("ip", "-n", NS[node], "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", NS[node], "link", "set", dev, "up")
    data = {n: loopdev(SIZE_MB) for n in NS}
    meta = {n: loopdev(1) for n in NS}
    metadata.format_metadata(meta["alpha"], (SIZE_MB << 20) // 512, 8, force=True)
    nodes = {n: {"address": VETH[n][1], "device": data[n], "metadata": meta[n]} for n in NS}
    secret = write_secret(HERE / "secret")
    cfg = {}
    for n in NS:
        (HERE / n).mkdir(parents=True, exist_ok=True)
        cfg[n] = HERE / n / "repctl.yaml"
        cfg[n].write_text(config_text(n, nodes, {"beta": "sync"}, root=HERE, secret=secret))

    cleanup.add("r0", lambda: sh("dmsetup", "remove", "--retry", "r0", check=False))
    for n in ("beta", "alpha"):
        with open(RESULTS / f"daemon-ocf-{n}.log", "a") as log:  # the daemon keeps its copy
            proc = subprocess.Popen(["ip", "netns", "exec", NS[n], str(REPCTL), "-c",
                                     str(cfg[n]), "daemon", "--node", n],
                                    stdout=log, stderr=subprocess.STDOUT)
        cleanup.process(proc, timeout=60)
        wait_for(sock(n).exists, 120, f"{n}'s control socket")
    wait_for(lambda: (status("alpha") or {}).get("role") == "primary"
             and os.path.exists("/dev/mapper/r0"), 60, "alpha up as the primary")
    wait_for(lambda: all(t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                         for t in status("alpha")["targets"]), 180,  # type: ignore[index]
             "beta in sync", interval=0.5)
    setup = time.monotonic() - started

    # The agent where user nobody can read it (ocf-tester runs meta-data as nobody), and the
    # stand-in crm_master first in PATH (ocf-shellfuncs appends the system's folders after it).
    bin_dir = HERE / "bin"
    bin_dir.mkdir()
    for d in (HERE, bin_dir):
        d.chmod(0o755)
    agent = bin_dir / "repctl-agent"
    shutil.copy(AGENT, agent)
    agent.chmod(0o755)
    crm = bin_dir / "crm_master"
    crm.write_text(FAKE_CRM_MASTER)
    crm.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "OCF_ROOT": "/usr/lib/ocf",
           "HOME": "/root", "LANG": "C.UTF-8"}

    # What one action costs here: the agent runs the repctl CLI (a Python program) once or
    # more per action, and ocf-tester runs some 35 actions.
    t = time.monotonic()
    sh("ip", "netns", "exec", NS["alpha"], str(REPCTL), "-c", str(cfg["alpha"]), "status",
       "--json")
    cli = time.monotonic() - t
    t = time.monotonic()
    probe = subprocess.run([str(agent), "monitor"], env={
        **env, "OCF_RESOURCE_INSTANCE": "r0", "OCF_RESKEY_resource": "r0",
        "OCF_RESKEY_config": str(cfg["alpha"]), "OCF_RESKEY_repctl": str(REPCTL),
        "OCF_RESKEY_CRM_meta_interval": "10000"}, capture_output=True, text=True, check=False)
    monitor = time.monotonic() - t
    assert probe.returncode == 8, probe.stderr  # running promoted: alpha is the primary
    (bin_dir / "crm.log").unlink(missing_ok=True)

    rec = Recorder()
    ready = time.monotonic()
    log = RESULTS / "ocf-tester.log"  # written as it runs: kept when it times out
    try:
        with log.open("w") as f:
            p = subprocess.run(
                ["ip", "netns", "exec", NS["alpha"],
                 shutil.which("ocf-tester") or "/usr/sbin/ocf-tester", "-v", "-n", "r0",
                 "-o", "resource=r0", "-o", f"config={cfg['alpha']}", "-o", f"repctl={REPCTL}",
                 str(agent)],
                env=env, stdout=f, stderr=subprocess.STDOUT, timeout=TESTER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ocf-tester did not finish within {TESTER_TIMEOUT} s; it "
                             f"said:\n{log.read_text()}") from None
    finally:
        rec.stop()
    tested = time.monotonic()
    out = log.read_text()
    crm_log = bin_dir / "crm.log"
    scores = crm_log.read_text().splitlines() if crm_log.exists() else []
    print(f"ocf-tester: setup {setup:.0f} s, one `repctl status` {cli:.1f} s, one "
          f"agent monitor {monitor:.1f} s, ocf-tester {tested - ready:.0f} s")
    print(f"role events: {rec.roles()}\nobserved (role, device): {rec.seen}\nscores: {scores}")

    assert p.returncode == 0, out
    assert "passed all tests" in out
    # Every promote and demote of the run changed the real role, in this order: the primary
    # ocf-tester found demoted ("Cleanup, demote"), then three rounds of promote and demote
    # ("Checking for promote action" and "demotion of started resource"; promote, demote;
    # "Promoting resource", "Demoting resource"). The demote of a secondary and the promote
    # of a primary in between change nothing and emit nothing.
    assert rec.roles() == [("primary", "secondary")] + [
        ("secondary", "primary"), ("primary", "secondary")] * 3, rec.events
    # The device was there while alpha was the primary, never while it was a secondary; the
    # poller also saw alpha down (stopped) without it.
    assert ("primary", True) in rec.seen and ("secondary", False) in rec.seen, rec.seen
    assert ("down", False) in rec.seen, rec.seen
    assert ("secondary", True) not in rec.seen, rec.seen
    # ocf-tester ends with the resource stopped: down in the daemon, no device
    assert status("alpha") is None
    assert not os.path.exists("/dev/mapper/r0")
    # The promotion scores the agent asked for: 10000 while primary or UpToDate, and deleted
    # once stopped (the last call).
    assert "r0 -Q -l reboot -v 10000" in scores, scores
    assert scores[-1] == "r0 -Q -l reboot -D", scores
    # beta followed every promotion: a secondary all along, in session with alpha at the end
    # of the last one (its role never changed)
    assert (status("beta") or {}).get("role") == "secondary"
