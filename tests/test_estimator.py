"""FlowDensity as a scikit-learn estimator: the estimator checks, clone / get_params, GridSearchCV,
Pipeline, accuracy on a Gaussian, and no files unless a folder is given."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from iterflow.apps.estimator import FlowDensity, expected_failed_checks
from iterflow.errors import InputError

SMALL = {"steps": 20, "hidden": (16,), "random_state": 0}


@parametrize_with_checks(
    [FlowDensity(**SMALL), FlowDensity(dtype="float32", **SMALL)],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator: FlowDensity, check: object) -> None:
    check(estimator)  # type: ignore[operator]


def data(n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)) * np.array([3.0, 0.5]) + np.array([10.0, -4.0])


def test_learns_a_gaussian_in_the_data_units(tmp_path: Path) -> None:
    X = data()
    model = FlowDensity(
        steps=150, hidden=(32, 32), batch_size=256, dtype="float32", out=tmp_path / "run"
    ).fit(X)
    assert model.run_dir_ == tmp_path / "run" and (tmp_path / "run" / "config.json").exists()
    s = model.sample(2000, random_state=1)
    assert s.shape == (2000, 2) and s.dtype == np.float64
    assert np.allclose(s.mean(0), [10.0, -4.0], atol=0.5)  # samples come back in the data's units
    assert np.array_equal(s, model.sample(2000, random_state=1))
    lp = model.score_samples(X[:100])
    true = multivariate_normal([10.0, -4.0], np.diag([9.0, 0.25])).logpdf(X[:100])
    assert abs(lp.mean() - true.mean()) < 0.3  # a Gaussian is easy: close to the true log-density
    assert model.score(X[:100]) == pytest.approx(lp.mean())
    assert model.n_features_in_ == 2 and len(model.history_) == 1


def test_errors() -> None:
    with pytest.raises(InputError, match="^X: .*2D"):
        FlowDensity().fit(np.zeros(5))
    with pytest.raises(NotFittedError, match="fitted"):
        FlowDensity().sample(3)
    model = FlowDensity(**SMALL).fit(data(50))
    with pytest.raises(InputError, match="X has 3 features"):
        model.score_samples(np.zeros((4, 3)))
    with pytest.raises(InputError, match="^n_samples: "):
        model.sample(0)
    with pytest.raises(InputError, match="^settings: "):
        FlowDensity(steps=5, settings={"steps": 6}).fit(data(50))
    with pytest.raises(InputError, match="^data: "):
        FlowDensity(settings={"data": "moons"}).fit(data(50))


def test_params_clone_and_pickle() -> None:
    model = FlowDensity("jko", blocks=2, options={"gamma": 0.5}, random_state=3)
    params = model.get_params()
    assert params["method"] == "jko" and params["options"] == {"gamma": 0.5}
    twin = clone(model)
    assert twin.get_params() == params and twin.options is not model.options
    assert twin.set_params(steps=7).steps == 7 and model.steps is None
    fitted = FlowDensity(**SMALL).fit(data(80))
    again = pickle.loads(pickle.dumps(fitted))
    X = data(10, seed=1)
    assert np.array_equal(fitted.score_samples(X), again.score_samples(X))


def test_grid_search_and_pipeline_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch creates its (empty) compiler cache folder $TMPDIR/torchinductor_$USER when the first
    # optimiser imports torch._dynamo: torch's doing, once per process, before the folders we watch
    import torch._dynamo  # noqa: F401

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2)) * 0.4
    X[:, 0] += np.where(rng.random(400) < 0.5, -2.5, 2.5)  # two modes: a flow beats a Gaussian
    model = FlowDensity(
        batch_size=256, hidden=(64, 64), lr=1e-2, random_state=0, settings={"time_freqs": 4}
    )
    search = GridSearchCV(model, {"steps": [5, 400]}, cv=2).fit(X)
    # 5 steps leave the standardised Gaussian (about -2.85 nats); 400 near the true -1.70
    assert search.best_params_ == {"steps": 400}
    assert search.best_score_ > -2.0 and search.best_estimator_.n_features_in_ == 2
    pipe = make_pipeline(StandardScaler(), FlowDensity(steps=60, hidden=(16,), random_state=0))
    pipe.fit(X)
    assert pipe.score_samples(X[:5]).shape == (5,) and np.isfinite(pipe.score(X))
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []


def test_divergence_choice_above_the_exact_rule() -> None:
    """Above 16 features ``auto`` is one Hutchinson probe; ``divergence="exact"`` gives each row's
    exact log-density (the flow's exact ``log_prob`` with the same solver), whatever the width."""
    import torch

    from iterflow.core.integrand import EXACT_DIVERGENCE_MAX_DIM

    d = EXACT_DIVERGENCE_MAX_DIM + 4
    x = np.random.default_rng(0).normal(size=(64, d)) @ np.diag(np.linspace(0.5, 2.0, d))
    model = FlowDensity(steps=30, hidden=(16,), random_state=0, divergence="exact").fit(x)
    got = model.score_samples(x[:8])
    with torch.no_grad():
        want = model.flow_.log_prob(
            torch.as_tensor(x[:8]), solver="rk4", steps=16, divergence="exact"
        ).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    noisy = model.set_params(divergence="auto").score_samples(x[:8])
    assert np.abs(noisy - want).max() > 1e-6  # one probe is not the exact trace
    with pytest.raises(InputError, match="^divergence: "):
        model.set_params(divergence="trace").score_samples(x[:8])
