"""One image evaluation: bits/dim, FD (local classifier features) against NFE, precision, recall,
density and coverage on the same features, the nearest-training-image distance, and pictures, of a
flow or of a run folder (``iterflow image-eval``).

The parts live in their own modules: :mod:`iterflow.evaluation.bits_per_dim` (likelihood of
dequantized images), :mod:`iterflow.evaluation.feature_classifier` (the locally trained feature
classifier and its Fréchet distance), :mod:`iterflow.evaluation.memorisation` and
:mod:`iterflow.evaluation.image_samples` (sampling and PNGs).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iterflow.core.flow import Flow
from iterflow.core.ode import SolverSpec
from iterflow.data import DATASETS, get_dataset
from iterflow.data.images import ImageDataset, image_dataset_from_path
from iterflow.errors import InputError, check_positive, fail
from iterflow.evaluation.bits_per_dim import image_bits_per_dim
from iterflow.evaluation.evaluate import PRDC_K
from iterflow.evaluation.feature_classifier import (
    FD_LABEL,
    ClassifierConfig,
    load_or_train_classifier,
    local_frechet_distance,
)
from iterflow.evaluation.image_samples import (
    clip_to_range,
    nfe_per_image,
    sample_images,
    save_image_grid,
    save_trajectory_strip,
)
from iterflow.evaluation.memorisation import nearest_train_distance
from iterflow.metrics import PRDC_KEYS, precision_recall_density_coverage
from iterflow.train import TrainConfig, load_run

__all__ = [
    "ImageEvalOptions",
    "ImageRunEvaluation",
    "evaluate_image_run",
    "evaluate_images",
    "load_image_dataset",
]


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
        _check_solver(self.bpd_solver, self.bpd_steps, self.bpd_tol, prefix="bpd_")
        _check_solver(self.solver, self.steps, self.tol, prefix="")


def _check_solver(solver: str, steps: int, tol: float, *, prefix: str) -> None:
    """Validate one solver of :class:`ImageEvalOptions`; errors name its fields (``bpd_steps``)."""
    names = {"solver": "solver", "steps": "steps", "atol": "tol", "rtol": "tol"}
    try:
        SolverSpec(solver, steps, tol, tol)
    except InputError as e:
        raise InputError(prefix + names.get(e.argument, e.argument), e.rule, e.value) from None


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
        ``fd_local_classifier_by_nfe``, ``fd_test_vs_train``, ``precision``, ``recall``,
        ``density``, ``coverage`` (samples against the FD's training reference, on the same
        classifier features, ``k = prdc_k``), ``nearest_train``, ``classifier``, ...).
    """
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
        "nfe_per_image": nfe_per_image(nfe, o.n_samples),
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
    # precision, recall, density and coverage on the same features: samples against the reference
    if min(shown.shape[0], ref.shape[0]) > PRDC_K:
        feats = (clf.features(ref), clf.features(shown))
        out.update(precision_recall_density_coverage(*feats, k=PRDC_K, seed=o.seed))
    else:
        out.update(dict.fromkeys(PRDC_KEYS))
    out["prdc_k"] = PRDC_K
    by_nfe = {}
    for steps in sorted({max(1, k // flow.num_blocks) for k in o.nfes}):
        s_k, used = sample_images(flow, o.n_samples, seed=o.seed + 1, solver="euler", steps=steps)
        by_nfe[str(nfe_per_image(used, o.n_samples))] = local_frechet_distance(
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


def load_image_dataset(spec: str, argument: str = "spec") -> ImageDataset:
    """The :class:`~iterflow.data.images.ImageDataset` named by ``spec``.

    Arguments:
        spec: a registered data set name (``digits8``, ``fashion-mnist``, ...) or a path (an IDX
            file, a folder of images, a ``.npy`` of integer images).
        argument: the name errors give to ``spec`` (the caller's argument it came from).
    """
    ds = get_dataset(spec) if spec in DATASETS else image_dataset_from_path(spec)
    if not isinstance(ds, ImageDataset):
        fail(
            argument,
            "must be an image data set (digits8, fashion-mnist, an IDX file, a folder of "
            "images or a .npy of integer images)",
            spec,
        )
    return ds


@dataclass
class ImageRunEvaluation:
    """What :func:`evaluate_image_run` returns: the metrics and the run they were computed on.

    Attributes:
        metrics: the dict of :func:`evaluate_images` plus ``method``.
        flow, config, meta: the loaded run (:func:`iterflow.train.load_run`).
        n_train: training images of the run's split.
    """

    metrics: dict[str, Any]
    flow: Flow
    config: TrainConfig
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

    Arguments:
        run: the run folder (trained on an image data set).
        options: see :class:`ImageEvalOptions`.
        grid, trajectory, title: as in :func:`evaluate_images`; ``title`` defaults to
            ``"METHOD on DATA"``.
        device: where the flow is loaded and evaluated.

    Returns:
        :class:`ImageRunEvaluation`; ``metrics["method"]`` is the run's method.
    """
    flow, cfg, meta = load_run(run, device=device)
    ds = load_image_dataset(cfg.data, argument="run")
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
