"""The common face of the density-ratio estimators (:class:`RatioEstimator`), their folders and the
training of their logistic classifiers on the one loop.

An estimator folder holds ``ratio.safetensors`` (the estimator's tensors with ``shift`` and
``scale``) and ``manifest.json`` (kind ``ratio``: the ``estimator`` kind, its ``state`` and the
``config`` it was fitted with); folders of iterflow before the one run-folder format
(``ratio.json``) still load. A fit into a folder checkpoints there under a key derived from its
configuration, so that an interrupted fit resumes when run again with the same arguments.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from iterflow.apps.ot.classifiers import ClassifierOptions
from iterflow.apps.ot.phases import Runtime, run_phase
from iterflow.apps.ot.samples import check_points
from iterflow.core import distributed as ddp
from iterflow.errors import fail
from iterflow.io import (
    MANIFEST,
    check_format,
    load_json,
    load_tensors,
    read_manifest,
    save_tensors,
    write_manifest,
)
from iterflow.methods import Loss
from iterflow.train import Checkpoint
from iterflow.train.loop import BatchSource

KIND = "ratio"
WEIGHTS, LEGACY_CONFIG = "ratio.safetensors", "ratio.json"

E = TypeVar("E", bound="RatioEstimator")


class RatioEstimator(ABC):
    """An estimate of ``log q(x)/p(x)`` (``p``: source, ``q``: target).

    Subclasses set ``kind`` and implement :meth:`log_ratio_u` and the state round trip
    (:meth:`state`, :meth:`from_state`) used by :meth:`save` and :func:`load_estimator` (JSON +
    safetensors; nothing is unpickled).
    """

    kind: ClassVar[str]

    def __init__(self, shift: Tensor, scale: Tensor) -> None:
        self.shift, self.scale = shift.detach(), scale.detach()

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    def normalize(self, x: Tensor) -> Tensor:
        """Data units -> the estimator's coordinates ``u = (x - shift) / scale``."""
        return (x - self.shift.to(x)) / self.scale.to(x)

    def log_ratio(self, x: Tensor, chunk: int = 8192) -> Tensor:
        """``log q(x)/p(x)`` for points ``x`` of shape ``(n, d)`` (data units) -> ``(n,)``."""
        x = check_points(x, "x", self.dim)
        with torch.no_grad():
            return torch.cat([self.log_ratio_u(self.normalize(c)) for c in x.split(chunk)])

    def __call__(self, x: Tensor) -> Tensor:
        return self.log_ratio(x)

    @abstractmethod
    def log_ratio_u(self, u: Tensor) -> Tensor:
        """Log ratio at normalised points ``u`` ``(n, d)`` -> ``(n,)``."""

    @abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(JSON config, tensors)`` that :meth:`from_state` rebuilds the estimator from."""

    @classmethod
    @abstractmethod
    def from_state(cls: type[E], config: dict[str, Any], tensors: dict[str, Tensor]) -> E:
        """Inverse of :meth:`state`."""

    def save(self, folder: str | Path, config: dict[str, Any] | None = None) -> Path:
        """Write ``ratio.safetensors`` then ``manifest.json`` into ``folder`` (created); returns it.

        ``config``: JSON values the estimator was fitted with (recorded; a fit into the folder with
        another config is refused).
        """
        folder = Path(folder)
        state, tensors = self.state()
        save_tensors(folder / WEIGHTS, {**tensors, "shift": self.shift, "scale": self.scale})
        write_manifest(folder, KIND, estimator=self.kind, state=state, config=config or {})
        return folder


def read_estimator(folder: str | Path, argument: str = "ratio") -> tuple[str, dict[str, Any]]:
    """``(estimator kind, {"state": ..., "config": ...})`` of an estimator folder: the JSON state
    :meth:`RatioEstimator.from_state` takes and the config it was fitted with (empty when not
    recorded), from its manifest or the ``ratio.json`` of an older folder; refuses newer formats."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        m = read_manifest(folder, KIND, argument)
        if not isinstance(m.get("estimator"), str) or not isinstance(m.get("state"), dict):
            fail(argument, f"{MANIFEST} must name the 'estimator' and its 'state'", str(folder))
        return m["estimator"], {"state": m["state"], "config": m.get("config") or {}}
    legacy = load_json(folder / LEGACY_CONFIG, argument)
    if not isinstance(legacy, dict):
        fail(argument, f"{LEGACY_CONFIG} must be a ratio config", str(folder))
    check_format(legacy, argument, str(folder))
    state = {k: v for k, v in legacy.items() if k not in ("format_version", "kind")}
    return str(legacy.get("kind")), {"state": state, "config": {}}


def has_estimator(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved estimator (a manifest or an older ``ratio.json``)."""
    return (Path(folder) / MANIFEST).is_file() or (Path(folder) / LEGACY_CONFIG).is_file()


def load_estimator(
    folder: str | Path, cls: type[E], device: str | torch.device = "cpu", argument: str = "ratio"
) -> E:
    """Load the estimator of class ``cls`` saved in ``folder`` (InputError on a bad folder)."""
    kind, record = read_estimator(folder, argument)
    if kind != cls.kind:
        fail(argument, f"must hold a {cls.kind!r} estimator, not {kind!r}", str(folder))
    tensors = load_tensors(Path(folder) / WEIGHTS, argument, device)
    if "shift" not in tensors or "scale" not in tensors:
        fail(argument, f"{WEIGHTS} must hold 'shift' and 'scale'", str(folder))
    try:
        return cls.from_state(record["state"], tensors)
    except (KeyError, RuntimeError, TypeError) as e:
        fail(argument, f"{WEIGHTS} must match the recorded state ({type(e).__name__}: {e})",
             str(folder))  # fmt: skip


def load_module(module: nn.Module, tensors: dict[str, Tensor], prefix: str) -> nn.Module:
    """Load the entries of ``tensors`` named ``prefix + key`` into ``module`` (moved to their
    device and dtype); evaluation mode."""
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    like = next((p for p in tensors.values() if p.is_floating_point()), None)
    if like is not None:
        module = module.to(device=like.device, dtype=like.dtype)
    module.load_state_dict(state)
    return module.eval()


def prefixed(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    """``module``'s state with every name prefixed by ``prefix``."""
    return {prefix + k: v for k, v in module.state_dict().items()}


def config_key(config: dict[str, Any]) -> int:
    """A checkpoint key derived from a fit's configuration (progress of another one is ignored)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def cached_estimator(folder: str | Path | None, cls: type[E], config: dict[str, Any],
                     device: torch.device) -> E | None:  # fmt: skip
    """The estimator already fitted into ``folder`` with ``config`` (``None``: none there yet).

    Raises:
        InputError: naming ``folder`` when it holds an estimator fitted with another config.
    """
    if folder is None or not has_estimator(folder):
        return None
    _, record = read_estimator(folder, "folder")
    recorded = record["config"]
    if recorded and recorded != json.loads(json.dumps(config)):
        fail("folder", "holds an estimator fitted with another configuration; use another folder",
             str(folder))  # fmt: skip
    return load_estimator(folder, cls, device, "folder")


def fit_logistic(
    module: nn.Module,
    loss_fn: Callable[[tuple[Tensor, ...], torch.Generator], Loss],
    data: BatchSource,
    options: ClassifierOptions,
    *,
    generator: torch.Generator,
    label: str,
    runtime: Runtime,
    folder: str | Path | None,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Train a logistic classifier on the one loop, checkpointing in ``folder`` (when given) under
    the key of ``config``."""
    key = config_key(config)
    checkpoint = Checkpoint(folder, key, write=runtime.main) if folder is not None else None
    module.train()
    return run_phase(module, loss_fn, data, options.optim_config(runtime.checkpoint_every),
                     generator=generator, label=label, runtime=runtime, checkpoint=checkpoint,
                     key=key)  # fmt: skip


def commit_estimator(
    estimator: E, folder: str | Path | None, config: dict[str, Any], runtime: Runtime
) -> E:
    """Save a fitted estimator into ``folder`` (rank 0) and drop the fit's progress files."""
    if folder is not None:
        if runtime.main:
            estimator.save(folder, config)
            Checkpoint(folder, config_key(config)).clear()
        ddp.barrier(runtime.ctx)
    return estimator


def log_ratio_mse(estimate: Tensor, truth: Tensor) -> float:
    """Mean squared error ``mean (estimate - truth)^2`` (float64)."""
    if estimate.shape != truth.shape:
        fail("estimate", f"must have the shape of truth {tuple(truth.shape)}",
             tuple(estimate.shape))  # fmt: skip
    return float((estimate.double() - truth.double()).pow(2).mean())
