# The two commands of the README:  make demo  (set up + train the default flow)  and  make test.
VENV ?= .venv
OUT ?= runs/demo
# The demo's recipe: flow matching on the checkerboard with Fourier features of x (a preset shipped
# with the package; benchmarks/bench_speed.py's DEMO_PRESET measures the same one).
DEMO_CONFIG ?= checkerboard-fourier

.PHONY: setup demo test lint bench docs

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/iterflow train --config $(DEMO_CONFIG) --out $(OUT)

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check iterflow tests benchmarks

bench: setup
	$(VENV)/bin/python benchmarks/bench_fm.py

docs: setup
	$(VENV)/bin/mkdocs build --strict
