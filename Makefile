# Two entry points: `make run` (train the SNN and its ANN twin on the built-in corpus) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-browser lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# SpikingJelly only for the cross-check tests; --no-deps keeps it from pulling another torch
	$(PY) -m pip install -q 'loguru>=0.7,<1' && $(PY) -m pip install -q --no-deps 'spikingjelly==2.0.0' || echo 'spikingjelly unavailable: its cross-checks will be skipped'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	# a rerun continues the runs there (or only reprints the results): compare never overwrites a run unasked
	$(VENV)/bin/spikedecoder compare configs/run.toml --out runs/make-run $(if $(wildcard runs/make-run/*/checkpoint),--resume)

test: $(STAMP)
	$(PY) -m pytest -q

# The served page in headless Chromium: Debian's chromium + chromium-driver (apt-get, only if missing; sudo unless
# root) and selenium; SPIKEDECODER_REQUIRE_BROWSER=1 makes a missing browser a failure instead of a skip.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }
	$(PY) -c 'import selenium' 2>/dev/null || $(PY) -m pip install -q -e '.[browser]'
	SPIKEDECODER_REQUIRE_BROWSER=1 $(PY) -m pytest -q -s -m browser  # -s: the test prints the page's tokens/s

lint: $(STAMP)
	$(VENV)/bin/ruff check spikedecoder tests benchmarks
	$(VENV)/bin/ruff format --check spikedecoder tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format spikedecoder tests benchmarks
	$(VENV)/bin/ruff check --fix spikedecoder tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
