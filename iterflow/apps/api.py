"""The tensor-first Python face of iterflow: :func:`fit` trains any method on a tensor, an array or a
``torch.utils.data.Dataset``, with the built-in networks or the user's own velocity module.

The command line's data set names are a layer on top of the same trainer
(:func:`iterflow.train.train`); here the data are the caller's rows, and nothing is written to disk
unless a run folder ``out`` is given.

Example:
    >>> import torch, iterflow
    >>> x = torch.randn(256, 2, dtype=torch.float64) * 0.5 + 1.0
    >>> class Velocity(torch.nn.Module):  # any module v(x, t, **cond); t is 0-dim or (B,)
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.net = torch.nn.Sequential(
    ...             torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
    ...     def forward(self, x, t):
    ...         t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
    ...         return self.net(torch.cat([x, t], 1))
    >>> result = iterflow.fit("fm", x, velocity=Velocity(), steps=50)
    >>> result.flow.sample(3, solver="rk4", steps=8).dtype, result.run_dir
    (torch.float64, None)
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iterflow.core.guidance import LABEL_KEY
from iterflow.errors import check_finite, fail
from iterflow.train import (
    Reporter,
    TrainConfig,
    TrainData,
    TrainResult,
    VelocitySource,
    check_labels,
    stage_seed,
    train_tensors,
)

#: ``fit`` settings that describe a named data set; :func:`fit` takes its data as ``x``.
DATA_SETTINGS = ("data", "n_train", "n_test", "img2d_dir")
#: Torch dtypes a run can train in (the others train in the config's default, float32).
_RUN_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def fit(
    method: str,
    x: Tensor | np.ndarray | torch.utils.data.Dataset,
    *,
    velocity: VelocitySource | None = None,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    cond: Mapping[str, Any] | None = None,
    labels: Any = None,
    reporter: Reporter | None = None,
    **settings: Any,
) -> TrainResult:
    """Train a flow on the rows of ``x`` with ``method`` (``fm``, ``cnf``, ``jko``, ``local-fm``, ...).

    Arguments:
        method: a name in :data:`iterflow.methods.METHODS`.
        x: the training rows, ``(n, *E)`` with ``n >= 2``: a tensor, a NumPy array (or anything
            ``numpy.asarray`` reads), or a ``torch.utils.data.Dataset`` whose items are rows or
            ``(row, label, ...)`` tuples (the first element is taken).
        velocity: the network of every block, instead of the built-in one of the config: an
            ``nn.Module`` called as ``v(x, t, **cond)`` (``x`` ``(B, *E)`` in the flow's normalised
            units; ``t`` a 0-dim tensor inside ODE solvers or ``(B,)`` in training losses; ``cond``
            the rows of ``cond``), deep-copied into each block (the module you pass is not
            trained; the trained copies are ``result.flow.blocks[i].velocity``); or a factory
            ``() -> nn.Module`` called once per block under a seed derived from ``seed``.
        config: a full :class:`~iterflow.train.TrainConfig` for ``method``; ``settings`` override
            its fields. Without it the config is ``TrainConfig.for_method(method, **settings)``
            (the method's recommended settings where ``settings`` leave a field unset).
        out: run folder: checkpoints every ``checkpoint_every`` steps, resumption when called again
            with the same data and settings, :func:`iterflow.train.load_run`. ``None`` (default):
            train in memory and write nothing. A velocity module without a ``config()`` is saved as
            weights only: load such a folder with ``load_run(out, velocity=module)``.
        cond: per-row conditioning: name -> ``(n, ...)`` tensor or array, aligned with the rows of
            ``x``, passed to ``velocity`` as keyword arguments (e.g. ``{"y": labels}``). Sample or
            score the trained flow under :func:`iterflow.conditioning` with the rows you want.
            Methods whose minibatches are not data rows (``reflow``, ``distill``) refuse it.
        labels: ``(n,)`` integer class labels in ``[0, K)`` of the rows of ``x`` (``K`` = the
            largest label + 1): the run is class-conditional, with the labels as ``cond["y"]``;
            the built-in networks get ``K`` classes and a null label, trained with label dropout
            (``label_dropout``, default 0.1), so the flow samples per class with
            classifier-free guidance (``flow.sample(n, labels=y, guidance=w)``) and scores
            ``log p(x | y)`` (:mod:`iterflow.evaluation.conditional`). A user ``velocity`` gets
            them as its keyword argument ``y``.
        reporter: progress sink (default: silent).
        **settings: :class:`~iterflow.train.TrainConfig` fields (``steps``, ``blocks``,
            ``batch_size``, ``lr``, ``hidden``, ``seed``, ``options``, ``n_val``, ...). ``dtype`` and
            ``device`` default to those of a tensor (or ``Dataset``) ``x`` (float32 / float64),
            else (arrays) ``float32`` on ``cpu``. Fields naming a data set
            (:data:`DATA_SETTINGS`) are refused.

    Returns:
        :class:`~iterflow.train.TrainResult`: ``flow`` (data units, evaluation mode), ``history``
        (one record per stage), ``run_dir`` (``None`` without ``out``), ``splits`` (the training
        rows; ``val`` is a seeded subset of at most ``n_val`` of them, used only for each stage's
        report; ``test`` is empty).

    Raises:
        InputError: naming the argument: ``x`` not rows of finite real numbers, ``cond`` not aligned
            with ``x``, a setting that names a data set, ``config`` for another method.
    """
    rows = as_rows(x, "x")
    cond_rows = {
        name: as_rows(v, f"cond[{name!r}]", min_rows=1) for name, v in (cond or {}).items()
    }
    num_classes = 0
    if labels is not None:
        if LABEL_KEY in cond_rows:
            fail("labels", "give class labels once: as labels or as cond['y']", "both")
        y = as_rows(labels, "labels", min_rows=1)
        if y.ndim != 1 or y.is_floating_point():
            fail("labels", "must be (n,) integer class labels", tuple(y.shape))
        num_classes = int(y.max()) + 1
        cond_rows[LABEL_KEY] = check_labels(y, num_classes, "labels")
    for name, v in cond_rows.items():
        if v.shape[0] != rows.shape[0]:
            fail("cond", f"{name!r} must have one row per row of x ({rows.shape[0]})", v.shape[0])
    if cond_rows and velocity is None and not num_classes:
        fail(
            "cond",
            "needs a velocity module that takes it as keyword arguments (class labels: "
            "pass labels=y for the built-in networks)",
            sorted(cond_rows),
        )
    typed = isinstance(x, (Tensor, torch.utils.data.Dataset))  # dtype/device chosen by the caller
    cfg = _config(method, rows if typed else None, config, settings, custom=velocity is not None)
    g = torch.Generator().manual_seed(stage_seed(cfg.seed, 0, salt=3))
    idx = torch.randperm(rows.shape[0], generator=g)[: min(rows.shape[0], cfg.n_val)].to(
        rows.device
    )
    fingerprint = _fingerprint(rows, cond_rows) if out is not None else None
    data = TrainData(
        train=rows,
        val=rows[idx],
        description=_describe(rows, cond_rows, fingerprint),
        cond=cond_rows,
        val_cond={name: v[idx] for name, v in cond_rows.items()},
        num_classes=num_classes,
    )
    name = "tensor" if fingerprint is None else f"tensor:{fingerprint}"
    cfg = dataclasses.replace(cfg, data=name, n_train=rows.shape[0], n_val=len(idx))
    return train_tensors(cfg, data, out, velocity=velocity, reporter=reporter)


def as_rows(x: Any, argument: str = "x", *, min_rows: int = 2) -> Tensor:
    """The rows of ``x`` as a tensor ``(n, ...)``: a tensor (detached), an array, or a
    ``torch.utils.data.Dataset`` (items stacked; the first element of tuple items). Real numbers
    only (floating or integer), finite, at least ``min_rows`` rows; errors name ``argument``."""
    if isinstance(x, torch.utils.data.TensorDataset):
        x = x.tensors[0]
    elif isinstance(x, torch.utils.data.Dataset):
        x = _stack_dataset(x, argument)
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:
            fail(argument, "must be a tensor, an array or a torch Dataset of rows", str(e))
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            fail(argument, "must hold real numbers", str(arr.dtype))
        t = torch.from_numpy(np.array(arr, copy=True))  # a copy: read-only inputs stay untouched
    if t.dtype == torch.bool or t.is_complex():
        fail(argument, "must hold real numbers (floating or integer)", str(t.dtype))
    if t.ndim < (2 if min_rows > 1 else 1) or t.shape[0] < min_rows:
        rule = "rows (n, *event_shape)" if min_rows > 1 else "one row per sample"
        fail(argument, f"must be {rule} with at least {min_rows} row(s)", tuple(t.shape))
    if t.is_floating_point():
        check_finite(t, argument)
    return t


def _stack_dataset(ds: torch.utils.data.Dataset, argument: str) -> Tensor:
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        fail(argument, "must be a map-style torch Dataset (with len())", type(ds).__name__)
    items = []
    for i in range(n):
        item = ds[i]
        if isinstance(item, (tuple, list)):
            item = item[0]  # (x, label, ...): the rows are the first element
        items.append(torch.as_tensor(item))
    if not items:
        fail(argument, "must hold at least 2 rows", 0)
    try:
        return torch.stack(items)
    except RuntimeError as e:
        fail(argument, "items must all have the same shape", str(e).splitlines()[0])


def _config(
    method: str,
    like: Tensor | None,
    config: TrainConfig | None,
    settings: dict[str, Any],
    *,
    custom: bool,
) -> TrainConfig:
    """The run's config: ``config`` or the method's recommendations, overridden by ``settings``;
    ``dtype``/``device`` from the tensor ``like`` (``None``: an array, whose float64 is NumPy's
    default rather than a choice: the config's float32) unless set."""
    for key in DATA_SETTINGS:
        if key in settings:
            fail(
                key,
                "names a data set; fit trains on x (iterflow.train.train takes names)",
                settings[key],
            )
    if config is None:
        given = dict(settings)
        if like is not None:
            given.setdefault("dtype", _RUN_DTYPES.get(like.dtype, "float32"))
            if like.device.type != "cpu":
                given.setdefault("device", str(like.device))
        # the recommendations tuned for the built-in MLP do not apply to the user's module
        if custom:
            given.setdefault("network", "custom")
        cfg = TrainConfig.for_method(method, **given)
    else:
        if not isinstance(config, TrainConfig):
            fail("config", "must be an iterflow.train.TrainConfig", type(config).__name__)
        if config.method != method:
            fail(
                "config",
                f"is a config of method {config.method!r}, not of {method!r}",
                config.method,
            )
        cfg = dataclasses.replace(config, **settings)
    return dataclasses.replace(cfg, network="custom") if custom else cfg


def _describe(rows: Tensor, cond: dict[str, Tensor], fingerprint: str | None) -> dict[str, Any]:
    """The data record of the run (``meta.json``'s ``data``)."""
    out: dict[str, Any] = {
        "name": "tensor",
        "source": "python",
        "dim": int(rows[0].numel()),
        "event_shape": list(rows.shape[1:]),
        "finite": True,
        "has_log_prob": False,
        "n_rows": int(rows.shape[0]),
        "dtype": str(rows.dtype).replace("torch.", ""),
    }
    if cond:
        out["cond"] = {name: list(v.shape[1:]) for name, v in cond.items()}
    if fingerprint is not None:
        out["fingerprint"] = fingerprint
    return out


def _fingerprint(rows: Tensor, cond: dict[str, Tensor]) -> str:
    """SHA-256 (16 hex digits) of the rows and the conditioning: a run folder resumes only on the
    same data (it is part of the config's ``data`` and so of its hash)."""
    h = hashlib.sha256()
    for name, t in (("x", rows), *sorted(cond.items())):
        c = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(c.shape)}:{c.dtype};".encode())
        h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()[:16]
