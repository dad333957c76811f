"""A scikit-learn-like density estimator on top of the trainer: ``fit(X)``, ``sample(n)``,
``score_samples(X)``.

Example:
    >>> import numpy as np
    >>> from iterflow.estimator import FlowDensity
    >>> X = np.random.default_rng(0).normal(size=(500, 2))
    >>> model = FlowDensity(steps=50, hidden=(32, 32)).fit(X)  # doctest: +SKIP
    >>> model.score_samples(X[:3]).shape  # doctest: +SKIP
    (3,)
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iterflow.core.flow import Flow
from iterflow.errors import check_finite, fail
from iterflow.io import atomic_write_bytes
from iterflow.train import TrainConfig, train


class FlowDensity:
    """Density model trained by any iterflow method on an in-memory array.

    Arguments:
        method: training method (``fm``, ``cnf``, ``jko``, ``local-fm``, ...).
        run_dir: where the run folder goes (default: a fresh temporary folder). The array is stored
            there as ``data.npy`` so the run can be evaluated and resumed from the CLI as well.
        solver, steps_per_block: integration used by :meth:`sample` and :meth:`score_samples`.
        **config: any :class:`~iterflow.train.TrainConfig` field (``steps``, ``blocks``, ``hidden``,
            ``batch_size``, ``lr``, ``seed``, ``device``, ``options``, ...); fields left out take the
            method's recommended settings (:meth:`~iterflow.train.TrainConfig.for_method`).

    Attributes:
        flow_: the trained :class:`~iterflow.flow.Flow` (after :meth:`fit`).
        run_dir_: the run folder.
    """

    def __init__(
        self,
        method: str = "fm",
        *,
        run_dir: str | Path | None = None,
        solver: str = "dopri5",
        steps_per_block: int = 16,
        **config: Any,
    ) -> None:
        self.method, self.run_dir, self.solver, self.steps_per_block = (
            method,
            run_dir,
            solver,
            steps_per_block,
        )
        self.config = config

    def fit(self, X: Any, y: Any = None) -> FlowDensity:
        """Train on the rows of ``X`` (``(n, d)``, finite); returns ``self``."""
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] < 3:
            fail("X", "must be a 2-D array (n, d) with at least 3 rows", arr.shape)
        check_finite(arr, "X")
        run = (
            Path(self.run_dir)
            if self.run_dir is not None
            else Path(tempfile.mkdtemp(prefix="iterflow-"))
        )
        run.mkdir(parents=True, exist_ok=True)
        data_path = run / "data.npy"
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(data_path, buf.getvalue())
        n = arr.shape[0]
        sizes = {"n_train": n, "n_val": max(1, n // 10), "n_test": max(1, n // 10)}
        cfg = TrainConfig.for_method(self.method, data=str(data_path), **{**sizes, **self.config})
        self.flow_: Flow = train(cfg, run / "run").flow
        self.run_dir_ = run
        return self

    def _flow(self) -> Flow:
        if not hasattr(self, "flow_"):
            fail("FlowDensity", "must be fitted first (call fit(X))", "unfitted")
        return self.flow_

    def _tensor(self, X: Any) -> torch.Tensor:
        f = self._flow()
        return torch.as_tensor(np.asarray(X, dtype=np.float64)).to(
            device=f.shift.device, dtype=f.shift.dtype
        )

    @torch.no_grad()
    def score_samples(self, X: Any) -> np.ndarray:
        """Log density of each row of ``X`` (nats), shape ``(n,)``."""
        f = self._flow()
        return (
            f.log_prob(self._tensor(X), solver=self.solver, steps=self.steps_per_block)
            .cpu()
            .numpy()
        )

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood of the rows of ``X``."""
        return float(self.score_samples(X).mean())

    @torch.no_grad()
    def sample(self, n: int = 1, random_state: int | None = None) -> np.ndarray:
        """``n`` samples in the data's units, shape ``(n, d)``."""
        f = self._flow()
        gen = torch.Generator(device=f.shift.device).manual_seed(
            0 if random_state is None else random_state
        )
        return (
            f.sample(n, generator=gen, solver=self.solver, steps=self.steps_per_block).cpu().numpy()
        )
