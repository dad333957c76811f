"""Static checks that CI runs with the suite: ruff (lint, including the annotation rules ANN on the
package) and mypy (the settings of ``[tool.mypy]`` in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint_and_annotations_pass() -> None:
    res = _run(str(BIN / "ruff"), "check", "iterflow", "tests", "benchmarks")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_mypy_passes_on_the_package() -> None:
    res = _run(sys.executable, "-m", "mypy")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
