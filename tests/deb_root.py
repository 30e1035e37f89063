#!/usr/bin/env python3
"""Install the Debian packages (build/deb) with apt into an overlay of this machine's root, on
the host, and keep what the installation changed for the VM test (tests/vm/test_deb.py).

    python3 tests/deb_root.py            # `make deb-root`, run by `make test-vm`

Why on the host: the test VM boots with this machine's root as its own root, so an overlay of
it is the same system the guest sees; but DKMS compiling dm-repl.ko under the emulated CPU took
about 400 s of CI, against about 10 s here. Everything else is as on a real machine: apt-get
installs the two .deb files (nothing downloaded: their dependencies are installed), dpkg runs
the maintainer scripts, and dh-dkms's postinst builds the module. In a chroot the running
kernel is not an installed one, so that postinst builds for every kernel with headers
(6.1 and 6.12 here), as when a package is installed into an image.

What the installation changed (the overlay's upper folder, whiteouts included) is kept in
build/deb-root/upper.tar. In the guest, test_deb.py unpacks it on a tmpfs, mounts that as the upper
folder of an overlay of / and, chrooted there, checks the files, loads the DKMS-built module with
modprobe and replicates with the installed /usr/bin/repctl.

Also written: build/deb-root/apt-install.log (apt's output), apt-install.rc (its exit status),
apt-install.seconds. A failed apt-get is recorded, not raised: the VM test fails on it with the
log. Exit status: 0, or 2 when this machine cannot do it (not root, no overlayfs, the mounts
refused), 1 on error.
Needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBS = REPO / "build" / "deb"
OUT = REPO / "build" / "deb-root"
CACHE = "var/cache/repctl-deb"  # where the .deb files are copied inside the root


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def version() -> str:
    m = re.search(r'^version = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    if not m:
        raise SystemExit("deb_root: no version in pyproject.toml")
    return m.group(1)


def main() -> int:
    if os.geteuid() != 0:
        print("deb_root: needs root (mount, chroot): not done; test_deb.py will skip",
              file=sys.stderr)
        return 2
    if "overlay" not in Path("/proc/filesystems").read_text():
        print("deb_root: this kernel has no overlayfs: not done; test_deb.py will skip",
              file=sys.stderr)
        return 2
    v = version()
    debs = [DEBS / f"repctl_{v}_amd64.deb", DEBS / f"repctl-dkms_{v}_all.deb"]
    missing = [str(d) for d in debs if not d.is_file()]
    if missing:
        print(f"deb_root: missing {', '.join(missing)}: run `make deb` first", file=sys.stderr)
        return 1
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    base = Path(tempfile.mkdtemp(prefix="repctl-deb-root."))
    root = base / "root"
    mounted: list[Path] = []
    try:
        try:
            sh("mount", "-t", "tmpfs", "-o", "size=1536m,mode=0755", "repctl-deb-root", str(base))
            mounted.append(base)
            for d in ("upper", "work", "root"):
                (base / d).mkdir()
            sh("mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir=/,upperdir={base / 'upper'},workdir={base / 'work'}", str(root))
            mounted.append(root)
        except subprocess.CalledProcessError as e:  # e.g. a container without the right
            print(f"deb_root: cannot mount the overlay here ({e}): not done; test_deb.py will "
                  "skip", file=sys.stderr)
            return 2
        for d in ("proc", "sys", "dev", "dev/pts", "run"):
            sh("mount", "--bind", f"/{d}", str(root / d))
            mounted.append(root / d)
        (root / CACHE).mkdir(parents=True, exist_ok=True)
        for deb in debs:
            shutil.copy(deb, root / CACHE)
        started = time.monotonic()
        p = subprocess.run(
            ["chroot", str(root), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME=/root", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
             "apt-get", "install", "-y", *(f"/{CACHE}/{d.name}" for d in debs)],
            capture_output=True, text=True, timeout=1800, check=False)
        took = time.monotonic() - started
        (OUT / "apt-install.log").write_text(p.stdout + p.stderr)
        (OUT / "apt-install.rc").write_text(f"{p.returncode}\n")
        (OUT / "apt-install.seconds").write_text(f"{took:.0f}\n")
        for m in reversed(mounted[2:]):
            sh("umount", str(m))
        del mounted[2:]
        sh("umount", str(root))
        mounted.remove(root)
        # one tar file: the guest reads it over 9p in seconds, where copying the 2,000 files
        # one by one took minutes; it keeps whiteouts (0:0 character devices) and xattrs
        sh("tar", "-C", str(base / "upper"), "--xattrs", "-cf", str(OUT / "upper.tar"), ".")
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)
        shutil.rmtree(base, ignore_errors=True)
    print(f"deb_root: apt-get install exited {p.returncode} after {took:.0f} s; what it changed "
          f"is in {OUT.relative_to(REPO)}/upper.tar (log: apt-install.log)")
    if p.returncode:
        print(p.stdout[-3000:] + p.stderr[-3000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
