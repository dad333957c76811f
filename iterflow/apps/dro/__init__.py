"""Worst-case sampling by flow-based distributionally robust optimisation (FlowDRO).

Given samples of a reference distribution ``P`` and a risk ``R`` (larger = worse), learn a transport map
``F`` that moves ``P`` toward the worst case within a Wasserstein-2 budget set by ``gamma``:

.. math::

    \\max_F \\; E_{X \\sim P}[R(F(X))] - \\frac{1}{2\\gamma} E |X - F(X)|^2 .

This is the Lagrangian (Moreau-envelope) form of Wasserstein DRO: ``F#P`` is the least favourable
distribution (LFD) for the budget ``W2^2(P, F#P) <= E|X - F(X)|^2``, and the optimum is attained by the
per-point proximal map ``F*(x) = argmax_y R(y) - |x - y|^2 / (2 gamma)``. Closed forms used by the tests:
a linear risk ``R(y) = a.y`` gives the shift ``F*(x) = x + gamma a`` (a label-dependent one,
``R(y; c) = a_c . y``, the shift ``x + gamma a_c``); a concave quadratic ``R(y) = -y^T Q y / 2 + b^T y``
(``Q`` positive definite) gives ``F*(x) = (I + gamma Q)^{-1}(x + gamma b)``.

``F`` is a :class:`~iterflow.core.flow.Flow` of one or a few ODE blocks (time-conditioned MLPs
integrated with a fixed-step solver, RK4 by default), working on standardised particles; the map is
taken in data units, ``F(x) = denormalize(blocks(normalize(x)))``. Unlike the per-sample optimum, the
flow is a *continuous*, invertible map: it applies to new samples without re-optimisation.

Label-dependent risks. For a classifier's cross-entropy ``R(y; c)`` the worst-case direction at a point
depends on its label ``c``: near a decision boundary, points of two classes sit at the same place and
must be pushed in opposite directions. A map of ``x`` alone can only take their average step (for
``R(y; c) = a_c . y``, :class:`LabelledLinearRisk`, it gets ``x + gamma E[a_c | x]`` instead of
``x + gamma a_c``), which is exactly the small-``gamma`` regime where only boundary points move. So when
the reference points have labels and the risk uses them (``DROConfig.condition="auto"``), every
block's velocity MLP also gets a class embedding and the map is ``F(x, c)``, one invertible map per
class, as FlowDRO treats classes separately; apply it as ``map(x, labels=...)`` (held-out points
have labels too; unlabelled ones can use the classifier's predictions).

Optimisation. The risk of a classifier is not concave and the objective has many local maxima. By
default ``gamma`` is warmed up geometrically from ``gamma / 16`` over the first 60% of the optimiser
steps (``DROConfig.gamma_warmup``), so that points first follow their own local ascent directions, as
per-sample gradient ascent does, before the budget reaches its value; at fixed ``gamma`` the map
settles in worse maxima at large budgets (more steps, width, solver steps or a larger batch did not
help in the benchmark; the warm-up did: see ``benchmarks/bench_dro.py``).

Modules: :mod:`.risks` (risks ``R``), :mod:`.data` (labelled sets: two moons, two circles,
scikit-learn's 8x8 digits), :mod:`.classifier` (a small MLP whose cross-entropy is the usual risk),
:mod:`.reference` (reference samples), :mod:`.config` (:class:`DROConfig`), :mod:`.map` (the map and
its assessment), :mod:`.fit` (training on the one loop: the objective is
:mod:`iterflow.methods.worst_case`), :mod:`.baseline` (per-sample gradient ascent on
``R(x') - |x - x'|^2 / (2 gamma)``, Sinha, Namkoong & Duchi 2018, arXiv 1710.10571, with calibration to
a given transport cost and transfer to new samples), :mod:`.store` (run folders: ``manifest.json``,
safetensors; resumable) and :mod:`.plots`.

Training (the classifier and the map) runs on :func:`iterflow.train.loop.optimize`: with a run folder
it checkpoints and resumes after an interruption to the same result, and it trains data-parallel
under ``torchrun``.

References:
    Xu, Lee, Cheng, Xie, "Flow-based distributionally robust optimization", IEEE JSAIT 2024,
    arXiv 2310.19253.

Example:
    >>> import torch
    >>> from iterflow.apps.dro import DROConfig, LinearRisk, fit_worst_case
    >>> x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    >>> res = fit_worst_case(x, LinearRisk([1.0, 0.0]), config=DROConfig(gamma=0.5, steps=20))
    >>> res.map(x).shape
    torch.Size([128, 2])
"""

from iterflow.apps.dro.baseline import (
    AscentResult,
    calibrate_ascent,
    gradient_ascent,
    transfer_displacement,
)
from iterflow.apps.dro.classifier import (
    MLPClassifier,
    accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from iterflow.apps.dro.config import DROConfig
from iterflow.apps.dro.data import LABELLED_SETS, LabelledData, labelled_data
from iterflow.apps.dro.fit import fit_worst_case
from iterflow.apps.dro.map import Assessment, WorstCaseMap, WorstCaseResult, assess
from iterflow.apps.dro.plots import plot_digit_pairs, plot_displacement
from iterflow.apps.dro.reference import Reference, load_reference
from iterflow.apps.dro.risks import (
    ClassifierLoss,
    LabelledLinearRisk,
    LinearRisk,
    QuadraticRisk,
    Risk,
    parse_risk,
    risk_values,
    uses_labels,
)
from iterflow.apps.dro.store import WorstCaseFolder, load_worst_case, save_worst_case

__all__ = [
    "LABELLED_SETS",
    "AscentResult",
    "Assessment",
    "ClassifierLoss",
    "DROConfig",
    "LabelledData",
    "LabelledLinearRisk",
    "LinearRisk",
    "MLPClassifier",
    "QuadraticRisk",
    "Reference",
    "Risk",
    "WorstCaseFolder",
    "WorstCaseMap",
    "WorstCaseResult",
    "accuracy",
    "assess",
    "calibrate_ascent",
    "fit_worst_case",
    "gradient_ascent",
    "labelled_data",
    "load_classifier",
    "load_reference",
    "load_worst_case",
    "parse_risk",
    "plot_digit_pairs",
    "plot_displacement",
    "risk_values",
    "save_classifier",
    "save_worst_case",
    "train_classifier",
    "transfer_displacement",
    "uses_labels",
]
