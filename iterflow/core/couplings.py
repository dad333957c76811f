"""Couplings: how the two ends ``(x0, x1)`` of a flow-matching pair are drawn together.

* ``independent``: ``x0`` and ``x1`` paired as given.
* ``ot``: within the minibatch, re-pair to minimise ``sum_i |x0_i - x1_pi(i)|^2`` (an assignment
  problem; Pooladian et al. arXiv 2304.14772, Tong et al. arXiv 2302.00482). Exact on the whole batch
  with POT's network simplex (``ot.emd``) or scipy's Jonker-Volgenant solver (``lsa``); or exact on
  chunks of the batch (``chunk``), which keeps the cost linear in the batch size, optionally followed
  by ``refine`` local improvement passes (:func:`refine_assignment`).
* ``sinkhorn``: entropic OT plan, then one partner sampled per row (cheaper, approximate).

Exact assignment costs grow about cubically (on one core of an AMD EPYC, ``ot.emd`` takes ~5 ms at
256 rows and ~0.2 s at 1,024, many times a training step), so ``ot_solver="auto"`` solves batches of
up to :data:`AUTO_EXACT_MAX` rows exactly and larger ones on spatially stratified chunks of about
:data:`AUTO_CHUNK` rows, followed by 2-opt passes and, above two dimensions, rounds of exact
re-assignment within windows of neighbouring pairs (:func:`resolve_windows`; the numbers:
:func:`auto_stages`): linear in the batch size, within about 1.1x the exact transport cost on
2-D data at 1,024 rows. Rows of one or two numbers go, where numba is installed, to a compiled
pairing of the same kind (:mod:`iterflow.core.ot_compiled`, :func:`compiled_pairing`: exact
stratified chunks and 2-opt to a local optimum; exact sorting in one column), which flow matching on
the CPU runs in line before each step; otherwise flow matching computes the pairing of the next
minibatch in a background thread while the current step trains
(:class:`iterflow.core.coupled_batches.CoupledBatches`).
``benchmarks/bench_speed.py`` measures the time and the quality (transport cost relative to the exact
whole-batch assignment) of every choice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from iterflow.errors import Registry, check_positive, fail

COUPLINGS: Registry[str] = Registry("coupling")
for _n in ("independent", "ot", "sinkhorn"):
    COUPLINGS.register(_n, _n)

OT_SOLVERS = ("auto", "emd", "lsa")
AUTO_EXACT_MAX = 128  # "auto": whole-batch exact OT up to this many rows ...
AUTO_CHUNK = 48  # ... otherwise exact OT on stratified chunks of about this many rows ...
AUTO_REFINE = 4  # ... followed by this many refinement passes ...
AUTO_WINDOWS = 2  # ... and this many rounds of exact re-assignment in windows of ...
AUTO_WINDOW = 32  # ... this many neighbouring pairs (auto_stages); rows of at most ...
AUTO_LOW_DIM = 2  # ... this many numbers get no windows and, by batch size, these 2-opt passes:
AUTO_REFINE_LOW = ((512, 8), (1024, 12), (2**62, 16))  # (up to this many rows, passes)


def _cost(a: Tensor, b: Tensor) -> np.ndarray:
    """Squared distances of flat rows, ``(..., B, D) x (..., B, D) -> (..., B, B)``, float64 on the CPU."""
    return torch.cdist(a.double(), b.double()).pow_(2).cpu().numpy()


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _reduced(cost: np.ndarray) -> np.ndarray:
    """``cost`` ``(..., m, m)`` less each column's minimum (a new array).

    Every assignment's total drops by the same constant, so the optimal assignments are the
    same; scipy's ``linear_sum_assignment`` (shortest augmenting paths from zero column duals)
    finds them sooner when every column holds a zero (the column reduction that
    Jonker-Volgenant's solver starts with). The row reduction adds nothing measurable and costs
    more (NumPy's minimum along the last axis of small matrices is the slow one).
    ``benchmarks/bench_ot_knobs.py`` times the ``auto`` pairing with and without it.
    """
    return cost - cost.min(axis=-2, keepdims=True)


@functools.cache
def _scipy_lsa() -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scipy's ``linear_sum_assignment``, imported on first use (scipy loads slowly)."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment


def _lsa(cost: np.ndarray, reduced: bool = False) -> np.ndarray:
    """scipy's exact assignment of one square matrix (:func:`_reduced` first unless ``reduced``)."""
    return _scipy_lsa()(cost if reduced else _reduced(cost))[1]


def _exact_solver(n: int, solver: str) -> str:
    """The exact solver for ``n`` rows: ``auto`` is scipy's below 192 rows, else POT's."""
    return ("lsa" if n < 192 else "emd") if solver == "auto" else solver


def _solve(cost: np.ndarray, solver: str) -> np.ndarray:
    """Optimal permutation of one square cost matrix (:func:`_exact_solver` picks the solver)."""
    n = cost.shape[0]
    solver = _exact_solver(n, solver)
    if solver == "lsa":
        return _lsa(cost)
    if solver == "emd":
        import ot

        w = np.full(n, 1.0 / n)
        return ot.emd(w, w, cost, numItermax=10_000_000).argmax(axis=1)
    fail("ot_solver", f"must be one of {list(OT_SOLVERS)}", solver)


def assignment(x0: Tensor, x1: Tensor, solver: str = "emd") -> Tensor:
    """Permutation ``pi`` (``(B,)`` long) minimising ``sum_i |x0_i - x1_{pi(i)}|^2`` exactly.

    Arguments:
        x0, x1: ``(B, *E)`` point sets.
        solver: ``"emd"`` (POT network simplex), ``"lsa"`` (scipy Jonker-Volgenant) or ``"auto"``.
    """
    if x0.shape[0] != x1.shape[0]:
        fail("x1", f"must have as many rows as x0 ({x0.shape[0]}) for an assignment", x1.shape[0])
    if solver not in OT_SOLVERS:
        fail("ot_solver", f"must be one of {list(OT_SOLVERS)}", solver)
    perm = _solve(_cost(_flat(x0), _flat(x1)), solver)
    return torch.as_tensor(perm, dtype=torch.long, device=x0.device)


def chunked_assignment(
    x0: Tensor, x1: Tensor, chunk: int, solver: str = "auto", *, stratify: bool = False
) -> Tensor:
    """Exact assignment within chunks of ``chunk`` rows (the last chunk may be shorter).

    Without ``stratify`` the chunks are consecutive rows: random sub-batches, since a minibatch's rows
    are in random order. With ``stratify`` each set is first ordered along a space-filling serpentine
    (:func:`_local_order`) and chunk ``c`` takes every ``G``-th point of that order (``G`` = number of
    chunks), so each chunk is a spatially even subsample of its set. OT between even subsamples is much
    closer to the whole-batch OT (on 2-D data, 1.4x its transport cost instead of 2.3x with 64-row
    chunks of 1,024 rows) for the same solver time.

    Returns:
        ``(B,)`` long permutation ``pi``: row ``i`` is paired with ``x1[pi[i]]``.
    """
    check_positive(chunk, "ot_chunk", integer=True)
    n = x0.shape[0]
    a, b = _flat(x0), _flat(x1)
    if stratify and chunk < n:
        an, bn = _numpy(a), _numpy(b)
        return torch.from_numpy(_stratified_np(an, bn, chunk, solver)).to(x0.device)
    perm = torch.empty(n, dtype=torch.long)
    full = (n // chunk) * chunk
    if full:
        costs = _cost(
            a[:full].reshape(-1, chunk, a.shape[1]), b[:full].reshape(-1, chunk, b.shape[1])
        )
        local_np = np.stack([_solve(c, solver) for c in costs])  # (G, chunk)
        offsets = np.arange(0, full, chunk)[:, None]
        perm[:full] = torch.from_numpy((local_np + offsets).reshape(-1))
    if full < n:
        perm[full:] = torch.from_numpy(_solve(_cost(a[full:], b[full:]), solver) + full)
    return perm.to(x0.device)


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().reshape(x.shape[0], -1).double().cpu().numpy()


def _rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``x[idx]`` for an ``(n, D)`` array: ``np.take`` along the first axis, which NumPy runs
    several times faster than fancy indexing of a 2-D array (4.1 against 23.0 µs for 1,024 rows
    of two columns, ``benchmarks/bench_ot_knobs.py``; the stages gather rows dozens of times)."""
    return np.take(x, idx, axis=0)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched squared distances ``(G, m, D) x (G, m, D) -> (G, m, m)``."""
    cross = np.matmul(a, b.transpose(0, 2, 1))
    return (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * cross


def _stratified_np(a: np.ndarray, b: np.ndarray, chunk: int, solver: str) -> np.ndarray:
    """:func:`chunked_assignment` with ``stratify``: chunk ``c`` holds the points ``c, c + G, ...``
    of each set's serpentine order (``G`` chunks; the first ``n mod G`` chunks have one more)."""
    n = a.shape[0]
    groups = math.ceil(n / chunk)
    frame = _frames(a.shape[1], 1)[0]
    strips = max(1, round(math.sqrt(n / 4)))
    oa, ob = _local_order(a, frame, strips), _local_order(b, frame, strips)
    q, r = divmod(n, groups)
    perm = np.empty(n, dtype=np.int64)
    for first, count, size in ((0, r, q + 1), (r, groups - r, q)):
        if count == 0 or size == 0:
            continue
        pos = np.arange(size)[None, :] * groups + np.arange(first, first + count)[:, None]
        ia, ib = oa[pos], ob[pos]  # (count, size) rows of a and b
        costs = _sq_dists(_rows(a, ia), _rows(b, ib))
        if _exact_solver(size, solver) == "lsa":
            costs = _reduced(costs)  # all chunks at once
            for c in range(count):
                perm[ia[c]] = ib[c][_lsa(costs[c], reduced=True)]
            continue
        for c in range(count):
            perm[ia[c]] = ib[c][_solve(costs[c], solver)]
    return perm


@functools.lru_cache(maxsize=64)
def _frames(dim: int, count: int) -> tuple[np.ndarray, ...]:
    """Fixed random orthonormal 2-frames ``(dim, 2)`` of ``R^dim`` (seeded: refinement is
    deterministic); for ``dim = 1`` the second direction is zero."""
    g = torch.Generator().manual_seed(20_240_611 + dim)
    frames = []
    for _ in range(count):
        q = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))[0].numpy()
        frames.append(q if q.shape[1] == 2 else np.concatenate([q, np.zeros((dim, 1))], 1))
    return tuple(frames)


def _local_order(p: np.ndarray, frame: np.ndarray, strips: int) -> np.ndarray:
    """A row order in which neighbours are close: ``strips`` strips along one projection of ``p``,
    each sorted along a second projection (stably: in 1-D, where the second projection is zero,
    a strip stays in the first one's order)."""
    n = p.shape[0]
    k = p @ frame  # (n, 2)
    order = np.argsort(k[:, 0])
    per = n // strips
    body = order[: per * strips].reshape(strips, per)
    within = np.argsort(np.take(k[:, 1], body), axis=1, kind="stable")
    within += np.arange(0, per * strips, per)[:, None]  # positions in ``order``
    head = np.take(order, within.ravel())
    return np.concatenate([head, order[per * strips :]]) if per * strips < n else head


def refine_assignment(
    x0: Tensor, x1: Tensor, perm: Tensor, passes: int, offsets: tuple[int, ...] = (1, 2, 3, 4)
) -> Tensor:
    """Improve a pairing by parallel 2-opt swaps between nearby pairs (never increases the cost).

    Swapping the partners of pairs ``i`` and ``j`` changes the transport cost by
    ``2 (x0_i - x0_j) . (x1_pi(i) - x1_pi(j))``, so a swap helps exactly when that is negative. Each
    pass orders the pairs so that neighbours are close (by ``x0`` on even passes, by their current
    partners ``x1_pi`` on odd ones, through fixed random 2-D projections), pairs every row with the one
    ``k`` places on for each ``k`` in ``offsets`` (disjoint pairs, all tested at once) and applies every
    improving swap. The cost decreases monotonically; a few passes after a chunked exact solve remove
    much of the gap to the whole-batch optimum (``benchmarks/bench_speed.py`` measures it). Runs in
    NumPy on the CPU, where its many small operations cost least.

    Arguments:
        x0, x1: ``(B, *E)``.
        perm: ``(B,)`` current pairing (``x0[i]`` with ``x1[perm[i]]``).
        passes: number of passes.
        offsets: neighbour distances tested in each pass.

    Returns:
        The improved ``(B,)`` permutation (on ``perm``'s device).
    """
    check_positive(passes, "ot_refine", integer=True, allow_zero=True)
    if passes == 0 or x0.shape[0] < 4:
        return perm
    p = _refine_np(_numpy(x0), _numpy(x1), perm.cpu().numpy().copy(), passes, offsets)
    return torch.from_numpy(p).to(perm.device)


def _refine_np(
    a: np.ndarray, b: np.ndarray, p: np.ndarray, passes: int, offsets: tuple[int, ...]
) -> np.ndarray:
    """:func:`refine_assignment` on NumPy arrays (``p`` is modified in place and returned).

    Each pass works in the order's positions: the rows ``a`` and partners ``p`` taken into that
    order once, each offset's pairs are then two strided views of them (no index arrays)."""
    n = a.shape[0]
    strips = max(1, round(math.sqrt(n / 4)))
    for it, frame in enumerate(_frames(a.shape[1], passes)):
        order = _local_order(a if it % 2 == 0 else _rows(b, p), frame, strips)
        ao, po = _rows(a, order), p[order]
        for t, k in enumerate(offsets):
            first = (t % 2) * k  # alternate the alignment: new neighbours for the next offset
            m = ((n - first) // (2 * k)) * 2 * k
            if m == 0:
                continue
            av = ao[first : first + m].reshape(-1, 2, k, a.shape[1])  # pairs (row 0, row 1)
            pv = po[first : first + m].reshape(-1, 2, k)  # a view: writes land in po
            bv = _rows(b, pv)
            swap = np.einsum("gkd,gkd->gk", av[:, 0] - av[:, 1], bv[:, 0] - bv[:, 1]) < 0
            p0 = pv[:, 0].copy()
            pv[:, 0] = np.where(swap, pv[:, 1], p0)
            pv[:, 1] = np.where(swap, p0, pv[:, 1])
        p[order] = po
    return p


def resolve_windows(
    x0: Tensor, x1: Tensor, perm: Tensor, rounds: int, window: int = AUTO_WINDOW
) -> Tensor:
    """Improve a pairing by exact re-assignment within windows of neighbouring pairs.

    Each round orders the pairs so that neighbours are close (by ``x0`` on even rounds, by their
    current partners on odd ones; fixed random 2-D projections, :func:`_local_order`), cuts the
    order into windows of ``window`` consecutive pairs (shifted by half a window every other pair of
    rounds) and solves each window's assignment between its ``x0`` rows and their ``x1`` partners
    exactly (scipy's ``linear_sum_assignment``). The cost never increases (each window's pairing
    is one of its feasible assignments); it is :func:`refine_assignment`'s 2-opt generalised to
    ``window``-opt.

    Arguments:
        x0, x1: ``(B, *E)``.
        perm: ``(B,)`` current pairing.
        rounds: number of rounds; window: pairs per window.

    Returns:
        The improved ``(B,)`` permutation (on ``perm``'s device).
    """
    check_positive(rounds, "rounds", integer=True, allow_zero=True)
    check_positive(window, "window", integer=True)
    if rounds == 0 or x0.shape[0] < 2 * window:
        return perm
    p = _windows_np(_numpy(x0), _numpy(x1), perm.cpu().numpy().copy(), rounds, window)
    return torch.from_numpy(p).to(perm.device)


def _windows_np(a: np.ndarray, b: np.ndarray, p: np.ndarray, rounds: int, m: int) -> np.ndarray:
    """:func:`resolve_windows` on NumPy arrays (``p`` is modified in place and returned)."""
    n = a.shape[0]
    strips = max(1, round(math.sqrt(n / 4)))
    frames = _frames(a.shape[1], rounds + 16)[16:]  # not those of the first 16 refinement passes
    for r, frame in enumerate(frames):
        order = _local_order(a if r % 2 == 0 else _rows(b, p), frame, strips)
        order = np.roll(order, -((r // 2) % 2) * (m // 2))
        g = n // m
        idx = order[: g * m].reshape(g, m)
        partners = p[idx]
        costs = _reduced(_sq_dists(_rows(a, idx), _rows(b, partners)))
        for c in range(g):
            p[idx[c]] = partners[c][_lsa(costs[c], reduced=True)]
    return p


def sinkhorn_pairing(
    x0: Tensor, x1: Tensor, reg: float, generator: torch.Generator | None
) -> Tensor:
    """For each row of ``x0`` sample a partner from an entropic OT plan (``reg``: relative to mean cost)."""
    import ot

    cost = _cost(_flat(x0), _flat(x1))
    n = cost.shape[0]
    w = np.full(n, 1.0 / n)
    plan = ot.sinkhorn(w, w, cost / cost.mean(), reg, numItermax=500, warn=False)
    p = torch.as_tensor(plan, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-300)
    gdev = generator.device if generator is not None else p.device
    idx = torch.multinomial(p.to(gdev), 1, generator=generator).squeeze(1)
    return idx.to(x0.device)


def auto_chunk(n: int) -> int:
    """Chunk size that ``ot_solver="auto"`` uses for a batch of ``n`` rows (``n``: no chunking)."""
    if n <= AUTO_EXACT_MAX:
        return n
    return math.ceil(n / math.ceil(n / AUTO_CHUNK))


def ot_permutation(
    x0: Tensor, x1: Tensor, *, chunk: int = 0, solver: str = "auto", refine: int = 0
) -> Tensor:
    """Minibatch-OT pairing permutation: exact on the whole batch or on chunks, then refinement.

    Arguments:
        x0, x1: ``(B, *E)``.
        chunk: rows per exact sub-problem (0: the whole batch).
        solver: ``"emd"``, ``"lsa"`` or ``"auto"``. ``auto`` solves batches of up to
            :data:`AUTO_EXACT_MAX` rows exactly; larger ones on stratified chunks of about
            :data:`AUTO_CHUNK` rows (:func:`chunked_assignment`) followed by passes of
            :func:`refine_assignment` and rounds of :func:`resolve_windows`, as many as
            :func:`auto_stages` gives for the rows' dimension (``chunk`` and ``refine``, when
            non-zero, replace the chunk size and the passes); rows of one or two numbers go to
            the compiled pairing where numba is installed (:func:`compiled_pairing`). The
            explicit solvers use consecutive (random) chunks.
        refine: passes of :func:`refine_assignment` after a chunked solve.

    Returns:
        ``(B,)`` permutation: ``x0[i]`` is paired with ``x1[perm[i]]``.
    """
    if solver not in OT_SOLVERS:
        fail("ot_solver", f"must be one of {list(OT_SOLVERS)}", solver)
    check_positive(chunk, "ot_chunk", integer=True, allow_zero=True)
    check_positive(refine, "ot_refine", integer=True, allow_zero=True)
    n = x0.shape[0]
    if solver != "auto":
        size = min(chunk or n, n)
        perm = chunked_assignment(x0, x1, size, solver)
        return refine_assignment(x0, x1, perm, refine) if size < n else perm
    if n > AUTO_EXACT_MAX and compiled_pairing(_flat(x0).shape[1], solver, chunk, refine):
        from iterflow.core import ot_compiled

        p = ot_compiled.pair(_numpy(x0), _numpy(x1), _frames(2, 1)[0])
        return torch.from_numpy(p).to(x0.device)
    chunk = chunk or auto_chunk(n)
    if chunk >= n:
        return assignment(x0, x1, "auto")
    p = auto_pairing_np(_numpy(x0), _numpy(x1), chunk, refine or None)
    return torch.from_numpy(p).to(x0.device)


#: Whether ``ot_solver="auto"`` may use the compiled pairing (:mod:`iterflow.core.ot_compiled`)
#: where numba is installed; ``False`` keeps to the NumPy one (tests and benchmarks compare them).
USE_COMPILED = True


def compiled_pairing(dim: int, solver: str = "auto", chunk: int = 0, refine: int = 0) -> bool:
    """Whether :func:`ot_permutation` with these ``solver``, ``chunk`` and ``refine`` pairs batches
    of more than :data:`AUTO_EXACT_MAX` rows of ``dim`` numbers with the compiled pairing: ``auto``
    with its own chunk size and passes, rows of one or two numbers, numba installed (``pip install
    iterflow[fast]``) and :data:`USE_COMPILED`. In one column it is the exact (sorted) pairing; in
    two, ``benchmarks/bench_ot_compiled.py`` times both and their transport costs on five data
    sets."""
    knobs = solver == "auto" and chunk == 0 and refine == 0
    return knobs and dim <= AUTO_LOW_DIM and USE_COMPILED and _compiled_available()


def pairing_environment(
    kind: str, dim: int, solver: str = "auto", chunk: int = 0, refine: int = 0
) -> dict[str, str]:
    """``{"ot_pairing": "compiled" | "numpy"}`` for the ``ot`` coupling (:func:`compiled_pairing`
    with these arguments), else ``{}``: the part of a run's environment that decides its pairs
    (the two implementations pair differently; :class:`iterflow.train.loop.Checkpoint` warns when a
    run resumes with the other). Batches of up to :data:`AUTO_EXACT_MAX` rows are solved exactly by
    either, so for them the record errs on the side of a warning."""
    if kind != "ot":
        return {}
    return {"ot_pairing": "compiled" if compiled_pairing(dim, solver, chunk, refine) else "numpy"}


@functools.lru_cache(maxsize=1)
def _compiled_available() -> bool:
    try:
        from iterflow.core import ot_compiled
    except ImportError:  # numba missing or broken (e.g. built against another NumPy)
        return False
    return ot_compiled.AVAILABLE


def auto_stages(dim: int, n: int) -> tuple[int, int, int]:
    """``(2-opt passes, window rounds, window)`` of ``ot_solver="auto"`` for ``n`` rows of ``dim``
    numbers.

    Up to :data:`AUTO_LOW_DIM` columns the local orders (2-D projections) see the whole point,
    and 2-opt passes improve the pairing at less cost than exact windows
    (``benchmarks/bench_ot_knobs.py``, checkerboard at batch 1,024: 12 passes 3.7 ms at 1.07x the
    exact cost, the earlier 4 passes and 2 rounds of 32-pair windows 5.3 ms at 1.07x); larger
    batches need more passes for the same quality (:data:`AUTO_REFINE_LOW`: 8 up to 512 rows, 12
    up to 1,024, 16 beyond; ``bench_speed.py``'s OT section prints the cost at 256-2,048 rows). In
    more dimensions the projections lose neighbours and the windows pay for themselves (checked
    on Gaussian mixtures in 5-32 dimensions, exploratory)."""
    if dim <= AUTO_LOW_DIM:
        return next(p for rows, p in AUTO_REFINE_LOW if n <= rows), 0, AUTO_WINDOW
    return AUTO_REFINE, AUTO_WINDOWS, AUTO_WINDOW


def auto_pairing_np(
    a: np.ndarray,
    b: np.ndarray,
    chunk: int,
    passes: int | None = None,
    rounds: int | None = None,
    window: int | None = None,
) -> np.ndarray:
    """The ``auto`` pairing's stages on NumPy rows ``(B, D)``: exact assignment on stratified
    chunks of about ``chunk`` rows, ``passes`` 2-opt passes, ``rounds`` rounds of exact
    re-assignment in windows of ``window`` pairs (skipped below two windows). ``None`` takes
    :func:`auto_stages`' value; ``benchmarks/bench_ot_knobs.py`` sweeps them."""
    stages = auto_stages(a.shape[1], a.shape[0])
    passes = stages[0] if passes is None else passes
    rounds = stages[1] if rounds is None else rounds
    window = stages[2] if window is None else window
    p = _stratified_np(a, b, chunk, "auto")
    if passes:
        p = _refine_np(a, b, p, passes, (1, 2, 3, 4))
    if rounds and a.shape[0] >= 2 * window:
        p = _windows_np(a, b, p, rounds, window)
    return p


def transport_cost(x0: Tensor, x1: Tensor) -> float:
    """Mean squared distance ``mean_i |x0_i - x1_i|^2`` of paired rows (a coupling's quality)."""
    return float((_flat(x0) - _flat(x1)).double().pow(2).sum(1).mean())


def couple(
    x0: Tensor,
    x1: Tensor,
    kind: str = "independent",
    *,
    chunk: int = 0,
    ot_solver: str = "auto",
    reg: float = 0.05,
    refine: int = 0,
    generator: torch.Generator | None = None,
    groups: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pair ``x0`` with a re-ordering of ``x1`` according to the coupling ``kind``.

    Arguments:
        x0, x1: ``(B, *E)`` samples of the two ends.
        kind: ``"independent"``, ``"ot"`` or ``"sinkhorn"``.
        chunk: if > 0, solve the OT problem separately on consecutive chunks of this many rows
            (0: the whole batch, or :func:`auto_chunk` rows with ``ot_solver="auto"``).
        ot_solver: ``"auto"``, ``"emd"`` (POT) or ``"lsa"`` (scipy) for exact OT.
        reg: entropic regularisation of ``"sinkhorn"``, relative to the mean squared distance.
        refine: local improvement passes after a chunked OT solve (:func:`refine_assignment`).
        generator: randomness of ``"sinkhorn"``.
        groups: ``(B,)`` integer group of each row (class labels of a conditional run): rows are
            paired only within their group, so each group keeps its share of ``x1`` (with ``x1``
            i.i.d. noise, every class sees ``N(0, I)`` noise, as its conditional flow needs).

    Returns:
        ``(x0, x1_paired)``.
    """
    COUPLINGS.get(kind, "coupling")
    if kind == "independent":
        return x0, x1
    if groups is not None:
        if groups.shape != x0.shape[:1]:
            fail("groups", f"must hold one group per row ({x0.shape[0]})", tuple(groups.shape))
        out = x1.clone()
        for g in torch.unique(groups):
            rows = (groups == g).nonzero()[:, 0]
            out[rows] = couple(
                x0[rows], x1[rows], kind, chunk=chunk, ot_solver=ot_solver, reg=reg,
                refine=refine, generator=generator,
            )[1]  # fmt: skip
        return x0, out
    if x0.shape[0] != x1.shape[0]:
        fail("x1", f"must have as many rows as x0 ({x0.shape[0]}) to be coupled", x1.shape[0])
    if kind == "ot":
        return x0, x1[ot_permutation(x0, x1, chunk=chunk, solver=ot_solver, refine=refine)]
    check_positive(chunk, "ot_chunk", integer=True, allow_zero=True)
    n = x0.shape[0]
    size = chunk if 0 < chunk < n else n
    parts = [
        b[sinkhorn_pairing(a, b, reg, generator)] for a, b in zip(x0.split(size), x1.split(size))
    ]
    return x0, torch.cat(parts, 0)
