# berth: every target a person or CI needs. `make demo` and `make test` work on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := npx --yes @bufbuild/buf@1.47.2
# golang-github-containers-common ships the default seccomp profile containers run with
# (/usr/share/containers/seccomp.json, Docker's and Podman's).
APT_PACKAGES := etcd-server runc conmon busybox-static skopeo umoci docker-registry openssl iproute2 curl \
  nftables containernetworking-plugins iperf3 \
  golang-github-containers-common podman docker.io containerd
# Peers the benchmarks measure berth against (not needed by the tests; docker-registry is: the
# image tests push to and pull from it; podman, docker.io and containerd too: their clients pull
# from and push to the registry's OCI HTTP API, each test starting its own daemon).
BENCH_APT_PACKAGES := podman buildah aardvark-dns wrk
# Debian packages an image is made of (scripts/nginx_image.py), downloaded as .deb files and
# never installed: installing nginx would run its maintainer scripts and, on a systemd host,
# start and enable a host nginx on port 80. The tests and the demo read only the files.
IMAGE_DEBS := nginx nginx-common
DEB_CACHE := .cache/debs
PROTO_FILES := $(shell find protos -name '*.proto')
# The protos are a public contract: `make lint` fails on a change that breaks clients generated
# from the last release of the contract, the commit named in protos/RELEASE (tagged api/v1).
BREAKING_AGAINST ?= $(shell cat protos/RELEASE)
# Empty means berthd's default state directory, which the CLI also finds on its own.
STATE_DIR ?=
STATE_FLAG := $(if $(STATE_DIR),--state-dir $(STATE_DIR),)

# The Node.js client in tests/clients/node uses the protos alone; its packages are pinned by
# its package-lock.json.
NODE_CLIENT := tests/clients/node

.PHONY: deps apt debs node bench-apt venv protos lint test unit integration chaos demo bench up down status clean

deps: apt debs venv protos

# apt packages are installed only when one is missing, so repeated runs stay fast.
apt_install_inline = { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; }

define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

apt:
	$(call apt_install,$(APT_PACKAGES))

# Downloaded only when one is missing: the image's bytes stay the same until the cache is
# removed (`make clean`), whatever the mirror publishes meanwhile.
debs:
	@mkdir -p $(DEB_CACHE); missing=""; for p in $(IMAGE_DEBS); do \
	  ls $(DEB_CACHE)/$${p}_*.deb >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "downloading:$$missing"; \
	  apt-get update -qq && cd $(DEB_CACHE) && apt-get download -qq -o APT::Sandbox::User=root $$missing; \
	fi

# Debian's nodejs and npm, unless the machine already has a Node.js with npm (NodeSource's
# nodejs package carries its own npm and conflicts with Debian's).
node: $(NODE_CLIENT)/node_modules/.installed

$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || $(call apt_install_inline,nodejs npm)
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

bench-apt:
	$(call apt_install,$(BENCH_APT_PACKAGES))

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

protos: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=clients/python --pyi_out=clients/python \
	  --grpc_python_out=clients/python $(PROTO_FILES)
	@# Byte-compile the editable sources now: the CLI otherwise compiles every module it imports
	@# on each run where .pyc cannot be written (PYTHONDONTWRITEBYTECODE, a read-only checkout).
	$(PY) -m compileall -q clients/python services

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cd protos && $(BUF) lint
	@# A shallow clone lacks the release commit: deepen it first.
	@git cat-file -e '$(BREAKING_AGAINST)^{commit}' 2>/dev/null || git fetch -q --unshallow || \
	  { echo "the contract's release $(BREAKING_AGAINST) (protos/RELEASE) is not in this clone"; exit 1; }
	$(BUF) breaking protos --against '.git#ref=$(BREAKING_AGAINST),subdir=protos'

unit: deps
	$(VENV)/bin/pytest -q tests/unit

integration: deps node
	$(VENV)/bin/pytest -q tests/integration

# --durations: the slowest tests, to keep the suite under CI's 20 minutes.
test: deps node lint
	$(VENV)/bin/pytest -q -ra --durations=25 tests

# The chaos test for longer than its bounded run in `make test` (1 minute of faults); a seed
# from a failure message replays that run: `CHAOS_SEED=123 make chaos`.
CHAOS_MINUTES ?= 30
CHAOS_SEED ?=
chaos: deps
	CHAOS_MINUTES=$(CHAOS_MINUTES) CHAOS_SEED=$(CHAOS_SEED) $(VENV)/bin/pytest -q -s -ra tests/chaos

demo: deps
	$(PY) scripts/demo.py $(STATE_FLAG)

bench: deps bench-apt
	$(PY) -m bench.registry
	$(PY) -m bench.registry_http
	$(PY) -m bench.node
	$(PY) -m bench.net_throughput
	$(PY) -m bench.cluster
	$(PY) -m bench.image
	$(PY) -m bench.builder
	$(PY) -m bench.security
	$(PY) -m bench.controller
	$(PY) -m bench.scale
	$(PY) -m bench.node_idle
	$(PY) -m bench.registry_ls
	$(PY) -m bench.deploy
	$(PY) -m bench.placement
	$(PY) -m bench.dns
	$(PY) -m bench.stats
	$(PY) -m bench.cli_startup
	$(PY) -m bench.net_start
	$(PY) -m bench.net_ports

up: deps
	$(VENV)/bin/berthd up $(STATE_FLAG)

down:
	$(VENV)/bin/berthd down $(STATE_FLAG)

status:
	$(VENV)/bin/berthd status $(STATE_FLAG)

clean: down
	rm -rf $(VENV) $(DEB_CACHE)
