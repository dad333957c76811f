"""Image-defined 2-D densities: a picture as a mixture of one small Gaussian per pixel.

The definition is that of the JKO-flow and local flow matching benchmarks (Xu, Cheng, Xie;
``/work/shared/data/img2d/README.md``): rotate the PNG by 180 degrees, mirror it left-right, convert
to 8-bit grayscale :math:`A` (``h`` rows, ``w`` columns); pixel weights :math:`W = \\max A - A`
normalised to 1; pixel :math:`(i, j)` is centred at :math:`(x_j, y_i)` with
``x = linspace(-4, 4, w)``, ``y = linspace(-4, 4, h)``; the density is
:math:`p(x, y) = \\sum_{ij} W_{ij}\\, \\mathcal N(x; x_j, s_x^2)\\, \\mathcal N(y; y_i, s_y^2)` with
:math:`s_x = 4/w`, :math:`s_y = 4/h`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iterflow.data.base import Dataset, GeneratedDataset, sample_categorical
from iterflow.errors import check_positive, fail

_F64 = torch.float64
_ENV_DIR = "ITERFLOW_IMG2D_DIR"
_RELATIVE_DIR = Path("..") / "shared" / "data" / "img2d"
_BRUTE_CHUNK = 2**22  # (points x pixels) entries per chunk of the exact fallback
_WINDOW_CHUNK = 2**15  # points per chunk of the windowed sum


def read_image_weights(path: str | Path) -> np.ndarray:
    """Pixel weights :math:`W` of a PNG, ``(h, w)`` float64 summing to 1 (README steps 1-2).

    Raises:
        InputError: unreadable image, fewer than 2 pixels per side, or a constant image.
    """
    from PIL import Image, UnidentifiedImageError

    argument = str(path)
    try:
        with Image.open(path) as img:
            img = img.rotate(180).transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L")
            a = np.asarray(img, dtype=np.float64)  # (h, w)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        fail(argument, "must be a readable PNG image", str(err))
    if a.ndim != 2 or min(a.shape) < 2:
        fail(argument, "must be an image of at least 2 x 2 pixels", tuple(a.shape))
    w = a.max() - a
    if w.sum() <= 0:
        fail(
            argument,
            "must not be a constant image (dark pixels carry the mass)",
            "all pixels equal",
        )
    return w / w.sum()


class ImageDensity(GeneratedDataset):
    """The pixel mixture of Gaussians defined by a grayscale or colour PNG (see module docstring).

    ``log_prob`` is exact: the sum runs over the :math:`(2r+1)^2` pixels around the nearest
    pixel (``radius`` :math:`r`, vectorised over points and offsets); every pixel outside that
    window is at least :math:`(r + 1/2)` pixel spacings (about :math:`2r + 1` standard
    deviations) away, so its share is below :math:`e^{-(2r+1)^2/2}` of the mixture's peak height.
    Points whose window sum is not at least :math:`e^{36}` times that bound (far from any dark
    pixel) are summed over all pixels instead, so the result is the exact mixture everywhere, to
    float64 rounding.

    Args:
        path: the PNG file.
        name: data set name (default: the file's stem).
        radius: half-width :math:`r` of the pixel window.

    References:
        Xu, Cheng, Xie, "Normalizing flow neural networks by JKO scheme", NeurIPS 2023,
        arXiv:2212.14424; "Local flow matching generative models", arXiv:2410.02548.
    """

    has_log_prob = True

    def __init__(self, path: str | Path, name: str | None = None, radius: int = 6) -> None:
        check_positive(radius, "radius", integer=True)
        self.path = Path(path)
        if not self.path.is_file():
            fail("path", "must be an existing PNG file", str(path))
        self.name, self.dim, self.radius = name or self.path.stem, 2, int(radius)
        weights = torch.from_numpy(read_image_weights(self.path))  # (h, w)
        self.height, self.width = weights.shape
        self.log_weights = torch.log(weights)  # (h, w), -inf on white pixels
        self.xs = torch.linspace(-4.0, 4.0, self.width, dtype=_F64)
        self.ys = torch.linspace(-4.0, 4.0, self.height, dtype=_F64)
        self.std = torch.tensor([4.0 / self.width, 4.0 / self.height], dtype=_F64)  # (s_x, s_y)
        flat = weights.reshape(-1)
        self._support = flat.nonzero()[:, 0]  # (P,) flat indices of pixels with mass
        self._support_weights = flat[self._support]  # (P,)

    @property
    def step(self) -> torch.Tensor:
        """Pixel spacing ``(dx, dy) = (8 / (w - 1), 8 / (h - 1))``."""
        return torch.tensor([8.0 / (self.width - 1), 8.0 / (self.height - 1)], dtype=_F64)

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        flat = self._support[sample_categorical(self._support_weights, n, generator)]
        centre = torch.stack([self.xs[flat % self.width], self.ys[flat // self.width]], dim=1)
        return centre + self.std * torch.randn(n, 2, generator=generator, dtype=_F64)

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        pts = x.to("cpu", _F64)
        out = torch.cat([self._window_log_density(b) for b in pts.split(_WINDOW_CHUNK)])
        far = out < self._far_threshold()
        if bool(far.any()):
            out = out.clone()
            out[far] = self._brute_log_density(pts[far])
        return out.to(x.device)

    def _log_norm(self) -> float:
        """:math:`-\\log(2\\pi s_x s_y)`, the log height of one unit-weight pixel Gaussian."""
        return -math.log(2 * math.pi * float(self.std.prod()))

    def _far_threshold(self) -> float:
        """Window sums below this may miss more than :math:`e^{-36}` relatively: sum all pixels."""
        gap = (self.radius + 0.5) * float((self.step / self.std).min())
        return self._log_norm() - 0.5 * gap**2 + 36.0

    def _window_log_density(self, pts: torch.Tensor) -> torch.Tensor:
        """Log of the mixture restricted to the pixels within ``radius`` of each point's nearest."""
        r = self.radius
        offsets = torch.arange(-r, r + 1)
        nearest = torch.round((pts + 4.0) / self.step).long()  # (n, 2) as (column, row)
        cols = nearest[:, 0].clamp(0, self.width - 1)[:, None] + offsets  # (n, 2r+1)
        rows = nearest[:, 1].clamp(0, self.height - 1)[:, None] + offsets  # (n, 2r+1)
        col_ok = (cols >= 0) & (cols < self.width)
        row_ok = (rows >= 0) & (rows < self.height)
        cols, rows = cols.clamp(0, self.width - 1), rows.clamp(0, self.height - 1)
        log_gx = self._log_gauss_1d(pts[:, 0:1], self.xs[cols], self.std[0])  # (n, 2r+1)
        log_gy = self._log_gauss_1d(pts[:, 1:2], self.ys[rows], self.std[1])  # (n, 2r+1)
        log_gx = log_gx.masked_fill(~col_ok, -math.inf)
        log_gy = log_gy.masked_fill(~row_ok, -math.inf)
        log_w = self.log_weights[rows[:, :, None], cols[:, None, :]]  # (n, rows, cols)
        terms = log_w + log_gy[:, :, None] + log_gx[:, None, :]
        return torch.logsumexp(terms.flatten(1), dim=1)  # (n,)

    def _brute_log_density(self, pts: torch.Tensor) -> torch.Tensor:
        """Exact log density by a log-sum-exp over every pixel with mass, in chunks of points."""
        rows, cols = self._support // self.width, self._support % self.width
        log_w = self.log_weights.reshape(-1)[self._support]  # (P,)
        chunk = max(1, _BRUTE_CHUNK // max(1, self._support.numel()))
        parts = []
        for batch in pts.split(chunk):
            log_gx = self._log_gauss_1d(batch[:, 0:1], self.xs[cols][None], self.std[0])
            log_gy = self._log_gauss_1d(batch[:, 1:2], self.ys[rows][None], self.std[1])
            parts.append(torch.logsumexp(log_w + log_gx + log_gy, dim=1))
        return torch.cat(parts)

    @staticmethod
    def _log_gauss_1d(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """:math:`\\log \\mathcal N(x; \\text{mean}, \\text{std}^2)`, broadcast."""
        return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)

    def _exact_entropy(self) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Name, dim, finite, source (the PNG path), has_log_prob and the image size."""
        info = super().describe()
        info.update(source=str(self.path.resolve()), width=int(self.width), height=int(self.height))
        return info


def img2d_candidates() -> list[Path]:
    """Folders searched for the benchmark PNGs, in order (see :func:`resolve_img2d_dir`)."""
    out = [Path(os.environ[_ENV_DIR]).expanduser()] if os.environ.get(_ENV_DIR) else []
    repo_root = Path(__file__).resolve().parents[2]  # iterflow/data/image2d.py -> repository
    return out + [Path.cwd() / _RELATIVE_DIR, repo_root / _RELATIVE_DIR]


def resolve_img2d_dir(img2d_dir: str | Path | None = None) -> Path:
    """The folder holding ``img_rose.png`` and ``img_tree.png``.

    Args:
        img2d_dir: explicit folder; default: ``$ITERFLOW_IMG2D_DIR``, else ``../shared/data/img2d``
            relative to the working directory, else relative to the repository root (first that
            exists).

    Raises:
        InputError: the explicit folder, or every default candidate, does not exist.
    """
    if img2d_dir is not None:
        folder = Path(img2d_dir).expanduser()
        if not folder.is_dir():
            fail(
                "img2d_dir",
                "must be an existing folder holding the img2d PNG files",
                str(img2d_dir),
            )
        return folder
    tried = img2d_candidates()
    for folder in tried:
        if folder.is_dir():
            return folder
    looked = [str(p.resolve()) for p in tried]
    fail(
        "img2d_dir",
        f"no img2d folder found; set {_ENV_DIR} or pass img2d_dir (looked in {looked})",
        None,
    )


def image_factory(name: str, file_name: str) -> Callable[..., Dataset]:
    """Registry factory building the named benchmark image density from ``img2d_dir``."""

    def factory(img2d_dir: str | Path | None = None) -> Dataset:
        path = resolve_img2d_dir(img2d_dir) / file_name
        if not path.is_file():
            fail("img2d_dir", f"must contain {file_name} for data set {name!r}", str(path.parent))
        return ImageDensity(path, name=name)

    factory.__name__ = f"{name}_image"
    return factory
