# The commands: `make demo`, `make test`, `make bench` (`make bench-quick`: a reduced run).
# Each sets itself up from nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.troupe-installed

.PHONY: demo test check lint typecheck unit clean bench bench-quick

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes; the package itself is installed editable.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

# The benchmarks also need the bench extras (Ray, NVIDIA Dynamo's runtime, pyinstrument): their
# own stamp.
BENCH_STAMP := $(VENV)/.troupe-bench-installed
$(BENCH_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,fast,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks

bench-quick: $(BENCH_STAMP)
	$(PY) -m benchmarks --quick

demo: $(STAMP)
	$(PY) -m troupe.demo

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check troupe tests examples benchmarks
	$(VENV)/bin/ruff format --check troupe tests examples benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest

test: check unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
