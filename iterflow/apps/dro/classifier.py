"""The risk classifier: a small smooth MLP whose cross-entropy is the usual risk of the worst-case
sampler, trained on the one loop (:func:`iterflow.train.loop.optimize`) with the per-row
cross-entropy of :func:`iterflow.methods.classifier.cross_entropy_loss`, and its files.

With a ``folder`` the training is a resumable phase: in-stage checkpoints under the key ``name``,
the trained weights committed atomically (``NAME.safetensors``, then ``NAME.json``, the record), and
a re-run with the same settings loads them instead of training again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iterflow.apps.dro.data import check_labels, check_points
from iterflow.core import distributed as ddp
from iterflow.core.nn import ACTIVATIONS
from iterflow.errors import check_positive, fail
from iterflow.io import (
    FORMAT_VERSION,
    check_format,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
)
from iterflow.methods.base import Loss
from iterflow.methods.classifier import cross_entropy_loss
from iterflow.train.loop import Checkpoint, OptimConfig, Reporter, StepBudget, optimize


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
    folder: str | Path | None = None,
    name: str = "classifier",
    checkpoint_every: int = 500,
    reporter: Reporter | None = None,
    stop_after_steps: int | None = None,
) -> MLPClassifier:
    """Train an :class:`MLPClassifier` by minibatch cross-entropy (AdamW, cosine schedule) on the
    one loop, data-parallel under ``torchrun``.

    Arguments:
        x: ``(n, d)`` points (the classifier gets their device and dtype); labels: ``(n,)``
            integer classes ``0..K-1``.
        seed: seeds the initialisation and the minibatches.
        folder: run folder of a resumable phase (see the module docstring; ``None``: nothing
            written). ``name``: its checkpoint key and file names.
        checkpoint_every: steps between in-stage checkpoints; reporter: progress (default silent).
        stop_after_steps: testing aid: raise ``KeyboardInterrupt`` after this many steps.

    Returns:
        The trained classifier in eval mode, on ``x``'s device and dtype.
    """
    check_points(x, "x")
    check_labels(x, labels)
    check_positive(steps, "steps", integer=True)
    check_positive(batch_size, "batch_size", integer=True)
    check_positive(label_smoothing, "label_smoothing", allow_zero=True)
    settings = {
        "hidden": list(hidden), "activation": activation, "steps": steps,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "label_smoothing": label_smoothing, "seed": seed, "n": int(x.shape[0]),
        "dtype": str(x.dtype).removeprefix("torch."),
    }  # fmt: skip
    if folder is not None and (Path(folder) / f"{name}.json").is_file():
        return _finished(Path(folder), name, settings).to(x.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = MLPClassifier(x.shape[1], int(labels.max()) + 1, hidden, activation)
    clf = clf.to(device=x.device, dtype=x.dtype)
    ctx = ddp.setup(x.device)
    main = ctx is None or ctx.is_main
    config = OptimConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         grad_clip=0.0, checkpoint_every=checkpoint_every)  # fmt: skip
    checkpoint = None if folder is None else Checkpoint(folder, name, write=main)

    def loss_fn(batch: tuple[Tensor, ...], generator: torch.Generator) -> Loss:
        return cross_entropy_loss(clf, batch[0], batch[1], label_smoothing=label_smoothing)

    record = optimize(
        clf,
        loss_fn,
        (x, labels.to(x.device)),
        config,
        generator=torch.Generator(device=x.device).manual_seed(seed),
        checkpoint=checkpoint,
        reporter=reporter,
        ctx=ctx,
        budget=StepBudget(stop_after_steps),
    )
    if checkpoint is not None:
        if main:  # commit: weights, then NAME.json (the record), then drop the progress files
            save_classifier(clf, checkpoint.folder, name, training=settings)
            checkpoint.clear()
        ddp.barrier(ctx)
    if reporter is not None:
        reporter.stage_end({**record, "blocks": name})
    return clf.eval()


def _finished(folder: Path, name: str, settings: dict[str, Any]) -> MLPClassifier:
    """The classifier a previous run committed to ``folder``, if it was trained with ``settings``."""
    meta = load_json(folder / f"{name}.json", "folder")
    old = meta.get("training") if isinstance(meta, dict) else None
    if old != settings:
        diff = {k: ((old or {}).get(k), v) for k, v in settings.items() if (old or {}).get(k) != v}
        fail("folder", f"holds a {name} trained with other settings {diff}; use a new folder",
             str(folder))  # fmt: skip
    return load_classifier(folder, name)


@torch.no_grad()
def accuracy(classifier: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Fraction of points whose predicted class ``argmax f(x)`` equals the label."""
    check_labels(x, labels)
    return float((classifier(x).argmax(1) == labels).to(torch.float64).mean())


def save_classifier(
    classifier: MLPClassifier,
    folder: str | Path,
    name: str = "classifier",
    *,
    training: dict[str, Any] | None = None,
) -> None:
    """Write ``NAME.safetensors`` (weights), then ``NAME.json`` (constructor arguments and, when
    given, the ``training`` settings) into ``folder``, each atomically."""
    folder = Path(folder)
    save_tensors(folder / f"{name}.safetensors", classifier.state_dict())
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "network": classifier.config()}
    if training is not None:
        meta["training"] = training
    save_json(folder / f"{name}.json", meta)


def load_classifier(folder: str | Path, name: str = "classifier") -> MLPClassifier:
    """Rebuild a classifier saved by :func:`save_classifier` (no unpickling)."""
    folder = Path(folder)
    meta = load_json(folder / f"{name}.json", "run")
    check_format(meta, "run", str(folder))
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
