"""The Debian packages (`make deb`: build/deb/repctl_*.deb, repctl-dkms_*.deb; docs/install.md),
installed with apt, then loaded and used in the test VM.

The guest's root is the host's. `make deb-root` (tests/deb_root.py) installs the two packages
with apt-get on the HOST, into an overlay of that same root, and keeps what the installation
changed in build/deb-root/upper.tar: dpkg runs the maintainer scripts and DKMS builds dm-repl.ko for
every kernel with headers, this guest's included (about 10 s there; the same build under the
emulated CPU took about 400 s of CI). Nothing is downloaded: everything the packages depend on
is installed.

In the guest, the `installed` fixture unpacks it on a tmpfs and mounts that as the upper
folder of an overlay of / at NEWROOT, binds /proc, /sys, /dev and /run into it: chrooted there,
the system is the one apt left. The tests check the installed files and the installed command
(Debian's python3 with the vendored libraries only) and DKMS's view of the module.

The replication test then swaps the module: guest-run.sh loaded the tree's kmod/dm-repl.ko;
with no repl device left (other test files leave none), it is unloaded and the DKMS-built module
loaded with modprobe in the chroot. Two nodes, each a network namespace joined by a veth pair,
run the INSTALLED /usr/bin/repctl (chrooted): `repctl create-md`, the two daemons, data written
on the primary, the same SHA-256 on the target. At the end the tree's module is loaded again, so
that the rest of the tier and guest-run.sh's final `rmmod dm_repl` find it.

Without the packages or their installation the tests skip, saying so: `make test-vm` does both
(`make deb deb-root`) first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import config_text, veth_pair, wait_for
from conftest import Cleanup
from repctl.control import ControlClient
from replfix import sha256_of

REPO = Path(os.environ.get("REPCTL_REPO", Path(__file__).resolve().parents[2]))
DEBS = REPO / "build" / "deb"
DEB_ROOT = REPO / "build" / "deb-root"  # tests/deb_root.py: the installation, done on the host
TREE_MODULE = REPO / "kmod" / "dm-repl.ko"
RESULTS = Path(os.environ.get("REPCTL_VM_RESULTS", "/tmp"))
BASE = Path("/tmp/repctl-deb")  # a tmpfs: the overlay's upper and work folders, and NEWROOT
NEWROOT = BASE / "root"
SRV = Path("/srv/repctl-deb")  # the nodes' configuration, sockets and state, as seen in NEWROOT
KVER = os.uname().release
SIZE_MB = 32
SIZE = SIZE_MB << 20
NS = {"alpha": "rp-da", "beta": "rp-db"}
VETH = {"alpha": ("da0", "10.78.9.1"), "beta": ("db0", "10.78.9.2")}


def sh(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def in_root(*cmd: str, ns: str | None = None) -> list[str]:
    """The argv that runs cmd in NEWROOT (in network namespace ns), with a plain environment:
    no .venv on PATH, no PYTHON* or REPCTL_* variables."""
    netns = ["ip", "netns", "exec", ns] if ns else []
    return [*netns, "chroot", str(NEWROOT), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", *cmd]


def chroot(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return sh(*in_root(*cmd), check=check, timeout=timeout)


def pyproject_version() -> str:
    m = re.search(r'^version = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert m, "no version in pyproject.toml"
    return m.group(1)


def the_debs() -> list[Path]:
    """The two packages of this tree's version, or a skip saying how to build them."""
    v = pyproject_version()
    debs = [DEBS / f"repctl_{v}_amd64.deb", DEBS / f"repctl-dkms_{v}_all.deb"]
    missing = [str(d.relative_to(REPO)) for d in debs if not d.is_file()]
    if missing:
        pytest.skip(f"no Debian packages to test: {', '.join(missing)} missing; build them with "
                    "`make deb` on the host (`make test-vm` does it first)")
    return debs


@dataclass
class Installed:
    apt_output: str
    apt_seconds: float


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """NEWROOT: an overlay of / whose upper folder (a tmpfs) starts as a copy of what the apt
    installation on the host changed (build/deb-root/upper.tar); all of it undone afterwards."""
    the_debs()
    upper = DEB_ROOT / "upper.tar"
    if not (DEB_ROOT / "apt-install.rc").is_file() or not upper.is_file():
        pytest.skip(f"the packages were not installed on the host: no {upper.relative_to(REPO)}; "
                    "`make deb-root` does it (as root; `make test-vm` runs it first)")
    out = (DEB_ROOT / "apt-install.log").read_text()
    rc = int((DEB_ROOT / "apt-install.rc").read_text())
    assert rc == 0, f"apt-get install on the host exited {rc}:\n{out}"
    cleanup = Cleanup()
    try:
        BASE.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "size=1536m,mode=0755", "repctl-deb", str(BASE))
        cleanup.add(f"tmpfs {BASE}", lambda: sh("umount", str(BASE)))
        # the overlay cannot take a folder under / as a layer above /: unpacked on the tmpfs
        for d in ("upper", "work", "root"):
            (BASE / d).mkdir()
        sh("tar", "-C", str(BASE / "upper"), "--xattrs", "-xf", str(upper))
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir=/,upperdir={BASE / 'upper'},workdir={BASE / 'work'}", str(NEWROOT))
        cleanup.add(f"overlay {NEWROOT}", lambda: sh("umount", str(NEWROOT)))
        for d in ("proc", "sys", "dev", "dev/pts", "run"):
            sh("mount", "--bind", f"/{d}", str(NEWROOT / d))
            cleanup.add(f"bind {NEWROOT / d}", lambda d=d: sh("umount", str(NEWROOT / d)))
        took = float((DEB_ROOT / "apt-install.seconds").read_text())
        print(f"apt-get install of the two packages on the host (DKMS build included): {took:.0f} s")
        yield Installed(out, took)
    finally:
        errors = cleanup.run_all()
        assert not errors, errors


def test_packages_install_their_files(installed):
    out = installed.apt_output
    assert "2 newly installed" in out, out
    assert not re.search(r"^(Get|Err):\S*\s+(https?|ftp)://", out, re.MULTILINE), \
        f"apt downloaded something:\n{out}"
    for path in ("usr/bin/repctl", "usr/lib/repctl/site/repctl/cli.py",
                 "usr/lib/repctl/site/repctl/dm-repl-uapi.h",
                 "lib/systemd/system/repctl.service", "etc/repctl/repctl.yaml.example",
                 "usr/lib/ocf/resource.d/repctl/repctl", "usr/share/man/man1/repctl.1.gz",
                 "usr/share/doc/repctl/vendored.txt", "usr/share/doc/repctl/install.md",
                 "usr/share/doc/repctl/cli.md", "usr/share/doc/repctl/config.md",
                 "usr/share/doc/repctl/failover.md", "usr/share/doc/repctl/pacemaker.md"):
        assert (NEWROOT / path).exists(), f"/{path} not installed"
    assert os.access(NEWROOT / "usr/lib/ocf/resource.d/repctl/repctl", os.X_OK)
    assert (NEWROOT / "usr/bin/repctl").read_text().startswith("#!/usr/bin/python3 -I\n")
    assert not (NEWROOT / "etc/repctl/repctl.yaml").exists(), "a live configuration was installed"
    # the installed command, with Debian's python3 and the vendored libraries only
    assert chroot("/usr/bin/repctl", "version").stdout.strip() == pyproject_version()
    assert "Usage: repctl" in chroot("/usr/bin/repctl", "--help").stdout


def test_dkms_built_and_installed_the_module(installed):
    v = pyproject_version()
    status = chroot("dkms", "status").stdout
    assert re.search(rf"^repctl/{re.escape(v)}, {re.escape(KVER)}, x86_64: installed", status,
                     re.MULTILINE), status
    info = chroot("modinfo", "-k", KVER, "dm-repl").stdout
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", info, re.MULTILINE))
    assert fields.get("filename") == f"/lib/modules/{KVER}/updates/dkms/dm-repl.ko", info
    assert fields.get("name") == "dm_repl", info
    assert fields.get("vermagic", "").split()[0] == KVER, info
    assert "dm-mod" in fields.get("depends", ""), info
    print(f"dkms status:\n{status}modinfo:\n{info}")


def repl_devices() -> list[str]:
    """dm devices with a repl target (they hold dm_repl)."""
    out = sh("dmsetup", "table", check=False).stdout
    return [line.split(":")[0] for line in out.splitlines() if " repl " in line]


def use_the_dkms_module(cleanup: Cleanup) -> None:
    """Replace the tree's dm_repl (loaded by guest-run.sh) with the DKMS one; put the tree's back
    at cleanup."""
    held = repl_devices()
    assert not held, f"repl devices left by another test hold dm_repl: {held}"

    def restore() -> None:
        if repl_devices():
            raise AssertionError(f"repl devices still there: {repl_devices()}")
        if Path("/sys/module/dm_repl").exists():
            sh("rmmod", "dm_repl")
        sh("insmod", str(TREE_MODULE))
        assert Path("/sys/module/dm_repl").exists()

    if Path("/sys/module/dm_repl").exists():
        sh("rmmod", "dm_repl")
    cleanup.add("the tree's dm-repl.ko, loaded again", restore)
    dkms_ko = f"/lib/modules/{KVER}/updates/dkms/dm-repl.ko"
    out = chroot("modprobe", "-v", "dm-repl").stdout
    assert f"insmod {dkms_ko}" in out, out
    # The module has no srcversion; its build ID (in /sys/module/*/notes) tells which file it is.
    loaded = loaded_build_id()
    assert loaded == file_build_id(str(NEWROOT) + dkms_ko), "the loaded dm_repl is not DKMS's"
    print(f"loaded {dkms_ko}, build ID {loaded} (the tree's kmod/dm-repl.ko: "
          f"{file_build_id(str(TREE_MODULE))})")


def loaded_build_id() -> str:
    """The GNU build ID of the loaded dm_repl: an ELF note, namesz, descsz, type, "GNU\\0", ID."""
    note = Path("/sys/module/dm_repl/notes/.note.gnu.build-id").read_bytes()
    namesz, descsz = int.from_bytes(note[0:4], "little"), int.from_bytes(note[4:8], "little")
    start = 12 + (namesz + 3) // 4 * 4
    return note[start:start + descsz].hex()


def file_build_id(ko: str) -> str:
    m = re.search(r"Build ID: ([0-9a-f]+)", sh("readelf", "-n", ko).stdout)
    assert m, f"no build ID in {ko}"
    return m.group(1)


class Nodes:
    """alpha (source, with metadata) -> beta (sync), each in its namespace, run with the
    installed /usr/bin/repctl in NEWROOT."""

    def __init__(self, cleanup: Cleanup, loopdev) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        shutil.rmtree(NEWROOT / SRV.relative_to("/"), ignore_errors=True)
        veth_pair(cleanup, NS, VETH)
        self.data = {n: loopdev(SIZE_MB) for n in NS}
        meta = loopdev(2)
        nodes = {"alpha": {"address": VETH["alpha"][1], "device": self.data["alpha"],
                           "metadata": meta},
                 "beta": {"address": VETH["beta"][1], "device": self.data["beta"]}}
        secret = SRV / "secret"
        self.outside(secret).parent.mkdir(parents=True)
        fd = os.open(self.outside(secret), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"deb-test-secret-0123456789abcdef")
        os.close(fd)
        self.cfg = {}
        for n in NS:
            self.cfg[n] = SRV / n / "repctl.yaml"
            self.outside(self.cfg[n]).parent.mkdir(parents=True)
            self.outside(self.cfg[n]).write_text(
                config_text(n, nodes, {"beta": "sync"}, root=SRV, secret=secret))
        cleanup.add("r0", lambda: sh("dmsetup", "remove", "--retry", "r0", check=False))
        cleanup.add("daemons", self.stop_all)

    @staticmethod
    def outside(path: Path) -> Path:
        """A path of NEWROOT as this process sees it."""
        return NEWROOT / path.relative_to("/")

    def repctl(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        return sh(*in_root("/usr/bin/repctl", "-c", str(self.cfg[node]), *args, ns=NS[node]))

    def start(self, node: str) -> None:
        with open(RESULTS / f"daemon-deb-{node}.log", "ab") as log:
            self.procs[node] = subprocess.Popen(
                in_root("/usr/bin/repctl", "-c", str(self.cfg[node]), "daemon", "--node", node,
                        ns=NS[node]), stdout=log, stderr=subprocess.STDOUT)
        sock = self.outside(SRV / node / "repctl.sock")
        wait_for(sock.exists, 180, f"{node}'s control socket")

    def stop_all(self) -> None:
        for node in list(self.procs):
            p = self.procs.pop(node)
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)

    def status(self) -> dict:
        """alpha's status over its control socket (the CLI starts slowly on the emulated CPU)."""
        client = ControlClient(self.outside(SRV / "alpha" / "repctl.sock"))
        return client.call("status")["resources"][0]

    def converged(self) -> bool:
        st = self.status()
        k = st.get("kernel") or {}
        return k.get("acked", -1) >= k.get("published", 0) and all(
            t["state"] == "streaming" and t["out_of_sync_bytes"] == 0 and t["lag_records"] == 0
            for t in st["targets"])


def test_replication_with_the_installed_packages(installed, cleanup, loopdev):
    started = time.monotonic()
    use_the_dkms_module(cleanup)
    c = Nodes(cleanup, loopdev)
    c.repctl("alpha", "create-md", "r0", "--node", "alpha")
    c.start("beta")
    c.start("alpha")
    wait_for(lambda: os.path.exists("/dev/mapper/r0"), 120, "alpha's device /dev/mapper/r0")
    wait_for(c.converged, 300, "the initial sync to beta", interval=0.5)

    data = os.urandom(4 << 20)
    with open("/dev/mapper/r0", "r+b", buffering=0) as f:
        for offset in (0, 9 << 20, SIZE - len(data)):
            f.seek(offset)
            f.write(data)
        os.fsync(f.fileno())
    wait_for(c.converged, 300, "beta caught up", interval=0.5)

    st = json.loads(c.repctl("alpha", "status", "--json").stdout)["resources"][0]
    assert [(t["name"], t["state"]) for t in st["targets"]] == [("beta", "streaming")], st
    assert sha256_of("/dev/mapper/r0", SIZE) == sha256_of(c.data["beta"], SIZE)
    took = time.monotonic() - started
    print(f"replication with the installed packages: {took:.0f} s")
    (RESULTS / "deb-replication.seconds").write_text(f"{took:.0f}\n")
