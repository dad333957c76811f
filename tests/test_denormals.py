"""Flushing subnormal floats (iterflow.core.denormals): in force where set first, reaching the worker
threads only when set before PyTorch starts them, off by the environment variable, and harmless to
training (the weights of a run are those of a run without it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from iterflow.core import denormals

HAS_FTZ = torch.set_flush_denormal(False)  # whether this CPU has the mode (leaves it off)


def run_py(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (two intra-op threads) and return its last line."""
    full = {**os.environ, "OMP_NUM_THREADS": "2", **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not HAS_FTZ, reason="this CPU has no flush-to-zero mode")
def test_flush_before_the_pool_reaches_every_worker_and_after_only_the_caller():
    first = """
        import torch
        from iterflow.core.denormals import flush_denormals, pool_flushes
        torch.set_num_threads(2)
        print(flush_denormals(), pool_flushes())
    """
    assert run_py(first) == "True True"
    late = """
        import torch
        from iterflow.core.denormals import flush_denormals, pool_flushes
        torch.set_num_threads(2)
        (torch.ones(1 << 21) * 2).sum()  # starts the worker pool without the flag
        flush_denormals()
        x = torch.tensor([1e-30]) * 1e-9  # one element: computed by the calling thread
        print(bool(x == 0), torch.get_num_threads() == 1 or not pool_flushes())
    """
    assert run_py(late) == "True True"


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_environment_turns_it_off(value):
    code = """
        import torch
        from iterflow.core.denormals import flush_denormals, pool_flushes
        print(flush_denormals(), pool_flushes(), bool(torch.tensor([1e-30]) * 1e-9 > 0))
    """
    assert run_py(code, ITERFLOW_FLUSH_DENORMALS=value) == "False False True"


def test_enabled_unless_turned_off(monkeypatch):
    monkeypatch.delenv(denormals.ENV, raising=False)
    assert denormals.flushing_enabled()
    for on in ("1", "on", "yes", "anything"):
        monkeypatch.setenv(denormals.ENV, on)
        assert denormals.flushing_enabled()


@pytest.mark.skipif(not HAS_FTZ, reason="this CPU has no flush-to-zero mode")
def test_the_cli_and_the_trainer_flush():
    cli = """
        import importlib
        from iterflow.core.denormals import pool_flushes
        importlib.import_module("iterflow.cli.app").main(["--help"])
        print(pool_flushes())
    """
    assert run_py(cli) == "True"
    trainer = """
        import torch
        import iterflow
        torch.manual_seed(0)
        iterflow.fit("fm", torch.randn(64, 2), steps=2, batch_size=8, hidden=[8])
        print(bool(torch.tensor([1e-30]) * 1e-9 == 0))
    """
    assert run_py(trainer) == "True"


@pytest.mark.skipif(not HAS_FTZ, reason="this CPU has no flush-to-zero mode")
def test_training_with_flushing_gives_the_same_weights(tmp_path):
    """A short flow-matching run with and without flushing (each in its own process, the flag set
    before any computation): bit-identical weights."""
    code = f"""
        import torch
        import iterflow
        on = iterflow.flush_denormals()
        torch.manual_seed(0)
        x = torch.randn(512, 3) * torch.tensor([1.0, 0.1, 3.0])
        res = iterflow.fit("fm", x, steps=150, batch_size=64, hidden=[32, 32])
        w = torch.cat([p.detach().flatten() for p in res.flow.parameters()])
        torch.save(w, "{tmp_path}/w_" + ("on" if on else "off") + ".pt")
        print(on)
    """
    assert run_py(code) == "True"
    assert run_py(code, ITERFLOW_FLUSH_DENORMALS="0") == "False"
    on, off = torch.load(tmp_path / "w_on.pt"), torch.load(tmp_path / "w_off.pt")
    assert torch.equal(on, off)
