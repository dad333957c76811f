"""Worst-case sampling by flow-based distributionally robust optimisation (FlowDRO).

Given samples of a reference distribution ``P`` and a risk ``R`` (larger = worse), learn a transport map
``F`` that moves ``P`` toward the worst case within a Wasserstein-2 budget set by ``gamma``:

.. math::

    \\max_F \\; E_{X \\sim P}[R(F(X))] - \\frac{1}{2\\gamma} E |X - F(X)|^2 .

This is the Lagrangian (Moreau-envelope) form of Wasserstein DRO: ``F#P`` is the least favourable
distribution (LFD) for the budget ``W2^2(P, F#P) <= E|X - F(X)|^2``, and the optimum is attained by the
per-point proximal map ``F*(x) = argmax_y R(y) - |x - y|^2 / (2 gamma)``. Closed forms used by the tests:
a linear risk ``R(y) = a.y`` gives the shift ``F*(x) = x + gamma a`` (a label-dependent one,
``R(y; c) = a_c . y``, the shift ``x + gamma a_c``); a concave quadratic ``R(y) = -y^T Q y / 2 + b^T y``
(``Q`` positive definite) gives ``F*(x) = (I + gamma Q)^{-1}(x + gamma b)``.

``F`` is a :class:`~iterflow.flow.Flow` of one or a few ODE blocks (time-conditioned MLPs integrated with a
fixed-step solver, RK4 by default), working on standardised particles; the map is taken in data units,
``F(x) = denormalize(blocks(normalize(x)))``. Unlike the per-sample optimum, the flow is a *continuous*,
invertible map: it applies to new samples without re-optimisation.

Label-dependent risks. For a classifier's cross-entropy ``R(y; c)`` the worst-case direction at a point
depends on its label ``c``: near a decision boundary, points of two classes sit at the same place and
must be pushed in opposite directions. A map of ``x`` alone can only take their average step (for
``R(y; c) = a_c . y``, :class:`LabelledLinearRisk`, it gets ``x + gamma E[a_c | x]`` instead of
``x + gamma a_c``), which is exactly the small-``gamma`` regime where only boundary points move. So when
the reference points have labels and the risk uses them (``DROConfig.condition="auto"``), every
block's velocity MLP also gets a class embedding and the map is ``F(x, c)``, one invertible map per
class, as FlowDRO treats classes separately; apply it as ``map(x, labels=...)`` (held-out points
have labels too; unlabelled ones can use the classifier's predictions).

Optimisation. The risk of a classifier is not concave and the objective has many local maxima. By
default ``gamma`` is warmed up geometrically from ``gamma / 16`` over the first 60% of the optimiser
steps (``DROConfig.gamma_warmup``), so that points first follow their own local ascent directions, as
per-sample gradient ascent does, before the budget reaches its value; at fixed ``gamma`` the map
settles in worse maxima at large budgets (more steps, width, solver steps or a larger batch did not
help in the benchmark; the warm-up did: see ``benchmarks/bench_dro.py``).

Also here: labelled data sets (two moons, two circles, scikit-learn's 8x8 digits), a small MLP classifier
trainer whose cross-entropy is the usual risk, the classical baseline (per-sample gradient ascent on
``R(x') - |x - x'|^2 / (2 gamma)``, Sinha, Namkoong & Duchi 2018, arXiv 1710.10571) with calibration to a
given transport cost and transfer to new samples, and run-folder I/O (safetensors + JSON).

References:
    Xu, Lee, Cheng, Xie, "Flow-based distributionally robust optimization", IEEE JSAIT 2024,
    arXiv 2310.19253.

Example:
    >>> import torch
    >>> from iterflow.apps.dro import DROConfig, LinearRisk, fit_worst_case
    >>> x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    >>> res = fit_worst_case(x, LinearRisk([1.0, 0.0]), config=DROConfig(gamma=0.5, steps=20))
    >>> res.map(x).shape
    torch.Size([128, 2])
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from iterflow._version import __version__
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import ACTIVATIONS, build_network
from iterflow.core.ode import FIXED_SOLVERS, SolverSpec, integrate
from iterflow.errors import InputError, check_finite, check_positive, fail
from iterflow.io import FORMAT_VERSION, load_json, load_tensors, save_json, save_tensors
from iterflow.train import DTYPES, RunDir, cosine_lr, load_flow, stage_seed, standardization

__all__ = [
    "LABELLED_SETS",
    "AscentResult",
    "Assessment",
    "ClassifierLoss",
    "DROConfig",
    "LabelledData",
    "LabelledLinearRisk",
    "LinearRisk",
    "MLPClassifier",
    "QuadraticRisk",
    "Reference",
    "WorstCaseMap",
    "WorstCaseResult",
    "accuracy",
    "assess",
    "calibrate_ascent",
    "fit_worst_case",
    "gradient_ascent",
    "labelled_data",
    "load_classifier",
    "load_reference",
    "load_worst_case",
    "parse_risk",
    "plot_digit_pairs",
    "plot_displacement",
    "risk_values",
    "save_classifier",
    "save_worst_case",
    "train_classifier",
    "transfer_displacement",
    "uses_labels",
]

Risk = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Risks
# ------------------------------------------------------------------------------------------------


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
        out = risk(y, labels)
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
        InputError: (argument ``--risk``) for an unknown form or wrong numbers of entries.
    """
    kind, _, body = spec.partition(":")
    if kind == "linear":
        a = _numbers(body, "--risk")
        if len(a) != dim:
            fail("--risk", f"linear:a1,...,ad needs d = {dim} numbers", spec)
        return LinearRisk(a)
    if kind == "quadratic":
        q_text, _, b_text = body.partition(";")
        q = _numbers(q_text, "--risk")
        if len(q) == 1:
            qm = q[0] * torch.eye(dim, dtype=torch.float64)
        elif len(q) == dim:
            qm = torch.diag(torch.tensor(q, dtype=torch.float64))
        elif len(q) == dim * dim:
            qm = torch.tensor(q, dtype=torch.float64).reshape(dim, dim)
        else:
            fail("--risk", f"quadratic Q needs 1, {dim} or {dim * dim} numbers", spec)
        b = _numbers(b_text, "--risk") if b_text.strip() else None
        if b is not None and len(b) != dim:
            fail("--risk", f"quadratic b needs {dim} numbers", spec)
        try:
            return QuadraticRisk(qm, b)
        except InputError as e:
            fail("--risk", f"quadratic: {e.argument} {e.rule}", spec)
    fail("--risk", "must be 'classifier', 'linear:a1,...,ad' or 'quadratic:Q[;b]'", spec)


# ------------------------------------------------------------------------------------------------
# Labelled data and the classifier
# ------------------------------------------------------------------------------------------------

LABELLED_SETS = ("moons", "circles", "sklearn:digits")


@dataclass(frozen=True)
class LabelledData:
    """Labelled train/test points.

    Attributes:
        name: data set name.
        train_x, test_x: ``(n, d)`` float32 points; train_y, test_y: ``(n,)`` int64 labels.
        classes: number of classes.
        image_shape: ``(C, H, W)`` when a point is a flattened image, else ``None``.
        pixel_shift, pixel_scale: ``pixels = x * pixel_scale + pixel_shift`` (standardised images).
        pixel_range: ``(low, high)`` of the pixel values.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: int
    image_shape: tuple[int, ...] | None = None
    pixel_shift: Tensor | None = None
    pixel_scale: Tensor | None = None
    pixel_range: tuple[float, float] = (0.0, 1.0)

    def to_pixels(self, x: Tensor) -> Tensor:
        """Standardised flattened images ``(n, d)`` -> images ``(n, C, H, W)`` in pixel units."""
        if self.image_shape is None or self.pixel_shift is None or self.pixel_scale is None:
            fail("data", "has no image shape", self.name)
        px = x * self.pixel_scale.to(x) + self.pixel_shift.to(x)
        return px.reshape(x.shape[0], *self.image_shape)


def _as_labelled(
    name: str, x: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int, **extra: Any
) -> LabelledData:
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    order = torch.randperm(xt.shape[0], generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test : n_test + n_train]
    return LabelledData(name, xt[train], yt[train], xt[test], yt[test], int(yt.max()) + 1, **extra)


def labelled_data(
    name: str, n_train: int = 1000, n_test: int = 1000, seed: int = 0
) -> LabelledData:
    """A labelled data set for classifier risks.

    * ``moons``: scikit-learn ``make_moons(noise=0.15)`` (2 classes, 2-D);
    * ``circles``: ``make_circles(factor=0.5, noise=0.08)`` (2 classes, 2-D);
    * ``sklearn:digits``: the bundled 8x8 digits (1,797 images, 10 classes, 64-d), standardised per
      pixel with the training rows' mean and standard deviation (floored at 1); at most 20% of the
      rows are held out as the test split.

    Arguments:
        name: one of :data:`LABELLED_SETS`.
        n_train, n_test: split sizes (caps for digits).
        seed: seeds the generated points (``random_state``) and the shuffle.
    """
    check_positive(n_train, "--n-train", integer=True)
    check_positive(n_test, "--n-test", integer=True)
    check_positive(seed, "--seed", integer=True, allow_zero=True)
    import sklearn.datasets as skd

    if name == "moons":
        x, y = skd.make_moons(n_train + n_test, noise=0.15, random_state=seed)
        return _as_labelled(name, x, y, n_train, n_test, seed)
    if name == "circles":
        x, y = skd.make_circles(n_train + n_test, factor=0.5, noise=0.08, random_state=seed)
        return _as_labelled(name, x, y, n_train, n_test, seed)
    if name == "sklearn:digits":
        x, y = skd.load_digits(return_X_y=True)
        n_test = min(n_test, int(0.2 * len(x)))
        raw = _as_labelled(name, x, y, n_train, n_test, seed)
        shift = raw.train_x.mean(0)
        scale = raw.train_x.std(0).clamp_min(1.0)  # constant border pixels stay at 0
        return LabelledData(
            name,
            (raw.train_x - shift) / scale,
            raw.train_y,
            (raw.test_x - shift) / scale,
            raw.test_y,
            raw.classes,
            (1, 8, 8),
            shift,
            scale,
            (0.0, 16.0),
        )
    fail("--data", f"must be one of {list(LABELLED_SETS)} for a classifier risk", name)


class MLPClassifier(nn.Module):
    """Smooth MLP classifier ``(B, d) -> (B, classes)`` logits (SiLU by default: smooth input gradients).

    Arguments:
        dim: input dimension; classes: number of classes; hidden: hidden widths; activation: name in
            :data:`iterflow.nn.ACTIVATIONS`.
    """

    def __init__(
        self, dim: int, classes: int, hidden: Sequence[int] = (64, 64), activation: str = "silu"
    ) -> None:
        super().__init__()
        check_positive(dim, "dim", integer=True)
        check_positive(classes, "classes", integer=True)
        for h in hidden:
            check_positive(h, "hidden", integer=True)
        act = ACTIVATIONS.get(activation, "activation")
        self.dim, self.classes, self.hidden, self.activation = (
            dim,
            classes,
            tuple(hidden),
            activation,
        )
        widths = [dim, *self.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), act()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return {
            "kind": "mlp-classifier",
            "dim": self.dim,
            "classes": self.classes,
            "hidden": list(self.hidden),
            "activation": self.activation,
        }


def _check_labelled(x: Tensor, labels: Tensor, argument: str = "labels") -> None:
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        fail(argument, "must be an integer tensor", getattr(labels, "dtype", type(labels).__name__))
    if tuple(labels.shape) != (x.shape[0],):
        fail(argument, f"must have shape ({x.shape[0]},), one label per point", tuple(labels.shape))


def _check_label_range(labels: Tensor, k: int, rule: str) -> None:
    """Fail unless every label lies in ``[0, k)``; ``rule`` is the message."""
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= k:
            fail("labels", rule, (lo, hi))


def train_classifier(
    x: Tensor,
    labels: Tensor,
    *,
    hidden: Sequence[int] = (64, 64),
    activation: str = "silu",
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.1,
    seed: int = 0,
) -> MLPClassifier:
    """Train an :class:`MLPClassifier` by minibatch cross-entropy (AdamW, cosine schedule).

    Arguments:
        x: ``(n, d)`` points; labels: ``(n,)`` integer classes ``0..K-1``.
        seed: seeds the initialisation and the minibatches.

    Returns:
        The trained classifier in eval mode, on ``x``'s device and dtype.
    """
    _check_points(x, "x")
    _check_labelled(x, labels)
    check_positive(steps, "steps", integer=True)
    check_positive(batch_size, "batch_size", integer=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = MLPClassifier(x.shape[1], int(labels.max()) + 1, hidden, activation)
    clf = clf.to(device=x.device, dtype=x.dtype)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, steps)
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen).to(
            x.device
        )
        loss = TF.cross_entropy(clf(x[idx]), labels[idx], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def accuracy(classifier: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Fraction of points whose predicted class ``argmax f(x)`` equals the label."""
    _check_labelled(x, labels)
    return float((classifier(x).argmax(1) == labels).to(torch.float64).mean())


def save_classifier(
    classifier: MLPClassifier, folder: str | Path, name: str = "classifier"
) -> None:
    """Write ``NAME.json`` (constructor arguments) and ``NAME.safetensors`` (weights) into ``folder``."""
    folder = Path(folder)
    save_tensors(folder / f"{name}.safetensors", classifier.state_dict())
    save_json(
        folder / f"{name}.json", {"format_version": FORMAT_VERSION, "network": classifier.config()}
    )


def load_classifier(folder: str | Path, name: str = "classifier") -> MLPClassifier:
    """Rebuild a classifier saved by :func:`save_classifier` (no unpickling)."""
    folder = Path(folder)
    meta = load_json(folder / f"{name}.json", "run")
    cfg = dict(meta.get("network", {})) if isinstance(meta, dict) else {}
    if cfg.pop("kind", None) != "mlp-classifier":
        fail("run", f"{name}.json must describe an mlp-classifier", str(folder))
    try:
        clf = MLPClassifier(**cfg)
    except TypeError as e:
        fail("run", f"{name}.json must match MLPClassifier's arguments ({e})", str(folder))
    state = load_tensors(folder / f"{name}.safetensors", "run")
    clf = clf.to(next(iter(state.values())).dtype)  # the saved precision, loaded without rounding
    try:
        clf.load_state_dict(state)
    except RuntimeError as e:
        fail(
            "run",
            f"{name}.safetensors must match {name}.json ({str(e).splitlines()[0]})",
            str(folder),
        )
    return clf.eval()


# ------------------------------------------------------------------------------------------------
# Reference samples
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Samples of the reference distribution ``P``: training points and held-out points.

    Attributes:
        train, test: ``(n, d)`` points; train_labels, test_labels: ``(n,)`` labels or ``None``.
        source: JSON-serialisable description (``kind``: ``tensor``, ``labelled``, ``dataset``, ``run``).
        data: the :class:`LabelledData` when the reference is a labelled set.
    """

    train: Tensor
    test: Tensor
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    source: dict[str, Any] = field(default_factory=dict)
    data: LabelledData | None = None


def _is_run_folder(spec: str | os.PathLike[str]) -> bool:
    p = Path(spec)
    return p.is_dir() and (p / "config.json").is_file() and (p / "meta.json").is_file()


def load_reference(
    spec: str | os.PathLike[str],
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    solver: str = "dopri5",
    steps: int = 16,
) -> Reference:
    """Reference samples from a run folder, a labelled set, or any :func:`iterflow.data.get_dataset` name.

    Resolution order: a trained iterflow run folder (``n_train + n_test`` samples drawn with
    ``Flow.sample``, seeded by ``seed``, integrated with ``solver``/``steps``); a name in
    :data:`LABELLED_SETS` (points *with* labels); otherwise a data set name or file of
    :mod:`iterflow.data` (its train and test splits). Note that ``moons`` and ``circles`` resolve to
    the labelled scikit-learn versions here.
    """
    check_positive(n_train, "--n-train", integer=True)
    check_positive(n_test, "--n-test", integer=True)
    if _is_run_folder(spec):
        from iterflow.train import load_run

        flow, cfg, _ = load_run(spec)
        with torch.no_grad():
            pts = flow.sample(
                n_train + n_test,
                generator=torch.Generator().manual_seed(seed),
                solver=solver,
                steps=steps,
            )
        src = {
            "kind": "run",
            "path": str(spec),
            "method": cfg.method,
            "data": cfg.data,
            "seed": seed,
        }
        return Reference(pts[:n_train].float(), pts[n_train:].float(), source=src)
    name = os.fspath(spec)
    if name in LABELLED_SETS:
        d = labelled_data(name, n_train, n_test, seed)
        return Reference(
            d.train_x,
            d.test_x,
            d.train_y,
            d.test_y,
            {"kind": "labelled", "name": name, "seed": seed},
            d,
        )
    from iterflow.data import get_dataset

    ds = get_dataset(name)
    sp = ds.splits(n_train, 1, n_test, seed)
    return Reference(sp.train, sp.test, source={"kind": "dataset", "name": name, "seed": seed})


# ------------------------------------------------------------------------------------------------
# The flow map
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DROConfig:
    """Options of the flow-based worst-case map (saved with it).

    Attributes:
        gamma: Lagrange parameter of the Wasserstein budget (larger = farther moves).
        blocks: number of ODE blocks in the map.
        schedule: ``joint`` (all blocks optimise the objective together; the map is the proximal step
            of size ``gamma``) or ``progressive`` (block ``k`` is trained alone on the particles pushed by
            blocks ``< k``, each a proximal step of size ``gamma / blocks``: a Wasserstein proximal
            gradient flow as in FlowDRO; for a linear risk both give ``x + gamma a``, in general the
            progressive chain approximates the gradient flow of ``R`` run for time ``gamma``).
        hidden, activation, time_freqs: each block's velocity MLP (the output layer starts at zero,
            so the map starts as the identity).
        solver, ode_steps: fixed-step solver and its steps per block (RK4, 8 steps by default).
        kinetic: weight ``lambda`` of the path regulariser
            ``lambda / (2 gamma) * E[K * sum_k int_0^1 |v_k|^2 ds - |F(X) - X|^2]`` (``K`` blocks,
            velocities in data units). By Cauchy-Schwarz it is >= 0, and 0 exactly for straight paths
            at constant speed; the optimal map is reached by such paths, so the regulariser makes
            trajectories straight (the map smooth) without moving the optimum. ``lambda = 1`` turns the
            transport term into the kinetic energy (Benamou-Brenier form).
        steps, batch_size, lr, lr_schedule, weight_decay, grad_clip: optimisation (Adam / AdamW),
            per block for the progressive schedule.
        gamma_warmup, gamma_start: continuation in ``gamma``: over the first ``gamma_warmup`` of the
            optimiser steps (per block) the Lagrange parameter grows geometrically from
            ``gamma * gamma_start`` to ``gamma``, then stays there. For a non-concave risk (a
            classifier's loss) the objective has many local maxima; starting at a small budget lets
            every point first follow its own local ascent direction, as per-sample gradient ascent
            does, instead of being dragged by the early, shared moves of the network into a worse
            basin (digits, ``gamma = 3``: training objective 11.2 with the warm-up, 9.5 without,
            per-sample ascent 11.0). The optimum of the final objective is unchanged.
            ``gamma_warmup = 0`` turns it off.
        standardize: the flow's normalisation from the reference (``dim``, ``scalar``, ``none``, ``auto``;
            see :func:`iterflow.train.standardization`); coordinates that are (nearly) constant on the
            reference keep the overall standard deviation, so new points that vary there stay finite.
        condition: ``auto`` (default): when the risk is label-dependent (a classifier's cross-entropy,
            see :func:`uses_labels`) and the reference points have labels, every block's velocity also
            gets the label (a class embedding in its first layer), so the map is
            ``F(x, c)``: near a decision boundary, points of different classes at the same place are
            pushed in opposite directions, which a map of ``x`` alone can only average. ``none``: a map
            of ``x`` alone.
        seed: initialisation and minibatches. dtype: ``float32`` or ``float64``.
        log_every: steps between history records.
    """

    gamma: float = 1.0
    blocks: int = 1
    schedule: str = "joint"
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"
    time_freqs: int = 0
    solver: str = "rk4"
    ode_steps: int = 8
    kinetic: float = 0.0
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-2
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma_warmup: float = 0.6
    gamma_start: float = 1 / 16
    standardize: str = "dim"
    condition: str = "auto"
    seed: int = 0
    dtype: str = "float32"
    log_every: int = 50

    def __post_init__(self) -> None:
        check_positive(self.gamma, "--gamma")
        for name in ("blocks", "ode_steps", "steps", "batch_size", "log_every"):
            check_positive(getattr(self, name), f"--{name.replace('_', '-')}", integer=True)
        if self.schedule not in ("joint", "progressive"):
            fail("--schedule", "must be 'joint' or 'progressive'", self.schedule)
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if not self.hidden:
            fail("--hidden", "must list at least one width", self.hidden)
        for h in self.hidden:
            check_positive(h, "--hidden", integer=True)
        ACTIVATIONS.get(self.activation, "--activation")
        check_positive(self.time_freqs, "--time-freqs", integer=True, allow_zero=True)
        FIXED_SOLVERS.get(self.solver, "--solver")
        for name in ("kinetic", "weight_decay", "grad_clip"):
            check_positive(getattr(self, name), f"--{name.replace('_', '-')}", allow_zero=True)
        check_positive(self.lr, "--lr")
        if self.lr_schedule not in ("cosine", "constant"):
            fail("--lr-schedule", "must be 'cosine' or 'constant'", self.lr_schedule)
        if self.standardize not in ("dim", "scalar", "none", "auto"):
            fail("--standardize", "must be 'dim', 'scalar', 'none' or 'auto'", self.standardize)
        if not 0.0 <= self.gamma_warmup < 1.0:
            fail("--gamma-warmup", "must be in [0, 1) (a fraction of the steps)", self.gamma_warmup)
        if not 0.0 < self.gamma_start <= 1.0:
            fail("--gamma-start", "must be in (0, 1] (a fraction of gamma)", self.gamma_start)
        if self.condition not in ("auto", "none"):
            fail("--condition", "must be 'auto' or 'none'", self.condition)
        check_positive(self.seed, "--seed", integer=True, allow_zero=True)
        if self.dtype not in DTYPES:
            fail("--dtype", f"must be one of {sorted(DTYPES)}", self.dtype)

    @property
    def spec(self) -> SolverSpec:
        return SolverSpec(self.solver, self.ode_steps)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DROConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            fail(
                "dro.json",
                f"config keys must be among {sorted(known)}",
                sorted(set(d) - known) if isinstance(d, dict) else d,
            )
        # maps saved before these options existed: maps of x alone, trained at a fixed gamma
        old = {"condition": "none", "gamma_warmup": 0.0}
        return cls(**{**old, **d, "hidden": tuple(d.get("hidden", cls.hidden))})


class WorstCaseMap:
    """The learned transport map ``F`` (data units -> data units), ``F(x)`` or, label-conditioned,
    ``F(x, c)``.

    Arguments:
        flow: the blocks and the normalisation; spec: the fixed-step solver.

    ``map(x, labels=...)`` integrates every block forward (``s: 0 -> 1``); ``map.inverse(y, labels=...)``
    backward. A conditioned map (:attr:`num_classes` > 0) needs ``labels``: ``(B,)`` integers in
    ``[0, num_classes)``, one per point (for a classifier risk: the points' true labels, or the
    classifier's predictions when there are none); an unconditioned map ignores valid labels.
    """

    def __init__(self, flow: Flow, spec: SolverSpec) -> None:
        self.flow, self.spec = flow, spec

    @property
    def num_classes(self) -> int:
        """Classes the map is conditioned on (0: a map of ``x`` alone)."""
        return int(getattr(self.flow.blocks[0].velocity, "num_classes", 0))

    def _labels(self, x: Tensor, labels: Tensor | None) -> Tensor | None:
        k = self.num_classes
        if labels is None:
            if k > 0:
                fail(
                    "labels",
                    f"are required by a label-conditioned map (num_classes={k}): pass "
                    "labels=(B,) integer classes",
                    None,
                )
            return None
        _check_labelled(x, labels)
        if k == 0:
            return None
        _check_label_range(labels, k, f"must lie in [0, {k})")
        return labels.to(x.device)

    def __call__(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``F(x)``, shape ``(B, d)``, in ``x``'s dtype; differentiable when grad mode is on."""
        x = self.flow._check(x, "x")
        lab = self._labels(x, labels)
        return _push(self.flow, x.to(self.dtype), self.spec, kinetic=False, labels=lab)[0].to(
            x.dtype
        )

    def inverse(self, y: Tensor, labels: Tensor | None = None) -> Tensor:
        """``F^{-1}(y)`` (up to solver error), shape ``(B, d)``, in ``y``'s dtype."""
        y = self.flow._check(y, "y")
        with _conditioned(self.flow, self._labels(y, labels)):
            u = self.flow.decode(self.flow.normalize(y.to(self.dtype)), solver=self.spec)
        return u.to(y.dtype)

    def trajectory(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Paths ``(blocks * steps + 1, B, d)`` in data units from ``x`` to ``F(x)``."""
        x = self.flow._check(x, "x")
        with _conditioned(self.flow, self._labels(x, labels)):
            return self.flow.trajectory(x, direction="encode", solver=self.spec)

    @property
    def dtype(self) -> torch.dtype:
        return self.flow.shift.dtype


@contextmanager
def _conditioned(flow: Flow, labels: Tensor | None) -> Iterator[None]:
    """Hand ``labels`` to every conditional block velocity for the duration (no-op for ``None``)."""
    with ExitStack() as stack:
        if labels is not None:
            for b in flow.blocks:
                if getattr(b.velocity, "num_classes", 0) > 0:
                    stack.enter_context(b.velocity.condition(labels))  # type: ignore[operator]
        yield


def _check_points(x: Any, argument: str) -> None:
    if not isinstance(x, Tensor):
        fail(argument, "must be a torch.Tensor", type(x).__name__)
    if x.ndim != 2 or x.shape[0] < 1 or not x.is_floating_point():
        fail(
            argument, "must be a floating (n, d) tensor with n >= 1", (tuple(x.shape), str(x.dtype))
        )
    check_finite(x, argument)


def _block_field(
    block: Block, scale: Tensor
) -> Callable[[Tensor, tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """Augmented field ``(du/ds, d kinetic/ds) = (v, |scale * v|^2)`` of one block."""

    def f(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        v = block(state[0], t)
        return v, ((v * scale) ** 2).sum(1)

    return f


def _push(
    flow: Flow,
    x: Tensor,
    spec: SolverSpec,
    *,
    kinetic: bool,
    blocks: Sequence[Block] | None = None,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(F(x), sum_k int |v_k|^2 ds)`` in data units through ``blocks`` (default: all); ``labels``
    condition the velocities (conditional blocks only)."""
    u = flow.normalize(x)
    chain = list(flow.blocks) if blocks is None else list(blocks)
    with _conditioned(flow, labels):
        if not kinetic:
            for b in chain:
                u = b.encode(u, spec)
            return flow.denormalize(u), None
        scale = flow.scale.to(u.dtype)
        total = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        for b in chain:
            zero = torch.zeros_like(total)
            u, kin = integrate(_block_field(b, scale), (u, zero), 0.0, 1.0, spec)  # type: ignore[misc]
            total = total + kin
        return flow.denormalize(u), total


@dataclass(frozen=True)
class Assessment:
    """Transport cost, risk and (for classifiers) accuracy before and after a map, on one set of points.

    Attributes:
        n: number of points.
        transport_cost: ``E|X - F(X)|^2`` (an upper bound on ``W2^2(P, F#P)``).
        risk_before, risk_after: ``E R(X)`` and ``E R(F(X))``.
        objective: ``E R(F(X)) - E|X - F(X)|^2 / (2 gamma)`` (``None`` without ``gamma``).
        accuracy_before, accuracy_after: classifier accuracy on ``X`` and ``F(X)`` (classifier risks).
    """

    n: int
    transport_cost: float
    risk_before: float
    risk_after: float
    objective: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def risk_increase(self) -> float:
        return self.risk_after - self.risk_before

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "risk_increase": self.risk_increase}


@torch.no_grad()
def assess(
    x: Tensor,
    y: Tensor,
    risk: Risk | ClassifierLoss,
    labels: Tensor | None = None,
    gamma: float | None = None,
) -> Assessment:
    """Compare points ``x`` with their images ``y = F(x)`` (both ``(n, d)``): cost, risk, accuracy."""
    _check_points(x, "x")
    if not isinstance(y, Tensor) or y.shape != x.shape:
        fail("y", f"must have the shape of x {tuple(x.shape)}", tuple(getattr(y, "shape", ())))
    cost = float(((y - x) ** 2).sum(1).mean())
    r0, r1 = float(risk_values(risk, x, labels).mean()), float(risk_values(risk, y, labels).mean())
    acc0 = acc1 = None
    if isinstance(risk, ClassifierLoss) and labels is not None:
        acc0, acc1 = accuracy(risk.classifier, x, labels), accuracy(risk.classifier, y, labels)
    obj = None if gamma is None else r1 - cost / (2 * gamma)
    return Assessment(int(x.shape[0]), cost, r0, r1, obj, acc0, acc1)


@dataclass
class WorstCaseResult:
    """What :func:`fit_worst_case` returns.

    Attributes:
        map: the learned map ``F``; config: its options; train: the assessment on the training points.
        history: records ``{block, step, gamma, loss, risk, cost, kinetic_excess}`` every ``log_every``
            steps (``gamma``: the Lagrange parameter of that step, see ``DROConfig.gamma_warmup``).
        seconds: training wall time.
    """

    map: WorstCaseMap
    config: DROConfig
    train: Assessment
    history: list[dict[str, float]]
    seconds: float


def _new_flow(x: Tensor, config: DROConfig, num_classes: int = 0) -> Flow:
    d = x.shape[1]
    xd = x.detach().cpu().double()
    shift, scale = standardization(xd, config.standardize)
    # (near-)constant coordinates keep the overall scale: dividing by a ~0 std would blow up new
    # points that vary there (e.g. border pixels of digits that are blank in every training image)
    overall = float(xd.std()) if xd.numel() > 1 else 1.0
    scale = torch.where(scale < 1e-3 * overall, torch.full_like(scale, max(overall, 1e-6)), scale)
    net_cfg = {
        "kind": "mlp",
        "dim": d,
        "hidden": list(config.hidden),
        "activation": config.activation,
        "time_freqs": config.time_freqs,
        "zero_init": True,
    }
    if num_classes > 0:
        net_cfg["num_classes"] = num_classes
    blocks = []
    for k in range(config.blocks):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stage_seed(config.seed, k, salt=71))
            blocks.append(Block(build_network(net_cfg)))
    flow = Flow(blocks, (d,), shift=shift, scale=scale)
    return flow.to(device=x.device, dtype=DTYPES[config.dtype])


def _objective(
    flow: Flow,
    blocks: Sequence[Block],
    x: Tensor,
    labels: Tensor | None,
    risk: Risk | ClassifierLoss,
    gamma: float,
    config: DROConfig,
) -> tuple[Tensor, dict[str, float]]:
    """Loss ``-E R(F x) + E|x - F x|^2 / (2 gamma) + kinetic excess`` of one minibatch; ``labels``
    go to the risk and to the velocities of a conditioned map."""
    y, kin = _push(flow, x, config.spec, kinetic=config.kinetic > 0, blocks=blocks, labels=labels)
    r = risk_values(risk, y, labels).mean()
    cost = ((y - x) ** 2).sum(1)
    loss = -r + cost.mean() / (2 * gamma)
    excess = torch.zeros((), dtype=x.dtype, device=x.device)
    if kin is not None:
        excess = (len(blocks) * kin - cost).mean()
        loss = loss + config.kinetic * excess / (2 * gamma)
    terms = {
        "gamma": float(gamma),
        "loss": float(loss.detach()),
        "risk": float(r.detach()),
        "cost": float(cost.mean().detach()),
        "kinetic_excess": float(excess.detach()),
    }
    return loss, terms


def _optimise(
    flow: Flow,
    blocks: Sequence[Block],
    x: Tensor,
    labels: Tensor | None,
    risk: Risk | ClassifierLoss,
    gamma: float,
    config: DROConfig,
    index: int,
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> list[dict[str, float]]:
    params = [p for b in blocks for p in b.parameters()]
    opt_cls = torch.optim.AdamW if config.weight_decay > 0 else torch.optim.Adam
    opt = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(stage_seed(config.seed, index, salt=72))
    n, history = x.shape[0], []
    for step in range(config.steps):
        lr = (
            cosine_lr(config.lr, step, config.steps)
            if config.lr_schedule == "cosine"
            else config.lr
        )
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen).to(x.device)
        lab = None if labels is None else labels[idx]
        g_step = _annealed_gamma(gamma, step, config)
        loss, terms = _objective(flow, blocks, x[idx], lab, risk, g_step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"loss became {terms['loss']} at step {step + 1}; lower lr or gamma"
            )
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append({"block": index, "step": step + 1, **terms})
            if progress is not None:
                progress(index * config.steps + step + 1, _total_steps(config), terms)
    return history


def _annealed_gamma(gamma: float, step: int, config: DROConfig) -> float:
    """Lagrange parameter at optimiser ``step``: geometric from ``gamma * gamma_start`` to ``gamma``
    over the first ``gamma_warmup`` of the steps, then ``gamma``."""
    warm = int(config.gamma_warmup * config.steps)
    if step >= warm:
        return gamma
    return gamma * config.gamma_start ** (1 - step / warm)


def _total_steps(config: DROConfig) -> int:
    return config.steps * (config.blocks if config.schedule == "progressive" else 1)


def _resolve_risk_and_labels(
    reference: Tensor | str | os.PathLike[str], risk: Any, labels: Tensor | None, n: int, seed: int
) -> tuple[Tensor, Risk | ClassifierLoss, Tensor | None]:
    if labels is not None and not uses_labels(risk):
        if not isinstance(risk, nn.Module):
            fail(
                "labels",
                "are only used with a classifier risk (a ClassifierLoss or a logits module) or "
                "another label-dependent risk",
                type(risk).__name__,
            )
        risk = ClassifierLoss(risk)  # a classifier given with labels: its loss is the risk
    if not callable(risk):
        fail(
            "risk",
            "must be a callable R(y) -> (B,), a ClassifierLoss or a classifier with labels",
            type(risk).__name__,
        )
    if isinstance(reference, Tensor):
        x = reference
    else:
        ref = load_reference(reference, n_train=n, n_test=1, seed=seed)
        x = ref.train
        if labels is None and isinstance(risk, ClassifierLoss):
            labels = ref.train_labels
    _check_points(x, "reference")
    if isinstance(risk, ClassifierLoss) and labels is None:
        labels = risk.predict(x)  # no labels known: attack the classifier's own predictions
    if uses_labels(risk) and labels is None:
        fail("labels", "are required by a label-dependent risk", type(risk).__name__)
    if labels is not None:
        _check_labelled(x, labels)
        labels = labels.to(x.device)
    return x, risk, labels


def _num_classes(risk: Any, x: Tensor, labels: Tensor) -> int:
    """Classes of a label-dependent risk: the classifier's logits, a ``classes`` attribute, or the
    largest label + 1."""
    if isinstance(risk, ClassifierLoss):
        with torch.no_grad():
            k = int(risk.classifier(x[:1]).shape[1])
    else:
        k = int(getattr(risk, "classes", 0)) or int(labels.max()) + 1
    _check_label_range(labels, k, f"must lie in [0, {k}) (the risk's classes)")
    return k


def fit_worst_case(
    reference: Tensor | str | os.PathLike[str],
    risk: Risk | ClassifierLoss | nn.Module,
    *,
    labels: Tensor | None = None,
    config: DROConfig | None = None,
    n: int = 2000,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> WorstCaseResult:
    """Learn the worst-case map ``F`` maximising ``E R(F(X)) - E|X - F(X)|^2 / (2 gamma)``.

    Arguments:
        reference: samples of ``P``, ``(n, d)``; or a data-set name / run folder, from which ``n``
            training samples are drawn (see :func:`load_reference`).
        risk: ``R``: a differentiable callable ``(B, d) -> (B,)``; a :class:`ClassifierLoss`; or a
            classifier module returning logits together with ``labels`` (its cross-entropy is the
            risk). For a classifier without labels, the labels of a labelled reference set are used,
            else the classifier's own predictions on the reference points.
        labels: ``(n,)`` labels of the reference points (classifier and other label-dependent risks).
            With ``config.condition="auto"`` the map is then conditioned on them, and applying it
            needs labels too: ``result.map(x, labels=...)``.
        config: options (:class:`DROConfig`); ``config.dtype`` sets the map's precision (the risk
            must accept it).
        progress: called as ``progress(step, total_steps, terms)`` every ``log_every`` steps.

    Returns:
        :class:`WorstCaseResult` with the map, the training assessment and the loss history.
    """
    config = DROConfig() if config is None else config
    x, risk, labels = _resolve_risk_and_labels(reference, risk, labels, n, config.seed)
    x = x.to(DTYPES[config.dtype])
    conditioned = config.condition == "auto" and labels is not None and uses_labels(risk)
    flow = _new_flow(x, config, _num_classes(risk, x, labels) if conditioned else 0)
    t0 = time.perf_counter()
    flow.train()
    if config.schedule == "joint":
        history = _optimise(
            flow, list(flow.blocks), x, labels, risk, config.gamma, config, 0, progress
        )
    else:
        history, pushed = [], x
        gamma_k = config.gamma / config.blocks
        for k, b in enumerate(flow.blocks):
            history += _optimise(flow, [b], pushed, labels, risk, gamma_k, config, k, progress)
            with torch.no_grad():
                pushed = _push(flow, pushed, config.spec, kinetic=False, blocks=[b], labels=labels)[
                    0
                ]
    flow.eval()
    wc_map = WorstCaseMap(flow, config.spec)
    with torch.no_grad():
        train = assess(x, wc_map(x, labels), risk, labels, config.gamma)
    return WorstCaseResult(wc_map, config, train, history, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# Baseline: per-sample gradient ascent (classical Lagrangian adversarial step)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AscentResult:
    """Per-sample worst case by gradient ascent.

    Attributes:
        points: ``(n, d)`` final points ``x'``; gamma, steps: the settings used.
        step_size: the fixed step ``eta``, or the initial per-sample step when ``adaptive``.
        adaptive: whether steps were controlled per sample (see :func:`gradient_ascent`).
        gradient_evaluations: risk gradients computed per sample (the re-optimisation cost of every
            new sample).
    """

    points: Tensor
    gamma: float
    steps: int
    step_size: float
    adaptive: bool
    gradient_evaluations: int

    def displacement(self, x: Tensor) -> Tensor:
        """``x' - x``, shape ``(n, d)``."""
        return self.points - x


def _lagrangian(
    risk: Risk | ClassifierLoss, z: Tensor, x0: Tensor, labels: Tensor | None, gamma: float
) -> tuple[Tensor, Tensor]:
    """``J(z) = R(z) - |z - x0|^2 / (2 gamma)`` per sample ``(n,)`` and its gradient ``(n, d)``."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        r = risk_values(risk, zr, labels)
        g = torch.autograd.grad(r.sum(), zr)[0]
    diff = z.detach() - x0
    return r.detach() - (diff**2).sum(1) / (2 * gamma), g - diff / gamma


def gradient_ascent(
    x: Tensor,
    risk: Risk | ClassifierLoss,
    *,
    gamma: float,
    labels: Tensor | None = None,
    steps: int = 100,
    step_size: float | None = None,
) -> AscentResult:
    """Per-sample gradient ascent on ``J(x') = R(x') - |x - x'|^2 / (2 gamma)``, started at ``x' = x``.

    ``x' <- x' + eta (grad R(x') - (x' - x) / gamma)``: the Lagrangian adversarial step of WRM (Sinha,
    Namkoong & Duchi 2018, arXiv 1710.10571).

    * ``step_size`` given: that fixed ``eta`` for every sample (the classical iteration; with
      ``eta = gamma / 5`` it converges to the proximal point when ``gamma * Lip(grad R) < 9``, and may
      oscillate otherwise).
    * ``step_size=None`` (default): the same ascent direction with a per-sample step control, so
      that a sharp risk cannot make it oscillate: each sample starts at ``eta = gamma / 5``; a step is
      taken only if it does not decrease that sample's ``J`` (then ``eta`` grows by 1.25), otherwise it
      is refused and ``eta`` halves. ``J`` never decreases. One risk gradient per step.

    Arguments:
        x: ``(n, d)`` points; risk, labels: as in :func:`fit_worst_case`.
        gamma: Lagrange parameter; steps: ascent steps; step_size: fixed ``eta`` or ``None``.
    """
    _check_points(x, "x")
    check_positive(gamma, "gamma")
    check_positive(steps, "steps", integer=True)
    if step_size is not None:
        check_positive(step_size, "step_size")
    if labels is not None:
        _check_labelled(x, labels)
    x0 = x.detach()
    z = x0.clone()
    if step_size is not None:
        for _ in range(steps):
            z = z + step_size * _lagrangian(risk, z, x0, labels, gamma)[1]
        return AscentResult(z, float(gamma), int(steps), float(step_size), False, int(steps))
    j, g = _lagrangian(risk, z, x0, labels, gamma)
    eta = torch.full((x.shape[0], 1), gamma / 5, dtype=x.dtype, device=x.device)
    for _ in range(steps):
        cand = z + eta * g
        jc, gc = _lagrangian(risk, cand, x0, labels, gamma)
        ok = (jc >= j)[:, None]
        z, g = torch.where(ok, cand, z), torch.where(ok, gc, g)
        j = torch.where(ok[:, 0], jc, j)
        eta = torch.where(ok, eta * 1.25, eta * 0.5)
    return AscentResult(z, float(gamma), int(steps), float(gamma / 5), True, int(steps) + 1)


def calibrate_ascent(
    x: Tensor,
    risk: Risk | ClassifierLoss,
    target_cost: float,
    *,
    labels: Tensor | None = None,
    steps: int = 100,
    gamma0: float = 1.0,
    rtol: float = 1e-3,
    max_iter: int = 40,
) -> AscentResult:
    """Gradient ascent whose transport cost ``E|x - x'|^2`` matches ``target_cost``.

    Bisects ``log gamma`` (the converged per-sample cost is non-decreasing in ``gamma``) after
    doubling/halving from ``gamma0`` to bracket the target (adaptive steps, see :func:`gradient_ascent`).

    Returns:
        The :class:`AscentResult` whose cost is closest to ``target_cost`` (relative error ``<= rtol``
        unless ``max_iter`` runs out or the risk cannot reach the cost).
    """
    check_positive(target_cost, "target_cost")
    check_positive(gamma0, "gamma0")

    def run(g: float) -> tuple[AscentResult, float]:
        res = gradient_ascent(x, risk, gamma=g, labels=labels, steps=steps)
        return res, float(((res.points - x) ** 2).sum(1).mean())

    best, best_cost = run(gamma0)
    lo, hi = (gamma0, None) if best_cost < target_cost else (None, gamma0)
    for _ in range(max_iter):
        if abs(best_cost - target_cost) <= rtol * target_cost:
            break
        if lo is not None and hi is not None:
            g = math.sqrt(lo * hi)
        else:
            g = (lo * 2.0) if lo is not None else (hi / 2.0)  # type: ignore[operator]
        res, cost = run(g)
        if abs(cost - target_cost) < abs(best_cost - target_cost):
            best, best_cost = res, cost
        if cost < target_cost:
            lo = g
        else:
            hi = g
    return best


def _nearest_index(a: Tensor, b: Tensor, chunk: int = 2048) -> Tensor:
    """Index into ``b`` of the nearest row (Euclidean) for every row of ``a``, shape ``(len(a),)``."""
    out = []
    for i in range(0, a.shape[0], chunk):
        out.append(torch.cdist(a[i : i + chunk], b).argmin(1))
    return torch.cat(out)


def transfer_displacement(train_x: Tensor, train_points: Tensor, new_x: Tensor) -> Tensor:
    """Re-use per-sample worst-case steps on new points: ``x_new + (x'_j - x_j)``, ``j`` = nearest
    training point of ``x_new``.

    This is the cheapest way to apply a per-sample attack to samples it was not computed on (the
    alternative, re-optimising every new sample, costs ``steps`` risk gradients per sample).

    Returns:
        ``(m, d)`` transferred points.
    """
    _check_points(train_x, "train_x")
    _check_points(new_x, "new_x")
    if train_points.shape != train_x.shape:
        fail(
            "train_points",
            f"must have the shape of train_x {tuple(train_x.shape)}",
            tuple(train_points.shape),
        )
    j = _nearest_index(new_x, train_x)
    return new_x + (train_points - train_x)[j]


# ------------------------------------------------------------------------------------------------
# Run-folder I/O
# ------------------------------------------------------------------------------------------------


def save_worst_case(result: WorstCaseResult, folder: str | Path) -> Path:
    """Write ``dro.json`` (config, networks, assessment, history), ``blocks/block_XXX.safetensors`` and
    ``normalization.safetensors`` into ``folder`` (``dro.json`` last: it is the commit record)."""
    folder, run = Path(folder), RunDir(folder)
    flow = result.map.flow
    nets = []
    for i, b in enumerate(flow.blocks):
        save_tensors(run.block(i), b.state_dict())
        nets.append(b.velocity.config())  # type: ignore[operator]
    save_tensors(run.normalization, {"shift": flow.shift, "scale": flow.scale})
    save_json(
        folder / "dro.json",
        {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "config": result.config.to_json(),
            "event_shape": list(flow.event_shape),
            "networks": nets,
            "train": result.train.to_json(),
            "history": result.history,
            "seconds": result.seconds,
        },
    )
    return folder


def load_worst_case(folder: str | Path, *, device: str = "cpu") -> WorstCaseResult:
    """Load what :func:`save_worst_case` wrote (never unpickles; mismatches raise InputError)."""
    folder, run = Path(folder), RunDir(folder)
    meta = load_json(folder / "dro.json", "run")
    if not isinstance(meta, dict) or not {"config", "networks", "event_shape", "train"} <= set(
        meta
    ):
        fail("run", "dro.json must hold config, networks, event_shape and train", str(folder))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        fail(
            "run",
            f"was written by a newer iterflow (format {meta.get('format_version')})",
            str(folder),
        )
    config = DROConfig.from_json(meta["config"])
    flow = load_flow(
        run,
        meta["networks"],
        meta["event_shape"],
        dtype=DTYPES[config.dtype],
        device=device,
        source="dro.json",
    )
    train_fields = {f.name for f in dataclasses.fields(Assessment)}
    train = Assessment(**{k: v for k, v in meta["train"].items() if k in train_fields})
    return WorstCaseResult(
        WorstCaseMap(flow, config.spec),
        config,
        train,
        list(meta.get("history", [])),
        float(meta.get("seconds", 0.0)),
    )


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def plot_displacement(
    x: Tensor,
    y: Tensor,
    path: str | Path,
    labels: Tensor | None = None,
    title: str | None = None,
    n_arrows: int = 300,
) -> Path:
    """2-D scatter of original points (circles) and their worst-case images (crosses), with arrows.

    Arguments:
        x, y: ``(n, 2)`` points and images; labels: optional classes (colours).
        n_arrows: arrows drawn for an evenly spaced subset of the points.
    """
    from matplotlib.figure import Figure

    from iterflow.viz import DPI

    xa, ya = x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy()
    if xa.ndim != 2 or xa.shape[1] != 2 or ya.shape != xa.shape:
        fail("x", "must have shape (n, 2), like y", (xa.shape, ya.shape))
    lab = np.zeros(len(xa), dtype=int) if labels is None else labels.detach().cpu().numpy()
    fig = Figure(figsize=(6.5, 6.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for c in np.unique(lab):
        m = lab == c
        col = colors[int(c) % len(colors)]
        ax.scatter(
            xa[m, 0],
            xa[m, 1],
            s=6,
            c=col,
            alpha=0.35,
            label=f"P (class {c})" if labels is not None else "P",
        )
        ax.scatter(
            ya[m, 0],
            ya[m, 1],
            s=8,
            c=col,
            marker="x",
            alpha=0.8,
            label=f"worst case (class {c})" if labels is not None else "worst case",
        )
    idx = np.unique(np.linspace(0, len(xa) - 1, min(n_arrows, len(xa))).round().astype(int))
    d = ya[idx] - xa[idx]
    ax.quiver(
        xa[idx, 0],
        xa[idx, 1],
        d[:, 0],
        d[:, 1],
        angles="xy",
        scale_units="xy",
        scale=1.0,
        width=0.002,
        color="0.25",
        alpha=0.6,
    )
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=11)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", facecolor="white")
    return out


def plot_digit_pairs(
    original: Tensor,
    worst: Tensor,
    path: str | Path,
    *,
    value_range: tuple[float, float],
    ncol: int = 8,
    title: str | None = None,
) -> Path:
    """Image grid: rows alternate original images and their worst-case images (``(n, C, H, W)`` each)."""
    from iterflow.viz import plot_image_grid

    if original.shape != worst.shape or original.ndim != 4:
        fail(
            "worst",
            f"must have the shape of original {tuple(original.shape)} (n, C, H, W)",
            tuple(worst.shape),
        )
    ncol = max(1, min(ncol, original.shape[0]))
    n = (original.shape[0] // ncol) * ncol
    o, w = (
        original[:n].reshape(-1, ncol, *original.shape[1:]),
        worst[:n].reshape(-1, ncol, *original.shape[1:]),
    )
    rows = torch.stack([o, w], 1).reshape(-1, *original.shape[1:])  # (orig row, worst row) pairs
    return plot_image_grid(
        rows.detach().cpu(), path, nrow=ncol, value_range=value_range, title=title
    )
