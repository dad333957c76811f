"""What every figure of :mod:`iterflow.viz` shares: style constants, input checks and panel layout.

Point clouds and images may be torch tensors (any device, detached here) or NumPy arrays
(:func:`to_numpy`). Figures are :class:`matplotlib.figure.Figure` objects in a constrained layout
(:func:`panel_figure`), saved as one PNG at :data:`DPI` (:func:`save_figure`). Importing this module
selects the non-interactive "Agg" backend if pyplot has not been imported yet, so the plots work on
headless machines.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless by default; never hijack a live session
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from iterflow.errors import fail  # noqa: E402

__all__ = [
    "DEFAULT_BOUNDS",
    "DIVERGING_CMAP",
    "DPI",
    "END_COLOR",
    "PANEL_INCHES",
    "SEQUENTIAL_CMAP",
    "START_COLOR",
    "ArrayLike",
    "Bounds",
    "PathLike",
    "check_bounds",
    "check_count",
    "dropped_note",
    "evenly",
    "panel_figure",
    "points2d",
    "save_figure",
    "square_limits",
    "style2d",
    "to_numpy",
]

ArrayLike = Tensor | np.ndarray
Bounds = tuple[float, float, float, float]
PathLike = str | os.PathLike

DPI = 120
PANEL_INCHES = 4.0
SEQUENTIAL_CMAP = "magma"  # perceptually uniform; dark = empty
DIVERGING_CMAP = "RdBu_r"  # for signed fields such as log density ratios
DEFAULT_BOUNDS: Bounds = (-4.5, 4.5, -4.5, 4.5)
START_COLOR, END_COLOR = "tab:blue", "tab:orange"

# ------------------------------------------------------------------------------------------------
# validation and conversion
# ------------------------------------------------------------------------------------------------


def to_numpy(a: ArrayLike, argument: str) -> np.ndarray:
    """Detached float64 NumPy copy of a tensor or array."""
    if isinstance(a, Tensor):
        return a.detach().cpu().double().numpy()
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    fail(argument, "must be a torch.Tensor or numpy array", type(a).__name__)


def points2d(a: ArrayLike, argument: str) -> tuple[np.ndarray, int]:
    """``(n, 2)`` points with non-finite rows removed, and how many rows were removed."""
    x = to_numpy(a, argument)
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 1:
        fail(argument, "must have shape (n, 2) with n >= 1", tuple(x.shape))
    keep = np.isfinite(x).all(1)
    return x[keep], int((~keep).sum())


def check_bounds(bounds: Sequence[float], argument: str = "bounds") -> Bounds:
    """``bounds`` as 4 floats ``(xmin, xmax, ymin, ymax)`` with ``xmin < xmax``, ``ymin < ymax``."""
    vals = tuple(float(b) for b in bounds) if isinstance(bounds, (Sequence, np.ndarray)) else ()
    if len(vals) != 4 or not all(map(math.isfinite, vals)):
        fail(argument, "must be 4 finite numbers (xmin, xmax, ymin, ymax)", bounds)
    if not (vals[0] < vals[1] and vals[2] < vals[3]):
        fail(argument, "must satisfy xmin < xmax and ymin < ymax", bounds)
    return vals  # type: ignore[return-value]


def check_count(value: int, argument: str, minimum: int = 1) -> None:
    """Raise :class:`~iterflow.errors.InputError` unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(argument, f"must be an integer >= {minimum}", value)


def square_limits(clouds: Sequence[np.ndarray], pad: float = 0.05, q: float = 0.005) -> Bounds:
    """Square limits covering the ``q`` to ``1 - q`` quantiles of all clouds, padded by ``pad``."""
    pts = np.concatenate([c for c in clouds if len(c)]) if any(len(c) for c in clouds) else None
    if pts is None:
        return DEFAULT_BOUNDS
    lo, hi = np.quantile(pts, q, axis=0), np.quantile(pts, 1 - q, axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6) * (1 + pad)
    return (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)


def evenly(n: int, k: int) -> np.ndarray:
    """At most ``k`` evenly spaced indices into ``range(n)`` (deterministic subsample)."""
    return np.arange(n) if n <= k else np.linspace(0, n - 1, k).round().astype(int)


# ------------------------------------------------------------------------------------------------
# figure helpers
# ------------------------------------------------------------------------------------------------


def panel_figure(
    n_panels: int, max_cols: int = 4, size: float = PANEL_INCHES
) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with ``n_panels`` axes in rows of at most ``max_cols``."""
    nrows = math.ceil(n_panels / max_cols)
    ncols = math.ceil(n_panels / nrows)  # balanced rows: 6 panels -> 2 x 3, not 5 + 1
    fig = Figure(figsize=(size * ncols, size * nrows + 0.3), dpi=DPI, layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def style2d(ax: Axes, bounds: Bounds, title: str) -> None:
    """Limits ``bounds``, square aspect, title and small tick labels of a 2-D panel."""
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=11)
    ax.tick_params(labelsize=8)


def save_figure(fig: Figure, path: PathLike, title: str | None) -> Path:
    """Give ``fig`` its title, save it as a PNG at ``path`` (parents created); return the path."""
    if title:
        fig.suptitle(title, fontsize=13)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", facecolor="white")
    return out


def dropped_note(n: int) -> str:
    """A panel-title line saying how many non-finite points were dropped (empty for none)."""
    return f"\n({n} non-finite points dropped)" if n else ""
