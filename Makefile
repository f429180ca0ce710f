# The two commands README.md gives: `make run` (the main job) and `make test` (the suite).
# Both set everything up first (.ci/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench
setup:
	bash .ci/setup.sh

run: setup
	$(PY) -m fastsel run

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest -q bench --benchmark-only
