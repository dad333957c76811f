"""Risks ``R`` of the worst-case sampler: analytic ones with closed-form worst cases (linear,
label-dependent linear, concave quadratic), a classifier's cross-entropy, and the text form of the
command line's ``--risk``.

A risk is any callable ``R(y) -> (B,)`` (larger = worse); a label-dependent one (:func:`uses_labels`)
is called as ``R(y, labels)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from iterflow.errors import InputError, check_finite, fail

Risk = Callable[[Tensor], Tensor]


def _vector(value: Any, argument: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        fail(argument, "must be a non-empty vector", tuple(t.shape))
    check_finite(t, argument)
    return t


class LinearRisk:
    """``R(y) = a . y``; its proximal map is the shift ``F*(x) = x + gamma a``.

    Arguments:
        a: ``(d,)`` direction (stored in float64, cast to the input's dtype and device).
    """

    def __init__(self, a: Sequence[float] | Tensor) -> None:
        self.a = _vector(a, "a")

    def __call__(self, y: Tensor) -> Tensor:  # (B, d) -> (B,)
        return y @ self.a.to(y)

    def optimal_map(self, x: Tensor, gamma: float) -> Tensor:
        """The exact worst-case map ``x + gamma a``, shape ``(B, d)``."""
        return x + gamma * self.a.to(x)


class LabelledLinearRisk:
    """A label-dependent linear risk ``R(y; c) = a_c . y``; its proximal map is ``x + gamma a_c``.

    The smallest risk whose worst case needs the label: two points at the same place with different
    labels must move in different directions (a map of ``x`` alone cannot do it).

    Arguments:
        a: ``(classes, d)`` one direction per class (float64, cast to the input's dtype).
    """

    uses_labels = True

    def __init__(self, a: Sequence[Sequence[float]] | Tensor) -> None:
        am = torch.as_tensor(a, dtype=torch.float64)
        if am.ndim != 2 or 0 in am.shape:
            fail("a", "must be a non-empty (classes, d) matrix", tuple(am.shape))
        check_finite(am, "a")
        self.a = am

    @property
    def classes(self) -> int:
        return int(self.a.shape[0])

    def __call__(self, y: Tensor, labels: Tensor) -> Tensor:  # (B, d), (B,) -> (B,)
        return (y * self.a.to(y)[labels]).sum(1)

    def optimal_map(self, x: Tensor, gamma: float, labels: Tensor) -> Tensor:
        """The exact worst-case map ``x + gamma a_c``, shape ``(B, d)``."""
        return x + gamma * self.a.to(x)[labels]


class QuadraticRisk:
    """Concave quadratic ``R(y) = -y^T Q y / 2 + b^T y`` with ``Q`` symmetric positive definite.

    Its proximal map is linear: ``F*(x) = (I + gamma Q)^{-1} (x + gamma b)``.

    Arguments:
        q: ``(d, d)`` symmetric positive-definite matrix.
        b: ``(d,)`` linear term (default zero).
    """

    def __init__(
        self, q: Sequence[Sequence[float]] | Tensor, b: Sequence[float] | Tensor | None = None
    ) -> None:
        qm = torch.as_tensor(q, dtype=torch.float64)
        if qm.ndim != 2 or qm.shape[0] != qm.shape[1] or qm.shape[0] == 0:
            fail("Q", "must be a square (d, d) matrix", tuple(qm.shape))
        check_finite(qm, "Q")
        if not torch.allclose(qm, qm.T, atol=1e-12 * max(1.0, float(qm.abs().max()))):
            fail("Q", "must be symmetric", qm.tolist())
        if float(torch.linalg.eigvalsh(qm).min()) <= 0:
            fail("Q", "must be positive definite (the risk must be concave)", qm.tolist())
        bv = torch.zeros(qm.shape[0], dtype=torch.float64) if b is None else _vector(b, "b")
        if bv.shape[0] != qm.shape[0]:
            fail("b", f"must have {qm.shape[0]} entries like Q", bv.shape[0])
        self.q, self.b = qm, bv

    def __call__(self, y: Tensor) -> Tensor:  # (B, d) -> (B,)
        q, b = self.q.to(y), self.b.to(y)
        return -0.5 * ((y @ q) * y).sum(1) + y @ b

    def optimal_map(self, x: Tensor, gamma: float) -> Tensor:
        """The exact worst-case map ``(I + gamma Q)^{-1}(x + gamma b)``, shape ``(B, d)``."""
        q, b = self.q.to(x), self.b.to(x)
        m = torch.eye(q.shape[0], dtype=x.dtype, device=x.device) + gamma * q
        return torch.linalg.solve(m, (x + gamma * b).T).T


class ClassifierLoss(nn.Module):
    """Risk of a classifier: the per-sample cross-entropy ``R(y; c) = -log softmax(f(y))_c``.

    Called as ``loss(y, labels)``; :func:`fit_worst_case` passes each sample's label with it, so the
    worst case pushes every point toward higher loss *for its own label* (and, with
    ``DROConfig.condition="auto"``, the map itself is conditioned on the label).

    Arguments:
        classifier: a module mapping ``(B, d)`` points to ``(B, classes)`` logits.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            fail(
                "classifier",
                "must be a torch.nn.Module returning logits",
                type(classifier).__name__,
            )
        self.classifier = classifier

    uses_labels = True

    def forward(self, y: Tensor, labels: Tensor) -> Tensor:  # (B, d), (B,) -> (B,)
        return TF.cross_entropy(self.classifier(y), labels, reduction="none")

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels ``argmax f(x)``, shape ``(B,)``."""
        return self.classifier(x).argmax(1)


def uses_labels(risk: Any) -> bool:
    """Whether a risk is label-dependent, ``R(y; labels)``: a :class:`ClassifierLoss`, or any callable
    with a true ``uses_labels`` attribute (like :class:`LabelledLinearRisk`)."""
    return isinstance(risk, ClassifierLoss) or bool(getattr(risk, "uses_labels", False))


def risk_values(risk: Risk | ClassifierLoss, y: Tensor, labels: Tensor | None = None) -> Tensor:
    """Evaluate a risk on a batch: ``R(y)`` or, for a label-dependent risk (:func:`uses_labels`),
    ``R(y; labels)``.

    Returns:
        ``(B,)`` risks (differentiable when grad mode is on).
    """
    if uses_labels(risk):
        if labels is None:
            fail("labels", "are required by a classifier (label-dependent) risk", None)
        out = risk(y, labels)  # type: ignore[call-arg]
    else:
        out = risk(y)
    if not isinstance(out, Tensor) or tuple(out.shape) != (y.shape[0],):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        fail("risk", f"must return one value per sample, shape ({y.shape[0]},)", shape)
    return out


def _numbers(text: str, argument: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(argument, "must be comma-separated numbers", text)
    if not vals or not all(math.isfinite(v) for v in vals):
        fail(argument, "must be comma-separated finite numbers", text)
    return vals


def parse_risk(spec: str, dim: int) -> LinearRisk | QuadraticRisk:
    """An analytic risk from text (the CLI's ``--risk``).

    Forms:
        ``linear:a1,...,ad`` — ``R(y) = a . y``.
        ``quadratic:Q[;b]`` — ``R(y) = -y^T Q y / 2 + b . y``; ``Q`` is one number ``c`` (``c I``),
        ``d`` numbers (a diagonal) or ``d*d`` numbers (row-major); ``b`` has ``d`` numbers (default 0).

    Raises:
        InputError: (argument ``spec``) for an unknown form or wrong numbers of entries.
    """
    kind, _, body = spec.partition(":")
    if kind == "linear":
        a = _numbers(body, "spec")
        if len(a) != dim:
            fail("spec", f"linear:a1,...,ad needs d = {dim} numbers", spec)
        return LinearRisk(a)
    if kind == "quadratic":
        q_text, _, b_text = body.partition(";")
        q = _numbers(q_text, "spec")
        if len(q) == 1:
            qm = q[0] * torch.eye(dim, dtype=torch.float64)
        elif len(q) == dim:
            qm = torch.diag(torch.tensor(q, dtype=torch.float64))
        elif len(q) == dim * dim:
            qm = torch.tensor(q, dtype=torch.float64).reshape(dim, dim)
        else:
            fail("spec", f"quadratic Q needs 1, {dim} or {dim * dim} numbers", spec)
        b = _numbers(b_text, "spec") if b_text.strip() else None
        if b is not None and len(b) != dim:
            fail("spec", f"quadratic b needs {dim} numbers", spec)
        try:
            return QuadraticRisk(qm, b)
        except InputError as e:
            fail("spec", f"quadratic: {e.argument} {e.rule}", spec)
    fail("spec", "must be 'classifier', 'linear:a1,...,ad' or 'quadratic:Q[;b]'", spec)
