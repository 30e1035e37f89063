#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-only
#
# The cluster stack of one node of the two-guest Pacemaker test (tests/pcmk/run.py): Corosync
# and Pacemaker started by hand on a read-only root, as there is no systemd in the guest.
#
#   node.sh start NAME SHARED     make the folders they write, write corosync.conf, start
#                                 corosync and pacemakerd, wait until Pacemaker answers
#   node.sh stop                  stop pacemakerd (Pacemaker stops this node's resources
#                                 first), then corosync
#   node.sh agent AGENT           install the OCF agent as ocf:repctl:repctl
#
# SHARED is a folder with `authkey` (the host writes the same key for both nodes) where the
# logs go. The nodes are alpha (10.79.0.1) and beta (10.79.0.2), the addresses that
# tests/vm/guest-run.sh gives the guests' NICs; NAME is this node.
#
# The guest's root is the host's, read-only: every folder that Corosync and Pacemaker write
# gets a tmpfs (virtme-ng already mounts one on /run, /var/log and /dev/shm, which this script
# also makes where they are missing: on a host, inside `unshare -m`, for a quick try).
set -euo pipefail

say() { echo "== pcmk: $*"; }

# A fresh tmpfs on $1 (owner $2, mode $3), unless this script mounted one there already.
scratch() {
    local dir=$1 owner=${2:-root:root} mode=${3:-0755}
    if ! grep -q " $dir tmpfs .*repctl-pcmk" /proc/mounts; then
        mount -t tmpfs -o "mode=$mode,size=64m" repctl-pcmk "$dir"
    fi
    chown "$owner" "$dir"
}

sandbox() {
    local d
    for d in /run /dev/shm /var/log; do
        grep -q " $d tmpfs " /proc/mounts || mount -t tmpfs -o mode=0755 repctl-pcmk "$d"
    done
    chmod 1777 /dev/shm
    scratch /etc/corosync
    scratch /var/lib/corosync
    scratch /var/lib/pacemaker
    scratch /etc/pacemaker root:haclient 0750
    for d in cib pengine blackbox cores; do
        install -d -o hacluster -g haclient -m 0750 "/var/lib/pacemaker/$d"
    done
    install -d -o hacluster -g haclient -m 0770 /var/log/pacemaker /var/log/pacemaker/bundles
    install -d -m 0755 /var/log/corosync /run/corosync /run/pacemaker
    # pcs keeps nothing it needs here, but writes its own settings under HOME
    install -d -m 0700 /run/pcmk-home
}

corosync_conf() {
    local shared=$1
    # Timeouts for a slow emulated CPU shared by two guests (and whatever else runs on the
    # machine): a token lost for 20 s ends the membership. The default, 3 s, parts the nodes
    # of a loaded machine, and without fencing each would then promote itself. two_node: the survivor
    # of the pair keeps quorum (and waits for both nodes at the very first start).
    cat > /etc/corosync/corosync.conf <<EOF
totem {
    version: 2
    cluster_name: repctl-test
    transport: knet
    crypto_cipher: aes256
    crypto_hash: sha256
    token: 20000
    join: 1000
    consensus: 24000
}
nodelist {
    node {
        name: alpha
        nodeid: 1
        ring0_addr: 10.79.0.1
    }
    node {
        name: beta
        nodeid: 2
        ring0_addr: 10.79.0.2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_stderr: no
    to_syslog: no
    to_logfile: yes
    logfile: $shared/corosync.log
    timestamp: on
}
EOF
    install -m 0400 "$shared/authkey" /etc/corosync/authkey
    # Pacemaker's own key (for remote nodes; pacemakerd warns without one)
    install -m 0440 -g haclient "$shared/authkey" /etc/pacemaker/authkey
}

start() {
    local name=$1 shared=$2
    hostname "$name"
    sandbox
    corosync_conf "$shared"
    : > "$shared/pacemaker.log"
    chmod 0666 "$shared/pacemaker.log"
    say "starting corosync"
    corosync -f > "$shared/corosync.out" 2>&1 &
    echo $! > /run/corosync/pid-by-node-sh
    local i
    for i in $(seq 120); do
        corosync-cfgtool -s > /dev/null 2>&1 && break
        sleep 1
    done
    corosync-cfgtool -s || { say "corosync did not start"; return 1; }
    say "starting pacemakerd"
    PCMK_logfile=$shared/pacemaker.log PCMK_debug=no HOME=/run/pcmk-home \
        pacemakerd > "$shared/pacemakerd.out" 2>&1 &
    echo $! > /run/pacemaker/pid-by-node-sh
    # pacemakerd reports "Pacemaker is running" once its subdaemons are up
    for i in $(seq 300); do
        if crmadmin --pacemakerd 2>/dev/null | grep -q 'is running'; then
            say "pacemaker is up"
            return 0
        fi
        sleep 1
    done
    say "pacemakerd did not come up:"
    crmadmin --pacemakerd || true
    return 1
}

stop() {
    local pid i
    if [ -s /run/pacemaker/pid-by-node-sh ]; then
        pid=$(cat /run/pacemaker/pid-by-node-sh)
        say "stopping pacemakerd ($pid): Pacemaker stops this node's resources first"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 600); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
    fi
    if [ -s /run/corosync/pid-by-node-sh ]; then
        pid=$(cat /run/corosync/pid-by-node-sh)
        say "stopping corosync ($pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
    fi
}

# The agent where Pacemaker looks for ocf:repctl:repctl: /usr/lib/ocf/resource.d is read-only,
# so a copy of it on tmpfs, with repctl/repctl added, is bind-mounted over it.
agent() {
    local src=$1 copy=/run/ocf-resource.d
    if [ ! -d "$copy" ]; then
        mkdir -p "$copy"
        cp -a /usr/lib/ocf/resource.d/. "$copy/"
        mkdir -p "$copy/repctl"
        install -m 0755 "$src" "$copy/repctl/repctl"
        mount --bind "$copy" /usr/lib/ocf/resource.d
    fi
}

case "${1:-}" in
start) start "$2" "$3" ;;
stop) stop ;;
agent) agent "$2" ;;
*) echo "usage: $0 start NAME SHARED | stop | agent AGENT" >&2; exit 2 ;;
esac
