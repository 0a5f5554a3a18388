# make demo: install what is missing, then run the main job end to end.
# make test: install what is missing, then lint, type-check and run the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
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

bench: setup
	EXTRA_APT="fuse-overlayfs unionfs-fuse git" scripts/setup.sh
	$(PY) -m bench.run --markdown

bench-quick: setup
	EXTRA_APT="fuse-overlayfs unionfs-fuse git" scripts/setup.sh
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
