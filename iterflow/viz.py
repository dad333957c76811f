"""Figures people want to look at: samples, densities, trajectories, block chains, curves, images.

Every function saves one PNG (dpi 120) at ``path``, creating parent folders, and returns the
:class:`~pathlib.Path`. Point clouds and images may be torch tensors (any device, detached here) or
NumPy arrays. 2-D panels use a square aspect and, when several are shown, the same axis limits.

Figures are built as :class:`matplotlib.figure.Figure` objects (no pyplot state, so nothing leaks
when plotting in a loop); the module selects the non-interactive "Agg" backend if pyplot has not
been imported yet, so it works on headless machines.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless by default; never hijack a live session
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from iterflow.errors import fail  # noqa: E402

__all__ = [
    "plot_blocks",
    "plot_curves",
    "plot_density",
    "plot_field",
    "plot_image_grid",
    "plot_image_trajectory",
    "plot_samples",
    "plot_trajectories",
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


def _to_numpy(a: ArrayLike, argument: str) -> np.ndarray:
    """Detached float64 NumPy copy of a tensor or array."""
    if isinstance(a, Tensor):
        return a.detach().cpu().double().numpy()
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    fail(argument, "must be a torch.Tensor or numpy array", type(a).__name__)


def _points2d(a: ArrayLike, argument: str) -> tuple[np.ndarray, int]:
    """``(n, 2)`` points with non-finite rows removed, and how many rows were removed."""
    x = _to_numpy(a, argument)
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 1:
        fail(argument, "must have shape (n, 2) with n >= 1", tuple(x.shape))
    keep = np.isfinite(x).all(1)
    return x[keep], int((~keep).sum())


def _check_bounds(bounds: Sequence[float], argument: str = "bounds") -> Bounds:
    vals = tuple(float(b) for b in bounds) if isinstance(bounds, (Sequence, np.ndarray)) else ()
    if len(vals) != 4 or not all(map(math.isfinite, vals)):
        fail(argument, "must be 4 finite numbers (xmin, xmax, ymin, ymax)", bounds)
    if not (vals[0] < vals[1] and vals[2] < vals[3]):
        fail(argument, "must satisfy xmin < xmax and ymin < ymax", bounds)
    return vals  # type: ignore[return-value]


def _check_count(value: int, argument: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(argument, f"must be an integer >= {minimum}", value)


def _square_limits(clouds: Sequence[np.ndarray], pad: float = 0.05, q: float = 0.005) -> Bounds:
    """Square limits covering the ``q`` to ``1 - q`` quantiles of all clouds, padded by ``pad``."""
    pts = np.concatenate([c for c in clouds if len(c)]) if any(len(c) for c in clouds) else None
    if pts is None:
        return DEFAULT_BOUNDS
    lo, hi = np.quantile(pts, q, axis=0), np.quantile(pts, 1 - q, axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6) * (1 + pad)
    return (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)


def _evenly(n: int, k: int) -> np.ndarray:
    """At most ``k`` evenly spaced indices into ``range(n)`` (deterministic subsample)."""
    return np.arange(n) if n <= k else np.linspace(0, n - 1, k).round().astype(int)


# ------------------------------------------------------------------------------------------------
# figure helpers
# ------------------------------------------------------------------------------------------------


def _figure(
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


def _style2d(ax: Axes, bounds: Bounds, title: str) -> None:
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=11)
    ax.tick_params(labelsize=8)


def _save(fig: Figure, path: PathLike, title: str | None) -> Path:
    if title:
        fig.suptitle(title, fontsize=13)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", facecolor="white")
    return out


def _dropped(n: int) -> str:
    return f"\n({n} non-finite points dropped)" if n else ""


# ------------------------------------------------------------------------------------------------
# 2-D samples
# ------------------------------------------------------------------------------------------------


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
    clouds = [_points2d(data, "data"), _points2d(samples, "samples")]
    lims = _square_limits([c for c, _ in clouds]) if bounds is None else _check_bounds(bounds)
    if bins is None:
        n_min = min((len(c) for c, _ in clouds if len(c)), default=0)
        bins = int(np.clip(2 * math.sqrt(n_min), 50, 200))
    _check_count(bins, "bins", 2)
    hists = [_hist_density(c, bins, lims) for c, _ in clouds]
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(h.max()) for h in hists) or 1.0)
    fig, axes = _figure(2)
    for ax, h, (c, nd), name in zip(axes, hists, clouds, ("data", "model samples"), strict=True):
        ax.imshow(
            h.T,
            origin="lower",
            extent=lims,
            cmap=SEQUENTIAL_CMAP,
            norm=norm,
            interpolation="nearest",
        )
        _style2d(ax, lims, f"{name} (n={len(c):,}){_dropped(nd)}")
    return _save(fig, path, title)


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
    tr = _to_numpy(traj, "traj")
    if tr.ndim != 3 or tr.shape[2] != 2 or tr.shape[0] < 2 or tr.shape[1] < 1:
        fail("traj", "must have shape (T+1, n, 2) with T >= 1 and n >= 1", tuple(tr.shape))
    _check_count(n_show, "n_show")
    tr = tr[:, _evenly(tr.shape[1], n_show)]
    keep = np.isfinite(tr).all(axis=(0, 2))
    tr, dropped = tr[:, keep], int((~keep).sum())
    lims = _square_limits([tr.reshape(-1, 2)], q=0.0)  # every drawn path fully visible
    fig, (ax,) = _figure(1, size=5.5)
    lines = LineCollection(list(tr.transpose(1, 0, 2)), colors="0.35", linewidths=0.5, alpha=0.4)
    ax.add_collection(lines)
    ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, color=START_COLOR, label="start (index 0)", zorder=3)
    ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, color=END_COLOR,
               label=f"end (index {tr.shape[0] - 1})", zorder=3)  # fmt: skip
    ax.legend(loc="upper right", markerscale=2.5, fontsize=9, framealpha=0.9)
    _style2d(ax, lims, f"{tr.shape[1]} paths, {tr.shape[0] - 1} steps{_dropped(dropped)}")
    return _save(fig, path, title)


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
    _check_count(max_points, "max_points")
    clouds = [_points2d(p, f"particles[{k}]") for k, p in enumerate(particles)]
    clouds = [(c[_evenly(len(c), max_points)], nd) for c, nd in clouds]
    lims = _square_limits([c for c, _ in clouds])
    fig, axes = _figure(len(clouds), max_cols=5, size=3.2)
    for ax, (c, nd), name in zip(axes, clouds, titles, strict=True):
        ax.scatter(
            c[:, 0], c[:, 1], s=1.0, alpha=0.5, color="tab:blue", linewidths=0, rasterized=True
        )
        _style2d(ax, lims, f"{name}{_dropped(nd)}")
    return _save(fig, path, title)


# ------------------------------------------------------------------------------------------------
# functions on a grid
# ------------------------------------------------------------------------------------------------


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
    lims = _check_bounds(bounds)
    _check_count(resolution, "resolution", 2)
    _check_count(chunk, "chunk")
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
    fig, axes = _figure(len(dens))
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
        _style2d(ax, lims, f"{name} density")
    fig.colorbar(im, ax=axes, shrink=0.85, label="density")
    return _save(fig, path, title)


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
    fig, axes = _figure(len(panels))
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
        _style2d(ax, lims, name)
    fig.colorbar(im, ax=axes, shrink=0.85)
    return _save(fig, path, title)


# ------------------------------------------------------------------------------------------------
# curves
# ------------------------------------------------------------------------------------------------


def _series(name: str, values: Sequence[float] | ArrayLike) -> np.ndarray:
    arr = (
        _to_numpy(values, f"series[{name!r}]") if isinstance(values, (Tensor, np.ndarray)) else None
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
    fig, axes = _figure(len(series), size=3.6)
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
    return _save(fig, path, title)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------


def _images01(
    images: ArrayLike, argument: str, value_range: Sequence[float], ndim: int
) -> np.ndarray:
    """Images with channels last, mapped from ``value_range`` to ``[0, 1]`` and clipped."""
    arr = _to_numpy(images, argument)
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
    _check_count(nrow, "nrow")
    n = arr.shape[0]
    if n == 0:
        fail("images", "must hold at least one image", tuple(arr.shape))
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    cells = np.ones((rows * cols, *arr.shape[1:]))
    cells[:n] = arr
    fig, _ = _show_tiled(_tile(cells.reshape(rows, cols, *arr.shape[1:])), title)
    return _save(fig, path, title)


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
    _check_count(n_show, "n_show")
    _check_count(n_time, "n_time")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        fail("traj", "must hold at least one time step and one sample", tuple(arr.shape[:2]))
    times = np.unique(_evenly(arr.shape[0], n_time))
    rows = _evenly(arr.shape[1], n_show)
    cells = arr[times][:, rows].transpose(1, 0, 2, 3, 4)  # (rows, cols, H, W, C)
    grid = _tile(cells)
    fig, ax = _show_tiled(grid, title)
    w, pad = cells.shape[3], 2
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(times))])
    ax.set_xticklabels([f"{t}" for t in times], fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlabel(f"time index (0..{arr.shape[0] - 1})", fontsize=9)
    return _save(fig, path, title)
