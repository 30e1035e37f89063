# SPDX-License-Identifier: GPL-2.0-only
"""The failover scenarios of tests/vm/test_failover.py, on three Vagrant machines with the
repctl CLI and the systemd-run daemon (make test-vagrant; docs/vagrant.md).

In the netns tier every node shares one kernel, and a "crash" is the daemon stopped and the
device removed. Here each node is its own machine: the switchover goes through `repctl
demote`/`promote` on two hosts, the failover pulls the plug of alpha's VM (`virsh destroy`),
and the split brain is made by two machines that were primary apart.

Each test starts from `Cluster.reset()`: every data disk zeroed, alpha the source with beta
(sync) and gamma (async) streaming.
"""

from __future__ import annotations

import threading
import time

from conftest import DATA, STEP, TOOL, Cluster, say, wait_for

DEV = "/dev/mapper/r0"
MNT = "/mnt/r0"


def write_blocks(node, first: int, count: int, tag: str) -> set[int]:
    p = node.run(f"python3 {TOOL} write {DEV} {first} {count} {tag}")
    acked = {int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("acked ")}
    assert acked == set(range(first, first + count)), p.stdout[-500:]
    return acked


def check_blocks(node, blocks: set[int], tag: str, dev: str = DEV) -> None:
    node.run(f"python3 {TOOL} check {dev} {tag}", input=" ".join(map(str, sorted(blocks))))


def digests(c: Cluster, nodes=("alpha", "beta", "gamma")) -> dict[str, str]:
    return {n: c[n].sha256(DATA) for n in nodes}


def test_switchover(cluster: Cluster) -> None:
    """alpha demoted, beta promoted: the file system alpha wrote is on beta, nothing else is
    resynced, and all three copies are equal after each step; promoting beta while alpha is
    primary is refused."""
    c = cluster
    c.reset()
    alpha, beta = c["alpha"], c["beta"]
    # every inode table written now: no lazy initialisation writing on in the background
    alpha.run(f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {DEV} && "
              f"mkdir -p {MNT} && mount {DEV} {MNT} && "
              f"for i in $(seq 20); do head -c 1M /dev/urandom > {MNT}/a$i; done && "
              f"sha256sum {MNT}/a* > /root/sums && umount {MNT}")
    sums = alpha.run("cat /root/sums").stdout
    c.wait_converged("alpha")

    p = beta.repctl("promote", "r0", check=False)
    assert p.returncode == 1 and "alpha" in p.stderr and "primary" in p.stderr, p
    assert alpha.status()["role"] == "primary"

    alpha.repctl("demote", "r0")
    alpha.run(f"test ! -e {DEV}")
    assert alpha.status()["role"] == "secondary"
    before = digests(c, ("alpha", "beta"))
    assert before["alpha"] == before["beta"], before

    sent = {t["name"]: t["bytes_sent"] for t in alpha.status().get("targets", [])}
    beta.repctl("promote", "r0")
    beta.run(f"mkdir -p {MNT} && mount {DEV} {MNT}")
    beta.run("sha256sum -c --quiet", input=sums)
    beta.run(f"for i in $(seq 5); do head -c 1M /dev/urandom > {MNT}/b$i; done && umount {MNT}")
    c.wait_converged("beta")
    st = beta.status()
    assert {t["name"] for t in st["targets"]} == {"alpha", "gamma"}, st
    # alpha got what beta wrote, not the device (128 MiB)
    to_alpha = next(t["bytes_sent"] for t in st["targets"] if t["name"] == "alpha")
    assert to_alpha < 32 << 20, (to_alpha, sent)
    after = digests(c)
    assert len(set(after.values())) == 1, after
    assert after["alpha"] != before["alpha"]


def test_failover_acknowledged_writes_survive(cluster: Cluster) -> None:
    """Sync writes on alpha; alpha's VM is powered off mid-write (its QEMU killed); `repctl
    promote r0` on beta: every write alpha acknowledged is on beta. alpha boots again, follows
    beta by itself, and ends identical."""
    c = cluster
    c.reset()
    alpha, beta = c["alpha"], c["beta"]
    writer = alpha.popen(f"python3 {TOOL} write {DEV} 0 20000 fo")
    acked: list[int] = []
    failed: list[str] = []

    def read() -> None:
        assert writer.stdout is not None
        for line in writer.stdout:
            if line.startswith("acked "):
                acked.append(int(line.split()[1]))
            elif line.strip():
                failed.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for(lambda: len(acked) >= 300 or writer.poll() is not None, STEP,
             "300 acknowledged sync writes on alpha", lambda: (len(acked), failed))
    assert writer.poll() is None, (writer.returncode, failed, writer.stderr.read())
    c.power_off("alpha")
    writer.wait(120)
    reader.join(60)
    say(f"{len(acked)} writes acknowledged before alpha's power was cut")
    assert len(acked) >= 300

    # beta may still hold its session with alpha until it notices the silence
    def promoted() -> bool:
        p = beta.repctl("promote", "r0", check=False)
        if p.returncode == 0:
            return True
        say(f"promote refused: {p.stderr.strip()}")
        return False

    wait_for(promoted, 300, "beta promoted", interval=10)
    check_blocks(beta, set(acked), "fo")
    own = write_blocks(beta, 25000, 100, "fo-beta")

    c.up("alpha")   # the daemon starts at boot and finds beta primary
    c.wait_converged("beta")
    assert c["alpha"].status()["role"] == "secondary"
    check_blocks(c["alpha"], set(acked), "fo", dev=DATA)
    check_blocks(c["alpha"], own, "fo-beta", dev=DATA)
    d = digests(c)
    assert len(set(d.values())) == 1, d


def test_split_brain_detected_then_resolved(cluster: Cluster) -> None:
    """beta disconnected; alpha writes apart and goes down; beta is promoted and writes too.
    `repctl up r0` on alpha finds a split brain: refused with the way out named, and no byte
    changes on either side. `repctl resolve r0 --discard-local` on alpha makes it beta's
    secondary, resynced to beta's data."""
    c = cluster
    c.reset()
    alpha, beta = c["alpha"], c["beta"]
    alpha.repctl("disconnect", "r0", "beta")
    wait_for(lambda: any(t["name"] == "beta" and t["state"] == "disconnected"
                         for t in alpha.status().get("targets", [])), 120, "beta disconnected")
    mine = write_blocks(alpha, 100, 50, "sb-alpha")
    alpha.repctl("down", "r0")
    beta.repctl("promote", "r0")
    theirs = write_blocks(beta, 3000, 50, "sb-beta")
    before = digests(c, ("alpha", "beta"))

    p = alpha.repctl("up", "r0", check=False)
    assert p.returncode == 1, p
    assert "split brain" in p.stderr and "repctl resolve r0 --discard-local" in p.stderr, p.stderr
    time.sleep(5)
    assert digests(c, ("alpha", "beta")) == before
    alpha.run(f"test ! -e {DEV}")

    out = alpha.repctl("resolve", "r0", "--discard-local").stdout
    assert "resyncs its changed chunks" in out, out
    c.wait_converged("beta")
    assert alpha.status()["role"] == "secondary"
    check_blocks(alpha, theirs, "sb-beta", dev=DATA)
    d = digests(c)
    assert len(set(d.values())) == 1, d
    # alpha's own writes apart were discarded: its blocks are beta's again (zeroes)
    p = alpha.run(f"python3 {TOOL} check {DATA} sb-alpha", input=" ".join(map(str, mine)),
                  check=False)
    assert p.returncode == 1 and "50 wrong" in p.stdout, p.stdout
