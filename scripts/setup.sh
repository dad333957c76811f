#!/usr/bin/env bash
# Set up a virtual environment for iterflow in .venv (idempotent).
# torch 2.13.0 is installed first: on the project's CPU machines pip takes a local CPU build of it;
# the package itself accepts torch>=2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.iterflow-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q "torch>=2.2"
# dev: tests and linters; docs: the site that tests/test_docs.py builds; tensorboard: --tensorboard;
# fast: numba, for the compiled minibatch-OT pairing.
"$VENV/bin/python" -m pip install -q -e ".[dev,docs,tensorboard,fast]"
# Fashion-MNIST comes from Debian's dataset-fashion-mnist package where we may install it (optional:
# tests fall back to scikit-learn's bundled 8x8 digits).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
    || echo "note: dataset-fashion-mnist not installed (optional)"
fi
touch "$stamp"
