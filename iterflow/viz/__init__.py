"""Figures people want to look at: samples, densities, trajectories, block chains, curves, images.

Every function saves one PNG (dpi 120) at ``path``, creating parent folders, and returns the
:class:`~pathlib.Path`. Point clouds and images may be torch tensors (any device, detached here) or
NumPy arrays. 2-D panels use a square aspect and, when several are shown, the same axis limits.

Figures are built as :class:`matplotlib.figure.Figure` objects (no pyplot state, so nothing leaks
when plotting in a loop); the package selects the non-interactive "Agg" backend if pyplot has not
been imported yet, so it works on headless machines.

One module per kind of figure, all exported here:

- :mod:`iterflow.viz.particles`: 2-D point clouds (:func:`plot_samples`,
  :func:`plot_trajectories`, :func:`plot_blocks`);
- :mod:`iterflow.viz.fields`: functions on a grid (:func:`plot_density`, :func:`plot_field`);
- :mod:`iterflow.viz.curves`: :func:`plot_curves`;
- :mod:`iterflow.viz.image_grids`: :func:`plot_image_grid`, :func:`plot_image_trajectory`;
- :mod:`iterflow.viz.figures`: the shared style constants (:data:`DPI`, colour maps), input checks
  and panel layout.
"""

from __future__ import annotations

from iterflow.viz.curves import plot_curves
from iterflow.viz.fields import plot_density, plot_field
from iterflow.viz.figures import (
    DEFAULT_BOUNDS,
    DIVERGING_CMAP,
    DPI,
    END_COLOR,
    PANEL_INCHES,
    SEQUENTIAL_CMAP,
    START_COLOR,
    ArrayLike,
    Bounds,
    PathLike,
)
from iterflow.viz.image_grids import plot_image_grid, plot_image_trajectory
from iterflow.viz.particles import plot_blocks, plot_samples, plot_trajectories

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
    "plot_blocks",
    "plot_curves",
    "plot_density",
    "plot_field",
    "plot_image_grid",
    "plot_image_trajectory",
    "plot_samples",
    "plot_trajectories",
]
