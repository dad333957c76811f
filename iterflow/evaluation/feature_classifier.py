"""The local feature classifier behind "FD (local classifier features)".

No Inception weights are available offline, so the library trains a small convolutional classifier
(:class:`FeatureNet`) on the same data set's training split: on the class labels when the set has
them, otherwise on the 4-way rotation-prediction task of Gidaris et al. (arXiv 1803.07728,
:func:`rotation_task`). It trains on the library's one loop (:func:`iterflow.train.loop.optimize`)
with the per-row cross-entropy (:func:`iterflow.methods.classifier.cross_entropy_loss`), is cached
as safetensors (never unpickled), and the Fréchet distance between Gaussian fits of its penultimate
features (:func:`iterflow.metrics.frechet_distance`) is the image-quality figure. Report it as
:data:`FD_LABEL`: it is comparable between models evaluated with the same cached classifier, never
with published FID.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from iterflow.core.nn.unet import norm_groups
from iterflow.errors import check_positive, fail
from iterflow.io import load_tensors, save_tensors
from iterflow.methods.base import Loss
from iterflow.methods.classifier import cross_entropy_loss
from iterflow.metrics import frechet_distance
from iterflow.train.loop import Checkpoint, OptimConfig, Reporter, StepBudget, optimize

__all__ = [
    "CACHE_ENV",
    "CACHE_VERSION",
    "FD_LABEL",
    "ClassifierConfig",
    "FeatureClassifier",
    "FeatureNet",
    "classifier_accuracy",
    "default_cache_dir",
    "load_or_train_classifier",
    "local_frechet_distance",
    "rotation_task",
    "train_classifier",
]

#: Environment variable naming the root of iterflow's cache (classifiers go to ``ROOT/classifiers``).
CACHE_ENV = "ITERFLOW_CACHE_DIR"
#: How the Fréchet distance on these features is reported (never "FID").
FD_LABEL = "FD (local classifier features)"
#: Part of the cache key: raised whenever training changes, so older cached classifiers are
#: retrained (2: trained on the shared loop, with its fused Adam).
CACHE_VERSION = 2


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training of the feature classifier (part of its cache key).

    Attributes:
        width: channels of the first convolution (then 2x and 4x after each stride-2 convolution).
        feature_dim: size of the penultimate layer, whose activations are the features.
        steps, batch_size, lr: Adam on the training split, cosine decay to 5% of ``lr`` without
            warm-up, no gradient clipping.
        seed: initialisation, minibatch order and rotations.
        checkpoint_every: steps between in-training checkpoints of :func:`load_or_train_classifier`
            (not part of the cache key: it does not change the result).
    """

    width: int = 32
    feature_dim: int = 128
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    checkpoint_every: int = field(default=200, compare=False)

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "steps", "batch_size", "checkpoint_every"):
            check_positive(getattr(self, name), name, integer=True)
        check_positive(self.lr, "lr")
        check_positive(self.seed, "seed", integer=True, allow_zero=True)

    def optim_config(self) -> OptimConfig:
        """The loop's settings: cosine schedule without warm-up, no clipping, no EMA.

        Example:
            >>> ClassifierConfig(steps=10).optim_config().lr_at(0)  # no warm-up: the peak at once
            0.002
        """
        return OptimConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule="cosine",
            warmup=0,
            grad_clip=0.0,
            checkpoint_every=self.checkpoint_every,
        )

    def cache_fields(self) -> dict[str, Any]:
        """The fields that decide the trained weights (the cache key's share of the config)."""
        out = asdict(self)
        del out["checkpoint_every"]
        return out


class FeatureNet(nn.Module):
    """Small CNN ``(B, C, H, W) -> (B, K)`` whose penultimate activations are the features.

    Three 3x3 convolutions (the last two with stride 2), GroupNorm and SiLU, global average pooling,
    a ``feature_dim`` linear layer, then the class head. Inputs are standardised with the training
    data's scalar mean and standard deviation (buffers ``mean`` and ``std``).

    Arguments:
        event_shape: ``(C, H, W)`` of the images.
        num_outputs: classes ``K`` of the head.
        width: channels of the first convolution; feature_dim: size of the features.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, event_shape: tuple[int, ...], num_outputs: int, width: int, feature_dim: int
    ) -> None:
        super().__init__()
        c = event_shape[0]
        w = [width, 2 * width, 4 * width]
        self.body = nn.Sequential(
            nn.Conv2d(c, w[0], 3, padding=1),
            nn.GroupNorm(norm_groups(w[0], 8), w[0]),
            nn.SiLU(),
            nn.Conv2d(w[0], w[1], 3, stride=2, padding=1),
            nn.GroupNorm(norm_groups(w[1], 8), w[1]),
            nn.SiLU(),
            nn.Conv2d(w[1], w[2], 3, stride=2, padding=1),
            nn.GroupNorm(norm_groups(w[2], 8), w[2]),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(w[2], feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_outputs)
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, feature_dim)`` penultimate activations."""
        return self.body((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, K)`` class logits."""
        return self.head(self.features(x))


@dataclass
class FeatureClassifier:
    """A trained :class:`FeatureNet` and what it was trained for.

    Attributes:
        net: the network (eval mode).
        task: ``"labels"`` (class labels) or ``"rotation"`` (self-supervised, no labels).
        val_accuracy: accuracy on the held-out split (``nan`` without one).
        path: the cache file; cached: whether it was loaded rather than trained now.
    """

    net: FeatureNet
    task: str
    val_accuracy: float
    path: Path | None
    cached: bool

    @torch.no_grad()
    def features(self, x: Tensor, chunk: int = 512) -> Tensor:
        """``(n, feature_dim)`` features of images ``(n, C, H, W)`` (computed in chunks, on CPU)."""
        dev = next(self.net.parameters()).device
        self.net.eval()
        return torch.cat(
            [self.net.features(c.to(dev, torch.float32)).cpu() for c in x.split(chunk)]
        )

    def info(self) -> dict[str, Any]:
        """JSON-serialisable summary: ``task``, ``val_accuracy``, ``path``, ``cached``."""
        return {
            "task": self.task,
            "val_accuracy": self.val_accuracy,
            "path": None if self.path is None else str(self.path),
            "cached": self.cached,
        }


def default_cache_dir() -> Path:
    """``$ITERFLOW_CACHE_DIR/classifiers`` or ``~/.cache/iterflow/classifiers``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "iterflow") / "classifiers"


def rotation_task(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each image of ``x`` ``(n, C, H, W)`` (square) rotated by ``k * 90`` degrees, ``k`` uniform
    in ``0..3``; returns ``(rotated images (n, C, H, W), targets k (n,))``.

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> out, k = rotation_task(x.expand(8, 1, 2, 2), torch.Generator().manual_seed(0))
        >>> all(torch.equal(o, torch.rot90(x[0], int(r), dims=(-2, -1))) for o, r in zip(out, k))
        True
    """
    k = torch.randint(0, 4, (x.shape[0],), generator=generator).to(x.device)
    out = x.clone()
    for r in (1, 2, 3):
        m = k == r
        out[m] = torch.rot90(x[m], r, dims=(-2, -1))
    return out, k


def _check_training_set(train_x: Tensor, train_y: Tensor | None) -> str:
    """Validate the training images (and labels); return the task."""
    if train_x.ndim != 4 or train_x.shape[0] < 2:
        fail("train_x", "must hold at least 2 images (n, C, H, W)", tuple(train_x.shape))
    if train_y is None and train_x.shape[-1] != train_x.shape[-2]:
        fail(
            "train_x",
            "must hold square images for the rotation task (no labels given)",
            tuple(train_x.shape),
        )
    if train_y is not None and train_y.shape != (train_x.shape[0],):
        fail(
            "train_y", f"must hold one label per image ({train_x.shape[0]},)", tuple(train_y.shape)
        )
    return "labels" if train_y is not None else "rotation"


def _new_net(train_x: Tensor, num_outputs: int, config: ClassifierConfig) -> FeatureNet:
    """A :class:`FeatureNet` for ``train_x``'s images, initialised from ``config.seed`` without
    touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return FeatureNet(tuple(train_x.shape[1:]), num_outputs, config.width, config.feature_dim)


def train_classifier(
    train_x: Tensor,
    train_y: Tensor | None,
    config: ClassifierConfig = ClassifierConfig(),
    *,
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
    checkpoint: Checkpoint | None = None,
    reporter: Reporter | None = None,
    budget: StepBudget | None = None,
) -> FeatureClassifier:
    """Train a :class:`FeatureNet` on images (labels; rotation prediction when ``train_y`` is None).

    The loss is the cross-entropy ``-log softmax(f(x))_y`` of each minibatch row, minimised by
    :func:`~iterflow.train.loop.optimize` on the CPU in float32; the result is a deterministic
    function of the data and ``config`` (``config.seed`` seeds the initialisation, the minibatches
    and the rotations).

    Arguments:
        train_x: ``(n, C, H, W)`` training images (data units).
        train_y: ``(n,)`` class labels, or ``None`` for the rotation task (needs ``H == W``).
        config: architecture and optimisation.
        val_x, val_y: held-out images (and labels) for the reported accuracy.
        checkpoint: in-training checkpoints every ``config.checkpoint_every`` steps; a later call
            with the same checkpoint resumes from there to the same weights.
        reporter: training progress (default: silent).
        budget: testing aid that interrupts training (see :class:`~iterflow.train.loop.StepBudget`).

    Returns:
        The classifier (not cached; see :func:`load_or_train_classifier`).
    """
    task = _check_training_set(train_x, train_y)
    k = int(train_y.max()) + 1 if train_y is not None else 4
    if val_y is not None and val_y.numel():
        k = max(k, int(val_y.max()) + 1)
    net = _new_net(train_x, k, config)
    x = train_x.detach().cpu().float()
    net.mean.fill_(float(x.mean()))
    net.std.fill_(float(x.std().clamp_min(1e-6)))
    data: tuple[Tensor, ...]
    if train_y is None:
        data = (x,)

        def loss_fn(batch: tuple[Tensor, ...], generator: torch.Generator) -> Loss:
            xb, yb = rotation_task(batch[0], generator)  # the whole batch, then each rank's rows
            return cross_entropy_loss(net, xb, yb)

    else:
        data = (x, train_y.detach().cpu().long())

        def loss_fn(batch: tuple[Tensor, ...], generator: torch.Generator) -> Loss:
            return cross_entropy_loss(net, batch[0], batch[1])

    gen = torch.Generator().manual_seed(config.seed)
    optimize(
        net,
        loss_fn,
        data,
        config.optim_config(),
        generator=gen,
        checkpoint=checkpoint,
        reporter=reporter,
        budget=budget,
    )
    net.eval()
    return FeatureClassifier(net, task, classifier_accuracy(net, val_x, val_y, task), None, False)


@torch.no_grad()
def classifier_accuracy(net: FeatureNet, x: Tensor | None, y: Tensor | None, task: str) -> float:
    """Accuracy of ``net`` on images ``x`` ``(n, C, H, W)`` and labels ``y`` ``(n,)``.

    For ``task="rotation"`` the images are rotated with a fixed seed and the targets are the
    rotations (``y`` is ignored). ``nan`` without images (or without labels for ``"labels"``).
    """
    if x is None or x.shape[0] == 0:
        return math.nan
    x = x.detach().cpu().float()
    if task == "rotation":
        x, y = rotation_task(x, torch.Generator().manual_seed(0))
    if y is None:
        return math.nan
    pred = torch.cat([net(c).argmax(1) for c in x.split(512)])
    return float((pred == y.long()).float().mean())


def _cache_key(x: Tensor, y: Tensor | None, config: ClassifierConfig) -> str:
    """Hash of the training images, labels, config and :data:`CACHE_VERSION` (20 hex digits)."""
    h = hashlib.sha256()
    head = {
        "shape": list(x.shape),
        "config": config.cache_fields(),
        "labels": y is not None,
        "version": CACHE_VERSION,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(x.detach().cpu().contiguous().float().numpy().tobytes())
    if y is not None:
        h.update(y.detach().cpu().contiguous().long().numpy().tobytes())
    return h.hexdigest()[:20]


def _load_cached(
    path: Path, train_x: Tensor, config: ClassifierConfig, task: str
) -> FeatureClassifier | None:
    """The classifier stored at ``path``; ``None`` if it is missing, corrupt or stale."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_tensors(path, "cache_dir")
        net = _new_net(train_x, state["head.weight"].shape[0], config)
        net.load_state_dict(state)
    except Exception:  # noqa: BLE001  (a corrupt or stale cache file is retrained and replaced)
        return None
    net.eval()
    accuracy = float(meta.get("val_accuracy", "nan"))
    return FeatureClassifier(net, meta.get("task", task), accuracy, path, True)


def load_or_train_classifier(
    train_x: Tensor,
    train_y: Tensor | None,
    *,
    cache_dir: str | Path | None = None,
    name: str = "data",
    config: ClassifierConfig = ClassifierConfig(),
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
    reporter: Reporter | None = None,
    budget: StepBudget | None = None,
) -> FeatureClassifier:
    """The feature classifier of a training set, from the cache or trained now and cached.

    The cache file ``{cache_dir}/{name}-{key}.safetensors`` is keyed by a hash of the training
    images, labels, ``config`` and :data:`CACHE_VERSION`; it stores the weights and (as metadata)
    the config, task and validation accuracy. Loading never unpickles. While it trains, the
    classifier checkpoints into ``{cache_dir}/{name}-{key}.progress/``: an interrupted training
    resumes from there (to the weights of an uninterrupted one), and the folder is removed once
    the weights are cached.

    Arguments:
        train_x, train_y, val_x, val_y: as in :func:`train_classifier`.
        cache_dir: folder of the cache (default :func:`default_cache_dir`).
        name: data set name used in the file name.
        config: architecture and training.
        reporter, budget: as in :func:`train_classifier`.
    """
    task = _check_training_set(train_x, train_y)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    stem = f"{safe}-{_cache_key(train_x, train_y, config)}"
    path = folder / f"{stem}.safetensors"
    cached = _load_cached(path, train_x, config, task)
    if cached is not None:
        return cached
    progress = folder / f"{stem}.progress"
    progress.mkdir(parents=True, exist_ok=True)
    clf = train_classifier(
        train_x,
        train_y,
        config,
        val_x=val_x,
        val_y=val_y,
        checkpoint=Checkpoint(progress, "classifier"),
        reporter=reporter,
        budget=budget,
    )
    meta = {
        "task": clf.task,
        "val_accuracy": repr(clf.val_accuracy),
        "config": json.dumps(config.cache_fields()),
        "name": name,
        "version": str(CACHE_VERSION),
    }
    save_tensors(path, clf.net.state_dict(), metadata=meta)
    shutil.rmtree(progress, ignore_errors=True)
    clf.path = path
    return clf


def local_frechet_distance(classifier: FeatureClassifier, a: Tensor, b: Tensor) -> float:
    """Fréchet distance between the local classifier's features of two image sets ``(n, C, H, W)``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` of Gaussian fits of the features
    (:func:`iterflow.metrics.frechet_distance`). Report it as :data:`FD_LABEL` (never as FID).
    """
    return frechet_distance(classifier.features(a), classifier.features(b))
