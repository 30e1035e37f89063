#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
#
# Build the Vagrant box of the cluster (vagrant/Vagrantfile) from Debian packages, since no
# public box can be downloaded here, and add it to Vagrant as repctl/debian12:
#
#   vagrant/build-box.sh            (make vagrant-box; as root, Debian 12 host)
#
# The box is what vagrant-libvirt expects (docs/vagrant.md): a tar of metadata.json
# ({"provider": "libvirt", "format": "qcow2", ...}), box.img (qcow2) and a Vagrantfile. The
# image is one ext4 file system on the whole disk (no partition table, so no partition
# support is needed in the host kernel to build it), booted by extlinux from its boot sector:
# Debian 12 (bookworm) minbase with systemd, its kernel and the matching headers, gcc and make
# (the guests build dm-repl.ko), python3-venv, sshd, sudo, and a `vagrant` user with Vagrant's
# public insecure key and password-less sudo (Vagrant replaces the key on the first `up`).
#
# Environment:
#   MIRROR     the Debian mirror (default: the one of this host's own apt sources)
#   SUITE      default bookworm
#   SIZE       the image's virtual size, default 8G (sparse)
#   BOX_NAME   default repctl/debian12
#   OUT        default build/vagrant (the box: $OUT/repctl-debian12.box)
#   NO_ADD=1   build the .box file only, do not `vagrant box add` it
#
# About 5-10 minutes, most of it debootstrap (its downloads are kept in $OUT/debootstrap-cache
# for the next build).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-build/vagrant}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUITE=${SUITE:-bookworm}
SIZE=${SIZE:-8G}
BOX_NAME=${BOX_NAME:-repctl/debian12}
BOX=$OUT/repctl-debian12.box
WORK=$OUT/box-work
MNT=$WORK/root

say() { echo "== build-box: $*"; }
die() { echo "build-box: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, a loop mount); run: sudo $0"
for tool in debootstrap mkfs.ext4 extlinux qemu-img mount blkid; do
    command -v "$tool" >/dev/null || die "'$tool' missing; run vagrant/install-deps"
done

# The host's own Debian mirror: the first URI serving $SUITE in its apt sources (deb822
# .sources files, then the one-line format). MIRROR= overrides.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        awk -v suite="$SUITE" '
            /^[ \t]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END { if (uri != "" && ok) print uri }' "$f" | head -n 1
    done
    if [ -e /etc/apt/sources.list ]; then
        awk -v suite="$SUITE" '$1 == "deb" && $0 ~ (" " suite " ") {
            for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; exit } }' /etc/apt/sources.list
    fi
}
MIRROR=${MIRROR:-$(host_mirror | head -n 1)}
[ -n "$MIRROR" ] || die "no Debian mirror for $SUITE in this host's apt sources; set MIRROR="

# Vagrant's public insecure key, as the vagrant package ships it.
INSECURE_PUB=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
    /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n 1 || true)
[ -n "$INSECURE_PUB" ] || die "Vagrant's insecure key (keys/vagrant.pub) not found: install vagrant"

cleanup() {
    local d
    for d in dev/pts dev proc sys; do
        mountpoint -q "$MNT/$d" 2>/dev/null && umount -l "$MNT/$d"
    done
    if mountpoint -q "$MNT" 2>/dev/null; then
        umount "$MNT"   # mount -o loop set autoclear: the loop device goes with it
    fi
}
trap cleanup EXIT

rm -rf "$WORK"
mkdir -p "$MNT" "$OUT/debootstrap-cache"
RAW=$WORK/disk.raw

# One ext4 over the whole disk. extlinux reads ext4, but 64bit and metadata_csum are left out
# to stay within what every syslinux release reads.
say "image: $SIZE, ext4 on the whole disk"
truncate -s "$SIZE" "$RAW"
mkfs.ext4 -q -F -L repctl-root -O ^64bit,^metadata_csum "$RAW"
UUID=$(blkid -s UUID -o value "$RAW")
mount -o loop "$RAW" "$MNT"

INCLUDE=(
    systemd-sysv udev dbus
    linux-image-amd64 linux-headers-amd64 gcc make kmod
    openssh-server sudo
    iproute2 iputils-ping procps less
    python3 python3-venv
    dmsetup e2fsprogs fio rsync
)
say "debootstrap $SUITE from $MIRROR (minbase + ${INCLUDE[*]})"
debootstrap --variant=minbase --cache-dir="$OUT/debootstrap-cache" \
    --include="$(IFS=,; echo "${INCLUDE[*]}")" "$SUITE" "$MNT" "$MIRROR"

mount -t proc proc "$MNT/proc"
mount -t sysfs sysfs "$MNT/sys"
mount --bind /dev "$MNT/dev"
mount --bind /dev/pts "$MNT/dev/pts"
in_root() { chroot "$MNT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

say "configuring"
KVER=$(basename "$(ls -d "$MNT"/lib/modules/* | sort -V | tail -n 1)")
echo repctl-box > "$MNT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\trepctl-box\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$MNT/etc/hosts"
echo "UUID=$UUID / ext4 errors=remount-ro 0 1" > "$MNT/etc/fstab"
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" > "$MNT/etc/apt/sources.list"

# Each clone makes its own machine id on its first boot: the DHCP client identifier of
# systemd-networkd derives from it, so clones sharing one would share one address.
: > "$MNT/etc/machine-id"
rm -f "$MNT/var/lib/dbus/machine-id"

# Network: eth0 (net.ifnames=0) by DHCP on Vagrant's management network; Vagrant itself
# writes /etc/systemd/network/50-vagrant-eth1.network for the private network.
cat > "$MNT/etc/systemd/network/90-eth0-dhcp.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4
EOF
in_root systemctl enable systemd-networkd.service
# Nothing in the guest reaches out on its own (its networks are isolated anyway).
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer

# sshd: host keys made on each clone's first boot, not baked into the box.
rm -f "$MNT"/etc/ssh/ssh_host_*
mkdir -p "$MNT/etc/systemd/system/ssh.service.d"
cat > "$MNT/etc/systemd/system/ssh.service.d/host-keys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF
echo 'UseDNS no' > "$MNT/etc/ssh/sshd_config.d/vagrant.conf"

# The vagrant user: insecure key, password-less sudo.
in_root useradd -m -s /bin/bash -U vagrant
echo 'vagrant:vagrant' | in_root chpasswd
install -d -m 0700 -o 1000 -g 1000 "$MNT/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$INSECURE_PUB" "$MNT/home/vagrant/.ssh/authorized_keys"
[ "$(in_root id -u vagrant)" = 1000 ] || die "the vagrant user is not uid 1000"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$MNT/etc/sudoers.d/vagrant"
chmod 0440 "$MNT/etc/sudoers.d/vagrant"

# Boot: extlinux in the file system's boot sector, the kernel on the serial console too
# (the Vagrantfile logs it to a file).
mkdir -p "$MNT/boot/extlinux"
cat > "$MNT/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
    LINUX /boot/vmlinuz-$KVER
    INITRD /boot/initrd.img-$KVER
    APPEND root=UUID=$UUID ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 biosdevname=0
EOF
extlinux --install "$MNT/boot/extlinux" >/dev/null

in_root apt-get clean
rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/tmp/*
cleanup

say "qcow2 and box"
qemu-img convert -O qcow2 "$RAW" "$WORK/box.img"
rm -f "$RAW"
VSIZE=$(qemu-img info --output=json "$WORK/box.img" | python3 -c \
    'import json, sys; print(json.load(sys.stdin)["virtual-size"] >> 30)')
cat > "$WORK/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $VSIZE}
EOF
cat > "$WORK/Vagrantfile" <<'EOF'
# Box repctl/debian12, made by vagrant/build-box.sh (repctl repository).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
EOF
cat > "$WORK/info.json" <<EOF
{"kernel": "$KVER", "suite": "$SUITE", "built": "$(date -u +%FT%TZ)",
 "repository": "repctl $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"}
EOF
tar -cf "$BOX" -C "$WORK" metadata.json Vagrantfile info.json box.img
rm -rf "$WORK"
say "built $BOX ($(du -h "$BOX" | cut -f1), kernel $KVER)"

if [ "${NO_ADD:-}" != 1 ]; then
    vagrant box add --force --name "$BOX_NAME" "$BOX"
    say "added as $BOX_NAME"
fi
