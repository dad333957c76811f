"""Shared test settings: float64 where tolerances are tight, few threads, deterministic seeds, and a
launcher of ``torchrun`` worker processes for the data-parallel checks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Tiny test tensors gain nothing from threads, and spin-waiting threads crawl on a loaded machine.
torch.set_num_threads(int(os.environ.get("ITERFLOW_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parent.parent

#: ``launch(script, *args, nproc=2, timeout=240)``: run ``script`` under ``torchrun`` (see :func:`torchrun`).
TorchRun = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def run_torchrun(
    script: str | Path, *args: str, nproc: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``python script *args`` in ``nproc`` CPU processes under ``torchrun --standalone``.

    The workers import this working tree's ``iterflow`` (the repository root leads ``PYTHONPATH``),
    use one thread each, and join a gloo group through the trainer (:func:`iterflow.core.distributed.setup`).
    Fails the calling test with the tail of both output streams unless every worker exits with 0.
    """
    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def torchrun() -> TorchRun:
    """:func:`run_torchrun`, for tests that train data-parallel in worker processes."""
    return run_torchrun
