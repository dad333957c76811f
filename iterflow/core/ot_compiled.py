"""The ``auto`` minibatch-OT pairing of two-column rows, compiled with numba (an optional extra).

Flow matching with the ``ot`` coupling pairs every minibatch before its step. On a two-core CPU the
NumPy pairing (:func:`iterflow.core.couplings.auto_pairing_np`: some 600 small array operations a
batch of 1,024) either runs beside the step in a background thread, which takes one of the step's
two threads, or adds its time to the step's. Compiled into one call that holds no interpreter lock,
the pairing takes a fraction of the step, so the trainer runs it in line and keeps both threads for
the step (:class:`iterflow.core.coupled_batches.CoupledBatches`). ``benchmarks/bench_ot_compiled.py``
and ``bench_speed.py`` time both implementations and report their transport costs against the exact
assignment; ``pip install iterflow[fast]`` (``make setup`` does) brings numba in. Without it the
functions below run as plain Python (correct, slow: the tests compare the two), and
:mod:`iterflow.core.couplings` keeps to its NumPy pairing.

The stages, for ``n`` rows ``a`` and ``n`` rows ``b`` of two numbers:

1. *Lattice-stratified exact chunks* (:func:`stratified`): both sets put in a local order (strips
   along one fixed projection, each sorted along a second), position ``t`` (strip ``s``, place ``r``
   in it) joins chunk ``(r + s k) mod G`` with ``k`` the golden-section fraction of ``G``: every
   chunk is a sample spread over the whole set (a rank-1 lattice; the NumPy pairing's stride ``G``
   can put a chunk on one line when ``G`` divides the strip length). Each chunk's assignment is
   solved exactly (:func:`assignment`, shortest augmenting paths as scipy's
   ``linear_sum_assignment``; scipy is no faster at this size and would hold the interpreter lock
   between calls). This fixes the pairing's large-scale structure.
2. *2-opt to a local optimum* (:func:`two_opt`): swapping the partners of pairs ``i`` and ``j``
   lowers the cost exactly when ``(a_i - a_j) . (b_pi(i) - b_pi(j)) < 0``. Candidates are the pairs
   whose rows share or neighbour a cell of a grid on the ranks of ``a``'s two coordinates, and those
   whose partners do on ``b``'s grid (about ``per`` points a cell); a queue holds the pairs to test,
   a pair re-enters it when its partner changes, and the pass ends when no candidate swap helps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - the fallback is tested by calling the plain functions
    numba = None  # type: ignore[assignment]

#: Whether the functions below are compiled (numba importable).
AVAILABLE = numba is not None

#: Golden-section fraction: the lattice step of :func:`stratified` (``k = round(G * GOLDEN)``).
GOLDEN = (3 - math.sqrt(5)) / 2

#: Rows of the exact chunks and points a grid cell of :func:`pair`. On the checkerboard, two moons,
#: eight Gaussians, rings and a uniform square against Gaussian noise at 300-2,048 rows these gave
#: the lowest worst-case transport cost of the settings tried (chunks of 24-48 rows, 1-1.5 points a
#: cell), lower than the NumPy pairing's on every one; smaller chunks lose the large-scale structure
#: that the 2-opt stage cannot restore (``benchmarks/bench_ot_compiled.py`` prints the sweep).
CHUNK = 48
PER_CELL = 1.5

F = TypeVar("F", bound=Callable[..., Any])


def _jit(f: F) -> F:
    """numba's ``njit`` (cached on disk, releasing the interpreter lock) where numba is installed."""
    if numba is None:  # pragma: no cover
        return f
    return numba.njit(cache=True, nogil=True)(f)  # type: ignore[return-value]


@_jit
def assignment(cost: np.ndarray) -> np.ndarray:
    """Optimal assignment of a square cost matrix: ``col[i]`` is row ``i``'s column.

    Shortest augmenting paths with dual variables (Jonker and Volgenant; the variant of scipy's
    ``linear_sum_assignment``, Crouse 2016): one Dijkstra-like search over the reduced costs per
    row, ``O(n^3)``; started from the column reduction (Jonker and Volgenant's first step: each
    column's dual its least cost, the column assigned to that row where the row is free), which
    leaves searches only for the rows it did not assign."""
    n = cost.shape[0]
    u = np.zeros(n)
    v = np.zeros(n)
    col = np.full(n, -1, np.int64)
    row = np.full(n, -1, np.int64)
    shortest = np.empty(n)
    path = np.empty(n, np.int64)
    seen_row = np.empty(n, np.bool_)
    seen_col = np.empty(n, np.bool_)
    remaining = np.empty(n, np.int64)
    for j in range(n):  # column reduction: v_j = min_i c_ij, each column to its best row if free
        best = 0
        for i in range(1, n):
            if cost[i, j] < cost[best, j]:
                best = i
        v[j] = cost[best, j]
        if col[best] == -1:
            col[best] = j
            row[j] = best
    for cur in range(n):
        if col[cur] != -1:
            continue
        for j in range(n):
            shortest[j] = np.inf
            path[j] = -1
            seen_row[j] = False
            seen_col[j] = False
            remaining[j] = n - 1 - j
        left = n
        min_val = 0.0
        i = cur
        sink = -1
        while sink == -1:
            seen_row[i] = True
            index = -1
            lowest = np.inf
            for it in range(left):
                j = remaining[it]
                r = min_val + cost[i, j] - u[i] - v[j]
                if r < shortest[j]:
                    path[j] = i
                    shortest[j] = r
                if shortest[j] < lowest or (shortest[j] == lowest and row[j] == -1):
                    lowest = shortest[j]
                    index = it
            min_val = lowest
            j = remaining[index]
            if row[j] == -1:
                sink = j
            else:
                i = row[j]
            seen_col[j] = True
            left -= 1
            remaining[index] = remaining[left]
        u[cur] += min_val
        for r in range(n):
            if seen_row[r] and r != cur:
                u[r] += min_val - shortest[col[r]]
        for j in range(n):
            if seen_col[j]:
                v[j] -= min_val - shortest[j]
        j = sink
        while True:  # augment along the path back to ``cur``
            r = path[j]
            row[j] = r
            nxt = col[r]
            col[r] = j
            j = nxt
            if r == cur:
                break
    return col


@_jit
def local_order(x: np.ndarray, y: np.ndarray, strips: int) -> np.ndarray:
    """Rows ordered by ``strips`` strips of equal count along ``x``, each sorted along ``y``
    (the rows past ``strips`` full strips form a last one)."""
    n = x.shape[0]
    order = np.argsort(x)
    per = n // strips
    lo = y.min()
    span = y.max() - lo
    key = np.empty(n)
    for t in range(n):
        s = min(t // per, strips)
        key[order[t]] = s * 4.0 + (y[order[t]] - lo) / (span + 1e-300) * 2.0
    return np.argsort(key, kind="mergesort")


@_jit
def _project(x: np.ndarray, frame: np.ndarray, k: int) -> np.ndarray:
    """``x @ frame[:, k]`` for two-column rows."""
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        out[i] = x[i, 0] * frame[0, k] + x[i, 1] * frame[1, k]
    return out


@_jit
def stratified(a: np.ndarray, b: np.ndarray, chunk: int, frame: np.ndarray) -> np.ndarray:
    """Stage 1: exact assignment within lattice-stratified chunks of about ``chunk`` rows
    (``frame``: ``(2, 2)`` orthonormal columns, the local order's two projections)."""
    n = a.shape[0]
    groups = max(1, (n + chunk - 1) // chunk)
    strips = max(1, int(round(math.sqrt(n / 4.0))))
    per = n // strips
    k = max(1, int(round(groups * GOLDEN)))
    oa = local_order(_project(a, frame, 0), _project(a, frame, 1), strips)
    ob = local_order(_project(b, frame, 0), _project(b, frame, 1), strips)
    group = np.empty(n, np.int64)
    start = np.zeros(groups + 1, np.int64)
    for t in range(n):
        c = ((t % per) + (t // per) * k) % groups
        group[t] = c
        start[c + 1] += 1
    for c in range(groups):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    ia = np.empty(n, np.int64)
    ib = np.empty(n, np.int64)
    for t in range(n):
        c = group[t]
        ia[fill[c]] = oa[t]
        ib[fill[c]] = ob[t]
        fill[c] += 1
    largest = 0
    for c in range(groups):
        largest = max(largest, start[c + 1] - start[c])
    buf = np.empty(largest * largest)
    perm = np.empty(n, np.int64)
    for c in range(groups):
        lo = start[c]
        size = start[c + 1] - lo
        if size == 0:
            continue
        cost = buf[: size * size].reshape((size, size))
        for s in range(size):
            x0 = a[ia[lo + s], 0]
            x1 = a[ia[lo + s], 1]
            for t in range(size):
                e0 = x0 - b[ib[lo + t], 0]
                e1 = x1 - b[ib[lo + t], 1]
                cost[s, t] = e0 * e0 + e1 * e1
        sol = assignment(cost)
        for s in range(size):
            perm[ia[lo + s]] = ib[lo + sol[s]]
    return perm


@_jit
def rank_cells(x: np.ndarray, y: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``g x g`` grid on the ranks of ``x`` and of ``y``: each row's cell ``g * cx + cy``, the rows
    in cell order and where each cell starts in it (``g * g + 1`` offsets)."""
    n = x.shape[0]
    cell = np.empty(n, np.int64)
    ox = np.argsort(x)
    oy = np.argsort(y)
    for r in range(n):
        cell[ox[r]] = (r * g // n) * g
    for r in range(n):
        cell[oy[r]] += r * g // n
    start = np.zeros(g * g + 1, np.int64)
    for i in range(n):
        start[cell[i] + 1] += 1
    for c in range(g * g):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        c = cell[i]
        order[fill[c]] = i
        fill[c] += 1
    return cell, order, start


@_jit
def _swap(
    i: int,
    j: int,
    r: int,
    q: np.ndarray,
    inv: np.ndarray,
    px: np.ndarray,
    py: np.ndarray,
    bx: np.ndarray,
    by: np.ndarray,
    work: np.ndarray,
    queued: np.ndarray,
    head: int,
    size: int,
) -> int:
    """:func:`two_opt`'s move: row ``i`` takes row ``j``'s partner ``r`` and ``j`` takes ``i``'s;
    both rows join the queue ``work`` (a ring from ``head``) unless there; returns its new size."""
    qi = q[i]
    q[i] = r
    q[j] = qi
    inv[r] = i
    inv[qi] = j
    px[j], py[j], px[i], py[i] = px[i], py[i], bx[r], by[r]
    n = q.shape[0]
    for m in (i, j):
        if not queued[m]:
            work[(head + size) % n] = m
            size += 1
            queued[m] = True
    return size


@_jit
def two_opt(a: np.ndarray, b: np.ndarray, perm: np.ndarray, per: float) -> np.ndarray:
    """Stage 2: improving 2-opt swaps until none of the candidates helps (returns a new
    permutation; the cost never increases). Works on the rows relabelled in cell order, the
    partners' coordinates kept beside them, so that each test reads neighbouring memory."""
    n = a.shape[0]
    g = max(1, int(math.sqrt(n / per)))
    acell, aord, ast = rank_cells(np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1]), g)
    bcell, bord, bst = rank_cells(np.ascontiguousarray(b[:, 0]), np.ascontiguousarray(b[:, 1]), g)
    apos = np.empty(n, np.int64)
    bpos = np.empty(n, np.int64)
    for t in range(n):
        apos[aord[t]] = t
        bpos[bord[t]] = t
    ax = np.empty(n)
    ay = np.empty(n)
    bx = np.empty(n)
    by = np.empty(n)
    acx = np.empty(n, np.int64)
    acy = np.empty(n, np.int64)
    bcx = np.empty(n, np.int64)
    bcy = np.empty(n, np.int64)
    for t in range(n):
        ax[t], ay[t] = a[aord[t], 0], a[aord[t], 1]
        bx[t], by[t] = b[bord[t], 0], b[bord[t], 1]
        acx[t], acy[t] = acell[aord[t]] // g, acell[aord[t]] % g
        bcx[t], bcy[t] = bcell[bord[t]] // g, bcell[bord[t]] % g
    q = np.empty(n, np.int64)  # q[s]: the partner (b's cell-order label) of a's row s
    inv = np.empty(n, np.int64)
    for i in range(n):
        q[apos[i]] = bpos[perm[i]]
        inv[bpos[perm[i]]] = apos[i]
    px = np.empty(n)  # the partner's coordinates
    py = np.empty(n)
    for s in range(n):
        px[s], py[s] = bx[q[s]], by[q[s]]
    work = np.arange(n)  # a ring buffer of the rows to test
    queued = np.ones(n, np.bool_)
    head = 0
    size = n
    while size > 0:
        i = work[head]
        head = (head + 1) % n
        size -= 1
        queued[i] = False
        xi, yi, pxi, pyi = ax[i], ay[i], px[i], py[i]
        y0, y1 = max(acy[i] - 1, 0), min(acy[i] + 2, g)
        for ux in range(max(acx[i] - 1, 0), min(acx[i] + 2, g)):
            for j in range(ast[ux * g + y0], ast[ux * g + y1]):  # rows near row i
                if (xi - ax[j]) * (pxi - px[j]) + (yi - ay[j]) * (pyi - py[j]) < 0:
                    size = _swap(i, j, q[j], q, inv, px, py, bx, by, work, queued, head, size)
                    pxi, pyi = px[i], py[i]
        t0 = q[i]
        y0, y1 = max(bcy[t0] - 1, 0), min(bcy[t0] + 2, g)
        for ux in range(max(bcx[t0] - 1, 0), min(bcx[t0] + 2, g)):
            for r in range(bst[ux * g + y0], bst[ux * g + y1]):  # partners near i's partner
                j = inv[r]
                if (xi - ax[j]) * (pxi - bx[r]) + (yi - ay[j]) * (pyi - by[r]) < 0:
                    size = _swap(i, j, r, q, inv, px, py, bx, by, work, queued, head, size)
                    pxi, pyi = px[i], py[i]
    out = np.empty(n, np.int64)
    for s in range(n):
        out[aord[s]] = bord[q[s]]
    return out


@_jit
def sorted_pairing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The exact pairing of one-column rows: the sorted orders matched (the monotone map)."""
    oa = np.argsort(a[:, 0], kind="mergesort")
    ob = np.argsort(b[:, 0], kind="mergesort")
    perm = np.empty(a.shape[0], np.int64)
    for t in range(a.shape[0]):
        perm[oa[t]] = ob[t]
    return perm


def pair(
    a: np.ndarray,
    b: np.ndarray,
    frame: np.ndarray,
    chunk: int = CHUNK,
    per: float = PER_CELL,
) -> np.ndarray:
    """The compiled ``auto`` pairing of ``(n, D)`` float64 rows, ``D`` 1 or 2 (``frame``: the
    stratification's ``(2, 2)`` projections): exact in one column, stages 1 and 2 in two (chunks of
    about ``chunk`` rows, ``per`` points a grid cell; ``bench_ot_compiled.py`` sweeps both)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    if a.shape[1] == 1:
        return sorted_pairing(a, b)  # type: ignore[no-any-return]
    first = stratified(a, b, chunk, np.ascontiguousarray(frame, dtype=np.float64))
    return two_opt(a, b, first, per)  # type: ignore[no-any-return]
