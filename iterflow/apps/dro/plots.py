"""Plots of the worst-case sampler: 2-D displacements and image pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from iterflow.errors import fail
from iterflow.viz import DPI, plot_image_grid


def plot_displacement(
    x: Tensor,
    y: Tensor,
    path: str | Path,
    labels: Tensor | None = None,
    title: str | None = None,
    n_arrows: int = 300,
) -> Path:
    """2-D scatter of original points (circles) and their worst-case images (crosses), with arrows.

    Arguments:
        x, y: ``(n, 2)`` points and images; labels: optional classes (colours).
        n_arrows: arrows drawn for an evenly spaced subset of the points.
    """

    xa, ya = x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy()
    if xa.ndim != 2 or xa.shape[1] != 2 or ya.shape != xa.shape:
        fail("x", "must have shape (n, 2), like y", (xa.shape, ya.shape))
    lab = np.zeros(len(xa), dtype=int) if labels is None else labels.detach().cpu().numpy()
    fig = Figure(figsize=(6.5, 6.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for c in np.unique(lab):
        m = lab == c
        col = colors[int(c) % len(colors)]
        ax.scatter(
            xa[m, 0],
            xa[m, 1],
            s=6,
            c=col,
            alpha=0.35,
            label=f"P (class {c})" if labels is not None else "P",
        )
        ax.scatter(
            ya[m, 0],
            ya[m, 1],
            s=8,
            c=col,
            marker="x",
            alpha=0.8,
            label=f"worst case (class {c})" if labels is not None else "worst case",
        )
    idx = np.unique(np.linspace(0, len(xa) - 1, min(n_arrows, len(xa))).round().astype(int))
    d = ya[idx] - xa[idx]
    ax.quiver(
        xa[idx, 0],
        xa[idx, 1],
        d[:, 0],
        d[:, 1],
        angles="xy",
        scale_units="xy",
        scale=1.0,
        width=0.002,
        color="0.25",
        alpha=0.6,
    )
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=11)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", facecolor="white")
    return out


def plot_digit_pairs(
    original: Tensor,
    worst: Tensor,
    path: str | Path,
    *,
    value_range: tuple[float, float],
    ncol: int = 8,
    title: str | None = None,
) -> Path:
    """Image grid: rows alternate original images and their worst-case images (``(n, C, H, W)`` each)."""

    if original.shape != worst.shape or original.ndim != 4:
        fail(
            "worst",
            f"must have the shape of original {tuple(original.shape)} (n, C, H, W)",
            tuple(worst.shape),
        )
    ncol = max(1, min(ncol, original.shape[0]))
    n = (original.shape[0] // ncol) * ncol
    o, w = (
        original[:n].reshape(-1, ncol, *original.shape[1:]),
        worst[:n].reshape(-1, ncol, *original.shape[1:]),
    )
    rows = torch.stack([o, w], 1).reshape(-1, *original.shape[1:])  # (orig row, worst row) pairs
    return plot_image_grid(
        rows.detach().cpu(), path, nrow=ncol, value_range=value_range, title=title
    )
