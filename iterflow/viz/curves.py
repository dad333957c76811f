"""Curves: one panel per named series (per-block movement, a KL proxy, loss against step)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from iterflow.errors import fail
from iterflow.viz.figures import ArrayLike, PathLike, panel_figure, save_figure, to_numpy

__all__ = ["plot_curves"]


def _series(name: str, values: Sequence[float] | ArrayLike) -> np.ndarray:
    arr = (
        to_numpy(values, f"series[{name!r}]") if isinstance(values, (Tensor, np.ndarray)) else None
    )
    if arr is None:
        try:
            arr = np.asarray(list(values), dtype=np.float64)
        except (TypeError, ValueError):
            fail(f"series[{name!r}]", "must be a sequence of numbers", values)
    if arr.ndim != 1 or arr.size == 0:
        fail(f"series[{name!r}]", "must be a non-empty 1-D sequence of numbers", arr.shape)
    return arr


def plot_curves(
    series: Mapping[str, Sequence[float] | ArrayLike],
    path: PathLike,
    xlabel: str | Mapping[str, str],
    title: str | None = None,
    logy: bool = False,
    x: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One panel per named series, e.g. per-block movement, a KL proxy, loss vs step.

    Arguments:
        series: ``name -> values``; panels wrap after 4 per row. Non-finite values leave gaps.
        path: output PNG.
        xlabel: label of the x axes: one for all panels, or ``name -> label`` per panel.
        title: figure title.
        logy: logarithmic y axes (non-positive values are not drawn).
        x: optional ``name -> x values`` (same length as the series); default ``1, 2, ..., len``.

    Returns:
        ``Path(path)``.
    """
    if not isinstance(series, Mapping) or not series:
        fail("series", "must be a non-empty mapping name -> sequence of numbers", series)
    fig, axes = panel_figure(len(series), size=3.6)
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        ys = _series(name, values)
        xs = np.arange(1, ys.size + 1) if x is None or name not in x else _series(name, x[name])
        if xs.shape != ys.shape:
            fail(f"x[{name!r}]", f"must have the same length as the series ({ys.size})", xs.size)
        ax.plot(xs, ys, marker="o" if ys.size <= 60 else None, markersize=3.5, linewidth=1.4)
        if logy:
            ax.set_yscale("log")
        if np.allclose(xs, np.round(xs)):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=11)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel.get(name, ""))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    return save_figure(fig, path, title)
