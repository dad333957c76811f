"""Sample-based metrics for generative models: discrepancies, precision/recall, entropy, bits/dim.

Every function takes point clouds as tensors of shape ``(n, ...)``; trailing dimensions are
flattened, so ``(n, C, H, W)`` images are points in ``R^(C*H*W)``. A 1-D tensor ``(n,)`` is ``n``
points in ``R^1``. NumPy arrays are accepted too. Inputs are validated (at least two points,
matching flattened dimension, finite values, same device) and failures raise
:class:`~iterflow.errors.InputError` naming the argument (``"x"``, ``"y"``, ...).

Heavy pairwise computations (MMD, nearest neighbours) run in row/column chunks on the inputs'
device, so ``10_000 x 10_000`` point pairs never need an ``n x m`` matrix in memory at once.
Scalars are returned as Python floats; sums are accumulated in float64.

The metrics live in one module per concept and are all exported here:

- :mod:`iterflow.metrics.kernel`: the kernel two-sample discrepancy (:func:`mmd`,
  :func:`median_heuristic`);
- :mod:`iterflow.metrics.wasserstein`: :func:`w2` (exact, network simplex) and :func:`sliced_w2`;
- :mod:`iterflow.metrics.gaussian`: Gaussian fits (:func:`frechet_distance`,
  :func:`gaussian_kl_to_standard`);
- :mod:`iterflow.metrics.neighbors`: nearest neighbours (:func:`knn`,
  :func:`nearest_neighbor_distance`) and k-NN entropy / KL estimates;
- :mod:`iterflow.metrics.prdc`: :func:`precision_recall_density_coverage`;
- :mod:`iterflow.metrics.likelihood`: :func:`bits_per_dim`;
- :mod:`iterflow.metrics.clouds`: the shared input validation and chunked pairwise distances.

References:
    Gretton et al., "A Kernel Two-Sample Test", JMLR 2012.
    Peyré & Cuturi, "Computational Optimal Transport", arXiv:1803.00567.
    Bonneel et al., "Sliced and Radon Wasserstein Barycenters of Measures", JMIV 2015.
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule ...", arXiv:1706.08500 (FID).
    Kozachenko & Leonenko, "Sample estimate of the entropy of a random vector", 1987;
    Kraskov, Stögbauer & Grassberger, "Estimating mutual information", arXiv:cond-mat/0305641.
    Kynkäänniemi et al., "Improved Precision and Recall Metric ...", arXiv:1904.06991;
    Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models", arXiv:2002.09797.
"""

from __future__ import annotations

from iterflow.metrics.gaussian import frechet_distance, gaussian_kl_to_standard
from iterflow.metrics.kernel import DEFAULT_MMD_SCALES, median_heuristic, mmd
from iterflow.metrics.likelihood import bits_per_dim
from iterflow.metrics.neighbors import (
    kl_to_standard_normal,
    knn,
    knn_entropy,
    nearest_neighbor_distance,
)
from iterflow.metrics.prdc import PRDC_KEYS, precision_recall_density_coverage
from iterflow.metrics.wasserstein import sliced_w2, w2

__all__ = [
    "DEFAULT_MMD_SCALES",
    "PRDC_KEYS",
    "bits_per_dim",
    "frechet_distance",
    "gaussian_kl_to_standard",
    "kl_to_standard_normal",
    "knn",
    "knn_entropy",
    "median_heuristic",
    "mmd",
    "nearest_neighbor_distance",
    "precision_recall_density_coverage",
    "sliced_w2",
    "w2",
]
