"""The base classes and helpers every data set module shares (splits, seeding, :class:`Dataset`)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iterflow.errors import check_positive, fail


@dataclass(frozen=True)
class Splits:
    """Train, validation and test points of one data set, each ``(n_split, dim)`` float32 on CPU."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


@dataclass(frozen=True)
class EntropyEstimate:
    """Differential entropy :math:`H(p) = -E_p[\\log p(X)]` in nats.

    Attributes:
        value: the entropy (exact, or the Monte Carlo mean of :math:`-\\log p(x_i)`).
        stderr: standard error of the Monte Carlo mean (0 for a closed form).
        n_mc: number of Monte Carlo points (0 for a closed form).
        exact: True when ``value`` is a closed form.
    """

    value: float
    stderr: float
    n_mc: int
    exact: bool


def check_generator(generator: Any) -> torch.Generator:
    """Fail unless ``generator`` is a CPU :class:`torch.Generator`; return it."""
    if not isinstance(generator, torch.Generator):
        fail(
            "generator",
            "must be a torch.Generator (e.g. torch.Generator().manual_seed(0))",
            generator,
        )
    if generator.device.type != "cpu":
        fail("generator", "must be a CPU torch.Generator", str(generator.device))
    return generator


def check_seed(seed: Any, argument: str = "seed") -> int:
    """Fail unless ``seed`` is a non-negative integer; return it."""
    check_positive(seed, argument, integer=True, allow_zero=True)
    return int(seed)


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def child_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``seed`` (NumPy ``SeedSequence``)."""
    states = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)
    return [int(s) >> 1 for s in states]


def sample_categorical(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` i.i.d. indices drawn with probabilities proportional to ``weights`` (inverse CDF).

    Args:
        weights: ``(K,)`` non-negative weights with a positive sum (zero weights are never drawn).
        n: number of draws, ``>= 0``.
        generator: CPU generator.

    Returns:
        ``(n,)`` int64 tensor of indices in ``[0, K)``.
    """
    cdf = torch.cumsum(weights.to(torch.float64), 0)  # (K,)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1)


class Dataset(ABC):
    """A data distribution on :math:`\\mathbb{R}^d` that can be sampled and split.

    Attributes:
        name: short name (``"checkerboard"``, ``"rose"``, a file's stem, ``"sklearn:wine"``).
        dim: dimension :math:`d` of a point.
        finite: True for file/table-backed sets with a fixed number of rows.
        has_log_prob: True when :meth:`log_prob` returns the exact log density.
        num_classes: number of classes of a labelled set (0: no labels); see :meth:`label_splits`.
    """

    name: str
    dim: int
    finite: bool
    has_log_prob: bool

    @property
    def num_classes(self) -> int:
        """Number of classes of a labelled set (0: no labels)."""
        return 0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n`` i.i.d. points (finite sets: rows with replacement).

        Args:
            n: number of points, ``>= 0``.
            generator: CPU generator; the only source of randomness.

        Returns:
            ``(n, dim)`` float32 CPU tensor.
        """
        check_positive(n, "n", integer=True, allow_zero=True)
        out = self._draw(int(n), check_generator(generator))
        return out.to(dtype=torch.float32, device="cpu").contiguous()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor | None:
        """Exact log density :math:`\\log p(x_i)` of each row, or ``None`` when it is unknown.

        Args:
            x: ``(n, dim)`` floating tensor (any device; float32 or float64).

        Returns:
            ``(n,)`` tensor of x's dtype and device (``-inf`` outside the support), or ``None``.
        """
        self._check_points(x)
        if not self.has_log_prob:
            return None
        return self._log_density(x).to(dtype=x.dtype)

    def entropy(self, n_mc: int = 20000, seed: int = 0) -> float | None:
        """Differential entropy in nats: closed form where one exists, else Monte Carlo.

        The Monte Carlo estimate is :math:`-\\frac1{n}\\sum_i \\log p(x_i)` with
        :math:`x_i \\sim p` drawn from ``seed`` and the exact :meth:`log_prob` (in float64).

        Returns:
            The entropy, or ``None`` when the density is unknown.
        """
        est = self.entropy_estimate(n_mc, seed)
        return None if est is None else est.value

    def entropy_estimate(self, n_mc: int = 20000, seed: int = 0) -> EntropyEstimate | None:
        """Like :meth:`entropy`, with the Monte Carlo standard error; ``None`` without a density."""
        check_positive(n_mc, "n_mc", integer=True)
        seed = check_seed(seed)
        exact = self._exact_entropy()
        if exact is not None:
            return EntropyEstimate(float(exact), 0.0, 0, True)
        if not self.has_log_prob:
            return None
        x = self.sample(n_mc, seeded_generator(seed)).double()
        nll = -self._log_density(x).double()
        se = float(nll.std() / math.sqrt(n_mc)) if n_mc > 1 else float("nan")
        return EntropyEstimate(float(nll.mean()), se, int(n_mc), False)

    @abstractmethod
    def splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """Train/val/test tensors, deterministic in ``seed``."""

    def label_splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """Class labels ``(n_split,)`` int64 in ``[0, num_classes)``, row for row those of
        :meth:`splits` with the same arguments.

        Raises:
            InputError: (argument ``data``) a data set without labels.
        """
        fail("data", "must have class labels for this use (a labelled data set)", self.name)

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary: name, dim, finite, source, has_log_prob (and extras)."""

    @abstractmethod
    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, dim)`` points (any float dtype); arguments already validated."""

    @abstractmethod
    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        """``(n,)`` exact log density; only called when ``has_log_prob``."""

    @abstractmethod
    def _exact_entropy(self) -> float | None:
        """Closed-form entropy, or ``None`` to fall back on Monte Carlo."""

    def _check_points(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            fail("x", "must be a torch.Tensor", type(x).__name__)
        if not x.is_floating_point():
            fail("x", "must be a floating-point tensor", str(x.dtype))
        if x.dim() != 2 or x.shape[1] != self.dim:
            fail("x", f"must have shape (n, {self.dim}) for data set {self.name!r}", tuple(x.shape))


class GeneratedDataset(Dataset):
    """A distribution known through a sampler (and possibly a density): as many points as asked."""

    finite = False

    def splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """Three independent draws of sizes ``n_train``, ``n_val``, ``n_test``.

        The three generators are seeded with independent children of ``seed`` (NumPy
        ``SeedSequence``), so the same seed gives identical tensors.
        """
        sizes = check_split_sizes(n_train, n_val, n_test)
        seeds = child_seeds(check_seed(seed), 3)
        parts = [self.sample(n, seeded_generator(s)) for n, s in zip(sizes, seeds, strict=True)]
        return Splits(*parts)

    def label_splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """The class of each row of :meth:`splits` (the same draws, replayed with their labels)."""
        if self.num_classes == 0:
            return super().label_splits(n_train, n_val, n_test, seed)
        sizes = check_split_sizes(n_train, n_val, n_test)
        seeds = child_seeds(check_seed(seed), 3)
        parts = [
            self.draw_labelled(n, seeded_generator(s))[1].long()
            for n, s in zip(sizes, seeds, strict=True)
        ]
        return Splits(*parts)

    def draw_labelled(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, dim)`` points and their ``(n,)`` classes, drawn as :meth:`sample` draws them
        (labelled sets override it and draw their points through it)."""
        raise NotImplementedError(f"{self.name} has no class labels")

    def describe(self) -> dict[str, Any]:
        """Name, dim, finite, source (``"generator"``), has_log_prob (and num_classes when
        labelled)."""
        out = {
            "name": self.name,
            "dim": int(self.dim),
            "finite": False,
            "source": "generator",
            "has_log_prob": bool(self.has_log_prob),
        }
        if self.num_classes:
            out["num_classes"] = int(self.num_classes)
        return out


def check_split_sizes(n_train: int, n_val: int, n_test: int) -> tuple[int, int, int]:
    """Fail unless ``n_train > 0`` and ``n_val, n_test >= 0`` are integers."""
    check_positive(n_train, "n_train", integer=True)
    check_positive(n_val, "n_val", integer=True, allow_zero=True)
    check_positive(n_test, "n_test", integer=True, allow_zero=True)
    return int(n_train), int(n_val), int(n_test)
