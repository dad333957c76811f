"""iterflow: flow-based generative models as iterative algorithms in probability space."""

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .flow import Block, Flow  # noqa: E402


def __getattr__(name: str):  # noqa: ANN202  (lazy: keep `import iterflow` light)
    if name == "FlowDensity":
        from .estimator import FlowDensity

        return FlowDensity
    if name in ("TrainConfig", "load_run"):
        from . import train as _train

        return getattr(_train, name)
    raise AttributeError(name)


__all__ = ["Block", "Flow", "FlowDensity", "InputError", "TrainConfig", "__version__", "load_run"]
