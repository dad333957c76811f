"""The compiled minibatch-OT pairing (``iterflow.core.ot_compiled``) against exact solvers, its own
uncompiled Python, and the NumPy pairing; and the trainer's choice to pair in line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from iterflow.core import couplings
from iterflow.core import ot_compiled as oc
from iterflow.methods.fm import FMOptions, inline_pairing

needs_numba = pytest.mark.skipif(not oc.AVAILABLE, reason="numba is not installed")


def _cost(a: np.ndarray, b: np.ndarray, perm: np.ndarray) -> float:
    return float(((a - b[perm]) ** 2).sum(1).mean())


def _exact(a: np.ndarray, b: np.ndarray) -> float:
    c = ((a[:, None] - b[None]) ** 2).sum(-1)
    r, col = linear_sum_assignment(c)
    return float(c[r, col].mean())


def _is_perm(p: np.ndarray, n: int) -> bool:
    return sorted(p.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 24, 48, 90])
@pytest.mark.parametrize("kind", ["uniform", "squared distances", "ties"])
def test_assignment_reaches_scipys_optimum(n: int, kind: str) -> None:
    rng = np.random.default_rng(n)
    for _ in range(6):
        if kind == "uniform":
            c = rng.random((n, n))
        elif kind == "squared distances":  # near-tied neighbours, as in the chunks
            d = int(rng.integers(1, 5))
            c = ((rng.normal(size=(n, d))[:, None] - rng.normal(size=(n, d))[None]) ** 2).sum(-1)
        else:
            c = rng.integers(0, 3, (n, n)).astype(float)  # many optimal assignments
        col = oc.assignment(c)
        r, cc = linear_sum_assignment(c)
        assert _is_perm(col, n)
        assert c[np.arange(n), col].sum() == pytest.approx(c[r, cc].sum(), abs=1e-9)


@needs_numba
def test_compiled_functions_compute_what_their_python_does() -> None:
    rng = np.random.default_rng(3)
    frame = couplings._frames(2, 1)[0]
    for n in (5, 60, 200):
        a, b = rng.normal(size=(n, 2)) * [1.0, 3.0], rng.random((n, 2))
        c = ((a[:, None] - b[None]) ** 2).sum(-1)
        assert np.array_equal(oc.assignment(c), oc.assignment.py_func(c))
        start = oc.stratified(a, b, 16, frame)
        assert np.array_equal(start, oc.stratified.py_func(a, b, 16, frame))
        assert np.array_equal(oc.two_opt(a, b, start, 1.5), oc.two_opt.py_func(a, b, start, 1.5))


@pytest.mark.parametrize("n", [1, 2, 5, 64, 333])
def test_two_opt_keeps_a_permutation_and_never_raises_the_cost(n: int) -> None:
    rng = np.random.default_rng(n)
    for a, b in [
        (rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + 2.0),
        (np.round(rng.normal(size=(n, 2)), 1), np.round(rng.random((n, 2)), 1)),  # repeated points
        (np.zeros((n, 2)), rng.normal(size=(n, 2))),  # one point n times
    ]:
        start = rng.permutation(n)
        for per in (1.0, 1.5, 4.0):
            p = oc.two_opt(a, b, start, per)
            assert _is_perm(p, n)
            assert _cost(a, b, p) <= _cost(a, b, start) + 1e-12


def test_two_opt_leaves_no_improving_swap_between_close_pairs() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 2)), rng.random((400, 2)) * 4 - 2
    p = oc.two_opt(a, b, rng.permutation(400), oc.PER_CELL)
    gain = np.einsum("ijd,ijd->ij", a[:, None] - a[None], b[p][:, None] - b[p][None])
    near = ((a[:, None] - a[None]) ** 2).sum(-1) < 0.02**2  # well inside one cell
    assert not (near & (gain < -1e-12)).any()


@pytest.mark.parametrize("n", [2, 17, 500])
def test_one_column_pairing_is_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, 1)) ** 3, rng.random((n, 1))
    p = oc.pair(a, b, couplings._frames(2, 1)[0])
    assert _is_perm(p, n)
    assert _cost(a, b, p) == pytest.approx(_exact(a, b), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["checkerboard", "moons", "8gaussians"])
@pytest.mark.parametrize("n", [300, 1024])
def test_pair_is_within_a_tenth_of_the_exact_cost_and_below_numpys(name: str, n: int) -> None:
    from iterflow.data import get_dataset

    x = get_dataset(name).splits(n, 10, 10, n).train.double()
    a = ((x - x.mean(0)) / x.std(0)).numpy()
    b = np.random.default_rng(n).normal(size=(n, 2))
    exact = _exact(a, b)
    got = _cost(a, b, oc.pair(a, b, couplings._frames(2, 1)[0]))
    numpy_pairing = _cost(a, b, couplings.auto_pairing_np(a, b, couplings.auto_chunk(n)))
    assert exact - 1e-9 <= got < 1.1 * exact
    assert got <= numpy_pairing * 1.01  # as good as the NumPy pairing (lower in every case seen)


@needs_numba
def test_ot_permutation_uses_the_compiled_pairing_in_two_columns(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 2, generator=g), torch.rand(512, 2, generator=g)
    frame = couplings._frames(2, 1)[0]
    want = oc.pair(couplings._numpy(a), couplings._numpy(b), frame)
    assert np.array_equal(couplings.ot_permutation(a, b).numpy(), want)
    # its own knobs, three columns or USE_COMPILED=False: the NumPy pairing
    assert couplings.compiled_pairing(2) and not couplings.compiled_pairing(3)
    assert not couplings.compiled_pairing(2, "emd") and not couplings.compiled_pairing(2, chunk=32)
    np_perm = couplings.auto_pairing_np(couplings._numpy(a), couplings._numpy(b), 48, 4)
    assert np.array_equal(couplings.ot_permutation(a, b, refine=4).numpy(), np_perm)
    monkeypatch.setattr(couplings, "USE_COMPILED", False)
    assert not couplings.compiled_pairing(2)
    np_auto = couplings.auto_pairing_np(couplings._numpy(a), couplings._numpy(b), 48)
    assert np.array_equal(couplings.ot_permutation(a, b).numpy(), np_auto)


def test_the_trainer_pairs_in_line_only_with_the_compiled_pairing_on_the_cpu(
    monkeypatch,
) -> None:
    ot = FMOptions(coupling="ot")
    two, three = torch.zeros(10, 2), torch.zeros(10, 3)
    assert inline_pairing(ot, two) == couplings.compiled_pairing(2) == oc.AVAILABLE
    assert not inline_pairing(ot, three)
    assert not inline_pairing(FMOptions(coupling="ot", ot_chunk=32), two)
    assert not inline_pairing(FMOptions(coupling="ot", ot_refine=2), two)
    assert not inline_pairing(FMOptions(coupling="ot", ot_solver="emd"), two)
    monkeypatch.setattr(couplings, "USE_COMPILED", False)
    assert not inline_pairing(ot, two)
