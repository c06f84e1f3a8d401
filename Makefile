# dermnode: one entry point for setup, run, test and lint.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PEERS  := dcmtk orthanc chromium postgresql

.PHONY: setup peers run test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev,train]'
	touch $(STAMP)

## setup: virtualenv with dermnode (editable) + dev tools, and the DICOM test peers from Debian
setup: $(STAMP) peers

## peers: install DCMTK, Orthanc, Chromium and PostgreSQL from Debian when missing (needs root; skipped with a message otherwise)
peers:
	@missing=""; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then echo "peers: dcmtk, orthanc, chromium and postgresql already installed"; \
	elif [ "$$(id -u)" != "0" ]; then echo "peers: not root, skipping apt-get install of:$$missing (tests that need them will skip)"; \
	else echo "peers: installing$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  systemctl stop orthanc postgresql >/dev/null 2>&1 || { service orthanc stop; service postgresql stop; } >/dev/null 2>&1 || true; \
	fi

## run: start the service on the embedded defaults (storage under var/, shipped models)
run: $(STAMP)
	$(VENV)/bin/dermnode serve

## test: the whole test suite (installs what it needs first)
test: setup
	$(VENV)/bin/pytest -q

## lint: ruff + mypy
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
