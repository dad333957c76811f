"""Minibatch-OT pairs coupled one step ahead (``iterflow.core.coupled_batches``) and the window
re-assignment of the ``auto`` solver (``iterflow.core.couplings.resolve_windows``)."""

from __future__ import annotations

import pytest
import torch

from iterflow.core.coupled_batches import CoupledBatches, step_seed
from iterflow.core.couplings import (
    assignment,
    chunked_assignment,
    ot_permutation,
    refine_assignment,
    resolve_windows,
    transport_cost,
)
from iterflow.errors import InputError
from iterflow.train import TrainConfig, train


def _pair(a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor) -> float:
    return transport_cost(a, b[perm])


@pytest.mark.parametrize(("dim", "n"), [(1, 200), (2, 300), (5, 256)])
def test_windows_never_increase_the_cost_and_approach_the_optimum(dim: int, n: int) -> None:
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(n, dim, generator=g) * torch.linspace(0.5, 2.0, dim)
    b = torch.randn(n, dim, generator=g) + 1.0
    start = chunked_assignment(a, b, 32, stratify=True)  # as the auto solver starts
    better = resolve_windows(a, b, start, rounds=3, window=16)
    assert sorted(better.tolist()) == list(range(n))  # a permutation
    exact = _pair(a, b, assignment(a, b, "emd"))
    costs = [_pair(a, b, start)]
    perm = start
    for _ in range(4):  # each round keeps or lowers the cost
        perm = resolve_windows(a, b, perm, rounds=1, window=16)
        costs.append(_pair(a, b, perm))
    assert all(c1 <= c0 + 1e-9 for c0, c1 in zip(costs, costs[1:]))
    got = _pair(a, b, better)
    assert exact - 1e-9 <= got <= exact + 0.7 * (costs[0] - exact) + 1e-9  # the gap shrinks


def test_windows_reject_bad_arguments_and_leave_small_batches() -> None:
    a, b = torch.randn(10, 2), torch.randn(10, 2)
    perm = torch.arange(10)
    assert torch.equal(resolve_windows(a, b, perm, rounds=2, window=8), perm)  # < 2 windows
    with pytest.raises(InputError, match="window"):
        resolve_windows(a, b, perm, rounds=1, window=0)
    with pytest.raises(InputError, match="rounds"):
        resolve_windows(a, b, perm, rounds=-1)


@pytest.mark.parametrize(("dim", "bound"), [(2, 1.15), (3, 1.5)])  # chunks resolve 2-D best
def test_auto_is_closer_to_exact_than_refinement_alone(dim: int, bound: float) -> None:
    g = torch.Generator().manual_seed(10 + dim)
    a = torch.rand(768, dim, generator=g) * 4 - 2
    b = torch.randn(768, dim, generator=g)
    exact = _pair(a, b, assignment(a, b, "emd"))
    auto = _pair(a, b, ot_permutation(a, b))
    refined_only = _pair(a, b, refine_assignment(a, b, ot_permutation(a, b, chunk=48), 0))
    assert exact - 1e-9 <= auto <= refined_only + 1e-9
    assert auto / exact < bound


def _ot_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b[ot_permutation(a, b)]


@pytest.mark.parametrize("ahead", [False, True])
def test_pairs_depend_on_seed_and_step_only(ahead: bool) -> None:
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    src = CoupledBatches(data, _ot_pair, seed=3, ahead=ahead)
    got = [src(torch.Generator(), 200) for _ in range(4)]
    src.close()
    assert torch.get_num_threads() == threads  # given back
    ref = CoupledBatches(data, _ot_pair, seed=3, ahead=False)
    for k, (x0, x1) in enumerate(got):
        e0, e1 = ref.make(k, 200)
        assert torch.equal(x0, e0) and torch.equal(x1, e1)
        assert transport_cost(x0, x1) < 0.5 * transport_cost(x0, x1[torch.randperm(200)])
    resumed = CoupledBatches(data, _ot_pair, seed=3, ahead=ahead)
    resumed.start_at(2)
    x0, x1 = resumed(torch.Generator(), 200)
    resumed.close()
    assert torch.equal(x0, got[2][0]) and torch.equal(x1, got[2][1])
    assert step_seed(3, 1) != step_seed(3, 2) != step_seed(4, 1)


def test_fm_with_ot_resumes_bit_for_bit(tmp_path) -> None:
    cfg = TrainConfig(
        method="fm", data="moons", steps=30, batch_size=256, hidden=(16, 16), n_train=2000,
        n_val=200, n_test=200, checkpoint_every=10, options={"coupling": "ot"},
    )  # fmt: skip
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", stop_after_steps=15)
    resumed = train(cfg, tmp_path / "cut")
    for p, q in zip(whole.flow.parameters(), resumed.flow.parameters()):
        assert torch.equal(p, q)
    rec = resumed.history[0]  # the stage's seconds count the optimisation before the resumption
    assert rec["seconds_before_resume"] > 0
    assert rec["seconds"] >= rec["seconds_optimize"] >= rec["seconds_before_resume"]
