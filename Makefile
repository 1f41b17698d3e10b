# The README's two commands: `make demo` and `make test`. Both set everything up
# first (Debian packages, .venv with the package and its test extra) and are
# idempotent: a second run installs nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What the daemon, the demo and the tests need from Debian.
APT_PACKAGES := fuse3 gcc python3-dev python3-venv \
	qemu-utils qemu-system-x86 fio strace tmux util-linux e2fsprogs procps \
	attr systemd systemd-container man-db groff-base debootstrap busybox-static debian-archive-keyring \
	iproute2 sshfs openssh-server openssh-client glusterfs-server glusterfs-client \
	libvirt-daemon-system libvirt-clients
# Where `make helpers` (part of setup) links this checkout's commands, as root.
BINDIR := /usr/local/bin
SBINDIR := /sbin
MANDIR := /usr/local/share/man
# Where `make install` (production, see docs/install.md) puts scachefs.
INSTALL_VENV := /opt/scachefs
UNITDIR := /usr/local/lib/systemd/system
DOCDIR := /usr/local/share/doc/scachefs

.PHONY: all setup apt venv helpers install uninstall demo test test-quick soak conformance lint \
	clean

all: test

setup: apt venv helpers

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root or install them)"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  policy=/usr/sbin/policy-rc.d; made=""; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy && made=1; fi; \
	  trap 'if [ -n "$$made" ]; then rm -f $$policy; fi' EXIT; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "scachefs needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The commands on PATH and mount.fuse.scachefs for mount(8), fstab and systemd, as
# links to this checkout (a developer's machine). Commands another installation put
# there (`make install`, another checkout) are left alone unless FORCE_HELPERS=1.
helpers: venv
	@here="$(CURDIR)/$(VENV)/bin/scachefs"; have=$$(readlink "$(BINDIR)/scachefs" || true); \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "not root: skipping $(BINDIR)/scachefs and $(SBINDIR)/mount.fuse.scachefs"; \
	elif [ -e "$(BINDIR)/scachefs" ] && [ "$$have" != "$$here" ] && [ -z "$(FORCE_HELPERS)" ]; then \
	  echo "$(BINDIR)/scachefs is $${have:-a file} (another installation): left alone, with"; \
	  echo "  $(SBINDIR)/mount.fuse.scachefs and the man pages (make helpers FORCE_HELPERS=1"; \
	  echo "  points them at this checkout); this checkout's commands: $(VENV)/bin/"; \
	else \
	  [ "$$have" = "$$here" ] || echo "linking $(BINDIR)/scachefs* and $(SBINDIR)/mount.fuse.scachefs" \
	    "to this checkout ($(CURDIR)); for production use make install"; \
	  ln -sfn "$(CURDIR)/$(VENV)/bin/scachefs" $(BINDIR)/scachefs; \
	  ln -sfn "$(CURDIR)/$(VENV)/bin/scachefs-stat" $(BINDIR)/scachefs-stat; \
	  ln -sfn "$(CURDIR)/$(VENV)/bin/scachefs-trace" $(BINDIR)/scachefs-trace; \
	  sed 's|@SCACHEFS@|$(BINDIR)/scachefs|' mount-helpers/mount.fuse.scachefs \
	    > $(SBINDIR)/mount.fuse.scachefs.tmp && chmod 755 $(SBINDIR)/mount.fuse.scachefs.tmp && \
	  mv $(SBINDIR)/mount.fuse.scachefs.tmp $(SBINDIR)/mount.fuse.scachefs; \
	  for page in scachefs.8 scachefs-stat.8 scachefs-trace.8; do \
	    install -D -m 644 docs/man/$$page $(MANDIR)/man8/$$page; done; \
	fi

# Production: a wheel of this checkout installed into its own venv ($(INSTALL_VENV)),
# commands linked into $(BINDIR), the mount(8) helper in $(SBINDIR), the service
# template in $(UNITDIR), man pages in $(MANDIR); nothing refers to the checkout
# afterwards. Idempotent; `make uninstall` removes it. See scripts/install.
INSTALL_ENV = INSTALL_VENV="$(INSTALL_VENV)" BINDIR="$(BINDIR)" SBINDIR="$(SBINDIR)" \
	UNITDIR="$(UNITDIR)" MANDIR="$(MANDIR)" DOCDIR="$(DOCDIR)" PYTHON="$(PYTHON)"

install:
	$(INSTALL_ENV) scripts/install install

uninstall:
	$(INSTALL_ENV) scripts/install uninstall

demo: setup
	$(PY) -m scachefs.demo

test: setup
	$(PY) -m pytest -v -ra --durations=15

test-quick: setup
	$(PY) -m pytest -q -x -m "not slow"

# The stress test for longer (10 minutes by default; SOAK_SECONDS=... to change).
SOAK_SECONDS ?= 600
soak: setup
	SCACHEFS_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -v -s tests/test_stress.py tests/test_crash_model.py

# Third-party conformance suites against real mounts (docs/reliability.md, "Conformance"):
# pjdfstest, fsx and xfstests' generic quick group, about 35 minutes. The suites' pristine
# tarballs come from SUITES (relative to this checkout); they are built once into
# SUITES_CACHE with their own Debian build dependencies.
SUITES ?= ../shared/suites
SUITES_CACHE ?= /var/cache/scachefs-suites
CONFORMANCE_APT_PACKAGES := autoconf automake libtool-bin make gcc gawk bc psmisc perl \
	xfsprogs xfslibs-dev uuid-dev uuid-runtime libacl1-dev libattr1-dev libaio-dev \
	liburing-dev libcap-dev libgdbm-dev libssl-dev acl attr quota fio dbench sqlite3 \
	qemu-utils fuse3 fsverity acct
conformance: setup
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(CONFORMANCE_APT_PACKAGES)"
	$(PY) conformance/run.py --suites "$(SUITES)" --cache "$(SUITES_CACHE)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
