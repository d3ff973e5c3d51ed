# make test / make demo / make bench: each sets up what it needs on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
# podman: for tests/integration/test_podman.py. It depends on "crun | runc":
# alone, apt picks crun (which fails on this machine kind's hybrid cgroups);
# with runc in the same install (or already installed) it keeps runc. The
# tests give podman their own containers.conf (CONTAINERS_CONF): nothing
# global is configured here.
# etcd-server: the tests' throwaway etcd for several hosts (tests/integration/
# test_cluster.py), started inside the tests' own network namespaces; the
# package's own service is stopped and disabled right after the install;
# etcd-client: etcdctl, which a store test uses to compact etcd's history
# docker.io: tests/integration/test_docker_firewall.py starts a dockerd of its
# own (its own data and exec roots, socket, no bridge) to check tether next
# to Docker's firewall; the package's services are stopped and disabled right
# after the install, so no other dockerd runs
APT_PACKAGES := runc busybox-static fuse3 iptables nftables conntrack iproute2 \
                python3 python3-venv python3-dev gcc podman etcd-server etcd-client docker.io
# the peers `make bench` measures tether against (podman's network backend,
# the CNI reference plugins, LXCFS); only the benchmark uses them
BENCH_PACKAGES := netavark containernetworking-plugins lxcfs
PYTHON ?= python3

.PHONY: test demo deps venv unit bench bench-deps clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  case "$$missing" in *etcd-server*) systemctl disable --now etcd >/dev/null 2>&1 || true;; esac; \
	  case "$$missing" in *docker.io*) units="docker.socket docker.service containerd.service"; \
	    systemctl disable $$units >/dev/null 2>&1; systemctl stop $$units >/dev/null 2>&1 || true;; esac; \
	fi

$(VENV)/.installed: pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m hooks.launcher >/dev/null  # tether-hook with python -I -S (hooks/launcher.py)
	@touch $@

venv: deps $(VENV)/.installed

test: venv
	$(VENV)/bin/pytest -p no:cacheprovider $(PYTEST_ARGS)

unit: venv
	$(VENV)/bin/pytest -p no:cacheprovider tests/unit

demo: venv
	$(VENV)/bin/tether demo

bench-deps: venv
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]' --config-settings editable_mode=compat
	$(PY) -m hooks.launcher >/dev/null  # pip wrote its console script back
	@touch $@

# one table (and bench/out/bench.png): tether against netavark, CNI, tmpfs,
# LXCFS; about 5 minutes (BENCH_ARGS=--quick: about 3)
bench: bench-deps $(VENV)/.bench-installed
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
