# The two commands: `make demo` and `make test`. Both set themselves up from nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.troupe-installed

.PHONY: demo test check lint typecheck unit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes; the package itself is installed editable.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

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
