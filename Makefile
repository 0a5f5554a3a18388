# make demo: install what is missing, then run the main job end to end.
# make test: install what is missing, then lint, type-check and run the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=
# mounted tests mostly wait for daemons and subprocesses: run them side by side
PYTEST_JOBS ?= auto

.PHONY: setup demo test lint bench bench-quick stress clean
setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check agentfs tests bench
	$(VENV)/bin/mypy agentfs

test: lint
	$(PY) -m pytest -n $(PYTEST_JOBS) $(PYTEST_ARGS)

stress: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# make bench: every workload on every default target, 3 alternating repetitions; writes
# bench/results/latest.{json,md} (the harness apt-installs fuse-overlayfs/unionfs-fuse).
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m bench --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
