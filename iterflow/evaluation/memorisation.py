"""Memorisation check: how close a model's samples come to its training images.

A model that copies its training set produces samples at (near) zero distance from some training
image; one that generalises keeps them about as far as held-out test images are. The distances are
per-pixel RMS, ``|a - b| / sqrt(D)``, so they read in the data's own units whatever the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from iterflow.metrics import knn, nearest_neighbor_distance

__all__ = ["NearestTrainDistance", "nearest_train_distance"]


@dataclass(frozen=True)
class NearestTrainDistance:
    """Distances (per-pixel RMS, ``|a - b| / sqrt(D)``) to the nearest training image.

    Attributes:
        samples_mean, samples_min: over the model's samples.
        test_mean: the same statistic for held-out test images (the reference; ``nan`` if none).
        ratio: ``samples_mean / test_mean``: near 1 for a model that generalises, near 0 for one
            that copies training images.
        nearest: ``(n,)`` index of the nearest training image of each sample.
    """

    samples_mean: float
    samples_min: float
    test_mean: float
    ratio: float
    nearest: Tensor

    def to_json(self) -> dict[str, float]:
        """The scalar fields (``nearest`` left out)."""
        return {
            "samples_mean": self.samples_mean,
            "samples_min": self.samples_min,
            "test_mean": self.test_mean,
            "ratio": self.ratio,
        }


def nearest_train_distance(
    samples: Tensor, train: Tensor, test: Tensor | None = None
) -> NearestTrainDistance:
    """Nearest-training-image distances of ``samples`` (and of ``test`` as the reference).

    Arguments:
        samples: ``(n, C, H, W)`` generated images.
        train: ``(m, C, H, W)`` training images.
        test: held-out images ``(k, C, H, W)``, or ``None``.

    Returns:
        :class:`NearestTrainDistance`.

    Example:
        >>> import torch
        >>> train = torch.rand(20, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> nearest_train_distance(train[:5], train).nearest.tolist()  # copies find themselves
        [0, 1, 2, 3, 4]
    """
    d = math.sqrt(math.prod(samples.shape[1:]))
    s = samples.flatten(1).float()
    r = train.flatten(1).float().to(s.device)
    idx, dist = knn(s, r, k=1, chunk=1024, exclude_self=False)
    dist = dist[:, 0] / d
    test_mean = math.nan
    if test is not None and test.shape[0] > 0:
        test_mean = float(
            nearest_neighbor_distance(test.flatten(1).float().to(s.device), r).mean() / d
        )
    mean = float(dist.mean())
    return NearestTrainDistance(
        mean, float(dist.min()), test_mean, mean / test_mean, idx[:, 0].cpu()
    )
