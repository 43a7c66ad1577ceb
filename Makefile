# The README's two commands: `make demo` and `make test`. Both create .venv and install pinned dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test install install-dev clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PIP) install -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(VENV)/bin/artsim demo

test: $(VENV)/.dev
	$(VENV)/bin/lint-imports --config pyproject.toml
	$(VENV)/bin/python -m pytest -q -ra tests

clean:
	rm -rf artifacts/demo
