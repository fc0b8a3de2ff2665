# The two set-up commands of the README: `make demo` and `make test`.
# Both work on a fresh machine with Python >= 3.11: they make .venv and install into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/tollway demo

test: $(VENV)/.test
	$(PY) -m pytest

lint: $(VENV)/.test
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/mypy
