"""Functions of the plane drawn on a grid: a model's density and signed fields such as log ratios.

The function is evaluated in chunks on the pixel centres, on the device and in the dtype of the
module behind it; a second panel shows the truth when given, on the same colour scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from iterflow.errors import fail
from iterflow.viz.figures import (
    DEFAULT_BOUNDS,
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    Bounds,
    PathLike,
    check_bounds,
    check_count,
    panel_figure,
    save_figure,
    style2d,
)

__all__ = ["plot_density", "plot_field"]


def _grid(bounds: Bounds, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(res,)`` along x and y."""
    dx = (bounds[1] - bounds[0]) / resolution
    dy = (bounds[3] - bounds[2]) / resolution
    xs = bounds[0] + dx * (np.arange(resolution) + 0.5)
    ys = bounds[2] + dy * (np.arange(resolution) + 0.5)
    return xs, ys


def _fn_device_dtype(fn: Callable[[Tensor], Tensor]) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the module behind ``fn`` (module or bound method), else defaults."""
    owner = getattr(fn, "__self__", fn)
    if isinstance(owner, nn.Module):
        for t in (*owner.parameters(), *owner.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _evaluate_grid(
    fn: Callable[[Tensor], Tensor],
    argument: str,
    bounds: Bounds,
    resolution: int,
    chunk: int,
) -> np.ndarray:
    """``fn`` on the ``resolution x resolution`` pixel centres -> array ``(res_y, res_x)``."""
    xs, ys = _grid(bounds, resolution)
    gx, gy = np.meshgrid(xs, ys)  # (res_y, res_x): row = y
    device, dtype = _fn_device_dtype(fn)
    pts = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=dtype, device=device)
    out = []
    for start in range(0, len(pts), chunk):
        batch = pts[start : start + chunk]
        val = fn(batch)
        if not isinstance(val, Tensor) or val.reshape(-1).shape[0] != batch.shape[0]:
            shape = tuple(val.shape) if isinstance(val, Tensor) else type(val).__name__
            fail(argument, "must map a (n, 2) tensor to a tensor of n values", shape)
        out.append(val.detach().reshape(-1).cpu().double())
    return torch.cat(out).numpy().reshape(resolution, resolution)


def _grid_panels(
    fn: Callable[[Tensor], Tensor],
    true_fn: Callable[[Tensor], Tensor] | None,
    names: tuple[str, str],
    bounds: Sequence[float],
    resolution: int,
    chunk: int,
) -> tuple[Bounds, list[tuple[str, np.ndarray]]]:
    lims = check_bounds(bounds)
    check_count(resolution, "resolution", 2)
    check_count(chunk, "chunk")
    panels = [("model", _evaluate_grid(fn, names[0], lims, resolution, chunk))]
    if true_fn is not None:
        panels.append(("truth", _evaluate_grid(true_fn, names[1], lims, resolution, chunk)))
    return lims, panels


def plot_density(
    log_prob_fn: Callable[[Tensor], Tensor],
    path: PathLike,
    bounds: Sequence[float] = DEFAULT_BOUNDS,
    resolution: int = 200,
    title: str | None = None,
    true_log_prob_fn: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 10_000,
) -> Path:
    """Heat map of ``exp(log_prob_fn(x))`` on a grid, next to the true density when given.

    The function is simply called on chunks of grid points; if it needs gradients (a CNF's
    divergence) it enables them itself. Grid points take the device and dtype of the first
    floating parameter/buffer when ``log_prob_fn`` is an ``nn.Module`` or a bound method of one,
    else CPU and the default dtype. Both panels share one colour scale.

    Arguments:
        log_prob_fn: maps ``(n, 2)`` points to log-densities ``(n,)``.
        path: output PNG.
        bounds: ``(xmin, xmax, ymin, ymax)`` of the grid.
        resolution: pixels per axis.
        title: figure title.
        true_log_prob_fn: the true log-density, drawn in a second panel.
        chunk: grid points per call.

    Returns:
        ``Path(path)``.
    """
    lims, panels = _grid_panels(
        log_prob_fn,
        true_log_prob_fn,
        ("log_prob_fn", "true_log_prob_fn"),
        bounds,
        resolution,
        chunk,
    )
    dens = [(name, np.exp(v)) for name, v in panels]
    vmax = max(float(np.nanmax(np.where(np.isfinite(d), d, np.nan), initial=0.0)) for _, d in dens)
    fig, axes = panel_figure(len(dens))
    for ax, (name, d) in zip(axes, dens, strict=True):
        im = ax.imshow(
            d,
            origin="lower",
            extent=lims,
            cmap=SEQUENTIAL_CMAP,
            vmin=0.0,
            vmax=vmax or 1.0,
            interpolation="nearest",
        )
        style2d(ax, lims, f"{name} density")
    fig.colorbar(im, ax=axes, shrink=0.85, label="density")
    return save_figure(fig, path, title)


def plot_field(
    fn: Callable[[Tensor], Tensor],
    path: PathLike,
    bounds: Sequence[float] = DEFAULT_BOUNDS,
    resolution: int = 200,
    title: str | None = None,
    true_fn: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 10_000,
) -> Path:
    """Heat map of a signed scalar field (e.g. a log density ratio) next to the truth when given.

    Uses a diverging colour map centred at 0 with symmetric limits shared by both panels, and
    draws the zero level set as a thin black contour.

    Arguments:
        fn: maps ``(n, 2)`` points to values ``(n,)``.
        path: output PNG.
        bounds: ``(xmin, xmax, ymin, ymax)`` of the grid.
        resolution: pixels per axis.
        title: figure title.
        true_fn: the true field, drawn in a second panel.
        chunk: grid points per call.

    Returns:
        ``Path(path)``.
    """
    lims, panels = _grid_panels(fn, true_fn, ("fn", "true_fn"), bounds, resolution, chunk)
    finite = [np.abs(v[np.isfinite(v)]) for _, v in panels]
    vmax = max((float(f.max()) for f in finite if f.size), default=1.0) or 1.0
    xs, ys = _grid(lims, resolution)
    fig, axes = panel_figure(len(panels))
    for ax, (name, v) in zip(axes, panels, strict=True):
        im = ax.imshow(
            v,
            origin="lower",
            extent=lims,
            cmap=DIVERGING_CMAP,
            vmin=-vmax,
            vmax=vmax,
            interpolation="nearest",
        )
        if np.nanmin(v) < 0 < np.nanmax(v):
            ax.contour(xs, ys, v, levels=[0.0], colors="k", linewidths=0.8)
        style2d(ax, lims, name)
    fig.colorbar(im, ax=axes, shrink=0.85)
    return save_figure(fig, path, title)
