"""Training methods: each a small objective plugged into the one trainer (:mod:`iterflow.train`)."""

from . import fm  # noqa: F401  (registers "fm")
from .base import METHODS, Loss, Method, MethodOptions, parse_options

__all__ = ["METHODS", "Loss", "Method", "MethodOptions", "parse_options"]
