# `make run` and `make test` do all the set-up on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the project needs at run or test time, as COMMAND=PACKAGE: installed only
# when the command is missing. node/npm run the independent CDS client in tests/interop.
# Orthanc + its DICOMweb plugin are the real PACS of tests/imaging (a path checks a file).
# Debian's chromium runs the SMART app's browser tests (tests/smart; never a browser download).
# Real PostgreSQL and Redis back the scale-out tests (started on loopback by the tests
# themselves, each with its own data folder and port, and stopped afterwards).
SYSTEM_PACKAGES := node=nodejs npm=npm /usr/sbin/Orthanc=orthanc \
	/usr/share/orthanc/plugins/libOrthancDicomWeb.so=orthanc-dicomweb chromium=chromium \
	/usr/lib/postgresql/15/bin/postgres=postgresql redis-server=redis-server
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench-hooks clean system-packages peers-check

$(STAMP): pyproject.toml
	@scripts/ensure-system-packages.sh $(SYSTEM_PACKAGES)
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || scripts/ensure-system-packages.sh venv-missing=python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ml,scale]'
	@touch $(STAMP)

system-packages:
	@scripts/ensure-system-packages.sh $(SYSTEM_PACKAGES)

# `make run PORT=9080 SANDBOX_PORT=9081` when 8080/8081 are taken.
PORT ?= 8080
SANDBOX_PORT ?= 8081

run: $(STAMP)
	$(BIN)/cxr-cds demo --port $(PORT) --sandbox-port $(SANDBOX_PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck unit

bench-hooks: $(STAMP)
	$(BIN)/python bench/hooks.py

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache

# The real CDS Hooks sandbox and SMART launcher (archives in ../shared/peers or PEERS_DIR),
# built once under .peers-cache/ and driven in Chromium; skipped when the archives are absent.
peers-check: $(STAMP)
	scripts/peers-check.sh
