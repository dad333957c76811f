"""Class-conditional flows: labels in every training method, label dropout, classifier-free
guidance, conditional log-likelihoods and the generative classifier.

Closed forms (float64). Classes ``y`` are Gaussians ``N(mu_y, sigma^2 I)``; with the straight
interpolant ``x_s = (1 - s) x_0 + s z`` (``x_0`` of class ``y``, ``z ~ N(0, I)``) the conditional
flow-matching velocity is exact:

    v*(x, s | y) = -mu_y + c(s) (x - (1 - s) mu_y),   c(s) = (s - (1 - s) sigma^2) / V(s),
    V(s) = (1 - s)^2 sigma^2 + s^2,

its flow maps ``x_0`` to ``(x_0 - mu_y) / sigma``, so ``log p(x | y) = log N(x; mu_y, sigma^2 I)``,
and its flow-matching loss per entry is ``int_0^1 1 + sigma^2 - (s - (1 - s) sigma^2)^2 / V(s) ds``.
``v*`` is affine in ``mu_y``, so the guided field of weight ``w`` is the field of the mean
``mu_null + w (mu_y - mu_null)`` and guided samples are ``mu_null + w (mu_y - mu_null) + sigma z``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm
from torch import Tensor, nn
from typer.testing import CliRunner

import iterflow
from iterflow.cli.app import app
from iterflow.core.conditioning import conditioning
from iterflow.core.flow import Block, Flow
from iterflow.core.guidance import guidance, guided_call
from iterflow.core.nn import MLPVelocity, UNet
from iterflow.core.ode import SolverSpec
from iterflow.core.rectified import load_pairs, simulate_pairs
from iterflow.core.store import load_trained_flow
from iterflow.data import get_dataset
from iterflow.errors import InputError
from iterflow.evaluation.conditional import (
    class_log_likelihoods,
    conditional_log_prob,
    generative_classifier,
)
from iterflow.methods import METHODS, parse_options
from iterflow.methods.cnf import likelihood_loss
from iterflow.methods.jko import jko_loss
from iterflow.train import TrainConfig, load_run, train
from iterflow.train.stages import drop_labels

DT = torch.float64
RK4 = {"solver": "rk4", "steps": 64}


class GaussianClasses(nn.Module):
    """The exact conditional velocity ``v*(x, s | y)`` of classes ``N(mu_y, sigma^2 I)`` (module
    docstring); the null label ``K`` is the class of mean ``mu_null``."""

    def __init__(self, means: Tensor, sigma: float, null_mean: Tensor) -> None:
        super().__init__()
        self.num_classes, self.sigma = means.shape[0], sigma
        self.register_buffer("means", torch.cat([means, null_mean[None]]))

    def forward(self, x: Tensor, s: Tensor | float, y: Tensor | None = None) -> Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
        m = self.means[y]  # (B, d)
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1)
        v = (1 - s) ** 2 * self.sigma**2 + s**2
        c = (s - (1 - s) * self.sigma**2) / v
        return -m + c * (x - (1 - s) * m)


def gaussian_problem(d: int, k: int, seed: int, sigma: float = 0.7) -> tuple[Tensor, Flow]:
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(k, d, generator=g, dtype=DT)
    vel = GaussianClasses(means, sigma, means.mean(0))
    return means, Flow([Block(vel)], (d,)).to(DT)


def draw(means: Tensor, sigma: float, n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, means.shape[0], (n,), generator=g)
    return means[y] + sigma * torch.randn(n, means.shape[1], generator=g, dtype=DT), y


def gauss_logpdf(x: Tensor, mean: Tensor, sigma: float) -> Tensor:
    d = x.shape[1]
    return (
        -0.5 * ((x - mean) ** 2).sum(1) / sigma**2
        - d * math.log(sigma)
        - 0.5 * d * math.log(2 * math.pi)
    )


# ------------------------------------------------------------------------------------------------
# Closed forms: velocity, losses, likelihoods, the classifier
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d", "k", "seed"), [(2, 3, 0), (5, 4, 1)])
def test_fm_loss_of_the_exact_conditional_velocity_is_its_closed_form(
    d: int, k: int, seed: int
) -> None:
    """Flow matching with labels bound: the exact ``v*`` attains the closed-form loss; with the
    labels shuffled (rows and labels misaligned) the same field does far worse."""
    sigma = 0.7
    means, flow = gaussian_problem(d, k, seed, sigma)
    x, y = draw(means, sigma, 40_000, seed + 10)
    method = METHODS["fm"](parse_options(METHODS["fm"], {}), event_shape=(d,), num_blocks=1)
    want = integrate.quad(
        lambda s: 1 + sigma**2 - (s - (1 - s) * sigma**2) ** 2 / ((1 - s) ** 2 * sigma**2 + s**2),
        0,
        1,
    )[0]
    with conditioning(y=y), torch.no_grad():
        rows = method.loss(flow, (x,), 0, torch.Generator().manual_seed(seed)).rows
    se = float(rows.std()) / math.sqrt(len(rows))
    assert abs(float(rows.mean()) - want) < 4 * se, (float(rows.mean()), want, se)
    with conditioning(y=y[torch.randperm(len(y))]), torch.no_grad():
        wrong = method.loss(flow, (x,), 0, torch.Generator().manual_seed(seed)).rows
    assert float(wrong.mean()) > want + 0.5


@pytest.mark.parametrize(("d", "k", "seed"), [(1, 2, 2), (3, 3, 3), (6, 5, 4)])
def test_conditional_log_density_of_the_exact_flow(d: int, k: int, seed: int) -> None:
    """``log p(x | y)`` by the instantaneous change of variables = ``log N(x; mu_y, sigma^2 I)``,
    through Flow.log_prob, the CNF loss and the JKO loss (model units, labels bound)."""
    sigma = 0.7
    means, flow = gaussian_problem(d, k, seed, sigma)
    x, y = draw(means, sigma, 300, seed)
    exact = gauss_logpdf(x, means[y], sigma)
    got = conditional_log_prob(flow, x, y, divergence="exact", **RK4)
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-7)
    with conditioning(y=y):
        torch.testing.assert_close(flow.log_prob(x, **RK4), exact, rtol=1e-7, atol=1e-7)
        spec = SolverSpec("rk4", 64)
        cnf = likelihood_loss(flow, x, spec, None, kinetic=0.0, jacobian=0.0)
        torch.testing.assert_close(cnf.terms["nll"], -exact, rtol=1e-7, atol=1e-7)
        jko = jko_loss(flow, x, 1.0, spec, None, kinetic=0.0, jacobian=0.0)
    # JKO's KL term is |z|^2 / 2 - log det = -log p(x | y) - (d / 2) log(2 pi)
    torch.testing.assert_close(
        jko.terms["kl"], -exact - 0.5 * d * math.log(2 * math.pi), rtol=0, atol=1e-7
    )


@pytest.mark.parametrize(("d", "k", "seed"), [(2, 3, 5), (4, 4, 6)])
def test_generative_classifier_of_the_exact_flow_is_the_bayes_classifier(
    d: int, k: int, seed: int
) -> None:
    sigma = 1.2
    means, flow = gaussian_problem(d, k, seed, sigma)
    x, y = draw(means, sigma, 2000, seed + 1)
    prior = torch.arange(1, k + 1, dtype=DT)  # unequal class counts
    res = generative_classifier(flow, x, y, prior=prior, divergence="exact", **RK4)
    exact = torch.stack([gauss_logpdf(x, means[c], sigma) for c in range(k)], 1)
    torch.testing.assert_close(res.log_likelihoods, exact, rtol=1e-7, atol=1e-7)
    joint = exact + (prior / prior.sum()).log()
    bayes = joint.argmax(1)
    top2 = joint.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert torch.equal(res.predictions[clear], bayes[clear])
    torch.testing.assert_close(res.log_marginal, torch.logsumexp(joint, 1), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(res.log_posterior.exp().sum(1), torch.ones(len(x), dtype=DT))


def test_two_class_accuracy_matches_the_bayes_accuracy() -> None:
    """Two isotropic classes, equal prior: the Bayes accuracy is Phi(|mu_1 - mu_0| / (2 sigma))."""
    sigma, n = 1.0, 4000
    means = torch.tensor([[0.0, 0.0, 0.0], [1.5, -0.5, 1.0]], dtype=DT)
    flow = Flow([Block(GaussianClasses(means, sigma, means.mean(0)))], (3,)).to(DT)
    x, y = draw(means, sigma, n, 7)
    acc = generative_classifier(flow, x, y, divergence="exact", **RK4).accuracy
    want = norm.cdf(float((means[1] - means[0]).norm()) / (2 * sigma))
    assert acc is not None and abs(acc - want) < 4 * math.sqrt(want * (1 - want) / n)


# ------------------------------------------------------------------------------------------------
# Guidance and label dropout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_guided_samples_of_gaussian_classes(w: float) -> None:
    """The guided field of the exact ``v*`` is the field of ``mu_null + w (mu_y - mu_null)``."""
    sigma = 0.6
    means, flow = gaussian_problem(3, 3, 8, sigma)
    y = torch.tensor([0, 1, 2, 3, 1])  # 3: the null label
    g = torch.Generator().manual_seed(0)
    x = flow.sample(5, generator=g, labels=y, guidance=w, **RK4)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    null = flow.chain[0].velocity.means[3]
    m = flow.chain[0].velocity.means[y]
    torch.testing.assert_close(x, null + w * (m - null) + sigma * z, rtol=0, atol=1e-8)


def test_guidance_zero_and_one_are_the_unconditional_and_conditional_fields_exactly() -> None:
    torch.manual_seed(0)
    net = MLPVelocity(3, hidden=(16,), num_classes=4).to(DT)
    nn.init.normal_(net.inp_y.weight)  # a null row that differs from the others
    flow = Flow([Block(net)], (3,)).to(DT)
    y, gen = torch.tensor([0, 3, 2, 1, 0, 4]), lambda: torch.Generator().manual_seed(1)
    null = torch.full_like(y, 4)
    plain = flow.sample(6, generator=gen(), labels=y, solver="rk4", steps=4)
    assert torch.equal(
        flow.sample(6, generator=gen(), labels=y, guidance=1.0, **RK4),
        flow.sample(6, generator=gen(), labels=y, **RK4),
    )
    assert torch.equal(
        flow.sample(6, generator=gen(), labels=y, guidance=0.0, **RK4),
        flow.sample(6, generator=gen(), labels=null, **RK4),
    )
    assert torch.equal(
        flow.sample(6, generator=gen(), **RK4), flow.sample(6, generator=gen(), labels=null, **RK4)
    )  # no label = the null label
    assert not torch.allclose(plain, flow.sample(6, generator=gen(), solver="rk4", steps=4))
    # other weights: v_null + w (v_y - v_null) from one stacked evaluation
    x, s = torch.randn(6, 3, dtype=DT), torch.rand(6, dtype=DT)
    with guidance(2.5):
        got = guided_call(net, x, s, {"y": y})
    want = net(x, s, null) + 2.5 * (net(x, s, y) - net(x, s, null))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with flow.count_nfe() as c, conditioning(y=y), guidance(3.0):
        flow.decode(x, solver="euler", steps=5)
    assert c.nfe == 5  # one stacked call per step


class Guided(nn.Module):
    """The guided field written out: ``v(x | null) + w (v(x | y) - v(x | null))`` (a plain module,
    so every map integrates it by the generic autograd path)."""

    def __init__(self, net: nn.Module, w: float) -> None:
        super().__init__()
        self.net, self.w = net, w

    def forward(self, x: Tensor, s: Tensor | float, y: Tensor) -> Tensor:
        null = torch.full_like(y, self.net.num_classes)
        v_null = self.net(x, s, null)
        return v_null + self.w * (self.net(x, s, y) - v_null)


def test_every_map_follows_the_guided_field() -> None:
    """log_prob (the augmented integrand), encode and decode under ``guidance(w)`` are those of
    the guided field written out as a module (whatever fast path the network offers)."""
    torch.manual_seed(1)
    net = MLPVelocity(3, hidden=(16, 16), num_classes=3).to(DT)
    nn.init.normal_(net.inp_y.weight)
    flow, ref = Flow([Block(net)], (3,)).to(DT), Flow([Block(Guided(net, 2.5))], (3,)).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    with conditioning(y=y):
        want = ref.log_prob(x, divergence="exact", solver="rk4", steps=8)
        with guidance(2.5):
            got = flow.log_prob(x, divergence="exact", solver="rk4", steps=8)
            enc = flow.encode(x, solver="rk4", steps=8)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(enc, ref.encode(x, solver="rk4", steps=8), rtol=0, atol=1e-12)


def test_guidance_and_labels_are_checked() -> None:
    flow = Flow([Block(MLPVelocity(2, hidden=(8,), num_classes=3))], (2,))
    plain = Flow([Block(MLPVelocity(2, hidden=(8,)))], (2,))
    with pytest.raises(InputError, match="guidance"):
        plain.sample(3, guidance=2.0)
    with pytest.raises(InputError, match="labels"):
        plain.sample(3, labels=0)
    with pytest.raises(InputError, match=r"labels.*\[0, 3\)"):
        flow.sample(3, labels=torch.tensor([0, 1, 5]))
    with pytest.raises(InputError, match="labels"):
        flow.sample(3, labels=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(InputError, match="guidance"):
        with guidance(float("nan")):
            pass
    with pytest.raises(InputError, match="guidance"), conditioning(y=torch.zeros(2).long()):
        with guidance(2.0):  # a network without classes cannot be guided
            plain.decode(torch.zeros(2, 2), solver="euler", steps=1)


@pytest.mark.parametrize("kind", ["ot", "sinkhorn"])
def test_ot_couplings_pair_rows_within_their_class(kind: str) -> None:
    """With labels, a minibatch OT coupling pairs noise only with rows of one class: each class
    keeps its own noise rows (so its noise stays N(0, I)), optimally paired within the class."""
    from iterflow.core.couplings import couple

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (90,), generator=g)
    x0 = torch.randn(90, 2, generator=g, dtype=DT) + 4.0 * y[:, None]
    x1 = torch.randn(90, 2, generator=g, dtype=DT)
    _, paired = couple(x0, x1, kind, groups=y, generator=torch.Generator().manual_seed(1))
    for c in range(3):
        rows = y == c
        mine = {tuple(r.tolist()) for r in x1[rows]}
        assert {tuple(r.tolist()) for r in paired[rows]} <= mine
        if kind == "ot":  # within the class: the class's own optimal pairing
            _, alone = couple(x0[rows], x1[rows], "ot")
            assert torch.equal(paired[rows], alone)
    _, mixed = couple(x0, x1, "ot")  # without groups, classes trade noise rows
    assert any(
        not {tuple(r.tolist()) for r in mixed[y == c]} <= {tuple(r.tolist()) for r in x1[y == c]}
        for c in range(3)
    )


def test_label_dropout_draws_the_null_label_with_its_probability() -> None:
    y = torch.randint(0, 5, (20_000,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(y, 0.1, 5, torch.Generator().manual_seed(1))
    dropped = out == 5
    assert torch.equal(out[~dropped], y[~dropped])
    assert abs(float(dropped.double().mean()) - 0.1) < 4 * math.sqrt(0.09 / len(y))
    assert torch.equal(drop_labels(y, 0.0, 5, torch.Generator()), y)


class Recorder(nn.Module):
    """A velocity that records the rows and labels it sees at ``s = 0`` (a CNF's first stage of
    RK4 evaluates the data rows themselves)."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, s: Tensor | float, y: Tensor) -> Tensor:
        st = torch.as_tensor(s)
        if st.ndim == 0 and float(st) == 0.0 and torch.is_grad_enabled():
            self.seen.append((x.detach().clone(), y.clone()))
        return self.lin(x) * 1e-3


def test_the_trainer_binds_each_row_its_own_label_with_dropout() -> None:
    """Rows whose first coordinate is positive are class 1: every row the network sees at s = 0
    arrives with its label or with the null label (2), the latter at the dropout rate."""
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    y = (x[:, 0] > 0).long()
    rec = Recorder()
    result = iterflow.fit(
        "cnf", x, velocity=lambda: rec, labels=y, steps=30, batch_size=100, standardize="none",
        label_dropout=0.25, options={"steps": 1}, n_val=10, ema=0.0,
    )  # fmt: skip
    assert result.flow.num_classes == 2
    xs = torch.cat([a for a, _ in rec.seen])
    ys = torch.cat([b for _, b in rec.seen])
    assert len(ys) >= 3000
    kept = ys != 2
    assert torch.equal(ys[kept], (xs[kept, 0] > 0).long())
    frac = float((~kept).double().mean())
    assert abs(frac - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(ys))


def test_mlp_null_label_and_weights_saved_before_it() -> None:
    torch.manual_seed(0)
    net = MLPVelocity(3, hidden=(8,), num_classes=2)
    assert net.inp_y is not None and net.inp_y.weight.shape == (3, 8)
    assert torch.equal(net.inp_y.weight[2], torch.zeros(8))  # the null row starts at zero
    x, t = torch.randn(4, 3), torch.tensor(0.3)
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), 2)))
    old = {k: v for k, v in net.state_dict().items()}
    old["inp_y.weight"] = old["inp_y.weight"][:2]  # a checkpoint with num_classes rows
    back = MLPVelocity(3, hidden=(8,), num_classes=2)
    back.load_state_dict(old)
    assert torch.equal(
        back(x, t, torch.tensor([0, 1, 0, 1])), net(x, t, torch.tensor([0, 1, 0, 1]))
    )
    unet = UNet((1, 6, 6), channels=8, channel_mult=(1,), num_classes=3)
    xi = torch.randn(2, 1, 6, 6)
    assert torch.equal(unet(xi, 0.5), unet(xi, 0.5, torch.full((2,), 3)))


# ------------------------------------------------------------------------------------------------
# Training with labels: every method, save/load, resume, reflow pairs, a trained classifier
# ------------------------------------------------------------------------------------------------

BASE = dict(
    data="8gaussians", labels=True, steps=16, batch_size=32, hidden=(16,), n_train=96, n_val=24,
    n_test=16, checkpoint_every=6, log_every=4, lr=5e-3, ema=0.9, dtype="float64", seed=2,
)  # fmt: skip
SETTINGS: dict[str, dict] = {
    "fm": {"options": {"push_steps": 4}},
    "cnf": {"options": {"steps": 2, "push_steps": 4}},
    "jko": {"blocks": 2, "steps": 8, "options": {"substeps": 1, "push_steps": 4}},
    "local-fm": {"blocks": 2, "options": {"push_steps": 4, "report_n": 24}},
    "reflow": {"options": {"n_pairs": 64, "pair_steps": 4, "push_steps": 4, "pair_guidance": 1.5}},
    "distill": {"options": {"n_pairs": 64, "pair_steps": 4, "push_steps": 4, "k_steps": 2}},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cond") / "source"
    train(TrainConfig(**{**BASE, **SETTINGS["fm"]}), path)
    return path


def labelled_config(name: str, source: Path) -> TrainConfig:
    setting = SETTINGS[name]
    options = dict(setting.get("options", {}))
    if name in ("reflow", "distill"):
        options["source"] = str(source)
    return TrainConfig(method=name, **{**BASE, **setting, "options": options})


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_method_trains_with_labels_saves_and_resumes(
    name: str, source: Path, tmp_path: Path
) -> None:
    """Each method on labelled data: the run records its classes, loads back into the same
    class-conditional flow (samples per label bit for bit), and an interrupted run ends with the
    weights of the uninterrupted one (label dropout draws included)."""
    cfg = labelled_config(name, source)
    whole = train(cfg, tmp_path / "whole")
    flow, _, meta = load_run(tmp_path / "whole")
    assert flow.num_classes == 8 and meta["labels"]["num_classes"] == 8
    assert sum(meta["labels"]["class_counts"]) == cfg.n_train
    assert all(n.get("num_classes") == 8 for n in meta["networks"])
    y = torch.arange(8)
    for w in (None, 2.0):
        a = whole.flow.sample(8, generator=torch.Generator().manual_seed(0), labels=y, guidance=w,
                              solver="rk4", steps=4)  # fmt: skip
        b = flow.sample(8, generator=torch.Generator().manual_seed(0), labels=y, guidance=w,
                        solver="rk4", steps=4)  # fmt: skip
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", stop_after_steps=cfg.checkpoint_every + 2)
    resumed = train(cfg, tmp_path / "resumed")
    for p, q in zip(whole.flow.state_dict().values(), resumed.flow.state_dict().values()):
        assert torch.equal(p, q), name


def test_reflow_pairs_are_decoded_under_their_labels(source: Path, tmp_path: Path) -> None:
    """The teacher's pairs of a labelled reflow: labels drawn from the training labels, kept in the
    pairs file, and each pair's data is the source's (guided) decoding of its noise under its label."""
    cfg = labelled_config("reflow", source)
    pairs_file = tmp_path / "pairs.safetensors"
    cfg = dataclasses.replace(cfg, options={**cfg.options, "pairs": str(pairs_file)})
    train(cfg, tmp_path / "run")
    pairs, info = load_pairs(pairs_file)
    assert pairs.labels is not None and pairs.labels.shape == (64,)
    assert info["pair_guidance"] == "1.5" and set(pairs.labels.tolist()) <= set(range(8))
    src = load_trained_flow(source)
    again = simulate_pairs(src, 1, spec=cfg_spec(), labels=pairs.labels[:1], guidance_weight=1.5)
    with conditioning(y=pairs.labels), guidance(1.5), torch.no_grad():
        decoded = src.chain[0].decode(pairs.noise, cfg_spec())
    torch.testing.assert_close(decoded, pairs.data, rtol=0, atol=1e-12)
    assert again.labels is not None and again.data.shape == (1, 2)
    with pytest.raises(InputError, match="pairs"):  # a run with labels refuses unlabelled pairs
        from iterflow.core.rectified import Pairs, save_pairs

        plain = tmp_path / "plain.safetensors"
        save_pairs(plain, Pairs(pairs.data, pairs.noise), info)
        train(
            dataclasses.replace(cfg, options={**cfg.options, "pairs": str(plain)}), tmp_path / "r2"
        )


def cfg_spec() -> SolverSpec:
    return SolverSpec("rk4", 4)


def test_trained_flow_learns_the_conditional_velocity_and_classifies_near_bayes() -> None:
    """Flow matching with labels on Gaussian classes: the learned v(x, s | y) is close to v*, its
    log p(x | y) to the exact density, and its generative classifier near the Bayes accuracy."""
    d, k, sigma = 2, 3, 0.8
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=DT)
    x, y = draw(means, sigma, 6000, 11)
    flow = iterflow.fit(
        "fm", x, labels=y, steps=1500, batch_size=256, lr=5e-3, hidden=(64, 64), time_freqs=2,
        standardize="none", label_dropout=0.1, seed=0,
    ).flow  # fmt: skip
    exact = GaussianClasses(means, sigma, means.mean(0))
    xt, yt = draw(means, sigma, 1000, 12)
    s = torch.rand(1000, generator=torch.Generator().manual_seed(3), dtype=DT)
    xs = (1 - s[:, None]) * xt + s[:, None] * torch.randn(1000, d, dtype=DT)
    with torch.no_grad():
        learned = flow.chain[0].velocity(xs, s, yt)
    ref = exact(xs, s, yt)
    rel = float((learned - ref).norm() / ref.norm())
    assert rel < 0.12, rel
    res = generative_classifier(flow, xt, yt, divergence="exact", **RK4)
    truth = torch.stack([gauss_logpdf(xt, means[c], sigma) for c in range(k)], 1)
    own = res.log_likelihoods.gather(1, yt[:, None])[:, 0]
    assert abs(float(own.mean() - truth.gather(1, yt[:, None])[:, 0].mean())) < 0.1
    bayes = float((truth.argmax(1) == yt).double().mean())
    assert res.accuracy is not None and abs(res.accuracy - bayes) < 0.02, (res.accuracy, bayes)
    ll = class_log_likelihoods(flow, xt[:5], divergence="exact", **RK4)
    assert ll.shape == (5, k)


# ------------------------------------------------------------------------------------------------
# Data with labels and the command line
# ------------------------------------------------------------------------------------------------


def test_labelled_data_sets_and_label_columns(tmp_path: Path) -> None:
    for name, k in (("moons", 2), ("pinwheel", 5), ("8gaussians", 8), ("circles", 2),
                    ("sklearn:iris", 3)):  # fmt: skip
        ds = get_dataset(name)
        assert ds.num_classes == k
        labels = ds.label_splits(50, 20, 10, 3)
        assert labels.train.dtype == torch.int64 and int(labels.train.max()) < k
        assert labels.val.shape == ds.splits(50, 20, 10, 3).val.shape[:1]
    # a mixture's labels are the components its points came from (exact class densities)
    gm = get_dataset("gmm-2d")
    x, y = gm.splits(400, 1, 1, 0).train.double(), gm.label_splits(400, 1, 1, 0).train
    assert float((gm.class_log_prob(x).argmax(1) == y).double().mean()) > 0.9
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,species\n" + "".join(f"{i},{-i},{5 + i % 3}\n" for i in range(30)))
    ds = get_dataset(csv, label_column="species")
    assert ds.dim == 2 and ds.num_classes == 3 and ds.describe()["class_names"] == ["5", "6", "7"]
    assert torch.equal(get_dataset(csv, label_column="-1").label_splits(30, 3, 3, 0).train,
                       ds.label_splits(30, 3, 3, 0).train)  # fmt: skip
    with pytest.raises(InputError, match="label_column"):
        get_dataset(csv, label_column="colour")
    with pytest.raises(InputError, match="label_column"):
        get_dataset("moons", label_column="0")
    with pytest.raises(InputError, match="data"):
        get_dataset("checkerboard").label_splits(5, 1, 1, 0)


def test_cli_trains_samples_per_class_with_guidance_and_evaluates(tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    common = ["--steps", "20", "--batch-size", "64", "--hidden", "16", "--n-train", "300",
              "--n-test", "60", "--n-val", "30", "-q", "--no-report"]  # fmt: skip
    r = runner.invoke(app, ["train", "--data", "moons", "--labels", "--out", str(run), *common])
    assert r.exit_code == 0, r.output
    out = tmp_path / "s.npy"
    args = ["sample", str(run), "--n", "7", "--out", str(out), "--solver", "rk4", "--steps", "4"]
    r = runner.invoke(app, [*args, "--label", "1", "--guidance", "2"])
    assert r.exit_code == 0, r.output
    guided = np.load(out)
    flow, _, _ = load_run(run)
    g = torch.Generator().manual_seed(0)
    want = flow.sample(7, generator=g, labels=1, guidance=2.0, solver="rk4", steps=4).detach()
    np.testing.assert_array_equal(guided, want.numpy())
    r = runner.invoke(app, ["eval", str(run), "--json", "--n", "50", "--cond-n", "40",
                            "--solver", "rk4", "--steps", "4"])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["num_classes"] == 2 and m["cond_n"] == 40
    assert 0 <= m["gen_classifier_accuracy"] <= 1 and math.isfinite(m["cond_nll"])
    # the flags' errors exit 2 naming the flag
    from iterflow.cli.app import main

    assert main([*args, "--label", "2"]) == 2
    assert main([*args, "--label", "dog"]) == 2
    plain = tmp_path / "plain"
    r = runner.invoke(app, ["train", "--data", "moons", "--out", str(plain), *common])
    assert r.exit_code == 0, r.output
    assert main(["sample", str(plain), "--n", "3", "--out", str(out), "--guidance", "2"]) == 2
    assert main(["train", "--data", "checkerboard", "--labels", "--out", str(tmp_path / "c"),
                 *common]) == 2  # fmt: skip


def test_cli_errors_name_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from iterflow.cli.app import main

    run = tmp_path / "run"
    main(["train", "--data", "moons", "--out", str(run), "--steps", "5", "--hidden", "8",
          "--n-train", "100", "-q", "--no-report"])  # fmt: skip
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "3", "--out", str(tmp_path / "s.npy"),
                 "--guidance", "2"]) == 2  # fmt: skip
    assert "--guidance" in capsys.readouterr().err
    assert main(["sample", str(run), "--n", "3", "--out", str(tmp_path / "s.npy"),
                 "--label", "0"]) == 2  # fmt: skip
    assert "--label" in capsys.readouterr().err
    assert main(["train", "--data", "moons", "--label-dropout", "1.5", "--out",
                 str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--label-dropout" in capsys.readouterr().err
