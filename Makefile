# The two commands a newcomer needs: `make demo` and `make test`. Both set up everything
# (virtualenv, packages, local Kafka/PostgreSQL/Redis) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint test-slow test-fault services-up services-down services-status clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "projector needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $@

## Run the demo: services, migrate, publish shuffled/duplicated scenarios, project, print views.
demo: $(STAMP)
	dev/services.sh up
	$(BIN)/python -m projector.demo

## The default suite: lint, types, tests against the real services (at most 15 minutes).
test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The benchmark of issue 11 (bench/README.md): 1M events through projector and the machine's
## limits, side by side; prints the tables, writes the chart and results.json to .dev/bench.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	dev/services.sh up
	$(BIN)/python -m bench.run

## Long runs kept out of the default suite.
test-slow: $(STAMP)
	$(BIN)/pytest -m slow

## The fault suite (docs/faults.md): real processes killed, stalled, cut off; prints each
## scenario's figures (lines starting FIGURES). About 15 minutes.
test-fault: $(STAMP)
	$(BIN)/pytest -m fault -s

services-up:
	dev/services.sh up
services-down:
	dev/services.sh down
services-status:
	dev/services.sh status

clean: services-down
	rm -rf .dev $(VENV)
