"""Continuous normalizing flows trained by maximum likelihood (FFJORD, Grathwohl et al., arXiv
1810.01367), with the kinetic-energy and Jacobian-Frobenius regularisers of RNODE (Finlay et al.,
arXiv 2002.02798).

Each block integrates the augmented state ``(x, a, k, j)`` over its time ``s: 0 -> 1``:

.. math::
    \\dot x = v(x, s), \\quad \\dot a = \\operatorname{div} v(x, s), \\quad
    \\dot k = |v(x, s)|^2, \\quad \\dot j = |\\varepsilon^\\top \\partial_x v(x, s)|^2,

so that ``a(1)`` is the log-determinant of the block's map, ``k(1)`` its kinetic energy and ``j(1)``
the integrated squared Jacobian norm (an unbiased estimate of ``int ||d v/d x||_F^2 ds``; exact when
the trace is exact, because then every row of the Jacobian is computed). Over a chain of blocks,
``log p(x) = log N(z; 0, I) + sum_n a_n(1)`` (model units). The loss of a minibatch is

.. math::
    \\mathcal L = \\mathbb E[-\\log p(x)] + \\lambda_K\\, \\mathbb E[k(1)] + \\lambda_J\\, \\mathbb E[j(1)].

The augmented integrand is the one of the ODE layer (:func:`iterflow.core.integrand.integrate_chain`,
with its ``auto`` divergence rule); :func:`kl_proxy_report` is shared with JKO-flow
(:mod:`iterflow.methods.jko`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.core.distributed import local_rows
from iterflow.core.flow import Flow, standard_normal_log_prob
from iterflow.core.integrand import (
    DIVERGENCES,
    PROBE_KINDS,
    draw_probes,
    integrate_chain,
)
from iterflow.core.ode import SolverSpec
from iterflow.errors import check_choice, check_positive, fail
from iterflow.methods.base import Loss, Method, MethodOptions


@torch.no_grad()
def kl_proxy_report(
    stage: Flow,
    before: Tensor,
    spec: SolverSpec,
    *,
    divergence: str,
    probes: int,
    probe_kind: str,
    logdet_before: float,
    seed: int,
    chunk: int = 4096,
) -> dict[str, float]:
    """Per-stage figures of the KL-to-``N(0, I)`` proxy on validation particles.

    With ``L_n(x_0)`` the log-determinant accumulated by blocks ``1..n`` and ``x_n`` the pushed
    particles, ``KL(p_n || N(0, I)) = E[|x_n|^2 / 2 - L_n] + (d/2) log(2 pi) - H(p_0)``. The proxy
    ``E[|x_n|^2 / 2 - L_n]`` therefore differs from the KL by a constant of the data alone: its
    decrease from block to block is the exact decrease of the KL (up to the solver and Monte Carlo).

    Arguments:
        stage: the trained stage (model units).
        before: ``(B, *E)`` validation particles entering the stage.
        spec: solver for the log-determinant (the push solver).
        divergence, probes, probe_kind: trace estimator (probes seeded by ``seed``).
        logdet_before: ``E[L_{n-1}]`` accumulated by the earlier stages.
        seed: seed of the probes.
        chunk: particles per integration call.

    Returns:
        ``{"logdet": E[log-det of the stage], "kl_proxy": E[|x_n|^2/2] - (logdet_before + logdet),
        "kl_proxy_change", "kl_proxy_change_se"}``: the last two are the mean and standard error
        of the per-particle change ``|x_n|^2/2 - |x_{n-1}|^2/2 - log det`` the stage made to the
        proxy (``kl_proxy`` minus the previous stage's, or minus ``E|x_0|^2/2`` for the first):
        paired on the same particles, so its error is that of the change, not of the proxy
        (what a stopping rule on held-out particles needs, :class:`~iterflow.methods.jko.JKO`).
    """
    gen = torch.Generator(device=before.device).manual_seed(seed)
    divs, energies = [], []
    energies_before = 0.5 * before.pow(2).reshape(before.shape[0], -1).sum(1)
    for part in before.split(chunk):
        eps = draw_probes(part, divergence, probes, probe_kind, gen)
        r = integrate_chain(
            list(stage.blocks),
            part,
            spec,
            probes=eps,
            create_graph=False,
            kinetic=False,
            jacobian=False,
        )
        divs.append(r.div)
        energies.append(0.5 * r.z.pow(2).reshape(r.z.shape[0], -1).sum(1))
    div, energy = torch.cat(divs), torch.cat(energies)
    change = (energy - energies_before.to(energy.dtype) - div).double()
    n = change.shape[0]
    change_se = float(change.std() / math.sqrt(n)) if n > 1 else float("nan")
    logdet = float(div.sum() / n)
    return {
        "logdet": logdet,
        "kl_proxy": float(energy.mean()) - (logdet_before + logdet),
        "kl_proxy_change": float(change.mean()),
        "kl_proxy_change_se": change_se,
    }


@torch.no_grad()
def solver_gap(stage: Flow, before: Tensor, after: Tensor, spec: SolverSpec) -> float:
    """``E|F_train(x) - F_push(x)|^2``: end points of the training solver ``spec`` against ``after``
    (the same particles carried by the accurate push solver). A large gap flags a field too stiff for
    the training solver, whose loss may then have exploited the discretisation."""
    coarse = stage.encode(before, solver=spec)
    return float((coarse - after).pow(2).reshape(after.shape[0], -1).sum(1).mean())


def check_solver_option(
    solver: str, steps: int, atol: float, rtol: float, prefix: str = ""
) -> None:
    """Validate a method's solver options, naming them as ``option '<prefix>solver'`` etc."""
    try:
        SolverSpec(solver, steps, atol, rtol)
    except ValueError as e:
        arg = getattr(e, "argument", "solver")
        fail(f"option '{prefix}{arg}'", getattr(e, "rule", str(e)), getattr(e, "value", solver))


@dataclass(frozen=True)
class CNFOptions(MethodOptions):
    """Options of maximum-likelihood CNF training.

    Attributes:
        solver: training solver (``rk4``, ``euler``, ... fixed steps; ``dopri5``, ``bosh3``, ...
            adaptive, differentiated through its steps).
        steps: fixed steps per block of the training solver.
        atol, rtol: tolerances of an adaptive training solver.
        divergence: ``auto`` (exact trace up to 16 dimensions,
            :func:`iterflow.core.integrand.resolve_divergence`), ``exact`` or ``hutchinson``.
        probes: Hutchinson probes per sample; probe_kind: ``rademacher`` or ``gaussian``.
        kinetic: weight of ``int |v|^2 ds`` (0: off).
        jacobian: weight of ``int |eps^T dv/dx|^2 ds`` (0: off).
        push_solver, push_steps: solver of the validation push and of the per-stage report.
    """

    solver: str = "rk4"
    steps: int = 8
    atol: float = 1e-5
    rtol: float = 1e-5
    divergence: str = "auto"
    probes: int = 1
    probe_kind: str = "rademacher"
    kinetic: float = 0.0
    jacobian: float = 0.0

    def __post_init__(self) -> None:
        check_solver_option(self.solver, self.steps, self.atol, self.rtol)
        check_solver_option(self.push_solver, self.push_steps, 1.0, 1.0, prefix="push_")
        check_choice(self.divergence, DIVERGENCES, "option 'divergence'")
        check_positive(self.probes, "option 'probes'", integer=True)
        check_choice(self.probe_kind, PROBE_KINDS, "option 'probe_kind'")
        check_positive(self.kinetic, "option 'kinetic'", allow_zero=True)
        check_positive(self.jacobian, "option 'jacobian'", allow_zero=True)

    def train_spec(self) -> SolverSpec:
        return SolverSpec(self.solver, self.steps, self.atol, self.rtol)


def likelihood_loss(
    stage: Flow,
    x: Tensor,
    spec: SolverSpec,
    probes: Tensor | None,
    *,
    kinetic: float,
    jacobian: float,
) -> Loss:
    """Regularised NLL of a minibatch through every block of ``stage`` (model units).

    Arguments:
        stage: blocks trained together (identity normalisation).
        x: ``(B, *E)`` minibatch.
        spec: training solver.
        probes: Hutchinson probes ``(K, B, *E)`` shared by all blocks, or ``None`` (exact trace).
        kinetic, jacobian: regulariser weights.

    Returns:
        :class:`Loss` with terms ``nll`` (``-mean log p``), ``kinetic`` and ``jacobian`` (summed
        over blocks, before weighting).

    Under data-parallel training each rank integrates only its rows of the global batch
    (:func:`iterflow.core.distributed.local_rows`); the loop reduces the per-row values.
    """
    n = x.shape[0]
    rows = local_rows(n)
    x, probes = x[rows], None if probes is None else probes[:, rows]
    r = integrate_chain(list(stage.blocks), x, spec, probes=probes, create_graph=True)
    kin, jac = r.kinetic, r.jacobian
    nll_rows = -(standard_normal_log_prob(r.z) + r.div)
    total = nll_rows
    if kinetic:
        total = total + kinetic * kin
    if jacobian:
        total = total + jacobian * jac
    terms = {"nll": nll_rows.detach(), "kinetic": kin.detach(), "jacobian": jac.detach()}
    return Loss(total, n, terms)


def likelihood_stage_report(
    options: Any,
    stage: Flow,
    before: Tensor,
    after: Tensor,
    index: int,
    logdet_before: float = 0.0,
) -> dict[str, float]:
    """Per-stage figures of a likelihood-trained stage (CNF, JKO-flow) on the validation particles:
    :func:`kl_proxy_report` with the push solver, and :func:`solver_gap` of the training solver.

    ``options`` carries ``push_spec()``, ``train_spec()``, ``divergence``, ``probes`` and
    ``probe_kind`` (:class:`CNFOptions`, :class:`~iterflow.methods.jko.JKOOptions`).
    """
    rep = kl_proxy_report(
        stage,
        before,
        options.push_spec(),
        divergence=options.divergence,
        probes=options.probes,
        probe_kind=options.probe_kind,
        logdet_before=logdet_before,
        seed=index,
    )
    return {**rep, "solver_gap": solver_gap(stage, before, after, options.train_spec())}


class CNF(Method):
    """Continuous normalizing flow by maximum likelihood (FFJORD, arXiv 1810.01367); N blocks jointly."""

    name = "cnf"
    Options = CNFOptions
    progressive = False
    # the end-to-end baseline of benchmarks/bench_likelihood.py on 2-D data (about two minutes on
    # 2 CPU cores): one block of width 64, RK4 over 8 steps, the same Jacobian weight as JKO-flow
    recommended = {
        "steps": 1500,
        "batch_size": 512,
        "lr": 5e-3,
        "hidden": (64, 64, 64),
        "activation": "gelu",
        "n_train": 20_000,
        "options": {"steps": 8, "jacobian": 0.2},
    }

    def loss(
        self, stage: Flow, batch: tuple[Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        o: CNFOptions = self.options  # type: ignore[assignment]
        x = batch[0]
        probes = draw_probes(x, o.divergence, o.probes, o.probe_kind, generator)
        return likelihood_loss(
            stage, x, o.train_spec(), probes, kinetic=o.kinetic, jacobian=o.jacobian
        )

    def stage_report(
        self, stage: Flow, before: Tensor, after: Tensor, index: int
    ) -> dict[str, float]:
        return likelihood_stage_report(self.options, stage, before, after, index)
