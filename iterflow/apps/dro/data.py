"""Labelled data sets for classifier risks (two moons, two circles, scikit-learn's 8x8 digits) and
the checks of points and labels shared by the worst-case sampler's functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iterflow.errors import check_finite, check_positive, fail

LABELLED_SETS = ("moons", "circles", "sklearn:digits")


@dataclass(frozen=True)
class LabelledData:
    """Labelled train/test points.

    Attributes:
        name: data set name.
        train_x, test_x: ``(n, d)`` float32 points; train_y, test_y: ``(n,)`` int64 labels.
        classes: number of classes.
        image_shape: ``(C, H, W)`` when a point is a flattened image, else ``None``.
        pixel_shift, pixel_scale: ``pixels = x * pixel_scale + pixel_shift`` (standardised images).
        pixel_range: ``(low, high)`` of the pixel values.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: int
    image_shape: tuple[int, ...] | None = None
    pixel_shift: Tensor | None = None
    pixel_scale: Tensor | None = None
    pixel_range: tuple[float, float] = (0.0, 1.0)

    def to_pixels(self, x: Tensor) -> Tensor:
        """Standardised flattened images ``(n, d)`` -> images ``(n, C, H, W)`` in pixel units."""
        if self.image_shape is None or self.pixel_shift is None or self.pixel_scale is None:
            fail("data", "has no image shape", self.name)
        px = x * self.pixel_scale.to(x) + self.pixel_shift.to(x)
        return px.reshape(x.shape[0], *self.image_shape)


def _as_labelled(
    name: str, x: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int, **extra: Any
) -> LabelledData:
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    order = torch.randperm(xt.shape[0], generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test : n_test + n_train]
    return LabelledData(name, xt[train], yt[train], xt[test], yt[test], int(yt.max()) + 1, **extra)


def labelled_data(
    name: str, n_train: int = 1000, n_test: int = 1000, seed: int = 0
) -> LabelledData:
    """A labelled data set for classifier risks.

    * ``moons``: scikit-learn ``make_moons(noise=0.15)`` (2 classes, 2-D);
    * ``circles``: ``make_circles(factor=0.5, noise=0.08)`` (2 classes, 2-D);
    * ``sklearn:digits``: the bundled 8x8 digits (1,797 images, 10 classes, 64-d), standardised per
      pixel with the training rows' mean and standard deviation (floored at 1); at most 20% of the
      rows are held out as the test split.

    Arguments:
        name: one of :data:`LABELLED_SETS`.
        n_train, n_test: split sizes (caps for digits).
        seed: seeds the generated points (``random_state``) and the shuffle.
    """
    check_positive(n_train, "n_train", integer=True)
    check_positive(n_test, "n_test", integer=True)
    check_positive(seed, "seed", integer=True, allow_zero=True)
    import sklearn.datasets as skd

    if name == "moons":
        x, y = skd.make_moons(n_train + n_test, noise=0.15, random_state=seed)
        return _as_labelled(name, x, y, n_train, n_test, seed)
    if name == "circles":
        x, y = skd.make_circles(n_train + n_test, factor=0.5, noise=0.08, random_state=seed)
        return _as_labelled(name, x, y, n_train, n_test, seed)
    if name == "sklearn:digits":
        x, y = skd.load_digits(return_X_y=True)
        n_test = min(n_test, int(0.2 * len(x)))
        raw = _as_labelled(name, x, y, n_train, n_test, seed)
        shift = raw.train_x.mean(0)
        scale = raw.train_x.std(0).clamp_min(1.0)  # constant border pixels stay at 0
        return LabelledData(
            name,
            (raw.train_x - shift) / scale,
            raw.train_y,
            (raw.test_x - shift) / scale,
            raw.test_y,
            raw.classes,
            (1, 8, 8),
            shift,
            scale,
            (0.0, 16.0),
        )
    fail("name", f"must be one of {list(LABELLED_SETS)} for a classifier risk", name)


def check_points(x: Any, argument: str) -> None:
    """Fail unless ``x`` is a finite floating ``(n, d)`` tensor with ``n >= 1``."""
    if not isinstance(x, Tensor):
        fail(argument, "must be a torch.Tensor", type(x).__name__)
    if x.ndim != 2 or x.shape[0] < 1 or not x.is_floating_point():
        fail(
            argument, "must be a floating (n, d) tensor with n >= 1", (tuple(x.shape), str(x.dtype))
        )
    check_finite(x, argument)


def check_labels(x: Tensor, labels: Any, argument: str = "labels") -> None:
    """Fail unless ``labels`` is an integer ``(n,)`` tensor, one label per row of ``x``."""
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        fail(argument, "must be an integer tensor", getattr(labels, "dtype", type(labels).__name__))
    if tuple(labels.shape) != (x.shape[0],):
        fail(argument, f"must have shape ({x.shape[0]},), one label per point", tuple(labels.shape))


def check_label_range(labels: Tensor, k: int, rule: str) -> None:
    """Fail unless every label lies in ``[0, k)``; ``rule`` is the message."""
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= k:
            fail("labels", rule, (lo, hi))
