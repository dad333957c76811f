# The two commands of the README:  make demo  (set up + train the default flow)  and  make test.
VENV ?= .venv
OUT ?= runs/demo

.PHONY: setup demo test lint bench docs

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/iterflow train --out $(OUT)

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check iterflow tests benchmarks

bench: setup
	$(VENV)/bin/python benchmarks/bench_fm.py

docs: setup
	$(VENV)/bin/mkdocs build --strict
