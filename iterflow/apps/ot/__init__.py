"""Flow-based optimal transport between two sample sets and density ratios along it.

Modules: :mod:`.transport` (the fit, in phases on the one loop), :mod:`.result` (options and
result), :mod:`.maps` (maps and costs in data units), :mod:`.gaussian` (closed forms between
Gaussians), :mod:`.store` (run folders), :mod:`.telescopic` (the telescopic ratio estimator),
:mod:`.baselines` (one classifier, kernel densities), :mod:`.ratio` (the estimators' registry and
loader), :mod:`.ratio_base` (their common face), :mod:`.classifiers` (logit networks),
:mod:`.phases` (phases, progress and resumable folders), :mod:`.samples` (sample sets). The
objective itself is :mod:`iterflow.methods.transport`.
"""

from iterflow.apps.ot.baselines import (
    ClassifierRatio,
    KDEOptions,
    KDERatio,
    cv_bandwidth,
    fit_classifier,
    fit_kde,
)
from iterflow.apps.ot.classifiers import ClassifierOptions, IntervalLogits, LogitNet
from iterflow.apps.ot.gaussian import (
    GaussianOTVelocity,
    gaussian_ot_flow,
    gaussian_ot_map,
    gaussian_w2_sq,
)
from iterflow.apps.ot.maps import (
    TransportCost,
    TransportMap,
    kinetic_energy,
    transport_cost,
    transport_normalization,
)
from iterflow.apps.ot.ratio import ESTIMATORS, load_ratio
from iterflow.apps.ot.ratio_base import RatioEstimator, log_ratio_mse
from iterflow.apps.ot.result import TransportOptions, TransportResult
from iterflow.apps.ot.store import load_transport, load_transport_meta, save_transport
from iterflow.apps.ot.telescopic import (
    TelescopicOptions,
    TelescopicRatio,
    chain_particles,
    fit_telescopic,
)
from iterflow.apps.ot.transport import fit_transport

__all__ = [
    "ESTIMATORS",
    "ClassifierOptions",
    "ClassifierRatio",
    "GaussianOTVelocity",
    "IntervalLogits",
    "KDEOptions",
    "KDERatio",
    "LogitNet",
    "RatioEstimator",
    "TelescopicOptions",
    "TelescopicRatio",
    "TransportCost",
    "TransportMap",
    "TransportOptions",
    "TransportResult",
    "chain_particles",
    "cv_bandwidth",
    "fit_classifier",
    "fit_kde",
    "fit_telescopic",
    "fit_transport",
    "gaussian_ot_flow",
    "gaussian_ot_map",
    "gaussian_w2_sq",
    "kinetic_energy",
    "load_ratio",
    "load_transport",
    "load_transport_meta",
    "log_ratio_mse",
    "save_transport",
    "transport_cost",
    "transport_normalization",
]
