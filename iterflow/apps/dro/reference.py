"""Reference samples ``P`` of the worst-case sampler: from a trained run folder (drawn from its
flow), a labelled set (points with labels) or any data set of :mod:`iterflow.data`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iterflow.apps.dro.data import LABELLED_SETS, LabelledData, labelled_data
from iterflow.data import get_dataset
from iterflow.errors import check_positive
from iterflow.train import load_run


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
    check_positive(n_train, "n_train", integer=True)
    check_positive(n_test, "n_test", integer=True)
    if _is_run_folder(spec):
        flow, cfg, _ = load_run(Path(spec))
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

    ds = get_dataset(name)
    sp = ds.splits(n_train, 1, n_test, seed)
    return Reference(sp.train, sp.test, source={"kind": "dataset", "name": name, "seed": seed})
