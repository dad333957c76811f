"""The image data set: discrete pixels, uniformly dequantized and scaled to a continuous range.

Preprocessing (Theis, van den Oord, Bethge, arXiv 1511.01844; Dinh et al., arXiv 1605.08803): an
image ``x`` with integer pixels in ``{0, ..., K-1}`` (``K`` = ``levels``) becomes

.. math::
    s = \\mathrm{low} + (\\mathrm{high} - \\mathrm{low})\\, \\frac{x + u}{K}, \\qquad
    u \\sim U[0, 1)^D,

a point of ``[low, high)^D`` (default ``[0, 1)``; :class:`Quantization`). The continuous model is
fitted to ``s``; bits per dimension (:func:`iterflow.evaluation.bits_per_dim.bits_per_dim`) undo
the scaling with its log-Jacobian. The trainer takes fixed split tensors, so each split is
dequantized once with a noise seeded from the run's seed (:meth:`ImageDataset.sample` draws fresh
noise).

Labels, when the source has them, are kept: :attr:`ImageDataset.labels` and
:meth:`ImageDataset.label_splits` (rows aligned with :meth:`ImageDataset.splits`). The sources that
build an :class:`ImageDataset` are in :mod:`iterflow.data.image_files` (files and folders) and
:mod:`iterflow.data.image_sets` (the built-in sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iterflow.data.base import (
    Dataset,
    Splits,
    check_seed,
    check_split_sizes,
    child_seeds,
    seeded_generator,
)
from iterflow.errors import check_positive, fail

__all__ = ["ImageDataset", "Quantization"]


# ------------------------------------------------------------------------------------------------
# quantization
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    """Discrete pixels ``{0..levels-1}`` <-> continuous values in ``[low, high)``.

    ``s = low + step * (x + u)`` with ``step = (high - low) / levels`` and ``u ~ U[0, 1)``; the map
    ``y = x + u -> s`` has Jacobian ``step`` per dimension, so ``log |ds/dy| = D log(step)``.

    Attributes:
        levels: number of discrete values ``K`` (256 for 8-bit images, 17 for sklearn digits).
        low, high: the continuous range.
    """

    levels: int = 256
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_positive(self.levels, "levels", integer=True)
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            fail("value_range", "must be finite (low, high) with low < high", (self.low, self.high))

    @property
    def step(self) -> float:
        """Width ``(high - low) / levels`` of one grey level in continuous units."""
        return (self.high - self.low) / self.levels

    def log_jacobian(self, dim: int) -> float:
        """``log |det ds/dy| = D log(step)`` for ``D = dim`` pixels (``y`` in ``[0, K)^D``)."""
        return dim * math.log(self.step)

    def dequantize(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``low + step (x + u)``, ``u ~ U[0,1)``; ``generator=None``: ``u = 1/2``."""
        xf = x.to(torch.float32)  # exact for integers below 2^24
        if generator is None:
            u = torch.full_like(xf, 0.5)
        else:
            u = torch.rand(xf.shape, generator=generator, dtype=torch.float32)
        return xf.add_(u).mul_(self.step).add_(self.low)

    def quantize(self, s: torch.Tensor) -> torch.Tensor:
        """Continuous values -> pixels ``floor((s - low) / step)`` clipped to ``[0, K-1]``."""
        return (
            ((s.double() - self.low) / self.step).floor().clamp(0, self.levels - 1).to(torch.int64)
        )

    def to_json(self) -> dict[str, Any]:
        return {"levels": self.levels, "low": self.low, "high": self.high}


# ------------------------------------------------------------------------------------------------
# the data set
# ------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """A finite set of discrete images, served dequantized and scaled (``finite``; no density).

    Arguments:
        images: ``(n, C, H, W)`` integer pixels in ``[0, levels)``.
        name: data set name.
        source: where the images came from.
        labels: ``(n,)`` integer class labels, or ``None``.
        levels: number of grey levels ``K``.
        value_range: ``(low, high)`` continuous range.
        test_images, test_labels: an official test set (used for the ``test`` split), or ``None``.
        class_names: names of the classes (optional).

    Attributes:
        event_shape: ``(C, H, W)``; dim: ``C * H * W``; quantization: the :class:`Quantization`.
    """

    finite = True
    has_log_prob = False

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        name: str,
        source: str,
        *,
        labels: np.ndarray | torch.Tensor | None = None,
        levels: int = 256,
        value_range: tuple[float, float] = (0.0, 1.0),
        test_images: np.ndarray | torch.Tensor | None = None,
        test_labels: np.ndarray | torch.Tensor | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.quantization = Quantization(levels, float(value_range[0]), float(value_range[1]))
        self.images = _check_pixels(images, name, levels)
        self.labels = _check_labels(labels, self.images.shape[0], name)
        self.test_images = None if test_images is None else _check_pixels(test_images, name, levels)
        self.test_labels = None
        if self.test_images is not None:
            if tuple(self.test_images.shape[1:]) != tuple(self.images.shape[1:]):
                fail(
                    name,
                    f"test images must have the shape {tuple(self.images.shape[1:])} of the "
                    "training images",
                    tuple(self.test_images.shape[1:]),
                )
            self.test_labels = _check_labels(test_labels, self.test_images.shape[0], name)
        self.name, self.source, self.class_names = name, source, class_names
        self.event_shape = tuple(int(s) for s in self.images.shape[1:])
        self.dim = math.prod(self.event_shape)

    @property
    def n_rows(self) -> int:
        """Number of training-pool images (the official test set excluded)."""
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (``max label + 1``), 0 without labels."""
        if self.labels is None:
            return 0
        top = int(self.labels.max())
        if self.test_labels is not None:
            top = max(top, int(self.test_labels.max()))
        return top + 1

    # -- splits ----------------------------------------------------------------------------------
    def _split_rows(
        self, n_train: int, n_val: int, n_test: int, seed: int
    ) -> dict[str, torch.Tensor]:
        """Row indices of each split (``test`` indexes ``test_images`` when there is one)."""
        n_train, n_val, n_test = check_split_sizes(n_train, n_val, n_test)
        order = torch.randperm(self.n_rows, generator=seeded_generator(check_seed(seed)))
        tenth = max(1, round(0.1 * self.n_rows))
        k_val = min(n_val, tenth)
        if self.test_images is not None:
            test = torch.arange(min(n_test, self.test_images.shape[0]))
            k_test = 0
        else:
            k_test = min(n_test, tenth)
            test = order[:k_test]
        val = order[k_test : k_test + k_val]
        k_train = min(n_train, self.n_rows - k_test - k_val)
        train = order[k_test + k_val : k_test + k_val + k_train]
        return {"train": train, "val": val, "test": test}

    def _pixels(self, part: str, rows: torch.Tensor) -> torch.Tensor:
        if part == "test" and self.test_images is not None:
            return self.test_images[rows]
        return self.images[rows]

    def splits(
        self, n_train: int, n_val: int, n_test: int, seed: int, *, dequantize: bool = True
    ) -> Splits:
        """Disjoint train/val/test images, dequantized and scaled, ``(n_split, C, H, W)`` float32.

        Rows are shuffled with ``seed``; ``val`` (and ``test`` when the source has no official test
        set) take about 10% of the images each, at most ``n_val`` / ``n_test``; ``train`` the rest,
        at most ``n_train``. Each split's dequantization noise comes from an independent child of
        ``seed``; ``dequantize=False`` gives the centres of the grey-level cells instead
        (``u = 1/2``).
        """
        rows = self._split_rows(n_train, n_val, n_test, seed)
        seeds = child_seeds(check_seed(seed) + 1, 3)
        out = []
        for (part, idx), s in zip(rows.items(), seeds, strict=True):
            gen = seeded_generator(s) if dequantize else None
            out.append(self.quantization.dequantize(self._pixels(part, idx), gen))
        return Splits(*out)

    def label_splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """Class labels ``(n_split,)`` int64 aligned with the rows of :meth:`splits`.

        Raises:
            InputError: the data set has no labels.
        """
        if self.labels is None:
            fail("data", "must have class labels for this use", self.name)
        rows = self._split_rows(n_train, n_val, n_test, seed)
        test_labels = self.test_labels if self.test_images is not None else self.labels
        if test_labels is None:
            fail("data", "must have labels for its test images", self.name)
        return Splits(
            self.labels[rows["train"]], self.labels[rows["val"]], test_labels[rows["test"]]
        )

    def describe(self) -> dict[str, Any]:
        """Name, dim, event shape, finite, source, sizes, quantization and classes."""
        return {
            "name": self.name,
            "dim": self.dim,
            "event_shape": list(self.event_shape),
            "finite": True,
            "source": self.source,
            "has_log_prob": False,
            "n_rows": self.n_rows,
            "n_test_rows": 0 if self.test_images is None else int(self.test_images.shape[0]),
            "dequantization": "uniform",
            **self.quantization.to_json(),
            "num_classes": self.num_classes,
        }

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, self.n_rows, (n,), generator=generator)
        return self.quantization.dequantize(self.images[rows], generator)

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an image data set has no known density")

    def _exact_entropy(self) -> float | None:
        return None

    def _check_points(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            fail("x", "must be a torch.Tensor", type(x).__name__)
        if not x.is_floating_point():
            fail("x", "must be a floating-point tensor", str(x.dtype))
        if tuple(x.shape[1:]) != self.event_shape or x.dim() != 4:
            fail(
                "x",
                f"must have shape (n, {', '.join(map(str, self.event_shape))}) for data set "
                f"{self.name!r}",
                tuple(x.shape),
            )


def _check_pixels(images: np.ndarray | torch.Tensor, argument: str, levels: int) -> torch.Tensor:
    """Validate ``(n, C, H, W)`` integer pixels in ``[0, levels)``; return them as uint8/int16."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] < 3 or min(arr.shape[1:]) < 1:
        fail(argument, "must hold at least 3 images of shape (C, H, W)", tuple(arr.shape))
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        fail(argument, "must hold numeric pixel values", str(arr.dtype))
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            fail(
                argument,
                f"must hold integer pixel values 0..{levels - 1} (discrete images; "
                "uint8 for 8-bit)",
                "non-integer values",
            )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= levels:
        fail(argument, f"must hold pixel values in 0..{levels - 1}", f"range {lo}..{hi}")
    dtype = np.uint8 if levels <= 256 else np.int32
    return torch.from_numpy(np.ascontiguousarray(arr.astype(dtype)))


def _check_labels(
    labels: np.ndarray | torch.Tensor | None, n: int, argument: str
) -> torch.Tensor | None:
    if labels is None:
        return None
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or (n and int(arr.min()) < 0):
        fail(
            argument,
            f"labels must be {n} non-negative integers, one per image",
            f"shape {arr.shape}, dtype {arr.dtype}",
        )
    return torch.from_numpy(arr.astype(np.int64))
