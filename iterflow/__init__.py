"""iterflow: flow-based generative models as iterative algorithms in probability space.

The Python face: :func:`fit` trains any method on a tensor, an array or a ``Dataset`` (with the
built-in networks or your own velocity module); :class:`FlowDensity` is the same as a scikit-learn
density estimator; :class:`Flow` samples, encodes and scores; :func:`score_rows` gives one
log-density per row (with Hutchinson's standard error); :func:`conditioning` binds per-row keyword
arguments of conditional velocity networks (class labels ``y``) and :func:`guidance` turns
classifier-free guidance on for label-conditional flows; :func:`flush_denormals`, called before a
program's first PyTorch computation, keeps subnormal floats from slowing training. ``fit``,
``FlowDensity``, ``TrainConfig``, ``load_run`` and ``score_rows`` are imported on first use, so
``import iterflow`` stays light.
"""

from typing import Any

from iterflow._version import __version__
from iterflow.core.conditioning import conditioning
from iterflow.core.denormals import flush_denormals
from iterflow.core.flow import Block, Flow
from iterflow.core.guidance import guidance
from iterflow.errors import InputError

_LAZY = {
    "fit": "iterflow.apps.api",
    "FlowDensity": "iterflow.apps.estimator",
    "TrainConfig": "iterflow.train",
    "TrainResult": "iterflow.train",
    "load_run": "iterflow.train",
    "score_rows": "iterflow.evaluation.score",
}


def __getattr__(name: str) -> Any:
    """The lazily imported names of :data:`_LAZY` (keeps ``import iterflow`` light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iterflow' has no attribute {name!r}")


__all__ = [
    "Block",
    "Flow",
    "FlowDensity",
    "InputError",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "conditioning",
    "fit",
    "flush_denormals",
    "guidance",
    "load_run",
    "score_rows",
]
