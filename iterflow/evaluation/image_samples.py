"""Images drawn from a flow: seeded samples, their clipping to the data range, and pictures (a
sample grid and noise-to-image trajectories) as PNG files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from iterflow.core.flow import Flow
from iterflow.core.ode import SolverSpec
from iterflow.data.images import Quantization
from iterflow.errors import check_positive
from iterflow.viz import plot_image_grid, plot_image_trajectory

__all__ = [
    "SAMPLE_CHUNK",
    "clip_to_range",
    "nfe_per_image",
    "sample_images",
    "save_image_grid",
    "save_trajectory_strip",
]

#: Images decoded together by :func:`sample_images` (each chunk counts its own evaluations).
SAMPLE_CHUNK = 256


@torch.no_grad()
def sample_images(
    flow: Flow,
    n: int,
    *,
    seed: int = 0,
    solver: str = "rk4",
    steps: int = 16,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    chunk: int = SAMPLE_CHUNK,
) -> tuple[Tensor, int]:
    """``n`` images decoded from seeded noise in chunks.

    Arguments:
        flow: the trained flow; its device and dtype are used.
        n: number of images.
        seed: seeds the noise ``z ~ N(0, I)`` (drawn on the CPU, so the same on every device).
        solver, steps, atol, rtol: the decoding ODE solver (steps per block).
        chunk: images per decoding call.

    Returns:
        ``(images (n, *event_shape) on the CPU, velocity evaluations used over all chunks)``.
    """
    check_positive(n, "n", integer=True)
    check_positive(chunk, "chunk", integer=True)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *flow.event_shape), generator=gen)
    spec = SolverSpec(solver, steps, atol, rtol)
    dev, dt = flow.shift.device, flow.shift.dtype
    with flow.count_nfe() as c:
        out = [flow.decode(zc.to(dev, dt), solver=spec).cpu() for zc in z.split(chunk)]
    return torch.cat(out), c.nfe


def nfe_per_image(nfe: int, n: int, chunk: int = SAMPLE_CHUNK) -> int:
    """Velocity evaluations per image of :func:`sample_images` (each chunk counts its own).

    Example:
        >>> nfe_per_image(64, 1000)  # four chunks of 256 images, 16 evaluations each
        16
    """
    return int(round(nfe / -(-n // chunk)))


def clip_to_range(x: Tensor, quantization: Quantization) -> Tensor:
    """Clamp images to the data range ``[low, high]`` (how they would be displayed or saved)."""
    return x.clamp(quantization.low, quantization.high)


def save_image_grid(
    images: Tensor,
    path: str | Path,
    quantization: Quantization,
    *,
    nrow: int = 8,
    title: str | None = None,
) -> Path:
    """A PNG grid of ``(n, C, H, W)`` images in the data set's range (``plot_image_grid``).

    Returns:
        The path written.
    """
    return plot_image_grid(
        images.detach().cpu(),
        path,
        nrow=nrow,
        value_range=(quantization.low, quantization.high),
        title=title,
    )


@torch.no_grad()
def save_trajectory_strip(
    flow: Flow,
    path: str | Path,
    quantization: Quantization,
    *,
    n: int = 8,
    n_time: int = 9,
    seed: int = 0,
    solver: str = "rk4",
    steps: int = 16,
    title: str | None = None,
) -> Path:
    """Noise-to-image paths as a PNG: one row per sample, ``n_time`` columns from noise (left) to
    image (right).

    Returns:
        The path written.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *flow.event_shape), generator=gen).to(flow.shift.device, flow.shift.dtype)
    traj = flow.trajectory(z, direction="decode", solver=solver, steps=steps).cpu()
    return plot_image_trajectory(
        traj,  # (T+1, n, C, H, W)
        path,
        n_show=n,
        n_time=n_time,
        value_range=(quantization.low, quantization.high),
        title=title,
    )
