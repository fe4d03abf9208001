# Meshwatch: `make demo` runs the platform on embedded defaults; `make test` runs the test suite.
# Both set themselves up on a fresh Debian machine with Python 3.11+: a .venv, the project,
# and (for tests) the real servers the tests start: mosquitto, VictoriaMetrics, InfluxDB 1.x,
# PostgreSQL, and Chromium with its driver for the browser test.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := mosquitto victoria-metrics influxdb postgresql chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DIR ?= demo-out

.PHONY: demo test lint bench servers clean

demo: $(VENV)/.demo-installed
	$(BIN)/meshwatch demo --out $(DEMO_DIR)

test: $(VENV)/.dev-installed servers
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(VENV)/.dev-installed servers
	$(BIN)/python bench/bench_contract.py
	$(BIN)/python bench/bench_simulator.py
	$(BIN)/python bench/bench_edge_inference.py
	$(BIN)/python bench/bench_edge_agent.py
	$(BIN)/python bench/bench_edge_memory.py
	$(BIN)/python bench/bench_bridge_core.py
	$(BIN)/python bench/bench_bridge.py
	$(BIN)/python bench/bench_flow.py
	$(BIN)/python bench/bench_flow_memory.py
	$(BIN)/python bench/bench_latency.py
	$(BIN)/python bench/bench_remediation.py
	$(BIN)/python bench/bench_generic_detector.py
	$(BIN)/python bench/bench_water_detectors.py

# Install the Debian packages of the servers the tests run, when any is missing.
servers:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Meshwatch needs Python 3.11 or newer; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "on Debian: apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV)/.demo-installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[edge,sim,cloud,train]'
	touch $@

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache .hypothesis
