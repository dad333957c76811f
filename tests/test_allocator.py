"""The CPU allocator settings of training (:mod:`iterflow.core.allocator`): with them a training
loop's freed activations are reused instead of faulted in again every step; switched on by the
environment only; nothing happens outside glibc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from iterflow.core import allocator

CHILD = r"""
import resource, sys, torch
torch.set_num_threads(1)
from iterflow.core.allocator import tune_cpu_allocator
print(tune_cpu_allocator() if sys.argv[1] == "1" else None)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(3, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256),
                          torch.nn.SiLU(), torch.nn.Linear(256, 2))
opt = torch.optim.Adam(net.parameters(), 1e-3)
def step():
    x = torch.randn(1024, 3)
    loss = (net(x) - x[:, :2]).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_child(tune: bool, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if tune else "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1", allocator.ENV: "1", **(env or {})},
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    first, faults = out.stdout.split()[-2:]
    return first, int(faults)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or allocator.platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's",
)
def test_tuned_allocator_stops_the_page_faults_of_every_step() -> None:
    tuned_flag, tuned = run_child(True)
    _, plain = run_child(False)
    assert tuned_flag == "True"
    # measured: about 250-300 minor faults per step with glibc's defaults, under 10 tuned
    assert tuned * 5 < plain, (tuned, plain)
    off_flag, _ = run_child(True, {allocator.ENV: "0"})
    assert off_flag == "False"  # switched off: nothing set


def test_switch_and_platforms(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, on in (("0", False), ("off", False), ("", False), ("1", True), ("on", True),
                      ("True", True), ("yes", True)):  # fmt: skip
        monkeypatch.setenv(allocator.ENV, value)
        assert allocator.tuning_enabled() is on
    monkeypatch.delenv(allocator.ENV)
    assert not allocator.tuning_enabled()  # off by default
    monkeypatch.setenv(allocator.ENV, "1")
    calls: list[int] = []
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: calls.append(1))
    monkeypatch.setattr(allocator, "_done", None)
    assert allocator.tune_cpu_allocator() is False and not calls  # not glibc: mallopt not called
    monkeypatch.setattr(allocator, "_done", True)
    assert allocator.tune_cpu_allocator() is True  # once per process: the first result stands
