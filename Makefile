# The README's two commands: `make demo` and `make test`. Both create .venv and install pinned dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test install install-dev browser clean

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
install-dev: $(VENV)/.dev browser

# Debian's chromium for tests/test_report_browser.py (Playwright drives this system browser); skipped when present
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

demo: $(VENV)/.runtime
	$(VENV)/bin/artsim demo

test: $(VENV)/.dev browser
	$(VENV)/bin/lint-imports --config pyproject.toml
	$(VENV)/bin/python -m pytest -q -ra --durations=30 tests

clean:
	rm -rf artifacts/demo
