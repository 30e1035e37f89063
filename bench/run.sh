#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-only
#
# The dm-repl benchmark. Runs INSIDE the test VM (tests/vm/guest-run.sh bench, started by
# `make bench` or `.venv/bin/python tests/vmrun.py --bench [-- ARGS]`), after dm-mod and
# kmod/dm-repl.ko are loaded. It loads brd (six 256 MiB RAM disks) and runs
# with the project's virtualenv, in one run:
#   bench/target_bench.py ARGS   the repl target against dm-linear on /dev/ram0 (metadata on
#                                /dev/ram1), docs/benchmarks.md
#   bench/replicate_bench.py     a source and a target daemon in two network namespaces:
#                                initial sync against a raw socket copy, streaming against
#                                dm-linear (ram0-ram3), docs/benchmarks-replication.md
#   bench/frame_bench.py         the per-frame MAC against crc-only frames over a socketpair,
#                                and the MAC inside TLS 1.3 (if the openssl command is there)
#                                (with --replicate-only too)
#   bench/cli_bench.py           how long repctl takes to start (--help, status) (with
#                                --replicate-only too), docs/benchmarks.md "CLI start"
#   bench/resync_bench.py        an application's QD1 4 KiB writes during a full resync, without
#                                and with the resync rate controller (docs/wan.md, "Resync
#                                rate"); only with --resync-only (make bench-resync)
#   bench/sync_cost.py           each daemon's CPU per synchronous write (QD1, QD16), with
#                                --profile a cProfile of every daemon thread; only with
#                                --sync-cost-only (make bench-sync-cost)
# A first argument --target-only or --replicate-only runs one of the two; --resync-only runs
# the resync benchmark alone.
# A first argument --peers runs only bench/peers_bench.py ARGS (`make bench-peers`): repctl
# against DRBD 8.4, md raid1 + nbd, dm-linear and the raw device, docs/benchmarks-peers.md.
#
# Exit status: non-zero when something failed (a device, fio, the consumer). A missed
# performance aim is printed as MISSED but is not a failure.
set -uo pipefail

# It loads a module and overwrites /dev/ram0 and /dev/ram1: only in the test VM.
if ! grep -qw 'repctl_vm=1' /proc/cmdline 2>/dev/null; then
    echo "bench/run.sh: refusing to run: this is not the test VM (no repctl_vm=1 on the" \
         "kernel command line). Use make bench." >&2
    exit 2
fi

which=both
case "${1:-}" in
    --target-only) which=target; shift ;;
    --replicate-only) which=replicate; shift ;;
    --resync-only) which=resync; shift ;;
    --peers) which=peers; shift ;;
    --sync-cost-only) which=synccost; shift ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
py="$repo/.venv/bin/python"
if [ ! -x "$py" ]; then
    echo "bench/run.sh: $py not found: make venv" >&2
    exit 2
fi
command -v fio >/dev/null || { echo "bench/run.sh: fio not found" >&2; exit 2; }

# brd's parameters apply only when it loads: reload it if it came with others.
rd_nr=6
rd_size=262144    # KiB: 256 MiB per disk
if [ -d /sys/module/brd ]; then
    if [ "$(cat /sys/module/brd/parameters/rd_size 2>/dev/null)" != "$rd_size" ] ||
       [ "$(cat /sys/module/brd/parameters/rd_nr 2>/dev/null)" != "$rd_nr" ]; then
        echo "== bench: brd is loaded with other parameters: reloading it"
        rmmod brd || exit 1
    fi
fi
echo "== bench: modprobe brd rd_nr=$rd_nr rd_size=$rd_size"
modprobe brd rd_nr=$rd_nr rd_size=$rd_size || exit 1
for d in /dev/ram0 /dev/ram1; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        [ -b "$d" ] && break
        sleep 0.2
    done
    [ -b "$d" ] || { echo "bench/run.sh: $d did not appear after modprobe brd" >&2; exit 1; }
done

rc=0
if [ "$which" = synccost ]; then
    results=${REPCTL_VM_RESULTS:-/tmp/repctl-bench}/sync-cost
    mkdir -p "$results"
    "$py" bench/sync_cost.py --results "$results" "$@" || rc=$?
fi
if [ "$which" = resync ]; then
    results=${REPCTL_VM_RESULTS:-/tmp/repctl-bench}/resync
    mkdir -p "$results"
    "$py" bench/resync_bench.py --results "$results" "$@" || rc=$?
fi
if [ "$which" = peers ]; then
    results=${REPCTL_VM_RESULTS:-/tmp/repctl-bench}/peers
    mkdir -p "$results"
    "$py" bench/peers_bench.py --results "$results" "$@" || rc=$?
fi
if [ "$which" = both ] || [ "$which" = target ]; then
    "$py" bench/target_bench.py "$@" || rc=$?
fi
if [ "$which" = both ] || [ "$which" = replicate ]; then
    results=${REPCTL_VM_RESULTS:-/tmp/repctl-bench}/replicate
    mkdir -p "$results"
    "$py" bench/replicate_bench.py --results "$results" || rc=$?
    "$py" bench/frame_bench.py || rc=$?
    "$py" bench/cli_bench.py --runs 10 || rc=$?
fi

# Free the RAM disks (the devices on them are gone); not being able to is not a failure.
rmmod brd 2>/dev/null || echo "== bench: brd stays loaded (busy)"
echo "== bench: exit $rc"
exit "$rc"
