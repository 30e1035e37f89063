#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-only
#
# Provision one node of the Vagrant cluster (run as root in the guest by vagrant/Vagrantfile):
#
#   provision.sh NAME YAML_B64 SECRET_B64 HOSTS_B64
#
# From the repository synced to /repctl (and the wheelhouse in /opt/repctl-wheels):
#   1. dm-repl.ko built against this kernel's headers (the box has linux-headers-amd64), installed
#      under /lib/modules/$(uname -r)/updates and loaded at boot (modules-load.d); until there is
#      a .deb with DKMS, a kernel update needs `vagrant provision` again;
#   2. repctl in /opt/repctl (a venv; its dependencies from the wheelhouse, no index), with
#      /usr/bin/repctl, the systemd unit packaging/repctl.service and the OCF agent;
#   3. /etc/repctl/repctl.yaml and /etc/repctl/secret (the same on every node), /etc/hosts;
#   4. on the source (alpha), the metadata device formatted (repctl create-md) unless it holds
#      dm-repl metadata already; then the daemon enabled and started.
# Idempotent: `vagrant provision` again rebuilds and reinstalls, and keeps the data, the
# metadata and the daemon's state.
set -euo pipefail

name=$1
say() { echo "== provision $name: $*"; }

KVER=$(uname -r)
[ -d "/lib/modules/$KVER/build" ] || {
    echo "provision: no headers for the running kernel $KVER (/lib/modules/$KVER/build)" >&2
    exit 1
}

say "the module, against $KVER"
src=/usr/src/dm-repl
rm -rf "$src"
cp -r /repctl/kmod "$src"
make -s -C "/lib/modules/$KVER/build" M="$src" modules
# (Its notes about the module left unsigned, and depmod skipped for want of a System.map: done
# below.)
make -s -C "/lib/modules/$KVER/build" M="$src" INSTALL_MOD_DIR=updates modules_install 2>&1 |
    grep -v 'SSL error\|sign-file\|At main.c\|System.map' || true
depmod -a "$KVER"
printf 'dm-mod\ndm-repl\n' > /etc/modules-load.d/repctl.conf
modprobe -a dm-mod dm-repl

say "repctl into /opt/repctl"
[ -x /opt/repctl/bin/python ] || python3 -m venv /opt/repctl
# --no-build-isolation: the venv's own setuptools builds it, with `wheel` from the wheelhouse
/opt/repctl/bin/pip install -q --no-index --find-links /opt/repctl-wheels wheel
/opt/repctl/bin/pip install -q --no-index --find-links /opt/repctl-wheels --no-build-isolation \
    /repctl
ln -sf /opt/repctl/bin/repctl /usr/bin/repctl
install -m 0644 /repctl/packaging/repctl.service /etc/systemd/system/repctl.service
install -D -m 0755 /repctl/ocf/repctl /usr/lib/ocf/resource.d/repctl/repctl

say "configuration"
install -d -m 0755 /etc/repctl
echo "$2" | base64 -d > /etc/repctl/repctl.yaml
(umask 077; echo "$3" | base64 -d > /etc/repctl/secret)
chmod 0600 /etc/repctl/secret
hosts=$(echo "$4" | base64 -d)
sed -i '/# repctl-cluster$/d' /etc/hosts
while read -r line; do echo "$line # repctl-cluster"; done <<< "$hosts" >> /etc/hosts

# udev names the disks by serial; wait for them after a fresh boot
udevadm settle
for d in /dev/disk/by-id/virtio-repctl-data /dev/disk/by-id/virtio-repctl-md; do
    [ -b "$d" ] || { echo "provision: $d missing (the Vagrantfile's extra disks)" >&2; exit 1; }
done

if [ "$name" = alpha ]; then
    out=$(repctl create-md r0 2>&1) && say "$out" || {
        case "$out" in
        *"already holds dm-repl metadata"*) say "metadata kept (already formatted)" ;;
        *) echo "$out" >&2; exit 1 ;;
        esac
    }
fi

systemctl daemon-reload
systemctl enable repctl.service
systemctl restart repctl.service
for _ in $(seq 60); do
    repctl status >/dev/null 2>&1 && break
    sleep 1
done
repctl status
say "done"
