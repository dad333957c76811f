# The two commands of the README:  make demo  (set up + train the default flow)  and  make test.
VENV ?= .venv
OUT ?= runs/demo
# The demo's recipe: flow matching on the checkerboard with Fourier features of x (a preset shipped
# with the package; benchmarks/bench_speed.py's DEMO_PRESET measures the same one).
DEMO_CONFIG ?= checkerboard-fourier
# Test processes (pytest-xdist), a file each at a time so that a file's fixtures are built once. The
# tests use one PyTorch thread each (tests/conftest.py), so on two cores two workers take 0.5-0.6x
# the serial time (a fresh-clone .ci/run: suite 546-626 s against 997-1,102 s serially, two-core AMD EPYC).
TEST_WORKERS ?= auto

.PHONY: setup demo test lint bench docs

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/iterflow train --config $(DEMO_CONFIG) --out $(OUT)

test: setup
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check iterflow tests benchmarks

bench: setup
	$(VENV)/bin/python benchmarks/bench_fm.py

docs: setup
	$(VENV)/bin/mkdocs build --strict
