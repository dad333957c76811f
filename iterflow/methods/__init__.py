"""Training methods: each a small objective plugged into the one trainer (:mod:`iterflow.train`).

:data:`METHODS` maps each method's name to its class; it is filled explicitly here (no registration
by import side effects): a new method is one module of this package and one line below.
"""

from iterflow.errors import Registry
from iterflow.methods.base import (
    Loss,
    Method,
    MethodOptions,
    options_record,
    parse_options,
    typed_options,
)
from iterflow.methods.cnf import CNF
from iterflow.methods.distill import Distill
from iterflow.methods.fm import FlowMatching
from iterflow.methods.jko import JKOFlow
from iterflow.methods.local_fm import LocalFlowMatching
from iterflow.methods.reflow import Reflow

METHODS: Registry[type[Method]] = Registry(
    "method",
    {
        "fm": FlowMatching,
        "cnf": CNF,
        "jko": JKOFlow,
        "local-fm": LocalFlowMatching,
        "reflow": Reflow,
        "distill": Distill,
    },
)

__all__ = [
    "METHODS",
    "Loss",
    "Method",
    "MethodOptions",
    "options_record",
    "parse_options",
    "typed_options",
]
