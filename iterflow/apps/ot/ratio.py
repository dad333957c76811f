r"""Density ratios ``log q(x)/p(x)`` from samples: telescopic, one classifier, kernel densities.

Three estimators share one face, :class:`~iterflow.apps.ot.ratio_base.RatioEstimator`
(``log_ratio(x)``, ``save``, and :func:`load_ratio`), listed in :data:`ESTIMATORS`:

* :class:`~iterflow.apps.ot.telescopic.TelescopicRatio` (``fit_telescopic``): classifiers between
  *consecutive* members of a chain ``p = rho_0, rho_1, ..., rho_K = q`` whose intermediate members
  are particles of a flow that transports ``p`` to ``q`` (Rhodes, Xu & Gutmann 2020,
  arXiv 2006.12204; Choi, Meng & Ermon 2022, arXiv 2111.11010; Xu, Cheng & Xie, AISTATS 2025,
  arXiv 2305.11857).
* :class:`~iterflow.apps.ot.baselines.ClassifierRatio` (``fit_classifier``): one logistic
  classifier between ``p`` and ``q``.
* :class:`~iterflow.apps.ot.baselines.KDERatio` (``fit_kde``): the difference of two Gaussian kernel
  density estimates (scikit-learn ``KernelDensity``), bandwidths chosen by cross-validation.

**Logistic loss.** For densities ``f0`` (label 0) and ``f1`` (label 1) drawn in equal numbers,

.. math::
    \ell(\phi) = E_{f_0} \log(1 + e^{\phi(x)}) + E_{f_1} \log(1 + e^{-\phi(x)})

is minimised pointwise by ``phi*(x) = log f1(x)/f0(x)`` (Lemma V.1 of the Xie-Cheng tutorial;
:func:`iterflow.methods.classifier.logistic_loss`). Every classifier here is trained with it on the
one loop, so each logit *is* a log-density-ratio estimate.

All estimators work on affinely normalised coordinates ``u = (x - shift) / scale``; the log ratio is
invariant under a map applied to both densities (the Jacobians cancel), so no correction is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from iterflow.apps.ot.baselines import ClassifierRatio, KDERatio
from iterflow.apps.ot.ratio_base import RatioEstimator, load_estimator, read_estimator
from iterflow.apps.ot.telescopic import TelescopicRatio
from iterflow.errors import Registry

ESTIMATORS: Registry[type[RatioEstimator]] = Registry(
    "ratio estimator",
    {"telescopic": TelescopicRatio, "classifier": ClassifierRatio, "kde": KDERatio},
)


def load_ratio(folder: str | Path, device: str | torch.device = "cpu") -> RatioEstimator:
    """Load an estimator written by :meth:`RatioEstimator.save` (InputError naming ``ratio`` on a
    missing or bad folder, or one written by a newer format)."""
    kind, _ = read_estimator(folder, "ratio")
    return load_estimator(folder, ESTIMATORS.get(kind, "ratio kind"), device, "ratio")
