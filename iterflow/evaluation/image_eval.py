r"""Image metrics: bits per dimension, Fréchet distance on local classifier features, memorisation.

Bits per dimension of dequantized data
--------------------------------------
An image ``x`` has ``D`` integer pixels in ``{0, ..., K-1}``. Uniform dequantization gives
``y = x + u`` in ``[0, K)^D`` (``u ~ U[0, 1)^D``), and the data set serves the scaled point
``s = low + step * y`` with ``step = (high - low) / K``
(:class:`iterflow.data.images.Quantization`).
The flow's ``log_prob`` is a density of ``s`` (its own standardisation ``u = (s - shift) / scale``
is already inside it). By the change of variables ``y -> s``, whose Jacobian is ``step`` in every
coordinate,

.. math::
    \log p_Y(y) = \log p_S(s) + D \log(\mathrm{step}),

and the bits per dimension are the NLL in the units of ``y`` (the dequantized ``[0, K)^D`` cube, in
which a grey level has width 1) divided by ``D ln 2``:

.. math::
    \mathrm{bpd} = \frac{-\log p_S(s) - D \log(\mathrm{step})}{D \ln 2}
                 = \frac{-\log p_S(s)}{D \ln 2} + \log_2 \frac{K}{\mathrm{high} - \mathrm{low}}.

For 8-bit images scaled to ``[0, 1]`` the correction is ``+ D log 256`` nats, i.e. ``+ 8`` bits per
dimension. Since the cell ``x + [0, 1)^D`` has unit volume, Jensen's inequality gives
``-log P(x) <= E_u[-log p_Y(x + u)]``: the bpd of the continuous model is an upper bound on the bpd
of the discrete model it defines (Theis, van den Oord, Bethge, arXiv 1511.01844). A model uniform on
``[low, high]^D`` scores exactly ``log2 K`` (8 bits for 8-bit images).

Fréchet distance on local classifier features
---------------------------------------------
No Inception weights are available offline, so the library trains a small convolutional classifier
on the same data set's training split (class labels when the set has them; otherwise the 4-way
rotation-prediction task of Gidaris et al., arXiv 1803.07728), caches it as safetensors, and
computes the Fréchet distance between Gaussian fits of its penultimate features
(:func:`iterflow.metrics.frechet_distance`). Report it as "FD (local classifier features)": it is
comparable between models evaluated with the same cached classifier, never with published FID.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from iterflow.core.flow import Flow
from iterflow.core.nn.unet import norm_groups
from iterflow.core.ode import SolverSpec
from iterflow.data.images import ImageDataset, Quantization
from iterflow.errors import check_positive, fail

CACHE_ENV = "ITERFLOW_CACHE_DIR"
FD_LABEL = "FD (local classifier features)"

# ------------------------------------------------------------------------------------------------
# bits per dimension
# ------------------------------------------------------------------------------------------------


def bits_per_dim(nll_nats: float | Tensor, dim: int, quantization: Quantization) -> float | Tensor:
    """Bits per dimension of dequantized images from the NLL of the scaled continuous data.

    ``bpd = (nll + D log(K / (high - low))) / (D ln 2)`` (derivation in the module docstring).

    Arguments:
        nll_nats: ``-log p_S(s)`` in nats per image: a number or a tensor of per-image values
            (returned elementwise).
        dim: number of pixels ``D`` (``C * H * W``).
        quantization: grey levels and scaling of the data set.

    Returns:
        Bits per dimension (float, or a tensor shaped like ``nll_nats``).
    """
    check_positive(dim, "dim", integer=True)
    return (nll_nats - quantization.log_jacobian(dim)) / (dim * math.log(2.0))


@dataclass(frozen=True)
class BitsPerDim:
    """Bits/dim of a flow on dequantized images.

    Attributes:
        bpd: mean bits per dimension; stderr: its standard error over images.
        nll_nats: mean NLL of the scaled data ``s`` (nats per image, before the correction).
        n: images; dim: pixels per image; nfe: velocity evaluations used.
        divergence, probes, solver, steps: how the log-likelihood was computed.
    """

    bpd: float
    stderr: float
    nll_nats: float
    n: int
    dim: int
    nfe: int
    divergence: str
    probes: int
    solver: str
    steps: int


@contextmanager
def full_precision(flow: Flow) -> Iterator[None]:
    """Run every :class:`~iterflow.unet.UNet` of ``flow`` without mixed precision inside the block.

    Likelihoods integrate a divergence (a sum of ``D`` Jacobian entries estimated by
    vector-Jacobian products); bfloat16's 8-bit mantissa makes that sum too noisy, so bits/dim are
    computed in the flow's own dtype even for networks trained with ``autocast="bf16"``.
    """
    from iterflow.core.nn.unet import UNet

    nets = [m for m in flow.modules() if isinstance(m, UNet)]
    saved = [n.autocast for n in nets]
    try:
        for n in nets:
            n.autocast = "none"
        yield
    finally:
        for n, a in zip(nets, saved, strict=True):
            n.autocast = a


def image_bits_per_dim(
    flow: Flow,
    x: Tensor,
    quantization: Quantization,
    *,
    solver: str = "dopri5",
    steps: int = 16,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    divergence: str = "hutchinson",
    probes: int = 1,
    seed: int = 0,
    chunk: int = 128,
) -> BitsPerDim:
    """Bits per dimension of ``flow`` on dequantized images ``x`` (data units).

    The NLL comes from :meth:`Flow.log_prob` (instantaneous change of variables; Hutchinson's
    estimator with ``probes`` Rademacher probes above 16 dimensions, unbiased for the log-density);
    then :func:`bits_per_dim` adds the scaling's log-Jacobian. U-Nets run in full precision here
    (:func:`full_precision`).

    Arguments:
        flow: trained flow on the scaled images.
        x: ``(n, C, H, W)`` dequantized test images in the data set's continuous units.
        quantization: the data set's :class:`~iterflow.data.images.Quantization`.
        solver, steps, atol, rtol: integration of the likelihood ODE.
        divergence, probes: ``"exact"``, ``"hutchinson"`` or ``"auto"``, and the probe count.
        seed: seeds the probes.
        chunk: images per batch.

    Returns:
        :class:`BitsPerDim`.
    """
    check_positive(chunk, "chunk", integer=True)
    if x.shape[0] < 1:
        fail("x", "must hold at least one image", tuple(x.shape))
    from iterflow.evaluation.evaluate import nll_per_sample

    x = x.to(device=flow.shift.device, dtype=flow.shift.dtype)
    spec = SolverSpec(solver, steps, atol, rtol)
    with full_precision(flow):
        nll, nfe = nll_per_sample(
            flow, x, spec=spec, divergence=divergence, probes=probes, seed=seed, chunk=chunk
        )
    nll = nll.cpu()
    per_image = bits_per_dim(nll, flow.dim, quantization)
    stderr = float(per_image.std() / math.sqrt(len(nll))) if len(nll) > 1 else math.nan
    return BitsPerDim(
        float(per_image.mean()),
        stderr,
        float(nll.mean()),
        int(len(nll)),
        flow.dim,
        nfe,
        divergence,
        probes,
        solver,
        steps,
    )


# ------------------------------------------------------------------------------------------------
# the local feature classifier
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training of the feature classifier (part of its cache key).

    Attributes:
        width: channels of the first convolution (then 2x and 4x after each stride-2 convolution).
        feature_dim: size of the penultimate layer, whose activations are the features.
        steps, batch_size, lr: Adam training on the training split.
        seed: initialisation and minibatch order.
    """

    width: int = 32
    feature_dim: int = 128
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "steps", "batch_size"):
            check_positive(getattr(self, name), name, integer=True)
        check_positive(self.lr, "lr")
        check_positive(self.seed, "seed", integer=True, allow_zero=True)


class FeatureNet(nn.Module):
    """Small CNN ``(B, C, H, W) -> (B, K)`` whose penultimate activations are the features.

    Three 3x3 convolutions (the last two with stride 2), GroupNorm and SiLU, global average pooling,
    a ``feature_dim`` linear layer, then the class head. Inputs are standardised with the training
    data's scalar mean and standard deviation (buffers).
    """

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

    def features(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, feature_dim)
        return self.body((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K)
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


def _rotation_task(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each image rotated by ``k * 90`` degrees, ``k`` uniform in 0..3; targets ``k``."""
    k = torch.randint(0, 4, (x.shape[0],), generator=generator)
    out = torch.stack([torch.rot90(i, int(r), dims=(-2, -1)) for i, r in zip(x, k, strict=True)])
    return out, k


def _cache_key(x: Tensor, y: Tensor | None, config: ClassifierConfig) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "shape": list(x.shape),
                "config": asdict(config),
                "labels": y is not None,
                "version": 1,
            },
            sort_keys=True,
        ).encode()
    )
    h.update(x.detach().cpu().contiguous().float().numpy().tobytes())
    if y is not None:
        h.update(y.detach().cpu().contiguous().long().numpy().tobytes())
    return h.hexdigest()[:20]


def train_classifier(
    train_x: Tensor,
    train_y: Tensor | None,
    config: ClassifierConfig = ClassifierConfig(),
    *,
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
) -> FeatureClassifier:
    """Train a :class:`FeatureNet` on images (labels; rotation prediction when ``train_y`` is None).

    Arguments:
        train_x: ``(n, C, H, W)`` training images (data units).
        train_y: ``(n,)`` class labels, or ``None`` for the rotation task (needs ``H == W``).
        config: architecture and optimisation.
        val_x, val_y: held-out images (and labels) for the reported accuracy.

    Returns:
        The classifier (not cached; see :func:`load_or_train_classifier`).
    """
    if train_x.ndim != 4 or train_x.shape[0] < 2:
        fail("train_x", "must hold at least 2 images (n, C, H, W)", tuple(train_x.shape))
    task = "labels" if train_y is not None else "rotation"
    if task == "rotation" and train_x.shape[-1] != train_x.shape[-2]:
        fail(
            "train_x",
            "must hold square images for the rotation task (no labels given)",
            tuple(train_x.shape),
        )
    if train_y is not None and train_y.shape != (train_x.shape[0],):
        fail(
            "train_y", f"must hold one label per image ({train_x.shape[0]},)", tuple(train_y.shape)
        )
    k = int(train_y.max()) + 1 if train_y is not None else 4
    if val_y is not None and val_y.numel():
        k = max(k, int(val_y.max()) + 1)
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = FeatureNet(tuple(train_x.shape[1:]), k, config.width, config.feature_dim)
    x = train_x.detach().cpu().float()
    net.mean.fill_(float(x.mean()))
    net.std.fill_(float(x.std().clamp_min(1e-6)))
    from iterflow.train import cosine_lr

    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    net.train()
    for step in range(config.steps):
        idx = torch.randint(0, x.shape[0], (min(config.batch_size, x.shape[0]),), generator=gen)
        xb = x[idx]
        yb = train_y[idx].long() if train_y is not None else None
        if yb is None:
            xb, yb = _rotation_task(xb, gen)
        for g in opt.param_groups:  # cosine decay to 5%, no warm-up
            g["lr"] = cosine_lr(config.lr, step, config.steps, warmup=0)
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    acc = _accuracy(net, val_x, val_y, task)
    return FeatureClassifier(net, task, acc, None, False)


@torch.no_grad()
def _accuracy(net: FeatureNet, x: Tensor | None, y: Tensor | None, task: str) -> float:
    if x is None or x.shape[0] == 0:
        return math.nan
    x = x.detach().cpu().float()
    if task == "rotation":
        x, y = _rotation_task(x, torch.Generator().manual_seed(0))
    if y is None:
        return math.nan
    pred = torch.cat([net(c).argmax(1) for c in x.split(512)])
    return float((pred == y.long()).float().mean())


def load_or_train_classifier(
    train_x: Tensor,
    train_y: Tensor | None,
    *,
    cache_dir: str | Path | None = None,
    name: str = "data",
    config: ClassifierConfig = ClassifierConfig(),
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
) -> FeatureClassifier:
    """The feature classifier of a training set, from the cache or trained now and cached.

    The cache file ``{cache_dir}/{name}-{key}.safetensors`` is keyed by a hash of the training
    images, labels and ``config``; it stores the weights and (as metadata) the config, task and
    validation accuracy. Loading never unpickles.

    Arguments:
        train_x, train_y, val_x, val_y: as in :func:`train_classifier`.
        cache_dir: folder of the cache (default :func:`default_cache_dir`).
        name: data set name used in the file name.
        config: architecture and training.
    """
    from safetensors.torch import load_file

    from iterflow.io import save_tensors

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    path = folder / f"{safe}-{_cache_key(train_x, train_y, config)}.safetensors"
    task = "labels" if train_y is not None else "rotation"
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            state = load_file(str(path))
            k = state["head.weight"].shape[0]
            net = FeatureNet(tuple(train_x.shape[1:]), k, config.width, config.feature_dim)
            net.load_state_dict(state)
            net.eval()
            return FeatureClassifier(
                net, meta.get("task", task), float(meta.get("val_accuracy", "nan")), path, True
            )
        except Exception:  # noqa: BLE001  (a corrupt or stale cache file is retrained and replaced)
            pass
    clf = train_classifier(train_x, train_y, config, val_x=val_x, val_y=val_y)
    meta = {
        "task": clf.task,
        "val_accuracy": repr(clf.val_accuracy),
        "config": json.dumps(asdict(config)),
        "name": name,
    }
    save_tensors(path, clf.net.state_dict(), metadata=meta)
    clf.path = path
    return clf


def local_frechet_distance(classifier: FeatureClassifier, a: Tensor, b: Tensor) -> float:
    """Fréchet distance between the local classifier's features of two image sets ``(n, C, H, W)``.

    Report it as ``"FD (local classifier features)"`` (never as FID).
    """
    from iterflow.metrics import frechet_distance

    return frechet_distance(classifier.features(a), classifier.features(b))


# ------------------------------------------------------------------------------------------------
# memorisation
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NearestTrainDistance:
    """Distances (per-pixel RMS, ``|a - b| / sqrt(D)``) to the nearest training image.

    Attributes:
        samples_mean, samples_min: over the model's samples.
        test_mean: the same statistic for held-out test images (the reference; ``nan`` if none).
        ratio: ``samples_mean / test_mean``: near 1 for a model that generalises, near 0 for one
            that copies training images.
        nearest: ``(n,)`` index of the nearest training image of each sample.
    """

    samples_mean: float
    samples_min: float
    test_mean: float
    ratio: float
    nearest: Tensor

    def to_json(self) -> dict[str, float]:
        return {
            "samples_mean": self.samples_mean,
            "samples_min": self.samples_min,
            "test_mean": self.test_mean,
            "ratio": self.ratio,
        }


def nearest_train_distance(
    samples: Tensor, train: Tensor, test: Tensor | None = None
) -> NearestTrainDistance:
    """Nearest-training-image distances of ``samples`` (and of ``test`` as the reference).

    Arguments:
        samples: ``(n, C, H, W)`` generated images; train: ``(m, C, H, W)`` training images;
        test: held-out images, or ``None``.
    """
    from iterflow.metrics import _knn, nearest_neighbor_distance

    d = math.sqrt(math.prod(samples.shape[1:]))
    s = samples.flatten(1).float()
    r = train.flatten(1).float().to(s.device)
    idx, dist = _knn(s, r, k=1, chunk=1024, exclude_self=False)
    dist = dist[:, 0] / d
    test_mean = math.nan
    if test is not None and test.shape[0] > 0:
        test_mean = float(
            nearest_neighbor_distance(test.flatten(1).float().to(s.device), r).mean() / d
        )
    mean = float(dist.mean())
    return NearestTrainDistance(
        mean, float(dist.min()), test_mean, mean / test_mean, idx[:, 0].cpu()
    )


# ------------------------------------------------------------------------------------------------
# sampling and pictures
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(
    flow: Flow,
    n: int,
    *,
    seed: int = 0,
    solver: str = "rk4",
    steps: int = 16,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    chunk: int = 256,
) -> tuple[Tensor, int]:
    """``n`` images decoded from seeded noise in chunks; returns ``(images on CPU, NFE used)``."""
    check_positive(n, "n", integer=True)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *flow.event_shape), generator=gen)
    spec = SolverSpec(solver, steps, atol, rtol)
    dev, dt = flow.shift.device, flow.shift.dtype
    with flow.count_nfe() as c:
        out = [flow.decode(zc.to(dev, dt), solver=spec).cpu() for zc in z.split(chunk)]
    return torch.cat(out), c.nfe


def clip_to_range(x: Tensor, quantization: Quantization) -> Tensor:
    """Clamp images to the data range ``[low, high]`` (how they would be displayed or saved)."""
    return x.clamp(quantization.low, quantization.high)


def save_image_grid(
    images: Tensor,
    path: str | Path,
    quantization: Quantization,
    *,
    nrow: int = 8,
    title: str | None = None,
) -> Path:
    """A PNG grid of ``(n, C, H, W)`` images in the data set's range (``plot_image_grid``)."""
    from iterflow.viz import plot_image_grid

    return plot_image_grid(
        images.detach().cpu(),
        path,
        nrow=nrow,
        value_range=(quantization.low, quantization.high),
        title=title,
    )


@torch.no_grad()
def save_trajectory_strip(
    flow: Flow,
    path: str | Path,
    quantization: Quantization,
    *,
    n: int = 8,
    n_time: int = 9,
    seed: int = 0,
    solver: str = "rk4",
    steps: int = 16,
    title: str | None = None,
) -> Path:
    """Noise-to-image paths: one row per sample, columns from noise (left) to image (right)."""
    from iterflow.viz import plot_image_trajectory

    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *flow.event_shape), generator=gen).to(flow.shift.device, flow.shift.dtype)
    traj = flow.trajectory(
        z, direction="decode", solver=solver, steps=steps
    ).cpu()  # (T+1, n, C, H, W)
    return plot_image_trajectory(
        traj,
        path,
        n_show=n,
        n_time=n_time,
        value_range=(quantization.low, quantization.high),
        title=title,
    )


# ------------------------------------------------------------------------------------------------
# one evaluation
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEvalOptions:
    """Settings of :func:`evaluate_images`.

    Attributes:
        n_bpd: test images for bits/dim (0 skips it); bpd_solver, bpd_steps, bpd_tol: its ODE solver
            (``bpd_tol`` is atol = rtol of adaptive solvers); divergence, probes: its trace
            estimator.
        n_samples: model samples for the Fréchet distance and the nearest-neighbour check.
        solver, steps, tol: the reference sampler.
        nfes: budgets of velocity evaluations per image at which the FD of Euler samples is also
            computed (FD against NFE): ``max(1, nfe // blocks)`` Euler steps per block; the keys
            of the result are the NFE actually used (a chain of blocks needs at least one each).
        seed: seeds sampling and probes.
        classifier: the feature classifier's config; cache_dir: its cache folder.
    """

    n_bpd: int = 256
    bpd_solver: str = "dopri5"
    bpd_steps: int = 16
    bpd_tol: float = 1e-4
    divergence: str = "hutchinson"
    probes: int = 1
    n_samples: int = 1000
    solver: str = "dopri5"
    steps: int = 16
    tol: float = 1e-4
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16)
    seed: int = 0
    classifier: ClassifierConfig = ClassifierConfig()
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_positive(self.n_bpd, "n_bpd", integer=True, allow_zero=True)
        check_positive(self.n_samples, "n_samples", integer=True)
        if self.n_samples < 2:
            fail("n_samples", "must be at least 2 (a covariance is fitted)", self.n_samples)
        for k in self.nfes:
            check_positive(k, "nfes", integer=True)
        SolverSpec(self.bpd_solver, self.bpd_steps, self.bpd_tol, self.bpd_tol)
        SolverSpec(self.solver, self.steps, self.tol, self.tol)


def evaluate_images(
    flow: Flow,
    dataset: ImageDataset,
    train_x: Tensor,
    test_x: Tensor,
    *,
    train_y: Tensor | None = None,
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
    options: ImageEvalOptions = ImageEvalOptions(),
    grid: str | Path | None = None,
    trajectory: str | Path | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Bits/dim, FD (local classifier features) against NFE, nearest-training-image distance, PNGs.

    Arguments:
        flow: the trained flow (data units of ``dataset``).
        dataset: the image data set (its quantization and name).
        train_x, test_x: dequantized training and test images (the run's splits).
        train_y, val_x, val_y: labels and validation images for the feature classifier.
        options: see :class:`ImageEvalOptions`.
        grid, trajectory: PNG paths for an 8x8 sample grid and a noise-to-image strip (optional).
        title: figure title.

    Returns:
        A JSON-serialisable dict (keys ``bits_per_dim``, ``fd_local_classifier``,
        ``fd_local_classifier_by_nfe``, ``fd_test_vs_train``, ``nearest_train``, ``classifier``,
        ...).
    """
    import time

    o = options
    q = dataset.quantization
    out: dict[str, Any] = {
        "data": dataset.name,
        "dim": flow.dim,
        "blocks": flow.num_blocks,
        "fd_label": FD_LABEL,
    }
    if o.n_bpd > 0:
        t0 = time.perf_counter()
        bpd = image_bits_per_dim(
            flow,
            test_x[: o.n_bpd],
            q,
            solver=o.bpd_solver,
            steps=o.bpd_steps,
            atol=o.bpd_tol,
            rtol=o.bpd_tol,
            divergence=o.divergence,
            probes=o.probes,
            seed=o.seed,
        )
        out["bits_per_dim"] = {**asdict(bpd), "seconds": time.perf_counter() - t0}
    clf = load_or_train_classifier(
        train_x,
        train_y,
        cache_dir=o.cache_dir,
        name=dataset.name,
        config=o.classifier,
        val_x=val_x,
        val_y=val_y,
    )
    out["classifier"] = clf.info()
    n = min(o.n_samples, train_x.shape[0])
    t0 = time.perf_counter()
    samples, nfe = sample_images(
        flow, o.n_samples, seed=o.seed + 1, solver=o.solver, steps=o.steps, atol=o.tol, rtol=o.tol
    )
    out["sampler"] = {
        "solver": o.solver,
        "steps": o.steps,
        "tol": o.tol,
        "nfe_per_image": _per_image(nfe, o.n_samples, flow),
        "seconds": time.perf_counter() - t0,
    }
    out["out_of_range_fraction"] = float(((samples < q.low) | (samples > q.high)).float().mean())
    shown = clip_to_range(samples, q)
    ref = train_x[
        torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(o.seed))[:n]
    ]
    out["fd_local_classifier"] = local_frechet_distance(clf, shown, ref)
    out["fd_test_vs_train"] = local_frechet_distance(clf, test_x[: o.n_samples], ref)
    # the Fréchet distance is biased upward at small n: record the sizes behind each number
    out["fd_n"] = {
        "samples": o.n_samples,
        "train_reference": n,
        "test": min(o.n_samples, test_x.shape[0]),
    }
    by_nfe = {}
    for steps in sorted({max(1, k // flow.num_blocks) for k in o.nfes}):
        s_k, used = sample_images(flow, o.n_samples, seed=o.seed + 1, solver="euler", steps=steps)
        by_nfe[str(_per_image(used, o.n_samples, flow))] = local_frechet_distance(
            clf, clip_to_range(s_k, q), ref
        )
    out["fd_local_classifier_by_nfe"] = by_nfe
    out["nearest_train"] = nearest_train_distance(shown, train_x, test_x[: o.n_samples]).to_json()
    if grid is not None:
        out["grid"] = str(save_image_grid(shown[:64], grid, q, title=title))
    if trajectory is not None:
        out["trajectory"] = str(
            save_trajectory_strip(flow, trajectory, q, seed=o.seed + 2, title=title)
        )
    return out


def load_image_dataset(spec: str) -> ImageDataset:
    """The :class:`~iterflow.data.images.ImageDataset` named by ``spec`` (a name or a path)."""
    from iterflow.data import DATASETS, get_dataset
    from iterflow.data.images import image_dataset_from_path

    ds = get_dataset(spec) if spec in DATASETS else image_dataset_from_path(spec)
    if not isinstance(ds, ImageDataset):
        fail(
            "--data",
            "must be an image data set (digits8, fashion-mnist, an IDX file, a folder of "
            "images or a .npy of integer images)",
            spec,
        )
    return ds


@dataclass
class ImageRunEvaluation:
    """What :func:`evaluate_image_run` returns: the metrics and the run they were computed on."""

    metrics: dict[str, Any]
    flow: Flow
    config: Any  # iterflow.train.TrainConfig
    meta: dict[str, Any]
    n_train: int


def evaluate_image_run(
    run: str | Path,
    options: ImageEvalOptions = ImageEvalOptions(),
    *,
    grid: str | Path | None = None,
    trajectory: str | Path | None = None,
    title: str | None = None,
    device: str = "cpu",
) -> ImageRunEvaluation:
    """:func:`evaluate_images` of a run folder on its own data set and splits (training images and
    labels for the feature classifier and the nearest-neighbour check, test images for bits/dim).

    ``title`` defaults to ``"METHOD on DATA"``; ``metrics["method"]`` is the run's method.
    """
    from iterflow.train import load_run

    flow, cfg, meta = load_run(run, device=device)
    ds = load_image_dataset(cfg.data)
    if tuple(ds.event_shape) != flow.event_shape:
        fail(
            "run",
            f"must model images of shape {ds.event_shape} like its data set",
            flow.event_shape,
        )
    sp = ds.splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    labels = (
        ds.label_splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
        if ds.labels is not None
        else None
    )
    metrics = evaluate_images(
        flow,
        ds,
        sp.train,
        sp.test,
        train_y=None if labels is None else labels.train,
        val_x=sp.val,
        val_y=None if labels is None else labels.val,
        options=options,
        grid=grid,
        trajectory=trajectory,
        title=title or f"{cfg.method} on {ds.name}",
    )
    metrics["method"] = cfg.method
    return ImageRunEvaluation(metrics, flow, cfg, meta, int(sp.train.shape[0]))


def _per_image(nfe: int, n: int, flow: Flow, chunk: int = 256) -> int:
    """NFE per image: :func:`sample_images` decodes in chunks, each counting its evaluations."""
    return int(round(nfe / math.ceil(n / chunk)))
