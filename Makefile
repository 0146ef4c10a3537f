# inpaint-gateway — see README.md. `make run` and `make test` work on a fresh machine with
# Python 3.11+ and redis-server (or a reachable Redis).

VENV ?= .venv
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench fuzz screenshots clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: Python 3.11+ is required (none found on PATH)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The SDK first: the main package depends on it, and it is not on any index.
	$(BIN)/python -m pip install --quiet -e ./clients/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/inpaint-gateway up

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -n 2 --dist loadfile

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make bench: installing wrk"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null \
	      || echo "make bench: could not install wrk; using the Python load generator"; \
	  else echo "make bench: wrk not found (apt-get install wrk); using the Python load generator"; fi; }
	$(BIN)/python -m bench.run

# schemathesis, every phase, against a live API on a redis-server of its own (tests/fuzzing.py).
FUZZ_EXAMPLES ?= 200
# The console's screenshots in docs/img, taken by its browser test (docs/console.md).
screenshots: $(STAMP)
	CONSOLE_SCREENSHOTS_DIR=docs/img $(BIN)/pytest -q -p no:randomly tests/test_console.py

fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzzing --max-examples $(FUZZ_EXAMPLES) $(FUZZ_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
