# SPDX-License-Identifier: GPL-2.0-only
#
# Top-level entry points. `make` alone lists them.
# Everything is relative to this directory: the repository works from any folder.

SHELL := /bin/bash

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.repctl-installed

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
.PHONY: help deps venv module test test-host test-vm test-cluster powercut soak demo bench clean

help:
	@echo 'Targets:'
	@echo '  make deps       install the Debian packages needed (as root; .ci/install-deps)'
	@echo '  make venv       create .venv with repctl installed editable, with test extras'
	@echo '  make module     build kmod/dm-repl.ko against KVER=$(KVER)'
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

test: test-host test-vm powercut
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

test-vm: venv
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

clean:
	@if [ -n "$(KVER)" ] && [ -d "$(KDIR)" ]; then $(MAKE) -C $(KDIR) M=$(CURDIR)/kmod clean; fi
	rm -rf build
