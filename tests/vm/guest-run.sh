#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-only
#
# Runs INSIDE the QEMU guest that tests/vmrun.py boots; never on a host.
#
#   guest-run.sh test  RESULTS [-- PYTEST-ARGS...]   load modules, pytest tests/vm, unload
#   guest-run.sh demo  RESULTS                       load modules, tests/vm/demo.sh, unload
#   guest-run.sh bench RESULTS [-- ARGS...]          load modules, bench/run.sh, unload
#   guest-run.sh setup                               load modules only (for `vmrun.py --shell`)
#   guest-run.sh crash-write RESULTS                 crash test, boot 1: load modules, run
#                                                    tests/vm/crash_workload.py, which resets
#                                                    the guest (sysrq b) mid-workload
#   guest-run.sh crash-check RESULTS [-- PYTEST-ARGS...]  crash test, boot 2: load modules,
#                                                    pytest tests/vm/crash_check.py, unload
#   guest-run.sh node RESULTS -- COMMAND [ARGS...]   one guest of several (tests/vmpair.py):
#                                                    load modules, bring up the link to the
#                                                    other guests, run COMMAND, unload
#
# RESULTS is a folder shared writable with the host. What lands there:
#   console output is captured by the host (console.log); here we write
#   insmod_rc    exit code of modprobe + insmod
#   rc           exit code of pytest (or of the demo / bench script)
#   rmmod_rc     exit code of `rmmod dm_repl` (non-zero: a leaked reference, a test failure)
#   dmesg.txt    the kernel log at the end; dmesg-live.txt follows it during the run so
#                that it survives a guest that hangs and is killed
#   tainted-start, tainted-end   /proc/sys/kernel/tainted before and after
#   junit.xml    pytest's report (test and crash-check modes)
# In crash-write mode a passing run never gets to write rc, rmmod_rc, dmesg.txt or
# tainted-end: the guest is reset first (crash_workload.py writes setup.json and crash.json).
#
# Not `set -e`: whatever fails, the module must be unloaded and the results written.
set -uo pipefail

# Guard: vmrun.py puts repctl_vm=1 on the guest kernel's command line. Anywhere else this
# script would load modules into, and unload them from, a real machine: refuse.
if ! grep -qw 'repctl_vm=1' /proc/cmdline 2>/dev/null; then
    echo "guest-run.sh: refusing to run: this is not the test VM (no repctl_vm=1 on the" \
         "kernel command line). Use tests/vmrun.py or make test-vm." >&2
    exit 2
fi

mode=${1:-test}
shift || true
results=${1:-/tmp/repctl-vm-results}
shift || true
if [ "${1:-}" = "--" ]; then
    shift
fi

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo" || exit 2
mkdir -p "$results"

export REPCTL_IN_VM=1
export REPCTL_REPO="$repo"
export REPCTL_VM_RESULTS="$results"
# The repository is read-only here: compiled modules go to the guest's /tmp, so that each
# Python program (every repctl command, each daemon) does not compile them again.
export PYTHONPYCACHEPREFIX=/tmp/repctl-pycache
export PATH="$repo/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ko=kmod/dm-repl.ko

say() { echo "== guest: $*"; }
kmsg() { echo "repctl-vm: $*" > /dev/kmsg 2>/dev/null || true; }

load_modules() {
    # dm-linear is part of dm-mod. brd only in test mode: bench/run.sh loads it with its
    # own disk count and size (module parameters apply only at load time).
    local mods=(dm-mod loop)
    if [ "$mode" = test ]; then
        mods+=(brd)
    fi
    # insmod does not resolve dependencies: load what dm-repl.ko says it needs.
    local dep
    for dep in $(modinfo -F depends "$ko" 2>/dev/null | tr ',' ' '); do
        mods+=("$dep")
    done
    say "kernel $(uname -r); modprobe -a ${mods[*]}; insmod $ko"
    modprobe -a "${mods[@]}" || return 1
    insmod "$ko" || return 1
    grep -q '^dm_repl ' /proc/modules
}

# tests/vmpair.py puts repctl_node=N on the command line of each guest of a pair and gives it
# one NIC on their shared link: the NIC gets 10.79.0.N/24.
setup_link() {
    local n nic="" d
    n=$(sed -n 's/.*repctl_node=\([0-9]\+\).*/\1/p' /proc/cmdline)
    if [ -z "$n" ]; then
        say "node mode without repctl_node=N on the kernel command line"
        return 1
    fi
    for d in /sys/class/net/*; do
        [ "${d##*/}" = lo ] || nic=${d##*/}
    done
    if [ -z "$nic" ]; then
        say "no NIC for the link to the other guests"
        return 1
    fi
    ip link set lo up && ip addr add "10.79.0.$n/24" dev "$nic" && ip link set "$nic" up || return 1
    say "link: $nic 10.79.0.$n/24"
}

if [ "$mode" = setup ]; then
    load_modules || exit 1
    say "modules loaded. VM tests from this shell:"
    say "  REPCTL_IN_VM=1 PYTHONPYCACHEPREFIX=/tmp/repctl-pycache .venv/bin/python -m pytest -p no:cacheprovider tests/vm -k ..."
    exit 0
fi

# Follow the kernel log into the shared folder from the start.
dmesg -w > "$results/dmesg-live.txt" 2>&1 &
dmesg_pid=$!
cat /proc/sys/kernel/tainted > "$results/tainted-start"
# The host checks the kernel log for warnings only after this line (boot noise excluded).
kmsg "guest-run start mode=$mode"

rc=0
load_modules
insmod_rc=$?
echo "$insmod_rc" > "$results/insmod_rc"

if [ "$insmod_rc" -ne 0 ]; then
    say "loading the modules failed (exit $insmod_rc): not running $mode"
    rc=$insmod_rc
else
    case "$mode" in
    test)
        # All of tests/vm unless the arguments name test files or node ids themselves.
        where=(tests/vm)
        for a in "$@"; do
            if [ "${a#-}" = "$a" ] && [ -e "${a%%::*}" ]; then
                where=()
                break
            fi
        done
        say "pytest ${where[*]} $*"
        python -m pytest "${where[@]}" -v -ra -p no:cacheprovider \
            --junitxml="$results/junit.xml" "$@"
        rc=$?
        ;;
    demo)
        if [ -f tests/vm/demo.sh ]; then
            bash tests/vm/demo.sh "$@"
            rc=$?
        else
            say "no demo yet: tests/vm/demo.sh does not exist"
            rc=2
        fi
        ;;
    crash-write)
        # Does not return when it works: the guest is reset mid-workload.
        python tests/vm/crash_workload.py "$results"
        rc=$?
        say "crash_workload.py returned (exit $rc) instead of resetting the guest"
        [ "$rc" -ne 0 ] || rc=1
        ;;
    node)
        if setup_link; then
            say "node: $*"
            "$@"
            rc=$?
        else
            rc=1
        fi
        ;;
    crash-check)
        say "pytest tests/vm/crash_check.py $*"
        python -m pytest tests/vm/crash_check.py -v -s -ra -p no:cacheprovider \
            --junitxml="$results/junit.xml" "$@"
        rc=$?
        ;;
    bench)
        if [ -f bench/run.sh ]; then
            bash bench/run.sh "$@"
            rc=$?
        else
            say "no benchmark yet: bench/run.sh does not exist"
            rc=2
        fi
        ;;
    *)
        say "unknown mode '$mode'"
        rc=2
        ;;
    esac
    echo "$rc" > "$results/rc"

    # A module that will not unload has leaked a reference or a device: a failure.
    rmmod dm_repl
    rmmod_rc=$?
    echo "$rmmod_rc" > "$results/rmmod_rc"
    if [ "$rmmod_rc" -ne 0 ]; then
        say "rmmod dm_repl failed (exit $rmmod_rc); what is left:"
        grep '^dm_repl ' /proc/modules
        dmsetup table 2>&1
    fi
fi

kmsg "guest-run end rc=$rc"
cat /proc/sys/kernel/tainted > "$results/tainted-end"
dmesg > "$results/dmesg.txt" 2>&1
kill "$dmesg_pid" 2>/dev/null
wait "$dmesg_pid" 2>/dev/null
say "$mode finished: exit $rc"
exit "$rc"
