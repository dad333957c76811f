"""Density-ratio estimators against exact log ratios between Gaussians.

The telescopic estimator is tested on the *exact* optimal-transport flow between two Gaussians
(:func:`iterflow.apps.ot.gaussian.gaussian_ot_flow`), so that only the classifiers are learned: the
chain's particles are known in closed form and the estimate must match
``log N(x; m2, S2) - log N(x; m1, S1)`` on points from both Gaussians.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iterflow.apps.ot import (
    ClassifierOptions,
    KDEOptions,
    KDERatio,
    TelescopicOptions,
    chain_particles,
    fit_classifier,
    fit_kde,
    fit_telescopic,
    gaussian_ot_flow,
    gaussian_ot_map,
    load_ratio,
    log_ratio_mse,
)
from iterflow.data import GaussianMixture
from iterflow.errors import InputError
from iterflow.methods.classifier import logistic_loss
from iterflow.train import StepBudget

F64 = torch.float64
M1, M2 = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([2.0, 1.0], dtype=F64)
S1 = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
S2 = torch.tensor([[0.4, -0.1], [-0.1, 1.5]], dtype=F64)
P, Q = GaussianMixture(M1[None], S1[None]), GaussianMixture(M2[None], S2[None])


def truth(x: torch.Tensor) -> torch.Tensor:
    return Q.log_prob(x.double()) - P.log_prob(x.double())


def samples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return P.sample(n, g), Q.sample(n, g)


def test_logistic_loss_is_minimised_at_the_log_ratio() -> None:
    """Pointwise minimiser of f0 softplus(phi) + f1 softplus(-phi) is log f1/f0 (Lemma V.1)."""
    x0, x1 = samples(200_000, seed=0)

    def loss(a: float, b: float) -> float:  # the logistic loss of the logit a * phi* + b
        return float(logistic_loss(lambda t: a * t + b, truth(x0), truth(x1)).value())

    best = loss(1.0, 0.0)
    for shift, scale in [(0.3, 1.0), (-0.3, 1.0), (0.0, 1.2), (0.0, 0.8)]:
        worse = loss(scale, shift)
        assert worse > best + 1e-3, (shift, scale)


def test_chain_particles_follow_the_exact_flow() -> None:
    flow = gaussian_ot_flow(M1, S1, M2, S2, blocks=2)
    a, c = gaussian_ot_map(M1, S1, M2, S2)
    x, y = (v.double() for v in samples(300, seed=1))
    k = 8
    chain = chain_particles(flow, x, y, k, particles="source", substeps=2)
    assert len(chain) == k + 1 and torch.equal(chain[0], x) and torch.equal(chain[-1], y)
    eye = torch.eye(2, dtype=F64)
    for i in range(1, k):
        t = i / k
        assert torch.allclose(chain[i], x @ (eye + t * (a - eye)).T + t * c, atol=1e-9)
    both = chain_particles(flow, x, y, k, particles="both")
    x0 = torch.linalg.solve(a, (y - c).T).T  # T^{-1}(y), then carried to t = 1/2
    pulled = x0 @ (eye + 0.5 * (a - eye)).T + 0.5 * c
    assert torch.allclose(both[k // 2][300:], pulled, atol=1e-9)
    with pytest.raises(InputError, match="intervals"):
        chain_particles(flow, x, y, 5)


@pytest.fixture(scope="module")
def telescopic() -> object:
    flow = gaussian_ot_flow(M1, S1, M2, S2, blocks=2).float()
    x, y = samples(20_000, seed=2)
    opts = TelescopicOptions(
        intervals=4,
        classifier=ClassifierOptions(hidden=(64, 64), time_freqs=4, steps=1000, batch_size=128),
    )
    return fit_telescopic(flow, x, y, opts, generator=torch.Generator().manual_seed(0))


def test_telescopic_recovers_the_gaussian_log_ratio(telescopic: object) -> None:
    tp, tq = samples(3000, seed=3)
    for pts in (tp, tq):
        mse, var = log_ratio_mse(telescopic.log_ratio(pts), truth(pts)), float(truth(pts).var())
        assert mse < 0.1 * var, (mse, var)
    terms = telescopic.interval_log_ratios(tp)
    assert terms.shape == (3000, 4)
    assert torch.allclose(terms.sum(1), telescopic.log_ratio(tp), atol=1e-4)


def random_pair(dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``(m1, S1, m2, S2)`` float64: random means and covariances with random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        rot = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))[0]
        ev = torch.exp(torch.empty(dim, dtype=F64).uniform_(-0.7, 0.7, generator=g))
        out += [0.8 * torch.randn(dim, generator=g, dtype=F64), (rot * ev) @ rot.T]
    return tuple(out)


@pytest.mark.parametrize("dim", [3, 8])
def test_telescopic_defaults_recover_random_gaussian_log_ratios(dim: int) -> None:
    """The default estimator (2 intervals, quadratic forms) on the exact OT flow between random
    Gaussians: the log ratio on points of both sides, against the closed form."""
    m1, s1, m2, s2 = random_pair(dim, seed=dim)
    p, q = GaussianMixture(m1[None], s1[None]), GaussianMixture(m2[None], s2[None])
    g = torch.Generator().manual_seed(0)
    x, y = p.sample(8000, g).double(), q.sample(8000, g).double()
    flow = gaussian_ot_flow(m1, s1, m2, s2, blocks=2)
    default = TelescopicOptions()
    assert default.intervals == 2 and default.quadratic
    opts = TelescopicOptions(classifier=ClassifierOptions(time_freqs=4, batch_size=512, steps=600))
    est = fit_telescopic(flow, x, y, opts, generator=torch.Generator().manual_seed(1))
    for pts in (p.sample(2000, g).double(), q.sample(2000, g).double()):
        want = q.log_prob(pts) - p.log_prob(pts)
        mse = log_ratio_mse(est.log_ratio(pts), want)
        assert mse < 0.05 * float(want.var()), (dim, mse, float(want.var()))


def test_quadratic_forms_of_the_interval_logits() -> None:
    """``phi_k(u) = net(u, t_k) + u^T A_k u + b_k^T u``, the same for one interval per row and for
    all intervals at once (float64, random forms)."""
    from iterflow.apps.ot import IntervalLogits

    torch.manual_seed(0)
    logits = IntervalLogits(3, 4, "conditioned", ClassifierOptions(hidden=(8,)), True).double()
    with torch.no_grad():
        logits.quad.normal_()
        logits.lin.normal_()
    u = torch.randn(10, 3, dtype=F64)
    k = torch.arange(10) % 4
    a = (logits.quad + logits.quad.transpose(1, 2)) / 2  # only the symmetric part counts
    want = torch.stack([u[i] @ a[k[i]] @ u[i] + logits.lin[k[i]] @ u[i] for i in range(10)])
    net = logits.nets[0](u, logits.times(u)[k])
    assert torch.allclose(logits(u, k), net + want, atol=1e-12)
    assert torch.allclose(logits.all_intervals(u)[torch.arange(10), k], logits(u, k), atol=1e-12)


def test_classifier_baseline_recovers_an_overlapping_log_ratio() -> None:
    x, y = samples(20_000, seed=4)
    est = fit_classifier(
        x,
        y,
        ClassifierOptions(hidden=(64, 64), steps=600, batch_size=256),
        generator=torch.Generator().manual_seed(0),
    )
    tp, tq = samples(2000, seed=5)
    for pts in (tp, tq):
        assert log_ratio_mse(est.log_ratio(pts), truth(pts)) < 0.15 * float(truth(pts).var())


def test_kde_ratio_closed_form_and_cross_validation() -> None:
    """One kernel per side: log q/p = (|x - p0|^2 - |x - q0|^2) / (2 h^2) when h_p = h_q = h."""
    h = 0.7
    p0, q0 = torch.tensor([[0.0, 0.0]], dtype=F64), torch.tensor([[1.0, -1.0]], dtype=F64)
    est = KDERatio(p0, q0, h, h, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    x = torch.randn(20, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    want = ((x - p0).pow(2).sum(1) - (x - q0).pow(2).sum(1)) / (2 * h * h)
    assert torch.allclose(est.log_ratio(x), want, atol=1e-9)
    grid = (0.05, 0.3, 3.0)
    x, y = samples(1000, seed=6)
    kde = fit_kde(x, y, KDEOptions(bandwidths=grid, folds=3))
    assert kde.bandwidth_p == 0.3 and kde.bandwidth_q == 0.3  # too narrow and too wide lose the CV


@pytest.mark.parametrize("kind", ["telescopic", "separate", "classifier", "kde"])
def test_save_load_round_trip(kind: str, telescopic: object, tmp_path: Path) -> None:
    x, y = samples(500, seed=7)
    if kind == "telescopic":
        est = telescopic
    elif kind == "separate":  # one classifier per interval
        opts = TelescopicOptions(
            intervals=4,
            mode="separate",
            particles="target",
            classifier=ClassifierOptions(hidden=(16,), steps=5, batch_size=32),
        )
        est = fit_telescopic(
            gaussian_ot_flow(M1, S1, M2, S2, blocks=2).float(),
            x,
            y,
            opts,
            generator=torch.Generator().manual_seed(0),
        )
        assert len(est.logits.nets) == 4
    elif kind == "classifier":
        est = fit_classifier(
            x,
            y,
            ClassifierOptions(hidden=(16,), steps=5),
            generator=torch.Generator().manual_seed(0),
        )
    else:
        est = fit_kde(x, y, KDEOptions(n_bandwidths=3, folds=2))
    est.save(tmp_path / kind)
    back = load_ratio(tmp_path / kind)
    assert type(back) is type(est)
    assert torch.allclose(back.log_ratio(x[:40]), est.log_ratio(x[:40]), atol=1e-6)


def test_inputs_are_validated(telescopic: object, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="mode"):
        TelescopicOptions(mode="nope")
    with pytest.raises(InputError, match="particles"):
        TelescopicOptions(particles="nope")
    with pytest.raises(InputError, match="hidden"):
        ClassifierOptions(hidden=())
    with pytest.raises(InputError, match="folds"):
        KDEOptions(folds=1)
    with pytest.raises(InputError, match="x"):
        telescopic.log_ratio(torch.zeros(3, 5))
    with pytest.raises(InputError, match="ratio"):
        load_ratio(tmp_path / "missing")
    flow = gaussian_ot_flow(M1, S1, M2, S2, blocks=2)
    x, y = samples(50, seed=8)
    with pytest.raises(InputError, match="target"):
        fit_telescopic(
            flow,
            x.double(),
            torch.zeros(5, 3, dtype=F64),
            generator=torch.Generator().manual_seed(0),
        )
    assert log_ratio_mse(torch.zeros(3), torch.ones(3)) == 1.0
    with pytest.raises(InputError, match="estimate"):
        log_ratio_mse(torch.zeros(3), torch.ones(4))


@pytest.mark.parametrize("stops", [(4,), (5, 4)])
def test_interrupted_ratio_fits_resume_to_the_uninterrupted_result(
    stops: tuple[int, ...], tmp_path: Path
) -> None:
    """Telescopic and single-classifier fits into a folder, interrupted after checkpoints and run
    again, give the uninterrupted estimators tensor for tensor (float64 on the CPU)."""
    flow = gaussian_ot_flow(M1, S1, M2, S2, blocks=2)
    x, y = (v.double() for v in samples(300, seed=9))
    clf = ClassifierOptions(hidden=(16,), time_freqs=2, steps=11, batch_size=32)
    tele = TelescopicOptions(intervals=2, classifier=clf)

    def fit(kind: str, **kw: object) -> object:
        gen = torch.Generator().manual_seed(0)
        if kind == "telescopic":
            return fit_telescopic(flow, x, y, tele, generator=gen, checkpoint_every=3, **kw)
        return fit_classifier(x, y, clf, generator=gen, checkpoint_every=3, **kw)

    for kind in ("telescopic", "classifier"):
        folder = tmp_path / kind
        whole = fit(kind)
        for k in stops:
            with pytest.raises(KeyboardInterrupt):
                fit(kind, folder=folder, budget=StepBudget(k))
        assert not (folder / "manifest.json").exists() and (folder / "progress.json").exists()
        res = fit(kind, folder=folder)
        module = "logits" if kind == "telescopic" else "net"
        want, got = getattr(whole, module).state_dict(), getattr(res, module).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), kind
        assert not (folder / "progress.json").exists()
        again = fit(kind, folder=folder)  # the finished estimator is loaded
        assert torch.equal(again.log_ratio(x[:20]), res.log_ratio(x[:20]))
        assert torch.equal(load_ratio(folder).log_ratio(x[:20]), res.log_ratio(x[:20]))
    with pytest.raises(InputError, match="folder: holds an estimator fitted with another"):
        fit_classifier(x, y, clf, generator=torch.Generator().manual_seed(1),
                       folder=tmp_path / "classifier")  # fmt: skip


def test_telescopic_estimators_saved_before_the_quadratic_forms_load(tmp_path: Path) -> None:
    """An estimator whose recorded options lack ``quadratic`` (saved before it existed) loads as
    one without the quadratic forms."""
    import json

    x, y = samples(300, seed=11)
    opts = TelescopicOptions(intervals=2, quadratic=False,
                             classifier=ClassifierOptions(hidden=(8,), steps=3, batch_size=16))  # fmt: skip
    flow = gaussian_ot_flow(M1, S1, M2, S2, blocks=2).float()
    est = fit_telescopic(flow, x, y, opts, generator=torch.Generator().manual_seed(0))
    est.save(tmp_path / "est")
    manifest = json.loads((tmp_path / "est" / "manifest.json").read_text())
    del manifest["state"]["options"]["quadratic"]
    (tmp_path / "est" / "manifest.json").write_text(json.dumps(manifest))
    back = load_ratio(tmp_path / "est")
    assert not back.options.quadratic
    assert torch.equal(back.log_ratio(x[:20]), est.log_ratio(x[:20]))


def test_older_estimator_folders_load_and_newer_ones_are_refused(tmp_path: Path) -> None:
    """A ``ratio.json`` folder of an earlier iterflow still loads; a manifest of a newer format is
    refused naming ``ratio``."""
    import json

    p0, q0 = torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)
    est = KDERatio(p0, q0, 0.5, 0.7, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    est.save(tmp_path / "new")
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert manifest["kind"] == "ratio" and manifest["estimator"] == "kde"
    old = tmp_path / "old"
    old.mkdir()
    (old / "ratio.safetensors").write_bytes((tmp_path / "new" / "ratio.safetensors").read_bytes())
    (old / "ratio.json").write_text(json.dumps({"format_version": 1, "kind": "kde",
                                                **manifest["state"]}))  # fmt: skip
    assert torch.equal(load_ratio(old).log_ratio(x), est.log_ratio(x))
    manifest["format_version"] = 99
    (tmp_path / "new" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="ratio: .*newer"):
        load_ratio(tmp_path / "new")
