# One entry point for people and CI. `make test` is the test command.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# `make run` and `make up` need only the [local] extra (no test or lint tools).
LOCAL_STAMP := $(VENV)/.local-stamp

.PHONY: install lint typecheck test test-fast run up bench clean constraints

# The dependencies at the versions of constraints.txt: the tests run on what the image installs.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(LOCAL_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[local]'
	touch $(LOCAL_STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy --strict worker emulator

# Two xdist workers: the Celery/broker tests run one at a time on one of them (tests/conftest.py),
# the unit, contract and model tests beside them on the other.
test: lint typecheck
	$(BIN)/pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# Without the official SDK test (offline machines) and the slow reliability runs.
test-fast: lint typecheck
	$(BIN)/pytest -n 2 --dist loadgroup -m "not sdk and not slow" $(PYTEST_ARGS)

# The first run: local stack + 50k sample rows, each verified committed exactly once (exit 0).
run: $(LOCAL_STAMP)
	$(BIN)/snowpipe-worker run

# The same local stack (embedded broker, emulator, worker, beat), kept running until Ctrl-C.
up: $(LOCAL_STAMP)
	$(BIN)/snowpipe-worker up

# After changing a dependency (or upgrading one in .venv): pin what .venv now has.
constraints: install
	$(BIN)/python -m tests.support.constraints > constraints.txt

bench: install
	$(BIN)/python bench/guard.py
	$(BIN)/python bench/emulator.py
	PYTHONPATH=. $(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
