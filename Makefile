# One-command workflows. `make serve` sets everything up and starts the gateway
# on the embedded backend; `make test` runs the whole test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup serve test system-deps node-deps proto

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e .
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e clients
	touch $@

# perf_analyzer (shipped in the tritonclient wheel) links libb64; dicom3tools' dciodvfy checks the DICOM SEG in tests;
# tests/test_web.py drives the page in Debian's chromium.
SYSTEM_PACKAGES := libb64-0d dicom3tools chromium
system-deps:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES); \
	  else echo "tests need: sudo apt-get install -y $(SYSTEM_PACKAGES)"; fi; }

# The Node client example (clients/node), which a test runs against a real gateway; Node 20 and npm come with the machine.
NODE_STAMP := clients/node/node_modules/.package-lock.json
$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund
node-deps: $(NODE_STAMP)

setup: $(STAMP) system-deps node-deps

serve: setup
	$(VENV)/bin/brainscan-server

test: setup
	$(PY) -m pytest -q -rs

proto: setup
	$(PY) -m brainscan_proto.protogen
