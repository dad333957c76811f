"""iterflow: flow-based generative models as iterative algorithms in probability space."""

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .flow import Block, Flow  # noqa: E402

__all__ = ["Block", "Flow", "InputError", "__version__"]
