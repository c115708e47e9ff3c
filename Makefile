# Every target creates or reuses .venv, so a fresh clone needs only Python >= 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EMULATOR_PORT ?= 8081
DAEMON_PORT ?= 8080
# Test processes run in parallel (pytest-xdist). Most of a test's time is spent waiting on the
# real daemon, emulator and PostgreSQL it starts, so more workers than cores pays off; each
# worker has its own emulator (and PostgreSQL server, when a test of it asks for one).
TEST_WORKERS ?= 6

.PHONY: all install run test unit lint format typecheck bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m daemon.devrun --emulator-port $(EMULATOR_PORT) --daemon-port $(DAEMON_PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test: lint typecheck unit

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
