"""What a training run is given: its tensors (:class:`TrainData`) and, optionally, the user's own
velocity network (:data:`VelocitySource`), with the helpers that build, record and rebuild such
networks block by block.

A user's velocity is any ``nn.Module`` called as ``v(x, t, **cond)``: ``x`` ``(B, *E)`` in the flow's
normalised units, ``t`` a 0-dim tensor (ODE solvers) or ``(B,)`` (training losses), ``cond`` the
per-row keyword arguments bound by :func:`iterflow.core.conditioning.conditioning`. A module is
deep-copied into every block; a factory ``() -> nn.Module`` is called once per block under a seed.
In a run folder a module with a ``config()`` (registered kind) is rebuilt from it; one without is
recorded as ``{"kind": "custom", "class": ...}`` (weights only): load it with ``velocity=`` again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from iterflow.core.flow import Block
from iterflow.core.guidance import LABEL_KEY
from iterflow.core.nn import NETWORKS, build_network
from iterflow.data import Splits, get_dataset
from iterflow.errors import check_positive, fail
from iterflow.train.config import TrainConfig

#: A user's velocity network: a module (deep-copied into every block) or a factory of modules
#: (called once per block, under a seed derived from the run's seed and the block's index).
VelocitySource = nn.Module | Callable[[], nn.Module]


@dataclass(frozen=True)
class TrainData:
    """The tensors a run trains on.

    Attributes:
        train: ``(n, *E)`` training rows (data units); minibatches are drawn from them.
        val: ``(m, *E)`` validation rows (``m >= 1``), pushed through every stage for its report.
        description: JSON-serialisable summary recorded in the run's ``meta.json`` (``data``).
        test: ``(k, *E)`` held-out rows (not used by training; returned in :class:`TrainResult`).
        cond: per-row conditioning of ``train``: name -> ``(n, ...)`` tensor, passed to the velocity
            networks as keyword arguments (:func:`iterflow.core.conditioning.conditioning`).
        val_cond: the same for ``val`` (``(m, ...)``; required with ``cond``, same names).
        num_classes: ``K > 0``: class labels, ``cond["y"]`` and ``val_cond["y"]`` ``(n,)`` integers
            in ``[0, K)``; the built-in networks are then label-conditional with ``K`` classes and a
            null label (label dropout, classifier-free guidance). 0: no class labels.
    """

    train: Tensor
    val: Tensor
    description: dict[str, Any]
    test: Tensor | None = None
    cond: Mapping[str, Tensor] = field(default_factory=dict)
    val_cond: Mapping[str, Tensor] = field(default_factory=dict)
    num_classes: int = 0

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            x = getattr(self, name)
            if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 1:
                fail(name, "must be a tensor of shape (n, *event_shape) with n >= 1", _shape(x))
        if self.val.shape[1:] != self.train.shape[1:]:
            fail(
                "val",
                f"rows must have the shape of the training rows {tuple(self.train.shape[1:])}",
                tuple(self.val.shape),
            )
        if set(self.cond) != set(self.val_cond):
            fail(
                "val_cond",
                f"must name the same tensors as cond {sorted(self.cond)}",
                sorted(self.val_cond),
            )
        for cond, rows, name in (
            (self.cond, self.train, "cond"),
            (self.val_cond, self.val, "val_cond"),
        ):
            for key, v in cond.items():
                if not isinstance(v, Tensor) or v.ndim == 0 or v.shape[0] != rows.shape[0]:
                    fail(
                        name,
                        f"{key!r} must be a tensor with one row per row ({rows.shape[0]})",
                        _shape(v),
                    )
        if self.num_classes:
            check_positive(self.num_classes, "num_classes", integer=True)
            for cond, name in ((self.cond, "cond"), (self.val_cond, "val_cond")):
                check_labels(cond.get(LABEL_KEY), self.num_classes, f"{name}[{LABEL_KEY!r}]")

    def class_counts(self) -> list[int]:
        """Training rows per class (``num_classes`` counts; the empirical prior ``p(y)``)."""
        y = self.cond[LABEL_KEY].long().cpu()
        return [int(c) for c in torch.bincount(y, minlength=self.num_classes)]

    def splits(self) -> Splits:
        """The rows as :class:`~iterflow.data.Splits` (an empty ``test`` when there is none)."""
        test = self.test if self.test is not None else self.train[:0]
        return Splits(self.train, self.val, test)


def check_labels(y: Any, num_classes: int, argument: str) -> Tensor:
    """``y`` as ``(n,)`` int64 class labels in ``[0, num_classes)``, or an error naming ``argument``."""
    if not isinstance(y, Tensor) or y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
        fail(argument, "must be (n,) integer class labels", _shape(y))
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        fail(argument, f"must lie in [0, {num_classes})", (int(y.min()), int(y.max())))
    return y.long()


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def block_network_config(b: Block) -> dict[str, Any]:
    """The record of a block's network in ``meta.json``: its ``config()``, or for a user's module
    without one ``{"kind": "custom", "class": ...}`` (weights only: load it with ``velocity=``)."""
    cfg = getattr(b.velocity, "config", None)
    if cfg is None:
        cls = type(b.velocity)
        return {"kind": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}
    return cfg()


def new_velocity(source: VelocitySource, seed: int) -> nn.Module:
    """A fresh velocity from a user's ``source``: a deep copy of a module, or a factory's module
    built under ``seed`` (without touching the global random state)."""
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)
    if not callable(source):
        fail("velocity", "must be an nn.Module or a function returning one", type(source).__name__)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = source()
    if not isinstance(net, nn.Module):
        fail("velocity", "must return an nn.Module when called", type(net).__name__)
    return net


def rebuild_velocity(
    net_cfg: dict[str, Any], velocity: VelocitySource | None, index: int
) -> nn.Module:
    """The network of recorded block ``index``: from ``velocity`` when given (weights are loaded
    afterwards), else from its recorded config (:func:`iterflow.core.nn.build_network`)."""
    if velocity is not None:
        return new_velocity(velocity, 0)
    if net_cfg.get("kind") not in NETWORKS.names():
        fail(
            "velocity",
            f"is required: block {index} holds a user network that the run folder cannot "
            "rebuild; pass a module (or factory) of that class",
            net_cfg.get("class", net_cfg.get("kind")),
        )
    return build_network(net_cfg)


def labelled_data(cfg: TrainConfig) -> TrainData:
    """The splits of the data set ``cfg.data`` with their class labels (a run with ``cfg.labels``):
    ``cond["y"]`` and ``val_cond["y"]`` from :meth:`~iterflow.data.Dataset.label_splits`, and
    the set's ``num_classes``.

    Raises:
        InputError: (argument ``labels``) a data set without class labels.
    """
    dataset = get_dataset(cfg.data, img2d_dir=cfg.img2d_dir, label_column=cfg.label_column or None)
    if dataset.num_classes < 1:
        fail(
            "labels",
            "need a labelled data set (moons, pinwheel, 8gaussians, digits8, fashion-mnist, "
            "sklearn:iris, ...; or a table with label_column)",
            cfg.data,
        )
    args = (cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    splits, labels = dataset.splits(*args), dataset.label_splits(*args)
    description = dataset.describe()
    names = getattr(dataset, "class_names", None)
    if names is not None:
        description.setdefault("class_names", [str(n) for n in names])
    return TrainData(
        splits.train,
        splits.val,
        description,
        test=splits.test,
        cond={LABEL_KEY: labels.train},
        val_cond={LABEL_KEY: labels.val},
        num_classes=dataset.num_classes,
    )


def labels_record(data: TrainData, cfg: TrainConfig) -> dict[str, Any]:
    """The ``labels`` entry of a labelled run's manifest: ``num_classes``, the training rows per
    class ``class_counts`` (the prior ``p(y)`` of the generative classifier), ``label_dropout``
    and the data set's ``class_names`` when it has them."""
    out: dict[str, Any] = {
        "num_classes": data.num_classes,
        "class_counts": data.class_counts(),
        "label_dropout": cfg.label_dropout,
    }
    names = data.description.get("class_names")
    if names is not None:
        out["class_names"] = [str(n) for n in names]
    return out
