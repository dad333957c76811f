"""Image figures: a grid of images and image trajectories (one row per sample, one column per time).

Images ``(n, C, H, W)`` (``C`` 1 or 3) are mapped from a value range to ``[0, 1]`` and tiled on a
white background, each image pixel drawn as an integer number of screen pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from iterflow.errors import fail
from iterflow.viz.figures import (
    DPI,
    ArrayLike,
    PathLike,
    check_count,
    evenly,
    save_figure,
    to_numpy,
)

__all__ = ["plot_image_grid", "plot_image_trajectory"]


def _images01(
    images: ArrayLike, argument: str, value_range: Sequence[float], ndim: int
) -> np.ndarray:
    """Images with channels last, mapped from ``value_range`` to ``[0, 1]`` and clipped."""
    arr = to_numpy(images, argument)
    if arr.ndim != ndim or arr.shape[-3] not in (1, 3):
        want = "(n, C, H, W)" if ndim == 4 else "(T+1, n, C, H, W)"
        fail(argument, f"must have shape {want} with C = 1 or 3", tuple(arr.shape))
    if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
        fail("value_range", "must be (low, high) with low < high", value_range)
    lo, hi = float(value_range[0]), float(value_range[1])
    arr = np.clip((np.nan_to_num(arr, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.moveaxis(arr, -3, -1)


def _tile(cells: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tile ``(rows, cols, H, W, C)`` cells into ``(rows*(H+pad)+pad, cols*(W+pad)+pad, C)``."""
    rows, cols, h, w, c = cells.shape
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c))
    for i in range(rows):
        for j in range(cols):
            out[
                pad + i * (h + pad) : pad + i * (h + pad) + h,
                pad + j * (w + pad) : pad + j * (w + pad) + w,
            ] = cells[i, j]
    return out


def _show_tiled(grid: np.ndarray, title: str | None) -> tuple[Figure, Axes]:
    """Figure sized so each grid pixel is drawn as an integer number of screen pixels."""
    scale = max(1, min(8, 900 // max(grid.shape[:2])))
    w_in, h_in = grid.shape[1] * scale / DPI, grid.shape[0] * scale / DPI
    fig = Figure(
        figsize=(w_in + 0.2, h_in + (0.5 if title else 0.2)), dpi=DPI, layout="constrained"
    )
    ax = fig.add_subplot()
    img = grid[..., 0] if grid.shape[-1] == 1 else grid
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig, ax


def plot_image_grid(
    images: ArrayLike,
    path: PathLike,
    nrow: int = 8,
    value_range: Sequence[float] = (0.0, 1.0),
    title: str | None = None,
) -> Path:
    """A grid of images, ``nrow`` per row (torchvision convention), on a white background.

    Arguments:
        images: shape ``(n, C, H, W)`` with ``C`` 1 (grey) or 3 (RGB).
        path: output PNG.
        nrow: images per row.
        value_range: ``(low, high)`` mapped to black/white; **default ``(0, 1)``**; pass
            ``(-1, 1)`` for images scaled to ``[-1, 1]``. Values outside are clipped.
        title: figure title.

    Returns:
        ``Path(path)``.
    """
    arr = _images01(images, "images", value_range, ndim=4)
    check_count(nrow, "nrow")
    n = arr.shape[0]
    if n == 0:
        fail("images", "must hold at least one image", tuple(arr.shape))
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    cells = np.ones((rows * cols, *arr.shape[1:]))
    cells[:n] = arr
    fig, _ = _show_tiled(_tile(cells.reshape(rows, cols, *arr.shape[1:])), title)
    return save_figure(fig, path, title)


def plot_image_trajectory(
    traj: ArrayLike,
    path: PathLike,
    n_show: int = 8,
    n_time: int = 8,
    value_range: Sequence[float] = (0.0, 1.0),
    title: str | None = None,
) -> Path:
    """Image trajectories: one row per sample, one column per (evenly spaced) time index.

    Arguments:
        traj: shape ``(T+1, n, C, H, W)``; column ``0`` is ``traj[0]``, the last is ``traj[T]``.
        path: output PNG.
        n_show: samples (rows) shown, evenly spaced over ``n``.
        n_time: time indices (columns) shown, evenly spaced over ``0..T`` including both ends.
        value_range: ``(low, high)`` mapped to black/white; default ``(0, 1)``, see
            :func:`plot_image_grid`.
        title: figure title.

    Returns:
        ``Path(path)``.
    """
    arr = _images01(traj, "traj", value_range, ndim=5)
    check_count(n_show, "n_show")
    check_count(n_time, "n_time")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        fail("traj", "must hold at least one time step and one sample", tuple(arr.shape[:2]))
    times = np.unique(evenly(arr.shape[0], n_time))
    rows = evenly(arr.shape[1], n_show)
    cells = arr[times][:, rows].transpose(1, 0, 2, 3, 4)  # (rows, cols, H, W, C)
    grid = _tile(cells)
    fig, ax = _show_tiled(grid, title)
    w, pad = cells.shape[3], 2
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(times))])
    ax.set_xticklabels([f"{t}" for t in times], fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlabel(f"time index (0..{arr.shape[0] - 1})", fontsize=9)
    return save_figure(fig, path, title)
