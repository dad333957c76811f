r"""The harness's cases that train networks (:mod:`closed_form_cases` has the exact ones).

Budget ``"default"`` trains with what a user gets without changing a flag: ``TrainConfig.for_method``
(the recommended recipe of ``iterflow train``) for JKO-flow and local flow matching, and the default
options of :func:`iterflow.apps.ot.fit_transport`, :func:`iterflow.apps.ot.fit_telescopic`,
:func:`iterflow.apps.ot.fit_classifier`, :func:`iterflow.apps.ot.fit_kde` and
:func:`iterflow.apps.dro.fit_worst_case`. Budget ``"test"`` shrinks the networks and the step counts
(smoke runs: the tolerances still apply, but the figures are not the library's accuracy).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from closed_form_cases import Check, map_error, moment_checks, rel
from closed_forms import (
    DT,
    Gaussian,
    generator,
    jko_gaussian_step,
    moments,
    ot_pair,
    ou_gaussian_step,
    random_gaussian,
    worst_case_problem,
)
from torch import Tensor

from iterflow.apps.dro import DROConfig, fit_worst_case
from iterflow.apps.ot import (
    ClassifierOptions,
    TelescopicOptions,
    TransportOptions,
    TransportResult,
    fit_classifier,
    fit_kde,
    fit_telescopic,
    fit_transport,
    gaussian_ot_map,
    gaussian_w2_sq,
    log_ratio_mse,
)
from iterflow.train import TrainConfig, train_tensors
from iterflow.train.inputs import TrainData

#: Overrides of the recommended recipes for budget "test" (small and short).
TEST_TRAIN = {"steps": 200, "batch_size": 256, "hidden": (32, 32), "n_train": 4000}


#: Overrides of the trained blocks' settings (the sweep's ``--set`` and ``--option``): ``TrainConfig``
#: fields and method options, e.g. ``{"time_freqs": 4}`` and ``{"jacobian": 0.0}`` (the former recipe).
OVERRIDES: dict[str, dict[str, Any]] = {"set": {}, "options": {}}


def block_config(method: str, seed: int, budget: str, options: dict[str, Any]) -> TrainConfig:
    """One block of ``method`` without standardisation, the recommended settings otherwise (budget
    ``test``: :data:`TEST_TRAIN`), then :data:`OVERRIDES`."""
    extra = {**({} if budget == "default" else TEST_TRAIN), **OVERRIDES["set"]}
    opts = {**options, **OVERRIDES["options"]}
    return TrainConfig.for_method(method, blocks=1, standardize="none", seed=seed, data="gaussian",
                                  options=opts, log_every=10_000, **extra)  # fmt: skip


def train_block(cfg: TrainConfig, x: Tensor) -> tuple[Any, float]:
    """Train ``cfg`` on the rows ``x`` (the first ``n_train`` train, 2000 more validate; float32);
    returns the flow and the seconds."""
    n = cfg.n_train
    data = TrainData(x[:n].float(), x[n : n + 2000].float(), {"name": "closed-form gaussian"})
    t0 = time.perf_counter()
    res = train_tensors(cfg, data)
    return res.flow, time.perf_counter() - t0


def overrides_note() -> str:
    items = {**OVERRIDES["set"], **OVERRIDES["options"]}
    return "; " + ", ".join(f"{k}={v}" for k, v in items.items()) if items else ""


def case_jko_block(d: int, seed: int, budget: str = "test") -> list[Check]:
    """One JKO-flow block at the recommended settings (``iterflow train --method jko --blocks 1
    --standardize none``) on ``n_train`` draws of ``N(m, S)``: the pushed mean and covariance of
    exact-moment points against :func:`closed_forms.jko_gaussian_step` (5%), and, reported, the
    covariance against the closed form for the training sample's own moments (no sampling error)."""
    g = generator(20, d, seed)
    p = random_gaussian(d, g)
    cfg = block_config("jko", seed, budget, {})
    n = cfg.n_train
    x = p.sample(n + 2000, g)
    flow, sec = train_block(cfg, x)
    gamma = float(cfg.options["gamma"])
    with torch.no_grad():
        y = flow.encode(p.exact_sample(20_000, g).float(), solver="rk4", steps=32).double()
    want = jko_gaussian_step(p, gamma)
    out = moment_checks("jko_block", d, seed, y, want, 0.05)
    sample = jko_gaussian_step(Gaussian(*moments(x[:n])), gamma)
    out.append(Check("jko_block", d, seed, "cov_vs_sample_step", rel(moments(y)[1], sample.cov), None,
                     f"gamma={gamma:g}{overrides_note()}", sec))  # fmt: skip
    return out


def case_local_fm_block(d: int, seed: int, budget: str = "test") -> list[Check]:
    """One local flow-matching block at the recommended settings with one OU step ``h ~ U(0.1, 1)``
    (``-o hs=h -o final_block=false``): pushed moments against :func:`closed_forms.ou_gaussian_step`."""
    g = generator(21, d, seed)
    p = random_gaussian(d, g)
    h = float(torch.empty(1, dtype=DT).uniform_(0.1, 1.0, generator=g))
    cfg = block_config("local-fm", seed, budget, {"hs": [h], "final_block": False})
    x = p.sample(cfg.n_train + 2000, g)
    flow, sec = train_block(cfg, x)
    with torch.no_grad():
        y = flow.encode(p.exact_sample(20_000, g).float(), solver="rk4", steps=32).double()
    out = moment_checks("local_fm_block", d, seed, y, ou_gaussian_step(p, h), 0.05)
    note = f"h={h:.3f}{overrides_note()}"
    return [Check(c.case, c.d, c.seed, c.quantity, c.error, c.tol, note, sec) for c in out]


# ------------------------------------------------------------------------------------------------
# Optimal transport and density ratios (library defaults)
# ------------------------------------------------------------------------------------------------

N_TRANSPORT = 20_000  # samples per side: the default --n-train of `iterflow transport`
TEST_TRANSPORT = TransportOptions(blocks=2, hidden=(64, 64), init_steps=300, ot_chunk=128,
                                  refine_steps=60, classifier_warmup=40)  # fmt: skip


@functools.lru_cache(maxsize=4)
def transport_fit(
    d: int, seed: int, budget: str
) -> tuple[Gaussian, Gaussian, Tensor, Tensor, TransportResult, float]:
    """The transport flow between :func:`closed_form_cases.ot_pair`'s Gaussians (cached: the ratio
    case reuses it)."""
    p, q = ot_pair(d, seed)
    g = generator(22, d, seed)
    n = N_TRANSPORT if budget == "default" else 4000
    xp, xq = p.sample(n, g).float(), q.sample(n, g).float()
    opts = TransportOptions() if budget == "default" else TEST_TRANSPORT
    t0 = time.perf_counter()
    res = fit_transport(xp, xq, opts, generator=torch.Generator().manual_seed(seed))
    return p, q, xp, xq, res, time.perf_counter() - t0


def case_ot_fit(d: int, seed: int, budget: str = "test") -> list[Check]:
    """Flow-based OT (:func:`iterflow.apps.ot.fit_transport`, default options) between two random
    Gaussians: the W2^2 estimate against Bures (5% up to 10-D, 10% above) and, reported, the RMSE of
    the learned forward and backward maps against the closed-form linear maps, relative to the RMS
    displacement ``W2``."""
    p, q, _, _, res, sec = transport_fit(d, seed, budget)
    w2 = gaussian_w2_sq(p.mean, p.cov, q.mean, q.cov)
    a, c = gaussian_ot_map(p.mean, p.cov, q.mean, q.cov)
    g = generator(23, d, seed)
    xt, yt = p.sample(4000, g), q.sample(4000, g)
    with torch.no_grad():
        fwd = res.forward(xt.float()).double()
        back = res.backward(yt.float()).double()
    exact_back = torch.linalg.solve(a, (yt - c).T).T
    rms = math.sqrt(w2)  # the exact maps' RMS displacement
    fwd_err = float((fwd - (xt @ a.T + c)).pow(2).sum(1).mean().sqrt()) / rms
    back_err = float((back - exact_back).pow(2).sum(1).mean().sqrt()) / rms
    note = f"flow {res.w2_sq:.3f} vs Bures {w2:.3f}"
    tol = 0.05 if d <= 10 else 0.10
    return [
        Check("ot_fit", d, seed, "w2_sq", abs(res.w2_sq / w2 - 1), tol, note, sec),
        Check("ot_fit", d, seed, "forward_map_rmse", fwd_err, None),
        Check("ot_fit", d, seed, "backward_map_rmse", back_err, None),
    ]


def ratio_checks(case: str, d: int, seed: int, budget: str, res: TransportResult, xp: Tensor, xq: Tensor,
                 log_p: Any, log_q: Any, tp: Tensor, tq: Tensor) -> list[Check]:  # fmt: skip
    """Telescopic, classifier and KDE log ratios (defaults) on test points of P and Q: per side the
    telescopic MSE over the better baseline's (tolerance 1: it must beat both)."""
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    small = budget != "default"
    tel_opts = (
        TelescopicOptions(classifier=ClassifierOptions(time_freqs=4, batch_size=64, steps=300))
        if small
        else None
    )
    clf_opts = ClassifierOptions(steps=300) if small else None
    estimators = {
        "telescopic": fit_telescopic(res.flow, xp, xq, tel_opts, generator=g),
        "classifier": fit_classifier(xp, xq, clf_opts, generator=g),
        "kde": fit_kde(xp, xq),
    }  # fmt: skip
    sec = time.perf_counter() - t0
    out = []
    for side, pts in (("P", tp), ("Q", tq)):
        truth = log_q(pts.double()) - log_p(pts.double())
        mse = {k: log_ratio_mse(e.log_ratio(pts.float()), truth) for k, e in estimators.items()}
        best = min(mse["classifier"], mse["kde"])
        note = ", ".join(f"{k} {v:.4g}" for k, v in mse.items())
        out.append(
            Check(
                case,
                d,
                seed,
                f"mse_on_{side}_tel_over_best",
                mse["telescopic"] / best,
                1.0,
                note,
                sec,
            )
        )
    return out


def case_ratio(d: int, seed: int, budget: str = "test") -> list[Check]:
    """Log ratios ``log q/p`` between :func:`closed_form_cases.ot_pair`'s Gaussians, exact
    ``log N(x; m_q, S_q) - log N(x; m_p, S_p)``, on the transport flow of :func:`case_ot_fit`."""
    p, q, xp, xq, res, _ = transport_fit(d, seed, budget)
    g = generator(24, d, seed)
    return ratio_checks(
        "ratio",
        d,
        seed,
        budget,
        res,
        xp,
        xq,
        p.log_prob,
        q.log_prob,
        p.sample(4000, g),
        q.sample(4000, g),
    )


def case_ratio_mixture(d: int, seed: int, budget: str = "test") -> list[Check]:
    """Two well-separated 2-D Gaussian mixtures of unequal spreads (``mixture_pair`` of
    ``bench_transport_ratio.py``, like the tutorial's Fig. 10; ``d`` is ignored): the telescopic
    log ratio against the baselines, with the exact mixture log densities."""
    from bench_transport_ratio import mixture_pair

    p, q = mixture_pair(2, seed)
    g = generator(25, 2, seed)
    n = N_TRANSPORT if budget == "default" else 4000
    xp, xq = p.sample(n, g).float(), q.sample(n, g).float()
    res = fit_transport(xp, xq, TransportOptions() if budget == "default" else TEST_TRANSPORT,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return ratio_checks("ratio_mixture", 2, seed, budget, res, xp, xq, p.log_prob, q.log_prob,
                        p.sample(4000, g), q.sample(4000, g))  # fmt: skip


def case_worst_case_fit(d: int, seed: int, budget: str = "test") -> list[Check]:
    """The flow worst-case map (:func:`iterflow.apps.dro.fit_worst_case`, default options, gamma 1)
    for the quadratic and linear risks of :func:`closed_form_cases.worst_case_problem` against their
    ``optimal_map`` on new points: error relative to the exact displacement (5%)."""
    p, quad, lin = worst_case_problem(d, seed)
    g = generator(26, d, seed)
    x, xt = p.sample(2000, g), p.sample(2000, g)
    small = dict(hidden=(32, 32), ode_steps=2, steps=300, batch_size=128, lr=1e-2, dtype="float64")
    config = DROConfig(gamma=1.0, seed=seed, **({} if budget == "default" else small))
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    out = []
    for name, risk in (("quadratic", quad), ("linear", lin)):
        t0 = time.perf_counter()
        res = fit_worst_case(x.to(dtype), risk, config=config)
        with torch.no_grad():
            y = res.map(xt.to(dtype))
        err = map_error(y, risk.optimal_map(xt, 1.0), xt)
        out.append(
            Check("worst_case_fit", d, seed, f"{name}_map", err, 0.05, "", time.perf_counter() - t0)
        )
    return out


TRAINING_CASES = {
    "jko_block": case_jko_block,
    "local_fm_block": case_local_fm_block,
    "ot_fit": case_ot_fit,
    "ratio": case_ratio,
    "ratio_mixture": case_ratio_mixture,
    "worst_case_fit": case_worst_case_fit,
}
