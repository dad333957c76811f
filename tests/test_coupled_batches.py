"""Minibatch-OT pairs coupled one step ahead (``iterflow.core.coupled_batches``) and the window
re-assignment of the ``auto`` solver (``iterflow.core.couplings.resolve_windows``)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from iterflow.core import couplings
from iterflow.core.coupled_batches import CoupledBatches, step_seed
from iterflow.core.couplings import (
    _compiled_available,
    assignment,
    chunked_assignment,
    ot_permutation,
    refine_assignment,
    resolve_windows,
    transport_cost,
)
from iterflow.errors import InputError
from iterflow.train import ResumeWarning, TrainConfig, train
from iterflow.train.loop import run_environment, warn_environment


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


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("dim", "bound"), [(2, 1.15), (3, 1.5)])  # chunks resolve 2-D best
def test_auto_is_closer_to_exact_than_refinement_alone(
    dim: int, bound: float, compiled: bool, monkeypatch
) -> None:
    from iterflow.core import couplings

    monkeypatch.setattr(couplings, "USE_COMPILED", compiled)  # 2-D: compiled where numba is
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # the same environment: no warning
        resumed = train(cfg, tmp_path / "cut")
    for p, q in zip(whole.flow.parameters(), resumed.flow.parameters()):
        assert torch.equal(p, q)
    rec = resumed.history[0]  # the stage's seconds count the optimisation before the resumption
    assert rec["seconds_before_resume"] > 0
    assert rec["seconds"] >= rec["seconds_optimize"] >= rec["seconds_before_resume"]


def _cut_run(tmp_path, blocks: int = 1, stop: int = 15) -> tuple[TrainConfig, Path]:
    """A 2-D run with the OT coupling cut after ``stop`` steps: flow matching (one block), or local
    flow matching whose last of ``blocks`` blocks is coupled by OT."""
    method, options = ("fm", {"coupling": "ot"}) if blocks == 1 else ("local-fm", {
        "final_coupling": "ot", "hs": [0.5] * (blocks - 1)})  # fmt: skip
    cfg = TrainConfig(
        method=method, data="moons", steps=20, batch_size=256, hidden=(8,), n_train=1000,
        n_val=100, n_test=100, checkpoint_every=10, blocks=blocks, options=options,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", stop_after_steps=stop)
    return cfg, tmp_path / "cut"


def test_a_resume_in_another_environment_is_warned(tmp_path) -> None:
    cfg, out = _cut_run(tmp_path)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["environment"]["torch"] == torch.__version__
    assert progress["environment"]["ot_pairing"] in ("compiled", "numpy")
    progress["environment"]["torch"] = "1.0.0"  # as if saved by another PyTorch
    (out / "progress.json").write_text(json.dumps(progress))
    with pytest.warns(ResumeWarning, match=r"step 10 of stage 0.*torch '1\.0\.0' then"):
        result = train(cfg, out)
    assert result.history[0]["steps"] == 20  # it still finishes


@pytest.mark.skipif(not _compiled_available(), reason="needs numba (the compiled pairing)")
@pytest.mark.parametrize("blocks", [1, 2])
def test_a_resume_with_the_other_ot_pairing_is_warned(tmp_path, monkeypatch, blocks) -> None:
    # blocks=2: cut in the second (OT) stage, so the finished first stage is warned about too
    cfg, out = _cut_run(tmp_path, blocks, stop=15 + 20 * (blocks - 1))
    monkeypatch.setattr(couplings, "USE_COMPILED", False)  # numba gone since the run was saved
    with pytest.warns(ResumeWarning) as caught:
        train(cfg, out)
    said = [str(w.message) for w in caught if w.category is ResumeWarning]
    pairing = "ot_pairing 'compiled' then, 'numpy' now"
    assert any(pairing in m and f"of stage {blocks - 1}" in m for m in said)
    assert any(pairing in m and "finished stages" in m for m in said) == (blocks == 2)


def test_environment_warnings_compare_only_what_was_recorded() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        warn_environment(None, run_environment(), "an older folder")  # nothing recorded
        warn_environment({"torch": torch.__version__}, run_environment({"ot_pairing": "x"}), "a")
    with pytest.warns(ResumeWarning, match="ot_pairing 'numpy' then, 'compiled' now"):
        warn_environment({"ot_pairing": "numpy"}, {"ot_pairing": "compiled"}, "here")


@pytest.mark.parametrize(
    ("m", "dim", "spread"), [(5, 1, 1.0), (16, 2, 0.05), (48, 2, 3.0), (32, 6, 0.2)]
)
def test_reduced_costs_have_the_same_optimal_assignments(m: int, dim: int, spread: float) -> None:
    from scipy.optimize import linear_sum_assignment

    from iterflow.core.couplings import _lsa, _reduced

    g = np.random.default_rng(m + dim)
    for _ in range(5):  # near neighbours (small spread: the windows' near-ties) and spread points
        a = g.normal(size=(m, dim)) * spread
        b = a + g.normal(size=(m, dim)) * spread + 1.0
        cost = ((a[:, None] - b[None]) ** 2).sum(-1)
        red = _reduced(cost)
        assert red.min(axis=0) == pytest.approx(np.zeros(m), abs=0) and (red >= 0).all()
        rows = np.arange(m)
        best = cost[linear_sum_assignment(cost)].sum()
        assert cost[rows, _lsa(cost)].sum() == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert cost[rows, _lsa(red, reduced=True)].sum() == pytest.approx(
            best, rel=1e-12, abs=1e-12
        )
        batch = _reduced(np.stack([cost, cost.T]))  # batched: each matrix on its own
        assert np.array_equal(batch[0], red) and np.array_equal(batch[1], _reduced(cost.T))


def _two_opt_reference(a: np.ndarray, b: np.ndarray, p: np.ndarray, passes: int) -> np.ndarray:
    """The 2-opt passes written with index arrays, as before they ran on strided views."""
    from iterflow.core.couplings import _frames, _local_order

    strips = max(1, round(math.sqrt(a.shape[0] / 4)))
    for it, frame in enumerate(_frames(a.shape[1], passes)):
        order = _local_order(a if it % 2 == 0 else b[p], frame, strips)
        for t, k in enumerate((1, 2, 3, 4)):
            o = order[(t % 2) * k :]
            m = (len(o) // (2 * k)) * 2 * k
            if m == 0:
                continue
            pairs = o[:m].reshape(-1, 2, k)
            i, j = pairs[:, 0].ravel(), pairs[:, 1].ravel()
            pi, pj = p[i], p[j]
            swap = ((a[i] - a[j]) * (b[pi] - b[pj])).sum(1) < 0
            p[i[swap]] = pj[swap]
            p[j[swap]] = pi[swap]
    return p


@pytest.mark.parametrize(("n", "dim"), [(7, 1), (300, 2), (1000, 2), (257, 3), (130, 8)])
def test_two_opt_on_views_makes_the_swaps_of_the_index_version(n: int, dim: int) -> None:
    from iterflow.core.couplings import _refine_np

    g = np.random.default_rng(n)
    a, b = g.normal(size=(n, dim)) * 2.0, g.normal(size=(n, dim))
    start = g.permutation(n)
    got = _refine_np(a, b, start.copy(), 3, (1, 2, 3, 4))
    assert np.array_equal(got, _two_opt_reference(a, b, start.copy(), 3))
    assert sorted(got.tolist()) == list(range(n))


@pytest.mark.parametrize(
    ("n", "dim", "strips"), [(1, 2, 1), (37, 1, 3), (200, 1, 3), (1024, 2, 16), (1000, 5, 16)]
)
def test_local_order_is_strips_along_one_projection_sorted_along_another(
    n: int, dim: int, strips: int
) -> None:
    from iterflow.core.couplings import _frames, _local_order

    p = np.random.default_rng(n).normal(size=(n, dim))
    frame = _frames(dim, 1)[0]
    order = _local_order(p, frame, strips)
    assert sorted(order.tolist()) == list(range(n))
    k = p @ frame
    per = n // strips
    body = order[: per * strips].reshape(strips, per)
    assert (np.diff(k[body, 1], axis=1) >= 0).all()  # each strip sorted along the second
    if dim == 1:  # no second projection: the strips keep the first one's order
        assert (np.diff(k[order, 0]) >= 0).all()
    edges = [k[body[s], 0] for s in range(strips)] + [k[order[per * strips :], 0]]
    for lo, hi in zip(edges, edges[1:]):  # strips (and the rest) follow along the first
        if len(lo) and len(hi):
            assert lo.max() <= hi.min()


def test_auto_stages_follow_the_dimension_and_the_batch() -> None:
    from iterflow.core.couplings import AUTO_WINDOWS, auto_stages

    low = [auto_stages(2, n) for n in (129, 512, 513, 1024, 1025, 4096)]
    assert [p for p, _, _ in low] == [8, 8, 12, 12, 16, 16]  # more rows, more passes
    assert all(r == 0 for _, r, _ in low) and auto_stages(1, 1024)[1] == 0  # no windows
    assert auto_stages(3, 1024)[1] == AUTO_WINDOWS > 0  # windows above two columns


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("n", [300, 1024, 2048])
def test_auto_stays_within_a_tenth_of_the_exact_cost_in_2d(
    n: int, compiled: bool, monkeypatch
) -> None:
    from iterflow.core import couplings
    from iterflow.data import get_dataset

    if compiled and not couplings.compiled_pairing(2):
        pytest.skip("numba is not installed (the compiled pairing)")
    monkeypatch.setattr(couplings, "USE_COMPILED", compiled)  # False: the NumPy pairing

    x = get_dataset("checkerboard").splits(n, 10, 10, n).train.double()
    a = (x - x.mean(0)) / x.std(0)  # the trainer's units
    b = torch.randn(n, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    exact = _pair(a, b, assignment(a, b, "emd"))
    got = _pair(a, b, ot_permutation(a, b))
    assert exact - 1e-9 <= got < 1.1 * exact
