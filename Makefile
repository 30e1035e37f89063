# SPDX-License-Identifier: GPL-2.0-only
#
# Top-level entry points. `make` alone lists them.
# Everything is relative to this directory: the repository works from any folder.

SHELL := /bin/bash

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.repctl-installed

# Debian's default kernel first (the one linux-headers-amd64 is for): .ci/install-deps also
# installs the 6.12 headers and image for `make module-kernels`, which must not become the
# kernel the VM tier builds for and boots.
ifeq ($(origin KVER),undefined)
KVER := $(shell dpkg-query -W -f='$${Depends}' linux-headers-amd64 2>/dev/null | sed -n 's/^linux-headers-\([^ ,]*\).*/\1/p')
ifeq ($(wildcard /lib/modules/$(KVER)/build),)
undefine KVER
endif
endif
# Kernel to build against (and boot in the VM tier): the newest /lib/modules/*
# that has a `build` directory. Override with `make module KVER=...`.
ifeq ($(origin KVER),undefined)
KVER := $(shell for d in /lib/modules/*/build; do [ -d "$$d" ] && basename "$${d%/build}"; done 2>/dev/null | sort -V | tail -n 1)
endif
KDIR := /lib/modules/$(KVER)/build

# Extra arguments for tests/vmrun.py, e.g. make test-vm VMARGS='-- -k sanity'
VMARGS ?=
VMRUN  := $(VPY) tests/vmrun.py --kver '$(KVER)'

RESULTS := build/test-results

.DEFAULT_GOAL := help
# `make test` runs the host tier first, then the VM tier, also under -j.
.NOTPARALLEL:
.PHONY: help deps venv module test test-host test-vm test-cluster powercut soak demo bench \
	bench-resync bench-sync-cost bench-peers clean

help:
	@echo 'Targets:'
	@echo '  make deps       install the Debian packages needed (as root; .ci/install-deps)'
	@echo '  make venv       create .venv with repctl installed editable, with test extras'
	@echo '  make module     build kmod/dm-repl.ko against KVER=$(KVER)'
	@echo '  make module-kernels  build dm-repl.ko against every /lib/modules/*/build, each in'
	@echo '                  build/kmod-KVER/ (kmod/ untouched); fails on any error or warning'
	@echo '  make deb        the Debian packages repctl and repctl-dkms in build/deb/ (docs/install.md)'
	@echo '  make test       host tier, then VM tier; what CI runs'
	@echo '  make test-host  unit tests, no privileges (pytest tests/host)'
	@echo '  make test-vm    VM tier: boots the kernel under QEMU, loads dm-repl.ko, pytest tests/vm,'
	@echo '                  then the crash test (two more boots; VMARGS="--no-crash" skips it)'
	@echo '                  one test: make test-vm VMARGS="-- -k test_name tests/vm/test_x.py"'
	@echo '  make powercut   two VMs; the primary'"'"'s power is cut CUTS=3 times (sync and async'
	@echo '                  resources), acknowledged writes checked on the survivor'
	@echo '  make soak       make powercut with CUTS=20; prints the tally'
	@echo '  make test-cluster  not in CI: Corosync + Pacemaker in two guests, power cut of the'
	@echo '                  primary, failover and return (tests/pcmk/run.py; installs pacemaker)'
	@echo '  make vagrant-box   not in CI: build the Vagrant box repctl/debian12 from Debian packages'
	@echo '                  (debootstrap; as root) and add it to Vagrant (vagrant/build-box.sh)'
	@echo '  make test-vagrant  not in CI: alpha, beta, gamma under Vagrant + libvirt (QEMU), the'
	@echo '                  switchover, failover and split-brain tests (tests/cluster; docs/vagrant.md)'
	@echo '  make demo       boot the VM and run the demo'
	@echo '  make bench      boot the VM (4G) and run bench/run.sh'
	@echo '  make bench-resync  boot the VM and run only bench/resync_bench.py'
	@echo '  make bench-sync-cost  boot the VM and run only bench/sync_cost.py (CPU per sync write)'
	@echo '  make bench-peers  not in CI: repctl against DRBD 8.4, md raid1 + nbd, dm-linear and'
	@echo '                  the raw device in one VM run, one table (docs/benchmarks-peers.md);'
	@echo '                  installs drbd-utils, nbd, mdadm first (as root); PEERS_ARGS="--runs 5"'
	@echo '  make clean      remove build products (keeps .venv)'
	@echo 'Details: docs/testing.md'

deps:
	@.ci/install-deps

# The stamp is newer than pyproject.toml once pip has installed from it.
venv: $(STAMP)

$(STAMP): pyproject.toml | deps
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

module: | deps
	@if [ -z "$(KVER)" ] || [ ! -d "$(KDIR)" ]; then \
		echo "module: no kernel headers at '$(KDIR)'; install linux-headers-amd64 (make deps) or set KVER=" >&2; \
		exit 1; \
	fi
	$(MAKE) -C $(KDIR) M=$(CURDIR)/kmod modules

# dm-repl.ko against every kernel whose headers are installed (Debian's 6.1 and the 6.12 that
# .ci/install-deps adds), each built in its own copy of the sources, build/kmod-KVER/, so that
# kmod/ is untouched. Last in `make test`, so that a kernel it fails on does not keep the tiers
# from running. Every kernel is tried; any error or warning (the compiler's, with Kbuild's
# -Werror, or modpost's) fails the target. The logs stay in build/kmod-KVER/build.log.
.PHONY: module-kernels
module-kernels: | deps
	@failed=; n=0; for b in /lib/modules/*/build; do \
		[ -d "$$b" ] || continue; k=$$(basename "$$(dirname "$$b")"); d=build/kmod-$$k; n=$$((n + 1)); \
		rm -rf "$$d" && mkdir -p "$$d" && cp kmod/Kbuild kmod/*.c kmod/*.h "$$d"/ || exit 1; \
		if $(MAKE) --no-print-directory -k -C "$$b" M=$(CURDIR)/$$d modules > "$$d/build.log" 2>&1 \
				&& ! grep -qi 'warning' "$$d/build.log"; then \
			echo "module-kernels: $$k: ok ($$d/dm-repl.ko)"; \
		else \
			echo "module-kernels: $$k: FAILED ($$d/build.log):"; sed 's/^/    /' "$$d/build.log"; \
			failed="$$failed $$k"; \
		fi; \
	done; \
	if [ "$$n" -eq 0 ]; then echo "module-kernels: no /lib/modules/*/build (make deps)" >&2; exit 1; fi; \
	if [ -n "$$failed" ]; then echo "module-kernels: FAILED for$$failed" >&2; exit 1; fi

# The Debian packages (packaging/debian, docs/install.md): dpkg-buildpackage in build/deb/src, a
# copy of the files of the tree that git knows or would add (kmod/ build products, .venv and
# build/ left out), with packaging/debian as debian/; the .deb files land in build/deb/. The
# stamp makes `make deb` a no-op while none of those files changed (a deleted one goes unseen:
# make clean).
DEB_TREE  := pyproject.toml README.md kmod pyctl packaging ocf docs
DEB_FILES := $(wildcard $(shell git ls-files -co --exclude-standard -- $(DEB_TREE) 2>/dev/null \
		|| find $(DEB_TREE) -type f ! -path '*/__pycache__/*'))
.PHONY: deb deb-root
deb: build/deb/.stamp

build/deb/.stamp: $(DEB_FILES) | deps
	rm -rf build/deb && mkdir -p build/deb/src
	printf '%s\n' $(DEB_FILES) | tar -cf - --files-from=- | tar -xf - -C build/deb/src
	cp -a packaging/debian build/deb/src/debian
	cd build/deb/src && dpkg-buildpackage -us -uc -b
	@ls -l build/deb/*.deb
	@touch $@

# The packages installed with apt into an overlay of this machine's root, on the host (DKMS
# builds the module here in seconds, not minutes under emulation): tests/deb_root.py, used by
# tests/vm/test_deb.py. Not root or no overlayfs: it says so, and test_deb.py skips.
deb-root: build/deb-root/.stamp

build/deb-root/.stamp: build/deb/.stamp tests/deb_root.py
	@rc=0; python3 tests/deb_root.py || rc=$$?; \
	if [ $$rc -eq 2 ]; then exit 0; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; touch $@

test: test-host test-vm powercut module-kernels
	@$(VPY) tests/vmrun.py --report $(RESULTS)/host-junit.xml build/vm-results/junit.xml \
		build/vm-results/crash/boot2/junit.xml build/powercut-results/junit.xml

test-host: venv
	@mkdir -p $(RESULTS)
	$(VPY) -m pytest tests/host -q --junitxml=$(RESULTS)/host-junit.xml

# The VM tier skips (exit 77 from vmrun.py, turned into success here) when QEMU, the
# kernel or its headers are missing, except under CI=true, where vmrun.py fails instead.
# The preflight runs before the module is built so that a machine without kernel
# headers skips rather than fails.
define vm_run
	@rc=0; $(VMRUN) --preflight $(1) || rc=$$?; \
	if [ $$rc -eq 77 ]; then echo "$@: SKIPPED (see the reason above)"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	$(MAKE) --no-print-directory module && $(VMRUN) $(1) $(VMARGS)
endef

test-vm: venv deb-root
	$(call vm_run,)

# The power-cut test (tests/powercut.py): its own two VMs, so its own runner; the same
# preflight (skip where the VM cannot boot, fail under CI=true).
CUTS ?= 3
powercut: venv
	@rc=0; $(VPY) tests/powercut.py --preflight || rc=$$?; \
	if [ $$rc -eq 77 ]; then echo "$@: SKIPPED (see the reason above)"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	$(MAKE) --no-print-directory module && $(VPY) tests/powercut.py --cuts $(CUTS)

soak:
	@$(MAKE) --no-print-directory powercut CUTS=20

# Not part of `make test` or CI: a real two-node Corosync + Pacemaker cluster in two guests
# (tests/pcmk/run.py, docs/testing.md). Installs the cluster packages first (as root).
test-cluster: venv
	@.ci/install-deps cluster
	@$(MAKE) --no-print-directory module
	@rc=0; $(VPY) tests/pcmk/run.py || rc=$$?; \
	if [ $$rc -eq 77 ]; then echo "$@: SKIPPED (see the reason above)"; exit 0; fi; \
	exit $$rc

# Not part of `make test` or CI: the three-node Vagrant cluster (vagrant/, docs/vagrant.md).
# vagrant/install-deps installs Vagrant, vagrant-libvirt, libvirt and python-vagrant (as root);
# host-setup starts libvirtd and prepares the storage pool and the guests' wheelhouse. Without
# them the tests skip, with the reason. VAGRANT_DRIVER=kvm where KVM works.
.PHONY: vagrant-box test-vagrant
VAGRANT_DRIVER ?= qemu
vagrant-box:
	@vagrant/install-deps
	vagrant/build-box.sh

test-vagrant: venv
	@vagrant/install-deps
	@vagrant/host-setup || echo "$@: host-setup failed: the cluster tests will skip (reason below)"
	REPCTL_VAGRANT=1 REPCTL_VAGRANT_DRIVER=$(VAGRANT_DRIVER) $(VPY) -m pytest tests/cluster -v -rs \
		-s --junitxml=$(RESULTS)/vagrant-junit.xml

demo: venv
	$(call vm_run,--demo)

bench: venv
	$(call vm_run,--bench)

# Only the resync benchmark (bench/resync_bench.py): an application's QD1 writes during a
# resync, without and with the resync rate controller (docs/wan.md, "Resync rate").
bench-resync: venv
	$(call vm_run,--bench -- --resync-only)

# Only bench/sync_cost.py: the CPU each daemon spends per synchronous write, QD1 and QD16
# (docs/benchmarks-peers.md, "What bounds repctl sync"). SYNC_COST_ARGS="--profile" adds a
# cProfile of every daemon thread.
SYNC_COST_ARGS ?=
bench-sync-cost: venv
	$(call vm_run,--bench -- --sync-cost-only $(SYNC_COST_ARGS))

# Not part of `make test` or CI: repctl against its peers (bench/peers_bench.py,
# docs/benchmarks-peers.md). Installs the peers' userland first (as root), as test-cluster does.
# Arguments for bench/peers_bench.py, e.g. PEERS_ARGS="--runs 5" or "--only base,drbd --runs 1".
PEERS_ARGS ?=
bench-peers: venv
	@.ci/install-deps peers
	$(call vm_run,--bench -- --peers $(PEERS_ARGS))

clean:
	@if [ -n "$(KVER)" ] && [ -d "$(KDIR)" ]; then $(MAKE) -C $(KDIR) M=$(CURDIR)/kmod clean; fi
	rm -rf build
