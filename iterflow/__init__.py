"""iterflow: flow-based generative models as iterative algorithms in probability space."""

from iterflow._version import __version__
from iterflow.core.flow import Block, Flow
from iterflow.errors import InputError


def __getattr__(name: str):  # noqa: ANN202  (lazy: keep `import iterflow` light)
    if name == "FlowDensity":
        from iterflow.apps.estimator import FlowDensity

        return FlowDensity
    if name in ("TrainConfig", "load_run"):
        from iterflow import train as _train

        return getattr(_train, name)
    raise AttributeError(name)


__all__ = ["Block", "Flow", "FlowDensity", "InputError", "TrainConfig", "__version__", "load_run"]
