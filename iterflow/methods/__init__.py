"""Training methods: each a small objective plugged into the one trainer (:mod:`iterflow.train`).

Every module of this package is imported here, so a method registers itself in :data:`METHODS` just by
living in ``iterflow/methods/``.
"""

import importlib
import pkgutil

from .base import METHODS, Loss, Method, MethodOptions, parse_options

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "Loss", "Method", "MethodOptions", "parse_options"]
