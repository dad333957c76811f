"""Classifier-free guidance of label-conditional velocities (Ho & Salimans, "Classifier-Free
Diffusion Guidance", arXiv 2207.12598).

A label-conditional velocity network (``num_classes = K > 0``: :class:`~iterflow.core.nn.MLPVelocity`,
:class:`~iterflow.core.nn.UNet`) takes labels ``y`` in ``[0, K]``, where ``K`` is the *null label*
("no class"); trained with label dropout (each row's label replaced by ``K`` with probability
``label_dropout``) one network is both the conditional field ``v(x, s | y)`` and the unconditional
``v(x, s | null)``. Inside ``with guidance(w):`` every :class:`~iterflow.core.flow.Block` whose
rows have labels bound (:func:`iterflow.core.conditioning.conditioning` with ``y=``) integrates

.. math::
    v_w(x, s \\mid y) = v(x, s \\mid \\varnothing) + w\\,\\big(v(x, s \\mid y)
    - v(x, s \\mid \\varnothing)\\big).

Convention: ``w = 1`` is the plain conditional field and ``w = 0`` the unconditional one, both
exactly (one network evaluation with the given or the null labels); ``w > 1`` pushes samples
toward their class. Ho & Salimans write ``(1 + w') eps(z, c) - w' eps(z)``: their ``w'`` is
``w - 1`` here. Other ``w`` cost one evaluation on ``2B`` rows (conditional and null halves stacked),
counted as one by :meth:`~iterflow.core.flow.Flow.count_nfe`. The guided field is an ordinary
velocity field, so every map of a flow (``sample``, ``encode``, ``log_prob``) follows it.

Example:
    >>> import torch
    >>> from iterflow.core.conditioning import conditioning
    >>> from iterflow.core.flow import Block, Flow
    >>> from iterflow.core.nn import MLPVelocity
    >>> flow = Flow([Block(MLPVelocity(2, hidden=(8,), num_classes=3))], (2,))
    >>> z, y = torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])  # 3: the null label
    >>> with conditioning(y=y), guidance(2.0):
    ...     flow.decode(z, solver="euler", steps=2).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from iterflow.errors import fail

#: The keyword argument that carries class labels to velocity networks.
LABEL_KEY = "y"

_WEIGHT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "iterflow_guidance", default=None
)


@contextmanager
def guidance(weight: float) -> Iterator[None]:
    """Integrate every label-conditional block with the guided field ``v_w`` (module docstring)
    inside the ``with`` body.

    Arguments:
        weight: the guidance weight ``w`` (finite; 1: conditional, 0: unconditional).

    Raises:
        InputError: (argument ``guidance``) a weight that is not a finite number.
    """
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        fail("guidance", "must be a finite number (1: conditional, 0: unconditional)", weight)
    token = _WEIGHT.set(float(weight))
    try:
        yield
    finally:
        _WEIGHT.reset(token)


def guidance_weight() -> float | None:
    """The weight ``w`` of the enclosing :func:`guidance` (``None`` outside one)."""
    return _WEIGHT.get()


def null_label(velocity: nn.Module) -> int:
    """The null label ``K`` of a label-conditional network (its ``num_classes``).

    Raises:
        InputError: (argument ``guidance``) a network without classes.
    """
    k = int(getattr(velocity, "num_classes", 0) or 0)
    if k <= 0:
        fail(
            "guidance",
            "needs a label-conditional velocity (a network with num_classes > 0)",
            type(velocity).__name__,
        )
    return k


def is_guided(cond: Mapping[str, Tensor]) -> bool:
    """Whether a velocity called with the rows ``cond`` is guided here (:func:`guided_call` then
    evaluates more than ``velocity(x, s, **cond)``; a fast path that evaluates the network
    directly must step aside)."""
    w = _WEIGHT.get()
    return w is not None and w != 1.0 and LABEL_KEY in cond


def guided_call(
    velocity: nn.Module, x: Tensor, s: Tensor | float, cond: dict[str, Tensor]
) -> Tensor:
    """``velocity(x, s, **cond)``, or the guided field ``v_w`` inside :func:`guidance` when
    ``cond`` holds labels ``y``.

    Arguments:
        velocity: the block's network.
        x: ``(B, *E)`` states; s: time, 0-dim or ``(B,)``.
        cond: the rows bound for this batch (``y`` ``(B,)`` labels among them).
    """
    if not is_guided(cond):
        return velocity(x, s, **cond)
    w = float(_WEIGHT.get() or 0.0)
    null = torch.full_like(cond[LABEL_KEY], null_label(velocity))
    if w == 0.0:
        return velocity(x, s, **{**cond, LABEL_KEY: null})
    b = x.shape[0]
    st = torch.as_tensor(s)
    both_s = torch.cat([st, st]) if st.ndim == 1 and st.shape[0] == b else s
    both = {k: torch.cat([v, v]) for k, v in cond.items()}
    both[LABEL_KEY] = torch.cat([cond[LABEL_KEY], null])
    v = velocity(torch.cat([x, x]), both_s, **both)  # (2B, *E): conditional rows, then null rows
    v_cond, v_null = v[:b], v[b:]
    return v_null + w * (v_cond - v_null)
