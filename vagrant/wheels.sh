#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
#
# Download repctl's dependencies (pyproject.toml's `dependencies`, at the versions installed in
# .venv) as wheels into build/vagrant/wheels, with `wheel` (setuptools, in the guest's venv
# already, needs it to build repctl from the synced repository). The Vagrantfile syncs the
# folder into each guest, which installs from it with `pip --no-index`: the guests never reach
# a package index.
# Host and guests are both Debian 12 (Python 3.11, x86_64), so the host's pip picks the right
# wheels. Skipped when the folder holds that list of versions already.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=build/vagrant/wheels
STAMP=$DIR/.complete
VPY=.venv/bin/python
[ -x "$VPY" ] || { echo "wheels.sh: no $VPY; run make venv" >&2; exit 1; }
# The versions this .venv runs (repctl's dependencies and theirs), so that the guests run what
# the host tiers test.
mapfile -t deps < <("$VPY" - <<'PY'
import importlib.metadata as md
import re

seen, todo = {}, ["repctl"]
while todo:
    try:
        dist = md.distribution(todo.pop())
    except md.PackageNotFoundError:
        continue  # a dependency for another platform or Python
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name in seen:
        continue
    seen[name] = dist.version
    for req in dist.requires or []:
        if "extra ==" not in req:
            todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
del seen["repctl"]
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PY
)
if [ "${#deps[@]}" -eq 0 ]; then
    echo "wheels.sh: repctl is not installed in .venv: make venv" >&2
    exit 1
fi
if [ -e "$STAMP" ] && [ "$(cat "$STAMP")" = "${deps[*]}" ]; then
    exit 0
fi
echo "== wheels: ${deps[*]} wheel -> $DIR"
rm -rf "$DIR"
mkdir -p "$DIR"
# (grep: pip's notes about find-links folders of this host's pip.conf that do not exist)
"$VPY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "${deps[@]}" \
    2> >(grep -v "^WARNING: Location .* is ignored" >&2)
"$VPY" -m pip download -q --only-binary=:all: -d "$DIR" wheel \
    2> >(grep -v "^WARNING: Location .* is ignored" >&2)
echo "${deps[*]}" > "$STAMP"
