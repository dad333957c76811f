"""Precision, recall, density and coverage (k-NN manifolds): known answers (identical sets, disjoint
sets, a dropped mode), agreement with a brute-force reference in float64 in several dimensions,
chunking and subsampling, errors, and the four keys in ``iterflow eval --json`` and
``image-eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import Tensor, nn

from iterflow.core.flow import Block, Flow
from iterflow.errors import InputError
from iterflow.metrics import PRDC_KEYS, clouds, neighbors, prdc, precision_recall_density_coverage

DT = torch.float64


def brute_prdc(real: Tensor, fake: Tensor, k: int) -> dict[str, float]:
    """The definitions written out on full distance matrices (as in the authors' ``prdc`` code)."""
    r, f = real.double().numpy(), fake.double().numpy()
    d_rr, d_ff, d_rf = cdist(r, r), cdist(f, f), cdist(r, f)  # (n, n), (m, m), (n, m)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    in_real = d_rf < r_real[:, None]  # fake j inside the ball of real i
    return {
        "precision": float(in_real.any(0).mean()),
        "recall": float((d_rf < r_fake[None, :]).any(1).mean()),
        "density": float(in_real.sum(0).mean() / k),
        "coverage": float((d_rf.min(1) < r_real).mean()),
    }


def clusters(centres: list[tuple[float, float]], per: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [
        torch.tensor(c, dtype=DT) + torch.randn(per, 2, generator=g, dtype=DT) for c in centres
    ]
    return torch.cat(parts)


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------------------------------------
# known answers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 5, 10])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_identical_sets_score_one(dim: int, k: int) -> None:
    x = randn(300, dim, seed=dim)
    got = precision_recall_density_coverage(x, x.clone(), k=k)
    assert got == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    if (
        dim >= 2
    ):  # float32 input far from the origin (no duplicate points) still decides ties exactly
        x32 = (x + 1000.0).float()
        assert precision_recall_density_coverage(x32, x32.clone(), k=k)["density"] == 1.0


def test_same_distribution_is_near_one() -> None:
    got = precision_recall_density_coverage(randn(2000, 2, seed=0), randn(2000, 2, seed=1))
    assert got["precision"] > 0.9 and got["recall"] > 0.9 and got["coverage"] > 0.9
    assert 0.85 < got["density"] < 1.15


@pytest.mark.parametrize("dim", [1, 2, 10])
def test_disjoint_far_apart_sets_score_zero(dim: int) -> None:
    real, fake = randn(200, dim, seed=0), randn(150, dim, seed=1) + 100.0
    got = precision_recall_density_coverage(real, fake)
    assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_dropped_mode_lowers_recall_and_coverage_not_precision() -> None:
    centres = [(0.0, 0.0), (30.0, 0.0), (0.0, 30.0)]
    real = clusters(centres, 300, seed=0)
    # fake = the real points minus the third cluster: fidelity is perfect, a third is missed
    subset = precision_recall_density_coverage(real, real[:600])
    assert subset["precision"] == 1.0 and subset["density"] == pytest.approx(1.0, abs=1e-12)
    assert subset["recall"] == pytest.approx(2 / 3) and subset["coverage"] == pytest.approx(2 / 3)
    # fresh samples of two of the three modes against fresh samples of all three
    all_modes = precision_recall_density_coverage(real, clusters(centres, 300, seed=1))
    dropped = precision_recall_density_coverage(real, clusters(centres[:2], 450, seed=2))
    assert dropped["precision"] > 0.85 and dropped["precision"] >= all_modes["precision"] - 0.05
    assert dropped["density"] > 0.8
    for key in ("recall", "coverage"):
        assert all_modes[key] > 0.9 and dropped[key] < 0.7, key


# ------------------------------------------------------------------------------------------------
# against the brute-force reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 5, 10])
@pytest.mark.parametrize("k", [1, 5])
def test_matches_brute_force_in_float64(dim: int, k: int) -> None:
    real = randn(180, dim, seed=10 + dim)
    fake = 1.2 * randn(130, dim, seed=20 + dim) + 0.4  # partly overlapping
    ref = brute_prdc(real, fake, k)
    got = precision_recall_density_coverage(real, fake, k=k)
    for key in PRDC_KEYS:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), (key, got, ref)
    # the same with small blocks: several chunks along both sets
    chunked = precision_recall_density_coverage(real, fake, k=k, chunk=7)
    assert chunked == got


def test_chunked_distance_blocks_stay_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clouds, "BLOCK_ENTRIES", 64)
    shapes: list[tuple[int, int]] = []
    real_sq = clouds.sq_dists

    def recording(a: Tensor, b: Tensor) -> Tensor:
        shapes.append((a.shape[0], b.shape[0]))
        return real_sq(a, b)

    for module in (neighbors, prdc):  # every caller of the pairwise blocks
        monkeypatch.setattr(module, "sq_dists", recording)
    real, fake = randn(90, 3, seed=0), randn(70, 3, seed=1) + 0.5
    got = precision_recall_density_coverage(real, fake, k=3, chunk=16)
    assert max(a * b for a, b in shapes) <= 16 * 90  # never the full (70, 90) block at once
    ref = brute_prdc(real, fake, 3)
    for key in PRDC_KEYS:
        assert got[key] == pytest.approx(ref[key], abs=1e-12)


def test_ten_thousand_points_each() -> None:
    real, fake = randn(10_000, 2, seed=0), randn(10_000, 2, seed=1)
    got = precision_recall_density_coverage(real, fake)
    assert all(0.0 <= got[key] <= 1.0 for key in ("precision", "recall", "coverage"))
    assert got["precision"] > 0.95 and got["recall"] > 0.95 and got["coverage"] > 0.95


def test_large_sets_are_subsampled_deterministically() -> None:
    real, fake = randn(400, 2, seed=0), randn(300, 2, seed=1) + 0.3
    a = precision_recall_density_coverage(real, fake, max_points=100, seed=4)
    assert a == precision_recall_density_coverage(real, fake, max_points=100, seed=4)
    # the documented subsample: a seeded generator draws the real rows, then the fake rows
    g = torch.Generator().manual_seed(4)
    ri, fi = torch.randperm(400, generator=g)[:100], torch.randperm(300, generator=g)[:100]
    ref = brute_prdc(real[ri], fake[fi], 5)
    for key in PRDC_KEYS:
        assert a[key] == pytest.approx(ref[key], abs=1e-12)
    assert precision_recall_density_coverage(real[:50], fake[:50], max_points=100) == (
        precision_recall_density_coverage(real[:50], fake[:50])
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"k": 0}, "k"),
        ({"k": 10}, "k"),  # the fake set has 10 points: k must be smaller
        ({"max_points": 1}, "max_points"),
        ({"seed": -1}, "seed"),
        ({"chunk": 0}, "chunk"),
        ({"fake": torch.zeros(10, 3, dtype=DT)}, "fake"),
        ({"real": torch.full((12, 2), math.nan, dtype=DT)}, "real"),
    ],
)
def test_errors_name_the_argument(kwargs: dict, argument: str) -> None:
    args = {"real": randn(12, 2, seed=0), "fake": randn(10, 2, seed=1), **kwargs}
    with pytest.raises(InputError) as info:
        precision_recall_density_coverage(**args)
    assert info.value.argument == argument


# ------------------------------------------------------------------------------------------------
# in the evaluations
# ------------------------------------------------------------------------------------------------


class Shrink(nn.Module):
    """``v = -0.2 x``: a flow that decodes noise to a slightly wider Gaussian."""

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return -0.2 * x


def test_evaluate_reports_the_four_metrics() -> None:
    from iterflow.evaluation.evaluate import PRDC_K, evaluate

    flow = Flow([Block(Shrink())], (2,)).to(DT)
    test = randn(120, 2, seed=0)
    m = evaluate(flow, test, n=120, solver="rk4", steps=4, nfes=(1,))
    assert m["prdc_k"] == PRDC_K == 5
    for key in ("precision", "recall", "coverage"):
        assert 0.5 < m[key] <= 1.0, (key, m[key])
    assert 0.3 < m["density"] < 1.5
    json.dumps(m)
    tiny = evaluate(flow, test, n=5, solver="rk4", steps=4, nfes=(1,))  # too few points for k = 5
    assert all(tiny[key] is None for key in PRDC_KEYS)


def test_eval_json_has_the_four_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from iterflow.cli import main
    from iterflow.train import TrainConfig, train

    cfg = TrainConfig.for_method(
        "fm", data="8gaussians", steps=30, hidden=(16,), batch_size=64, n_train=300, n_val=30,
        n_test=60, dtype="float64", seed=0,
    )  # fmt: skip
    train(cfg, tmp_path / "run")
    capsys.readouterr()
    args = ["eval", str(tmp_path / "run"), "--json", "--n", "60", "--solver", "rk4", "--steps", "4"]
    assert main(args) == 0
    m = json.loads(capsys.readouterr().out)
    for key in PRDC_KEYS:
        assert 0.0 <= m[key] <= (1.0 if key != "density" else 100.0), (key, m[key])
    assert m["prdc_k"] == 5


def test_image_eval_reports_them_on_the_classifier_features(tmp_path: Path) -> None:
    import iterflow.data.images  # noqa: F401  (digits8)
    from iterflow.data import get_dataset
    from iterflow.evaluation.feature_classifier import ClassifierConfig
    from iterflow.evaluation.image_eval import ImageEvalOptions, evaluate_images

    ds = get_dataset("digits8")
    sp = ds.splits(300, 40, 60, 0)
    labels = ds.label_splits(300, 40, 60, 0)
    flow = Flow([Block(Shrink())], ds.event_shape).to(torch.float32)
    opts = ImageEvalOptions(
        n_bpd=0, n_samples=40, solver="euler", steps=2, nfes=(1,),
        classifier=ClassifierConfig(width=4, feature_dim=8, steps=5, batch_size=32),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    m = evaluate_images(
        flow, ds, sp.train, sp.test, train_y=labels.train, val_x=sp.val, val_y=labels.val,
        options=opts,
    )  # fmt: skip
    assert m["prdc_k"] == 5
    for key in PRDC_KEYS:
        assert isinstance(m[key], float) and m[key] >= 0.0, (key, m[key])
    assert all(0.0 <= m[key] <= 1.0 for key in ("precision", "recall", "coverage"))
    json.dumps(m)
