#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-only
#
# The demo that `make demo` runs inside the test VM (tests/vm/guest-run.sh demo RESULTS):
# one primary replicating a live ext4 file system to two targets, for a sysadmin watching.
#
#   alpha  primary (source): a 128 MiB loop device + a metadata loop device -> /dev/mapper/r0
#   beta   synchronous target: a 128 MiB loop device
#   gamma  asynchronous target: a 128 MiB image file (a disk-to-disk backup)
#
# Each node is a network namespace (rp-alpha, rp-beta, rp-gamma), joined to alpha by its own
# veth pair, with its own config file and its own `repctl daemon` process, exactly as
# tests/vm/test_replicate.py builds it; gamma's link is slowed with tc (a WAN) so that its
# initial sync can be watched. Every command is printed with a `$ ` prefix before it runs,
# followed by its real output. Waits poll the daemon with tests/vm/demo.py (standard library
# only: the CLI is slow to start in the emulated VM); what is shown is the real `repctl`.
#
# Sections: 1 set up, 2 a file system on the primary (initial sync), 3 pause / resume of gamma
# (bitmap resync, bytes on the wire), 4 verify (repctl verify, sha256 of the three copies),
# 5 switchover (alpha demoted, beta promoted, the file system on beta, the copies follow it),
# 6 clean up (always, from an EXIT trap). Exit status 0 only if every step worked.
# The daemons' logs go to $REPCTL_VM_RESULTS/daemon-NODE.log; their tails are printed on failure.
# Also there: demo-timing.txt (when each command ran, how long it took), verify-*.txt,
# daemon-cpu.txt (the daemons' CPU time at the end).
#
# Runs only in the test VM: it creates namespaces, loop devices and a dm device as root.
set -uo pipefail

if ! grep -qw 'repctl_vm=1' /proc/cmdline 2>/dev/null; then
    echo "demo.sh: refusing to run outside the test VM (no repctl_vm=1 on the kernel command" \
         "line): run \`make demo\`." >&2
    exit 2
fi

REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$REPO/.venv/bin:$PATH"
RESULTS=${REPCTL_VM_RESULTS:-/tmp/rp-demo-results}
mkdir -p "$RESULTS"
: > "$RESULTS/demo-timing.txt"   # when each shown command started (s after the start) and took

ROOT=/tmp/rp-demo
MNT=$ROOT/mnt
SIZE_MB=128
CHUNK=4096
NODES=(alpha beta gamma)
declare -A NS=([alpha]=rp-alpha [beta]=rp-beta [gamma]=rp-gamma)
declare -A CFG=([alpha]=$ROOT/alpha/repctl.yaml [beta]=$ROOT/beta/repctl.yaml
                [gamma]=$ROOT/gamma/repctl.yaml)
declare -A PID=()
A=${CFG[alpha]}            # the primary's config: every command to the source uses it
LOOPS=()                   # loop devices we attached
NETNS=()                   # namespaces we created
MOUNTED=0
DM_CREATED=0
T0=$SECONDS
section=0

# ---------------------------------------------------------------- output helpers

heading() {
    section=$((section + 1))
    echo
    echo "=================================================================================="
    echo "  $section. $*    [$((SECONDS - T0)) s]"
    echo "=================================================================================="
}

note() { echo "# $*"; }

# run 'COMMAND LINE': print it with a `$ ` prefix, run it (eval: redirections and environment
# prefixes work), stop the demo if it fails.
run() {
    echo "\$ $1"
    local t=$SECONDS
    eval "$1"
    local rc=$?
    echo "$((t - T0)) +$((SECONDS - t)) s rc $rc: $1" >> "$RESULTS/demo-timing.txt"
    if [ "$rc" -ne 0 ]; then
        fail "\`$1\` exited $rc"
    fi
}

# like run, but a failure is only reported (cleanup must go on)
try() {
    echo "\$ $1"
    eval "$1"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "demo: cleanup step \`$1\` exited $rc" >&2
        CLEANUP_FAILED=1
    fi
    return 0
}

daemon_logs() {
    local n
    for n in "${NODES[@]}"; do
        if [ -f "$RESULTS/daemon-$n.log" ]; then
            echo "----- last lines of the $n daemon's log ($RESULTS/daemon-$n.log) -----"
            tail -n 40 "$RESULTS/daemon-$n.log"
        fi
    done
}

fail() {
    echo
    echo "DEMO FAILED in section $section after $((SECONDS - T0)) s: $*" >&2
    if [ -S "$ROOT/alpha/repctl.sock" ]; then
        echo "----- repctl status on alpha at the time of the failure -----"
        COLUMNS=120 timeout 300 repctl -c "$A" status 2>&1
    fi
    daemon_logs
    exit 1   # the EXIT trap cleans up
}

# ---------------------------------------------------------------- status helpers

# The source's status document, as `repctl status --json` prints it, but from demo.py, which
# needs only the standard library: the CLI takes many seconds to start in the emulated VM, so
# the waits poll with this and only what is shown runs the real `repctl status`.
PRIMARY=alpha   # whose status the waits read: the primary's (beta's after the switchover)
status_json() { python3 -I -S "$REPO/tests/vm/demo.py" "$ROOT/$PRIMARY/repctl.sock"; }

# jq over the source's status entry of r0
sq() { status_json | jq -r ".resources[0] | $1"; }

# one line of progress: each target's state, out-of-sync and sync percentage
progress_line() {
    sq '[.targets[] | "\(.name) \(.state) \(.out_of_sync_bytes / 1048576 * 10 | floor / 10) MiB out of sync, lag \(.lag_records)"
        + (if .sync then " (\(.sync.done_bytes * 1000 / (.sync.total_bytes + 1) | floor / 10)% of the resync)" else "" end)]
        | join(", ")' 2>/dev/null
}

converged() {
    sq '(.kernel.acked >= .kernel.published) and
        all(.targets[]; .state == "streaming" and .out_of_sync_bytes == 0 and .lag_records == 0)' \
        2>/dev/null | grep -qx true
}

# wait_until DESCRIPTION TIMEOUT COMMAND...: poll every second, a progress line every 5 s
wait_until() {
    local what=$1 timeout=$2 start=$SECONDS last=-5
    shift 2
    note "waiting until $what (at most ${timeout} s)"
    until "$@"; do
        if [ $((SECONDS - start)) -ge "$timeout" ]; then
            fail "timed out after $timeout s waiting until $what; $(progress_line)"
        fi
        if [ $((SECONDS - last)) -ge 5 ]; then
            last=$SECONDS
            local line
            line=$(progress_line)
            echo "   ... $((SECONDS - start)) s: ${line:-no answer from the alpha daemon yet}"
        fi
        sleep 1
    done
    note "done after $((SECONDS - start)) s"
}

# the bytes alpha has sent on its veth towards gamma (ag0), and the packets
tx_bytes() { ip netns exec rp-alpha cat /sys/class/net/ag0/statistics/tx_bytes; }
tx_packets() { ip netns exec rp-alpha cat /sys/class/net/ag0/statistics/tx_packets; }

# ---------------------------------------------------------------- clean up (always)

CLEANUP_FAILED=0
cleanup() {
    local rc=$? n
    trap - EXIT INT TERM
    section=5
    heading "Clean up"
    if [ "$MOUNTED" -eq 1 ]; then
        try "umount $MNT"
    fi
    if [ "${#PID[@]}" -gt 0 ]; then   # how much CPU the daemons used, for the record
        ps -o pid,etimes,times,args -p "$(IFS=,; echo "${PID[*]}")" > "$RESULTS/daemon-cpu.txt" 2>&1
    fi
    for n in alpha beta gamma; do
        [ -n "${PID[$n]:-}" ] || continue
        try "kill -TERM ${PID[$n]}    # the $n daemon"
    done
    for n in alpha beta gamma; do
        [ -n "${PID[$n]:-}" ] || continue
        local i
        for i in $(seq 1 30); do
            kill -0 "${PID[$n]}" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "${PID[$n]}" 2>/dev/null; then
            echo "demo: the $n daemon (pid ${PID[$n]}) ignored SIGTERM for 30 s: SIGKILL" >&2
            kill -KILL "${PID[$n]}" 2>/dev/null
            CLEANUP_FAILED=1
        fi
        wait "${PID[$n]}" 2>/dev/null
        local drc=$?
        if [ "$drc" -ne 0 ]; then
            echo "demo: the $n daemon exited $drc after SIGTERM" >&2
            CLEANUP_FAILED=1
        fi
    done
    if [ "$DM_CREATED" -eq 1 ] || [ -e /dev/mapper/r0 ]; then
        if [ -e /dev/mapper/r0 ]; then
            try "dmsetup remove --retry r0"
        fi
    fi
    if [ "${#LOOPS[@]}" -gt 0 ]; then
        try "losetup -d ${LOOPS[*]}"
    fi
    for n in "${NETNS[@]}"; do
        try "ip netns del $n"
    done
    try "rm -rf $ROOT"
    if [ "$rc" -eq 0 ] && [ "$CLEANUP_FAILED" -ne 0 ]; then
        rc=1
        daemon_logs
    fi
    echo
    if [ "$rc" -eq 0 ]; then
        echo "demo: all steps passed in $((SECONDS - T0)) s"
    else
        echo "demo: FAILED (exit $rc) after $((SECONDS - T0)) s; daemon logs in $RESULTS/daemon-*.log"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

# ================================================================== 1. set up

heading "Set up: three nodes, their devices, the configuration, the daemons"
note "alpha = primary, beta = synchronous target (a block device),"
note "gamma = asynchronous target (an image file: a disk-to-disk backup)."
note "Each node is a network namespace, joined to alpha by a veth pair:"
note "  alpha ab0 10.77.1.1 <-> ba0 10.77.1.2 beta;  alpha ag0 10.77.2.1 <-> ga0 10.77.2.2 gamma"
rm -rf "$ROOT"
mkdir -p "$ROOT/disks" "$ROOT/alpha" "$ROOT/beta" "$ROOT/gamma" "$MNT"
for n in alpha beta gamma; do
    ns=${NS[$n]}
    ip netns del "$ns" 2>/dev/null   # a left-over from an interrupted run
    run "ip netns add $ns"
    NETNS+=("$ns")
    run "ip -n $ns link set lo up"
done
run "ip link add ab0 netns rp-alpha type veth peer name ba0 netns rp-beta"
run "ip -n rp-alpha addr add 10.77.1.1/24 dev ab0 && ip -n rp-alpha link set ab0 up"
run "ip -n rp-beta addr add 10.77.1.2/24 dev ba0 && ip -n rp-beta link set ba0 up"
run "ip link add ag0 netns rp-alpha type veth peer name ga0 netns rp-gamma"
run "ip -n rp-alpha addr add 10.77.2.1/24 dev ag0 && ip -n rp-alpha link set ag0 up"
run "ip -n rp-gamma addr add 10.77.2.2/24 dev ga0 && ip -n rp-gamma link set ga0 up"
run "ip -n rp-alpha -br addr show"

echo
note "Disks: ${SIZE_MB} MiB loop devices for alpha's data and beta, a small metadata device"
note "for alpha (superblock + dirty bitmap), an image file for gamma."
run "truncate -s ${SIZE_MB}M $ROOT/disks/alpha-data.img $ROOT/disks/beta-data.img $ROOT/gamma/r0.img"
run "truncate -s 4M $ROOT/disks/alpha-meta.img $ROOT/disks/beta-meta.img"
attach() {  # attach FILE VAR: a loop device, recorded for the cleanup
    local dev
    echo "\$ losetup --find --show $1"
    dev=$(losetup --find --show "$1") || fail "losetup --find --show $1 failed"
    echo "$dev"
    LOOPS+=("$dev")
    printf -v "$2" '%s' "$dev"
}
attach "$ROOT/disks/alpha-data.img" ALPHA_DATA
attach "$ROOT/disks/alpha-meta.img" ALPHA_META
attach "$ROOT/disks/beta-data.img" BETA_DEV
attach "$ROOT/disks/beta-meta.img" BETA_META
GAMMA_IMG=$ROOT/gamma/r0.img

echo
note "The shared secret that authenticates the peers (the same file on every node, mode 0600):"
run "head -c 32 /dev/urandom | base64 > $ROOT/secret && chmod 600 $ROOT/secret"

write_config() {  # write_config NODE: the same file on every node but for the global paths
    cat > "${CFG[$1]}" <<EOF
global:
  control_socket: $ROOT/$1/repctl.sock
  state_dir: $ROOT/$1/state
  secret_file: $ROOT/secret
resources:
  r0:
    port: 7789
    chunk_size: 4KiB
    ring_size: 64MiB
    sync_timeout: 20s
    source: alpha
    nodes:
      alpha:
        address: 10.77.1.1
        device: $ALPHA_DATA
        metadata: $ALPHA_META
      beta:
        address: 10.77.1.2
        device: $BETA_DEV
        metadata: $BETA_META
      gamma:
        address: 10.77.2.2
        device: $GAMMA_IMG
    targets:
      beta: {mode: sync}
      gamma: {mode: async}
EOF
}
for n in alpha beta gamma; do
    write_config "$n"
done
echo
note "alpha's configuration (docs/config.md):"
run "cat $A"
note "beta's and gamma's files differ only in the control socket and state directory:"
echo "\$ diff $A ${CFG[beta]}"
diff "$A" "${CFG[beta]}"
[ $? -le 1 ] || fail "diff failed"

echo
note "Format alpha's metadata device (superblock and dirty bitmap, one bit per 4 KiB chunk):"
t=$SECONDS
run "repctl -c $A create-md r0 --node alpha"
T_CLI=$((SECONDS - t))   # how long one run of the CLI takes in this VM

echo
# The initial sync of 128 MiB is over in seconds on a fast machine; in the emulated VM one run
# of the CLI can take longer than that. So that `repctl status` can be watched while it runs,
# gamma's link is made a slow WAN link, for a sync that lasts at least three runs of the CLI
# (longer in fact: the new writes share the link), so that the two `repctl status` of
# section 2 both find it running.
SYNC_S=$((T_CLI * 3))
[ "$SYNC_S" -ge 20 ] || SYNC_S=20
[ "$SYNC_S" -le 240 ] || SYNC_S=240
KBIT=$(((SIZE_MB << 20) * 8 / 1000 / SYNC_S))
note "gamma is the off-site backup: its link is a WAN, shaped with tc to $((KBIT / 1000)) Mbit/s"
note "(chosen from how fast this VM runs the CLI, ${T_CLI} s, so that its initial sync can be"
note "watched). beta's link is left at full speed."
run "ip netns exec rp-alpha tc qdisc add dev ag0 root tbf rate ${KBIT}kbit burst 64kb latency 1s"

echo
note "Start the three daemons, each in its node's namespace. Their logs: $RESULTS/daemon-NODE.log"
start_daemon() {
    local n=$1
    : > "$RESULTS/daemon-$n.log"
    echo "\$ ip netns exec ${NS[$n]} repctl -c ${CFG[$n]} daemon --node $n >>$RESULTS/daemon-$n.log 2>&1 &"
    ip netns exec "${NS[$n]}" repctl -c "${CFG[$n]}" daemon --node "$n" \
        >>"$RESULTS/daemon-$n.log" 2>&1 &
    PID[$n]=$!
}
start_daemon beta
start_daemon gamma
start_daemon alpha
daemons_up() {
    local n
    for n in alpha beta gamma; do
        kill -0 "${PID[$n]}" 2>/dev/null || fail "the $n daemon exited at start"
        [ -S "$ROOT/$n/repctl.sock" ] || return 1
    done
    [ -b /dev/mapper/r0 ]
}
wait_until "the three daemons listen on their control sockets and alpha's has created /dev/mapper/r0" \
    600 daemons_up
DM_CREATED=1
run "ls -l /dev/mapper/r0 && dmsetup table r0"

# ================================================================== 2. file system

heading "A file system on the primary, while the initial sync runs"
note "A new target holds nothing yet: the daemon sends it every chunk once (the initial sync),"
note "while the new writes stream at the same time. The application does not wait for it."
syncing_or_done() {
    sq 'all(.targets[]; .state == "syncing" or .state == "streaming")' 2>/dev/null | grep -qx true
}
wait_until "both targets are connected" 120 syncing_or_done
SYNC_T0=$SECONDS
run "COLUMNS=120 repctl -c $A status"

echo
note "lazy_itable_init=0: mkfs writes the inode tables now, so that ext4 does not go on writing"
note "in the background afterwards (that would blur the byte counts in section 3); nodiscard:"
note "the devices are new, there is nothing to discard."
run "mkfs.ext4 -F -L demo -E lazy_itable_init=0,nodiscard /dev/mapper/r0"
echo
run "mount /dev/mapper/r0 $MNT"
MOUNTED=1
run "mkdir $MNT/db $MNT/www"
run "head -c 3M /dev/urandom > $MNT/db/orders.bin"
run "seq 1 150000 > $MNT/www/numbers.txt"
run "cp -r /usr/share/common-licenses $MNT/www/"
run "df -h $MNT"
run "COLUMNS=120 repctl -c $A status"
echo
wait_until "the initial sync is over: both targets streaming, nothing out of sync" 900 converged
note "initial sync of 2 x $SIZE_MB MiB done $((SECONDS - SYNC_T0)) s after the targets connected"
run "COLUMNS=120 repctl -c $A status"

# ================================================================== 3. pause / resume

heading "Pause the backup (gamma), keep writing, resume: only the changed chunks are sent"
run "repctl -c $A pause r0 gamma"
gamma_paused() { sq '.targets[] | select(.name == "gamma") | .state' 2>/dev/null | grep -qx paused; }
wait_until "gamma is paused" 30 gamma_paused
run "COLUMNS=120 repctl -c $A status"
echo
note "The primary goes on (beta, synchronous, still gets every write):"
run "head -c 2M /dev/urandom > $MNT/db/orders-2.bin"
run "seq 150001 250000 >> $MNT/www/numbers.txt"
run "rm -r $MNT/www/common-licenses"
run "sync"
# The daemon takes the kernel's dirty bitmap into gamma's out-of-sync bitmap once a second;
# once the kernel's bitmap is clean again, gamma's holds every chunk changed while paused.
kernel_clean() {
    sq '.kernel.dirty_chunks == 0 and .kernel.acked >= .kernel.published' 2>/dev/null | grep -qx true
}
wait_until "the changes are recorded in gamma's out-of-sync bitmap" 60 kernel_clean
run "COLUMNS=120 repctl -c $A status"
OOS=$(sq '.targets[] | select(.name == "gamma") | .out_of_sync_bytes') || fail "status --json failed"
[ "$OOS" -ge $((2 << 20)) ] 2>/dev/null \
    || fail "gamma's out-of-sync amount is $OOS bytes, less than the 2 MiB written while paused"
echo
note "gamma is out of sync by $OOS bytes ($((OOS / CHUNK)) chunks of 4 KiB)."
note "Bytes sent so far by alpha towards gamma (alpha's veth ag0):"
run "ip netns exec rp-alpha cat /sys/class/net/ag0/statistics/tx_bytes"
TX0=$(tx_bytes); PK0=$(tx_packets)
run "repctl -c $A resume r0 gamma"
wait_until "gamma has caught up" 300 converged
note "status: $(progress_line)"
run "ip netns exec rp-alpha cat /sys/class/net/ag0/statistics/tx_bytes"
TX1=$(tx_bytes); PK1=$(tx_packets)
SENT=$((TX1 - TX0)); PACKETS=$((PK1 - PK0))
PAYLOAD=$((SENT - 66 * PACKETS))     # Ethernet + IPv4 + TCP (with timestamps) per packet
echo
printf '%-44s %12d bytes (%d chunks)\n' "changed while paused (gamma's out of sync):" "$OOS" \
    $((OOS / CHUNK))
printf '%-44s %12d bytes (%d packets)\n' "sent to gamma on the wire by the resume:" "$SENT" \
    "$PACKETS"
printf '%-44s %12d bytes (%d.%02d x the changed bytes)\n' "  of which TCP payload:" "$PAYLOAD" \
    $((PAYLOAD / OOS)) $((PAYLOAD * 100 / OOS % 100))
# the resync frames' own headers, the handshake and the pings on top of the data (as in
# tests/vm/test_replicate.py)
LIMIT=$((OOS * 11 / 10 + 48 * (OOS / CHUNK) + 4096))
if [ "$PAYLOAD" -gt "$LIMIT" ]; then
    fail "the resume sent $PAYLOAD bytes of payload for $OOS changed bytes (more than $LIMIT)"
fi
note "the resume sent the changed chunks and not the whole $SIZE_MB MiB device"

# ================================================================== 4. verify

heading "Verify: the three copies are identical"
run "sync"
wait_until "both targets are streaming with nothing out of sync and no lag" 300 converged
note "status: $(progress_line)"
echo
PROBLEMS=()   # failed checks of this section: it goes on, to show (and diagnose) all of them

# chunk_digests CHUNK...: for each chunk, the start of the SHA-256 of its 4 KiB on the source
# read through the page cache (as the daemon and sha256sum read it) and with O_DIRECT (what
# the disk holds), and on the two targets: which side is wrong when the copies differ.
chunk_digests() {
    local ch
    h() { dd "$@" bs=$CHUNK count=1 status=none | sha256sum | cut -c1-16; }
    printf '%8s  %-16s  %-16s  %-16s  %-16s\n' chunk "r0 (cached)" "r0 (O_DIRECT)" \
        "beta (O_DIRECT)" "gamma image"
    for ch in "$@"; do
        printf '%8s  %-16s  %-16s  %-16s  %-16s\n' "$ch" \
            "$(h if=/dev/mapper/r0 skip="$ch")" "$(h if=/dev/mapper/r0 skip="$ch" iflag=direct)" \
            "$(h if="$BETA_DEV" skip="$ch" iflag=direct)" "$(h if="$GAMMA_IMG" skip="$ch")"
    done
}

# stale_check: once, whether the page cache of the source's device (through which the daemon
# reads for resyncs and verify) or of beta's disagrees with what the devices hold
STALE_CHECKED=0
stale_check() {
    [ "$STALE_CHECKED" -eq 0 ] || return 0
    STALE_CHECKED=1
    note "diagnosis: page cache against O_DIRECT reads, chunk by chunk:"
    python3 -I -S "$REPO/tests/vm/demo.py" --stale /dev/mapper/r0 | tee -a "$RESULTS/stale.txt"
    python3 -I -S "$REPO/tests/vm/demo.py" --stale "$BETA_DEV" | tee -a "$RESULTS/stale.txt"
}

note "repctl verify compares every chunk's checksum with the target's (exit 0: identical)."
note "(The two run at the same time: each command takes a while to start in the emulated VM.)"
declare -A VPID=()
for t in beta gamma; do
    repctl -c "$A" verify r0 "$t" > "$RESULTS/verify-$t.txt" 2>&1 &
    VPID[$t]=$!
done
for t in beta gamma; do
    wait "${VPID[$t]}"
    rc=$?
    echo "\$ repctl -c $A verify r0 $t"
    cat "$RESULTS/verify-$t.txt"
    if [ "$rc" -ne 0 ]; then
        PROBLEMS+=("repctl verify r0 $t exited $rc")
        # the chunk numbers of the listed rows (at most 20)
        mapfile -t chunks < <(awk '$1 ~ /^[0-9]+$/ && $2 ~ /^[0-9]+$/ {print $1}' \
            "$RESULTS/verify-$t.txt" | head -n 8)
        if [ "${#chunks[@]}" -gt 0 ]; then
            note "diagnosis: the first differing chunks, read on every side (sha256, first 16 digits):"
            chunk_digests "${chunks[@]}" | tee -a "$RESULTS/verify-$t.txt"
        fi
        stale_check
    fi
done
echo
note "And independently of repctl, the SHA-256 of the three whole copies. The block devices are"
note "read with O_DIRECT, that is what they hold: the page cache of a block device that has a"
note "file system mounted can be stale, as ext4 writes file data and its journal around it."
SUMS=()
for d in /dev/mapper/r0 "$BETA_DEV" "$GAMMA_IMG"; do
    if [ -b "$d" ]; then
        cmd="dd if=$d bs=1M iflag=direct status=none | sha256sum"
    else
        cmd="sha256sum < $d"   # an image file on tmpfs: no O_DIRECT, and its cache is coherent
    fi
    echo "\$ $cmd"
    out=$(eval "$cmd") || fail "\`$cmd\` failed"
    echo "$out"
    SUMS+=("${out%% *}")
done
echo
printf '%-15s %-40s %s\n' "alpha (source)" /dev/mapper/r0 "${SUMS[0]}" "beta (sync)" "$BETA_DEV" \
    "${SUMS[1]}" "gamma (async)" "$GAMMA_IMG" "${SUMS[2]}"
if [ "${SUMS[0]}" != "${SUMS[1]}" ] || [ "${SUMS[0]}" != "${SUMS[2]}" ]; then
    PROBLEMS+=("the SHA-256 of the three copies differ")
    stale_check
else
    note "the three copies are identical"
fi
if [ "${#PROBLEMS[@]}" -gt 0 ]; then
    fail "$(IFS=';'; echo "${PROBLEMS[*]}")"
fi

# ================================================================== 5. switchover

heading "Switchover: beta becomes the primary, alpha and gamma follow it"
note "A planned switchover (docs/failover.md): unmount, demote alpha (it drains its writes to"
note "the targets and removes /dev/mapper/r0), promote beta (a new data generation,"
note "/dev/mapper/r0 on beta's disk). alpha resyncs from its bitmap, gamma, whose bitmap only"
note "alpha knew, by checksums: in both cases only what differs travels. beta reaches gamma"
note "through alpha's namespace, which routes; gamma's link goes back to full speed."
run "ip netns exec rp-alpha sysctl -qw net.ipv4.ip_forward=1"
run "ip -n rp-beta route add 10.77.2.0/24 via 10.77.1.1"
run "ip -n rp-gamma route add 10.77.1.0/24 via 10.77.2.1"
run "ip netns exec rp-alpha tc qdisc del dev ag0 root"
ORDERS=$(sha256sum < "$MNT/db/orders.bin")
run "umount $MNT"
MOUNTED=0
run "repctl -c $A demote r0"
run "repctl -c ${CFG[beta]} promote r0"
PRIMARY=beta
run "mount /dev/mapper/r0 $MNT"
MOUNTED=1
echo "\$ sha256sum < $MNT/db/orders.bin    # the file written on alpha"
AFTER=$(sha256sum < "$MNT/db/orders.bin") || fail "cannot read orders.bin on beta"
echo "$AFTER"
[ "$AFTER" = "$ORDERS" ] || fail "orders.bin differs on beta after the switchover"
run "echo 'written on beta after the switchover' > $MNT/www/beta.txt && sync"
wait_until "alpha and gamma follow beta: streaming, nothing out of sync" 600 converged
run "COLUMNS=120 repctl -c ${CFG[beta]} status"
run "umount $MNT"
MOUNTED=0
wait_until "the unmount reached both" 300 converged
SUMS=()
for d in /dev/mapper/r0 "$ALPHA_DATA" "$GAMMA_IMG"; do
    if [ -b "$d" ]; then
        cmd="dd if=$d bs=1M iflag=direct status=none | sha256sum"
    else
        cmd="sha256sum < $d"
    fi
    echo "\$ $cmd"
    out=$(eval "$cmd") || fail "\`$cmd\` failed"
    echo "$out"
    SUMS+=("${out%% *}")
done
if [ "${SUMS[0]}" != "${SUMS[1]}" ] || [ "${SUMS[0]}" != "${SUMS[2]}" ]; then
    fail "after the switchover the SHA-256 of the three copies differ"
fi
note "beta (primary), alpha and gamma hold the same data"

# The EXIT trap cleans up and prints the result.
exit 0
