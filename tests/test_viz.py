"""Every plot writes a non-empty PNG that PIL opens, with the expected width/height order."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iterflow import viz
from iterflow.errors import InputError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _size(path: Path) -> tuple[int, int]:
    """(width, height) of a valid, non-empty PNG."""
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * (x**2).sum(1) - math.log(2 * math.pi)


def test_plot_samples(tmp_path: Path) -> None:
    data = torch.randn(2000, 2, generator=_gen(1))
    samples = np.random.default_rng(0).normal(size=(1500, 2)) * 1.2
    samples[0] = np.nan  # dropped, noted in the panel title
    out = viz.plot_samples(data, samples, tmp_path / "sub" / "samples.png", title="two moons")
    assert out == tmp_path / "sub" / "samples.png"
    w, h = _size(out)
    assert w > h  # two panels side by side


def test_plot_density_with_truth(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1).double()  # dtype/device of the grid follow the module

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float64
        return _std_normal_log_prob(x) + 0.0 * model(x)[:, 0]

    log_prob.__self__ = model  # type: ignore[attr-defined]  # mimic a bound method
    out = viz.plot_density(
        log_prob, tmp_path / "density.png", resolution=60, true_log_prob_fn=_std_normal_log_prob
    )
    w, h = _size(out)
    assert w > h
    w1, h1 = _size(viz.plot_density(_std_normal_log_prob, tmp_path / "one.png", resolution=40))
    assert w1 < w


def test_plot_field(tmp_path: Path) -> None:
    out = viz.plot_field(
        lambda x: x[:, 0] - 0.5 * x[:, 1],
        tmp_path / "field.png",
        bounds=(-2, 2, -2, 2),
        resolution=50,
        title="log ratio",
        true_fn=lambda x: x[:, 0] - 0.4 * x[:, 1],
    )
    w, h = _size(out)
    assert w > h


def test_plot_trajectories(tmp_path: Path) -> None:
    x0 = torch.randn(500, 2, generator=_gen(2))
    t = torch.linspace(0, 1, 11)[:, None, None]
    traj = (1 - t) * x0 + t * (x0 * 0.3 + 2.0)  # (11, 500, 2)
    w, h = _size(viz.plot_trajectories(traj, tmp_path / "traj.png", n_show=100, title="paths"))
    assert abs(w - h) < 0.3 * w  # one square panel


def test_plot_blocks(tmp_path: Path) -> None:
    x = torch.randn(3000, 2, generator=_gen(3))
    stages = [x * (1 + k) + k for k in range(4)]
    out = viz.plot_blocks(stages, tmp_path / "blocks.png", titles=["data", "b1", "b2", "b3"])
    w, h = _size(out)
    assert w > 2 * h
    w7, h7 = _size(viz.plot_blocks(stages + stages[:3], tmp_path / "blocks7.png", max_points=200))
    assert h7 > h  # wraps to a second row


def test_plot_curves(tmp_path: Path) -> None:
    series = {
        "movement": [1.0, 0.5, 0.2, 0.1],
        "KL proxy": torch.tensor([2.0, 1.0, 0.3, 0.05]),
        "loss": np.linspace(3, 1, 200),
    }
    out = viz.plot_curves(series, tmp_path / "curves.png", xlabel="block", logy=True, title="c")
    w, h = _size(out)
    assert w > h


def test_plot_image_grid(tmp_path: Path) -> None:
    images = torch.rand(20, 1, 8, 8, generator=_gen(4)) * 2 - 1
    out = viz.plot_image_grid(images, tmp_path / "grid.png", nrow=10, value_range=(-1, 1))
    w, h = _size(out)
    assert w > h  # 10 per row, 2 rows
    rgb = np.random.default_rng(1).random((3, 3, 6, 6))
    w2, h2 = _size(viz.plot_image_grid(rgb, tmp_path / "rgb.png", nrow=1, title="rgb"))
    assert h2 > w2  # one per row


def test_plot_image_trajectory(tmp_path: Path) -> None:
    traj = torch.rand(21, 10, 3, 8, 8, generator=_gen(5))
    out = viz.plot_image_trajectory(traj, tmp_path / "img_traj.png", n_show=3, n_time=6)
    w, h = _size(out)
    assert w > h  # 6 time columns, 3 sample rows


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda p: viz.plot_samples(torch.zeros(5, 3), torch.zeros(5, 2), p), "data"),
        (
            lambda p: viz.plot_samples(
                torch.zeros(5, 2), torch.zeros(5, 2), p, bounds=(1, 0, 0, 1)
            ),
            "bounds",
        ),
        (lambda p: viz.plot_density(lambda x: x, p, resolution=10), "log_prob_fn"),
        (lambda p: viz.plot_trajectories(torch.zeros(1, 5, 2), p), "traj"),
        (lambda p: viz.plot_blocks([torch.zeros(4, 2)], p, titles=["a", "b"]), "titles"),
        (lambda p: viz.plot_curves({}, p, xlabel="step"), "series"),
        (lambda p: viz.plot_image_grid(torch.zeros(2, 2, 4, 4), p), "images"),
        (
            lambda p: viz.plot_image_grid(torch.zeros(2, 1, 4, 4), p, value_range=(1, 1)),
            "value_range",
        ),
    ],
)
def test_bad_inputs_raise_input_error(tmp_path: Path, call, argument: str) -> None:  # noqa: ANN001
    with pytest.raises(InputError) as info:
        call(tmp_path / "bad.png")
    assert info.value.argument == argument
    assert not (tmp_path / "bad.png").exists()
