# One place for what developers and CI run. `make run` and `make test` set up everything they need.
PYTHON ?= python3
VENV := .venv
BQ_VENV := .venv-bqemulator
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint setup system-packages container-test container-packages clean

## run: Mosquitto and the subscriber under Supervisor, APP_ENV=LOCAL (events are logged, nothing leaves the machine)
run: system-packages $(VENV)/.runtime
	APP_ENV=$${APP_ENV:-LOCAL} $(PY) -m fmi_bridge.container.launch

## test: lint, the whole suite against real Mosquitto, Google's Pub/Sub emulator (the in-repo server for injected
## faults) and the BigQuery emulator, then the container built and run
test: setup
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -n 2 --dist loadfile
	$(MAKE) --no-print-directory container-test

## container-test: build the Dockerfile with buildah on a stand-in base image, run it with podman (LOCAL and PRD)
container-test: setup container-packages
	$(PY) -m pytest -m container tests/container/test_image.py

container-packages:
	@command -v buildah >/dev/null && command -v podman >/dev/null && command -v debootstrap >/dev/null \
	  && command -v runc >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    buildah podman debootstrap runc uidmap fuse-overlayfs ; }

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.gitlab-ci project-ci.yml

setup: system-packages $(VENV)/.installed $(BQ_VENV)/.installed

system-packages:
	@command -v mosquitto >/dev/null && command -v mosquitto_pub >/dev/null && command -v mosquitto_passwd >/dev/null \
	  && command -v openssl >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    mosquitto mosquitto-clients openssl ; }

# The runtime alone for `make run`; the test and lint tools on top for everything else.
$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BQ_VENV)/.installed: requirements-bqemulator.txt
	$(PYTHON) -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/pip install -q -r requirements-bqemulator.txt
	# DuckDB's extensions from PyPI, so the emulator starts without downloading anything
	$(BQ_VENV)/bin/python -c "import duckdb_extensions as e; e.import_extension('spatial'); e.import_extension('avro')"
	touch $@

clean:
	rm -rf $(VENV) $(BQ_VENV) var spool
