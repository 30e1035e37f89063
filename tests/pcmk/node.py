# SPDX-License-Identifier: GPL-2.0-only
"""One node of the two-guest Pacemaker cluster test, in its guest (tests/pcmk/run.py boots it):

    guest-run.sh node RESULTS -- python tests/pcmk/node.py RESULTS

RESULTS is the folder shared writable with the host. The host puts there `plan.json` (this
node's name, which boot this is, the sizes), `authkey` (Corosync's key), `secret` (repctl's),
and, while the node runs, the files that tell it what to do next:

    write       start the writer (the node must be the promoted one)
    acked.txt   the blocks the other node acknowledged before it lost its power: check them
                (this node must have been promoted since), then write blocks of its own
    stop        stop Pacemaker (it stops the clone here), the daemon, and power off

The node speaks on its console, one `PCMK ...` line per step (run.py waits for them), and
`PC-ACK N` for every block the writer wrote and had acknowledged (O_DIRECT|O_SYNC, so a line
means the write completed).

What runs here is real: the dm-repl module, the repctl daemon (started before Pacemaker, as
docs/pacemaker.md says systemd would), Corosync and Pacemaker (tests/pcmk/node.sh starts them
by hand: there is no systemd), the agent ocf/repctl that Pacemaker runs. There is no fencing:
stonith-enabled=false (a test-only shortcut, docs/testing.md).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "vm"))
from cluster import config_text
from repctl import metadata
from repctl.control import ControlClient
from repctl.errors import ReplError

NODE_SH = REPO / "tests" / "pcmk" / "node.sh"
AGENT = REPO / "ocf" / "repctl"
REPCTL = REPO / ".venv" / "bin" / "repctl"
ROOT = Path("/tmp/pcmk")             # the repctl config, socket and state of this node
NODES = {"alpha": "10.79.0.1", "beta": "10.79.0.2"}
BLOCK = 4096
DEVICE = "/dev/mapper/r0"


def say(text: str) -> None:
    print(f"PCMK {text}", flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def block(i: int, who: str = "writer") -> bytes:
    """The unique content of block i."""
    return hashlib.sha256(f"pcmk-{who}-{i}".encode()).digest() * (BLOCK // 32)


def disk_by_serial(serial: str) -> str:
    for d in Path("/sys/block").glob("vd*"):
        s = d / "serial"
        if s.exists() and s.read_text().strip() == serial:
            return f"/dev/{d.name}"
    raise RuntimeError(f"no virtio disk with serial {serial}")


class Node:
    def __init__(self, results: Path) -> None:
        self.results = results
        self.plan: dict[str, Any] = json.loads((results / "plan.json").read_text())
        self.name: str = self.plan["node"]
        self.peer = next(n for n in NODES if n != self.name)
        self.sock = ROOT / self.name / "repctl.sock"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.stack = False

    # -- repctl ---------------------------------------------------------------------------

    def setup_repctl(self) -> None:
        data = disk_by_serial("repctl-data")
        meta = disk_by_serial("repctl-meta")
        state = disk_by_serial("repctl-state")
        here = ROOT / self.name
        (here / "state").mkdir(parents=True, exist_ok=True)
        # the state disk (ext4, an image on the host) survives the power cut, as
        # /var/lib/repctl would; mounting it replays its journal
        sh("mount", "-o", "sync", state, str(here / "state"))
        secret = ROOT / "secret"
        secret.write_bytes((self.results / "secret").read_bytes())
        secret.chmod(0o600)
        nodes = {n: {"address": a, "device": data, "metadata": meta} for n, a in NODES.items()}
        # sync_timeout 30 s: an emulated guest starved of CPU for a few seconds must not make
        # the primary complete writes without its sync target (docs/failover.md, Limits)
        self.config = ROOT / "repctl.yaml"
        self.config.write_text(config_text(self.name, nodes, {"beta": "sync"}, root=ROOT,
                                           secret=secret, sync_timeout="30s"))
        marker = here / "state" / "metadata-formatted"
        if self.name == "alpha" and not marker.exists():
            size = metadata.device_bytes(data)
            metadata.format_metadata(meta, size // 512, BLOCK // 512, force=True)
            marker.write_text("by tests/pcmk/node.py\n")
            say(f"formatted alpha's metadata for {size} bytes")

    def start_daemon(self) -> None:
        self.sock.unlink(missing_ok=True)  # a power cut leaves the old one on the state disk
        log = open(self.results / f"daemon-boot{self.plan['boot']}.log", "ab")  # noqa: SIM115
        self.daemon = subprocess.Popen([str(REPCTL), "-c", str(self.config), "daemon",
                                        "--node", self.name], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait(lambda: self.sock.exists(), 180, "the repctl daemon's control socket")
        say(f"repctl daemon running (pid {self.daemon.pid})")

    def status(self) -> dict[str, Any] | None:
        try:
            found = ControlClient(self.sock).call("status")["resources"]
        except ReplError:
            return None
        return found[0] if found else None

    def in_sync(self) -> bool:
        """As a primary: every target streaming with nothing left to send."""
        st = self.status() or {}
        k = st.get("kernel") or {}
        return (st.get("role") == "primary" and bool(st.get("targets"))
                and k.get("acked", -1) >= k.get("published", 0)
                and all(t["state"] == "streaming" and t["out_of_sync_bytes"] == 0
                        and t["lag_records"] == 0 for t in st["targets"]))

    # -- Corosync and Pacemaker -------------------------------------------------------------

    def start_stack(self) -> None:
        sh("bash", str(NODE_SH), "agent", str(AGENT))
        sh("bash", str(NODE_SH), "start", self.name, str(self.results), timeout=900)
        self.stack = True
        say("corosync and pacemaker running")

    def crm(self) -> tuple[set[str], dict[str, str]]:
        """(the online nodes, {node: role of r0 there}) as crm_mon says."""
        p = sh("crm_mon", "-1", "--output-as=xml", check=False, timeout=120)
        if p.returncode:
            return set(), {}
        root = ET.fromstring(p.stdout)
        online = {n.get("name", "") for n in root.iter("node")
                  if n.get("online") == "true" and n.get("name")}
        roles = {}
        old = {"Master": "Promoted", "Slave": "Unpromoted"}  # the names before Pacemaker 2.1
        for r in root.iter("resource"):
            if r.get("id") == "r0" and r.get("active") == "true":
                for n in r.iter("node"):
                    role = r.get("role", "")
                    roles[n.get("name", "")] = old.get(role, role)
        return online, roles

    def snapshot(self, what: str) -> None:
        p = sh("crm_mon", "-1", "-A", "--show-detail", check=False, timeout=120)
        (self.results / f"crm_mon-{what}.txt").write_text(p.stdout + p.stderr)

    def configure(self) -> None:
        """The CIB, built offline with pcs -f and pushed: stonith off (no fence device in the
        test), the promotable clone as docs/pacemaker.md has it, with longer intervals and
        timeouts: under emulation one repctl CLI call can take a minute."""
        wait(lambda: self.crm()[0] == set(NODES), 600, "both nodes online in crm_mon")
        cib = Path("/run/pcmk-cib.xml")
        cib.write_text(sh("cibadmin", "--query").stdout)
        env_pcs = ["env", "HOME=/run/pcmk-home", "pcs", "-f", str(cib)]
        sh(*env_pcs, "property", "set", "stonith-enabled=false")
        sh(*env_pcs, "resource", "defaults", "update", "resource-stickiness=100")
        sh(*env_pcs, "resource", "create", "r0", "ocf:repctl:repctl", "resource=r0",
           f"config={self.config}", f"repctl={REPCTL}",
           "op", "monitor", "interval=59s", "timeout=300s", "role=Promoted",
           "op", "monitor", "interval=61s", "timeout=300s", "role=Unpromoted",
           "op", "start", "timeout=600s", "op", "stop", "timeout=600s",
           "op", "promote", "timeout=600s", "op", "demote", "timeout=600s",
           "op", "notify", "timeout=300s",
           "promotable", "promoted-max=1", "promoted-node-max=1", "clone-max=2",
           "clone-node-max=1", "notify=true")
        sh("env", "HOME=/run/pcmk-home", "pcs", "cluster", "cib-push", str(cib))
        say("CIB pushed: stonith-enabled=false, promotable clone r0-clone")

    def stop_stack(self) -> None:
        if self.stack:
            sh("bash", str(NODE_SH), "stop", timeout=900)
            self.stack = False

    # -- the scenario ----------------------------------------------------------------------

    def writer(self) -> None:
        """Unique blocks 0, 1, ... to /dev/mapper/r0, each O_DIRECT|O_SYNC; `PC-ACK N` once
        written. Runs until the host cuts the power (or the blocks run out)."""
        wait(self.in_sync, 600, "the target in sync before writing")
        say("writing")
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(DEVICE, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        for i in range(self.plan["writer_blocks"]):
            buf[:] = block(i)
            os.pwrite(fd, buf, i * BLOCK)
            print(f"PC-ACK {i}", flush=True)
        os.close(fd)
        say("writer done: no power cut came")

    def check(self, acked: list[int]) -> None:
        """This node, promoted after the other lost its power: every block the other had
        acknowledged is here, then blocks of its own (which the other lacks)."""
        lost = []
        with open(DEVICE, "rb", buffering=0) as f:
            for i in acked:
                f.seek(i * BLOCK)
                if f.read(BLOCK) != block(i):
                    lost.append(i)
        if lost:
            say(f"CHECK LOST {len(lost)} of {len(acked)} acknowledged blocks: {lost[:20]}")
        else:
            say(f"CHECK ok {len(acked)} acknowledged blocks all here")
        st = self.status() or {}
        sent = {t["name"]: t["resync_bytes"] for t in st.get("targets", [])}
        first, count = self.plan["own_blocks"]
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(DEVICE, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        for i in range(first, first + count):
            buf[:] = block(i, "survivor")
            os.pwrite(fd, buf, i * BLOCK)
        os.close(fd)
        self.sent_before = sent.get(self.peer, 0)
        say(f"WROTE {count} blocks from {first}; resync_bytes to {self.peer} {self.sent_before}")

    def run(self) -> int:
        boot = self.plan["boot"]
        self.setup_repctl()
        self.start_daemon()
        # first boot: the initial sync before Pacemaker (docs/pacemaker.md, Install)
        if boot == 1:
            if self.name == "alpha":
                wait(self.in_sync, 900, "the initial sync to beta", interval=1)
            else:
                wait(lambda: (self.status() or {}).get("disk") == "UpToDate", 900,
                     "beta UpToDate (the initial sync)", interval=1)
            say(f"initial sync done: {self.status()}")
        else:
            st = wait(self.status, 300, "r0 up after the reboot")
            say(f"REBOOTED r0 up as {st['role']} disk {st.get('disk')}")
        self.start_stack()
        if boot == 1 and self.name == "alpha":
            self.configure()

        promoted = rejoined = checked = synced = False
        writing: threading.Thread | None = None
        while not (self.results / "stop").exists():
            st = self.status() or {}
            _, roles = self.crm()
            role = roles.get(self.name, "")
            if not promoted and st.get("role") == "primary" and role == "Promoted":
                promoted = True
                self.snapshot("promoted")
                say(f"PROMOTED {self.name} by pacemaker (crm_mon: {roles})")
            if boot > 1 and not rejoined and role == "Unpromoted":
                rejoined = True
                self.snapshot("rejoined")
                say(f"REJOINED {self.name}: {role} in crm_mon, repctl role {st.get('role')} "
                    f"disk {st.get('disk')} (crm_mon: {roles})")
            if writing is None and (self.results / "write").exists():
                writing = threading.Thread(target=self.writer, daemon=True)
                writing.start()
            acked = self.results / "acked.txt"
            if promoted and not checked and acked.exists() and acked.stat().st_size:
                checked = True
                self.check([int(x) for x in acked.read_text().split()])
            if checked and not synced and self.in_sync():
                synced = True
                t = next(t for t in st["targets"] if t["name"] == self.peer)
                self.snapshot("synced")
                say(f"SYNCED {self.peer}: resync_bytes "
                    f"{t['resync_bytes'] - self.sent_before} (status: {t})")
            if boot > 1 and rejoined and st.get("disk") == "UpToDate" and not synced:
                synced = True
                say(f"UPTODATE {self.name} again")
            time.sleep(3)
        return self.shutdown()

    def shutdown(self) -> int:
        """Pacemaker stops the clone here (demote and repctl down on the primary), then the
        daemon stops; nothing of dm-repl may stay behind (guest-run.sh unloads the module)."""
        say("stopping")
        self.snapshot("before-stop")
        self.stop_stack()
        left = os.path.exists(DEVICE)
        st = self.status()
        if self.daemon is not None:
            self.daemon.terminate()
            self.daemon.wait(120)
        sh("sync")
        sh("umount", str(ROOT / self.name / "state"), check=False)
        ok = not left and st is None
        say(f"STOPPED device {'still there' if left else 'gone'}, r0 "
            f"{'down' if st is None else st.get('role')}: {'ok' if ok else 'NOT CLEAN'}")
        return 0 if ok else 1


def wait(pred: Any, timeout: float, what: str, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := pred():
            return got
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def main() -> int:
    node = Node(Path(sys.argv[1]))
    try:
        return node.run()
    except Exception as e:  # noqa: BLE001 - say why on the console, leave nothing behind
        say(f"FAILED {type(e).__name__}: {e}")
        node.snapshot("failed")
        node.stop_stack()
        if node.daemon is not None:
            node.daemon.terminate()
            node.daemon.wait(120)
        sh("dmsetup", "remove", "--retry", "r0", check=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
