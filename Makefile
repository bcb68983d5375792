# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates/refreshes .venv, installs gradguard (torch pinned to the local CPU 2.13.0 build), and runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The optional integrations' frameworks (lightning, transformers + accelerate, tensorboard): only `make test`
# installs them, under their own stamp, so `make demo` does not pull them (requirements.txt constrains them:
# they must not move the pinned torch).
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PIP) install -q --disable-pip-version-check -r requirements-test.txt -c requirements.txt
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradguard demo

# The report test opens report.html in headless Chromium; install Debian's chromium when it is missing
# (as root, or through passwordless sudo). Without it that one test is skipped with a loud message.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -n")

test: $(TEST_STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "WARNING: chromium is missing and could not be installed; the HTML report screenshot test will be SKIPPED"
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q

# pyflakes + import order + bugbear (ruff) and mypy on src/, tests/ and bench/: part of `make test`, so CI runs them
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
