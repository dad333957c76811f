"""The anomaly benchmark's core (benchmarks/bench_anomaly.py) on cases whose answer is known, so the
script cannot rot: anomalies far outside a Gaussian normal class are found by every detector."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy.stats import multivariate_normal

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script as a module (it puts its own folder on ``sys.path`` for its sibling ``common``)."""
    spec = importlib.util.spec_from_file_location("bench_anomaly", BENCH / "bench_anomaly.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def far_anomalies(d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal rows N(0, I_d); anomalies at radius 8 in random directions (chi_d is near sqrt(d))."""
    rng = np.random.default_rng(seed)
    x_train = rng.normal(size=(300, d))
    u = rng.normal(size=(30, d))
    anomalies = 8.0 * u / np.linalg.norm(u, axis=1, keepdims=True)
    x_test = np.concatenate([rng.normal(size=(100, d)), anomalies])
    return x_train, x_test, np.r_[np.zeros(100, bool), np.ones(30, bool)]


@pytest.mark.parametrize("d", [2, 5])
def test_every_detector_finds_far_anomalies(bench: ModuleType, d: int) -> None:
    x_train, x_test, flag = far_anomalies(d, seed=d)
    recipe = bench.FlowRecipe(candidates=(((16,), 30), ((32, 32), 120)), batch_size=128)
    res = bench.evaluate_case(x_train, x_test, flag, seed=0, recipe=recipe)
    assert set(res) == set(bench.DETECTORS)
    for name, r in res.items():
        assert r["auroc"] > 0.95, (name, r)
        assert r["ap"] > 0.8, (name, r)  # chance level: 30 / 130
    flow = res["flow"]
    assert [flow["hidden"], flow["steps"]] in ([[16], 30], [[32, 32], 120])
    assert np.isfinite(flow["val_log_likelihood"])
    # the flow's validation log-likelihood is near the truth, -d/2 log(2 pi e) per row
    assert abs(flow["val_log_likelihood"] + 0.5 * d * np.log(2 * np.pi * np.e)) < 0.5 * d


def test_scores_are_log_densities_and_inverted_scores_fail(bench: ModuleType) -> None:
    """On Gaussian rows BIC picks one component, whose score is the log-density of the maximum-
    likelihood Gaussian; swapping the labels gives AUROC < 0.05."""
    x_train, x_test, flag = far_anomalies(3, seed=1)
    scores, info = bench.fit_scores("gmm", x_train, x_test, 0, bench.FlowRecipe())
    assert info["components"] == 1
    mle = multivariate_normal(x_train.mean(0), np.cov(x_train.T, bias=True))
    np.testing.assert_allclose(scores, mle.logpdf(x_test), rtol=1e-4)
    res = bench.evaluate_case(x_train, x_test, ~flag, detectors=("gmm",))
    assert res["gmm"]["auroc"] < 0.05


def test_preprocess_fits_on_training_rows_only(bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.normal(3.0, 2.0, size=(200, 6))
    x_test = rng.normal(-5.0, 1.0, size=(50, 6))
    a, b = bench.preprocess(x_train, x_test, None)
    np.testing.assert_allclose(a.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(a.std(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(b, (x_test - x_train.mean(0)) / x_train.std(0), atol=1e-12)
    a, b = bench.preprocess(x_train, x_test, 4)
    assert a.shape == (200, 4) and b.shape == (50, 4)
    np.testing.assert_allclose(np.cov(a.T, bias=True), np.eye(4), atol=1e-10)  # whitened


def test_table_bolds_the_best_and_counts_wins(bench: ModuleType) -> None:
    dets = ("flow", "gmm")
    rows = [
        {
            "prevalence": 0.1,
            "results": {"flow": {"auroc": f, "ap": f}, "gmm": {"auroc": g, "ap": g}},
        }
        for f, g in ((0.9, 0.8), (0.7, 0.75), (0.95, 0.85))
    ]
    s = bench.summarise(rows, dets)
    assert s["flow_beats_gmm_auroc"] == 2 and s["cases"] == 3
    assert s["flow_auroc_mean"] == pytest.approx(0.85)
    assert s["flow_auroc_std"] == pytest.approx(np.std([0.9, 0.7, 0.95], ddof=1))
    md = bench.markdown({"toy": s}, dets)
    assert "| AUROC | **0.850 ± 0.132** | 0.800 ± 0.050 |" in md
    assert "- toy auroc: flow best; flow ahead of: gmm 2/3" in md
