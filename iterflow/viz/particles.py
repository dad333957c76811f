"""2-D point clouds: data against model samples, particle trajectories and block chains.

Each function saves one PNG and returns its :class:`~pathlib.Path`; several panels share the same
axis limits and a square aspect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import PowerNorm
from torch import Tensor

from iterflow.errors import fail
from iterflow.viz.figures import (
    END_COLOR,
    SEQUENTIAL_CMAP,
    START_COLOR,
    ArrayLike,
    Bounds,
    PathLike,
    check_bounds,
    check_count,
    dropped_note,
    evenly,
    panel_figure,
    points2d,
    save_figure,
    square_limits,
    style2d,
    to_numpy,
)

__all__ = ["plot_blocks", "plot_samples", "plot_trajectories"]


def _hist_density(points: np.ndarray, bins: int, lims: Bounds) -> np.ndarray:
    """2-D histogram ``(bins_x, bins_y)`` normalised by *all* points (those outside count too)."""
    rng = [[lims[0], lims[1]], [lims[2], lims[3]]]
    counts = np.histogram2d(points[:, 0], points[:, 1], bins=bins, range=rng)[0]
    area = (lims[1] - lims[0]) * (lims[3] - lims[2]) / bins**2
    return counts / (max(len(points), 1) * area)


def plot_samples(
    data: ArrayLike,
    samples: ArrayLike,
    path: PathLike,
    title: str | None = None,
    bounds: Sequence[float] | None = None,
    bins: int | None = None,
) -> Path:
    """Side-by-side 2-D histograms of data and model samples, same limits and colour scale.

    Histogram densities are drawn with a square-root colour scale (``PowerNorm(0.5)``) of the
    perceptually uniform "magma" map, so thin low-density structure stays visible.

    Arguments:
        data: reference points, shape ``(n, 2)``.
        samples: model samples, shape ``(m, 2)``.
        path: output PNG.
        title: figure title.
        bounds: ``(xmin, xmax, ymin, ymax)``; default: square limits around both clouds.
        bins: bins per axis; default ``clip(2 sqrt(min(n, m)), 50, 200)``.

    Returns:
        ``Path(path)``.
    """
    clouds = [points2d(data, "data"), points2d(samples, "samples")]
    lims = square_limits([c for c, _ in clouds]) if bounds is None else check_bounds(bounds)
    if bins is None:
        n_min = min((len(c) for c, _ in clouds if len(c)), default=0)
        bins = int(np.clip(2 * math.sqrt(n_min), 50, 200))
    check_count(bins, "bins", 2)
    hists = [_hist_density(c, bins, lims) for c, _ in clouds]
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(h.max()) for h in hists) or 1.0)
    fig, axes = panel_figure(2)
    for ax, h, (c, nd), name in zip(axes, hists, clouds, ("data", "model samples"), strict=True):
        ax.imshow(
            h.T,
            origin="lower",
            extent=lims,
            cmap=SEQUENTIAL_CMAP,
            norm=norm,
            interpolation="nearest",
        )
        style2d(ax, lims, f"{name} (n={len(c):,}){dropped_note(nd)}")
    return save_figure(fig, path, title)


def plot_trajectories(
    traj: ArrayLike, path: PathLike, n_show: int = 300, title: str | None = None
) -> Path:
    """Particle paths ``traj[0] -> traj[T]`` as thin lines with start and end points marked.

    Arguments:
        traj: positions, shape ``(T+1, n, 2)``; index 0 is the start (data or noise), index
            ``T`` the end.
        path: output PNG.
        n_show: number of paths drawn (evenly spaced over the ``n`` particles).
        title: figure title.

    Returns:
        ``Path(path)``.
    """
    tr = to_numpy(traj, "traj")
    if tr.ndim != 3 or tr.shape[2] != 2 or tr.shape[0] < 2 or tr.shape[1] < 1:
        fail("traj", "must have shape (T+1, n, 2) with T >= 1 and n >= 1", tuple(tr.shape))
    check_count(n_show, "n_show")
    tr = tr[:, evenly(tr.shape[1], n_show)]
    keep = np.isfinite(tr).all(axis=(0, 2))
    tr, dropped = tr[:, keep], int((~keep).sum())
    lims = square_limits([tr.reshape(-1, 2)], q=0.0)  # every drawn path fully visible
    fig, (ax,) = panel_figure(1, size=5.5)
    lines = LineCollection(list(tr.transpose(1, 0, 2)), colors="0.35", linewidths=0.5, alpha=0.4)
    ax.add_collection(lines)
    ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, color=START_COLOR, label="start (index 0)", zorder=3)
    ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, color=END_COLOR,
               label=f"end (index {tr.shape[0] - 1})", zorder=3)  # fmt: skip
    ax.legend(loc="upper right", markerscale=2.5, fontsize=9, framealpha=0.9)
    style2d(ax, lims, f"{tr.shape[1]} paths, {tr.shape[0] - 1} steps{dropped_note(dropped)}")
    return save_figure(fig, path, title)


def plot_blocks(
    particles: Sequence[ArrayLike],
    path: PathLike,
    titles: Sequence[str] | None = None,
    max_points: int = 5000,
    title: str | None = None,
) -> Path:
    """Scatter panels of the particles at each stage of a block chain, with common limits.

    Arguments:
        particles: one ``(n_k, 2)`` point cloud per stage, e.g. the data followed by the particles
            after each block. Panels wrap after 5 per row.
        path: output PNG.
        titles: one panel title per stage; default ``"stage k"``.
        max_points: points drawn per panel (evenly spaced subsample).
        title: figure title.

    Returns:
        ``Path(path)``.
    """
    if isinstance(particles, (Tensor, np.ndarray)) or not isinstance(particles, Sequence):
        fail(
            "particles",
            "must be a sequence (list) of (n, 2) point clouds",
            type(particles).__name__,
        )
    if not particles:
        fail("particles", "must hold at least one point cloud", particles)
    if titles is None:
        titles = [f"stage {k}" for k in range(len(particles))]
    if len(titles) != len(particles):
        fail("titles", f"must hold one title per stage ({len(particles)})", list(titles))
    check_count(max_points, "max_points")
    clouds = [points2d(p, f"particles[{k}]") for k, p in enumerate(particles)]
    clouds = [(c[evenly(len(c), max_points)], nd) for c, nd in clouds]
    lims = square_limits([c for c, _ in clouds])
    fig, axes = panel_figure(len(clouds), max_cols=5, size=3.2)
    for ax, (c, nd), name in zip(axes, clouds, titles, strict=True):
        ax.scatter(
            c[:, 0], c[:, 1], s=1.0, alpha=0.5, color="tab:blue", linewidths=0, rasterized=True
        )
        style2d(ax, lims, f"{name}{dropped_note(nd)}")
    return save_figure(fig, path, title)
