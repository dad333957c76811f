"""Shared test settings: float64 where tolerances are tight, few threads, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny test tensors gain nothing from threads, and spin-waiting threads crawl on a loaded machine.
torch.set_num_threads(int(os.environ.get("ITERFLOW_TEST_THREADS", "1")))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
