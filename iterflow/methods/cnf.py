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

The helpers :func:`integrate_path` and :func:`kl_proxy_report` are shared with JKO-flow
(:mod:`iterflow.methods.jko`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.core.distributed import local_rows, shard_mean
from iterflow.core.flow import EXACT_DIVERGENCE_MAX_DIM, Block, Flow, standard_normal_log_prob
from iterflow.core.ode import SolverSpec, integrate, make_probes
from iterflow.errors import check_choice, check_positive, fail
from iterflow.methods.base import Loss, Method, MethodOptions

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBE_KINDS = ("rademacher", "gaussian")

AugmentedState = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class PathIntegrals:
    """End point and path integrals of one block, per sample.

    Attributes:
        z: ``(B, *E)`` end point ``x(1)``.
        div: ``(B,)`` ``int_0^1 div v(x(s), s) ds`` (the block's log-determinant).
        kinetic: ``(B,)`` ``int_0^1 |v(x(s), s)|^2 ds``.
        jacobian: ``(B,)`` ``int_0^1 |eps^T dv/dx|^2 ds`` (``||dv/dx||_F^2`` with the exact trace).
    """

    z: Tensor
    div: Tensor
    kinetic: Tensor
    jacobian: Tensor


def resolve_divergence(kind: str, dim: int) -> str:
    """``"auto"`` -> ``"exact"`` up to 16 dimensions, else ``"hutchinson"``; others unchanged."""
    check_choice(kind, DIVERGENCES, "option 'divergence'")
    if kind == "auto":
        return "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    return kind


def _jacobian_terms(
    v: Tensor, x: Tensor, probes: Tensor | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """Divergence and squared Jacobian norm at one time, each ``(B,)``.

    Exact (``probes is None``): row ``i`` of ``J = dv/dx`` is one vector-Jacobian product, so
    ``tr J = sum_i J_ii`` and ``||J||_F^2 = sum_i |J_i|^2`` (``d`` backward passes). Hutchinson:
    ``eps^T J eps`` and ``|eps^T J|^2`` averaged over the ``K`` probes (``K`` backward passes).
    """
    b = v.shape[0]
    vf = v.reshape(b, -1)
    div = v.new_zeros(b)
    frob = v.new_zeros(b)
    if probes is None:
        for i in range(vf.shape[1]):
            row = torch.autograd.grad(
                vf[:, i].sum(), x, create_graph=create_graph, retain_graph=True
            )[0]
            row = row.reshape(b, -1)  # (B, d): dv_i/dx
            div = div + row[:, i]
            frob = frob + row.pow(2).sum(1)
        return div, frob
    for eps in probes:
        g = torch.autograd.grad(v, x, eps, create_graph=create_graph, retain_graph=True)[
            0
        ]  # eps^T J
        div = div + (g * eps).reshape(b, -1).sum(1)
        frob = frob + g.pow(2).reshape(b, -1).sum(1)
    k = probes.shape[0]
    return div / k, frob / k


def augmented_field(
    block: Block, probes: Tensor | None, create_graph: bool
) -> Callable[[Tensor, AugmentedState], AugmentedState]:
    """The vector field of the augmented state ``(x, a, k, j)`` (see the module docstring).

    Arguments:
        block: the block whose velocity is integrated.
        probes: ``(K, B, *E)`` Hutchinson probes held fixed along the path, or ``None`` (exact).
        create_graph: keep the graph so that the integrals can be differentiated (training).
    """

    def field(t: Tensor, state: AugmentedState) -> AugmentedState:
        x = state[0]
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = block(x, t)
            div, frob = _jacobian_terms(v, x, probes, create_graph)
            kin = v.pow(2).reshape(v.shape[0], -1).sum(1)
        if not create_graph:
            v, div, kin, frob = v.detach(), div.detach(), kin.detach(), frob.detach()
        return v, div, kin, frob

    return field


def integrate_path(
    block: Block,
    x: Tensor,
    spec: SolverSpec,
    *,
    probes: Tensor | None = None,
    create_graph: bool = True,
) -> PathIntegrals:
    """Integrate one block over ``s: 0 -> 1`` with its divergence, kinetic and Jacobian integrals.

    Arguments:
        block: the block.
        x: ``(B, *E)`` start points (model units).
        spec: solver (fixed-step or adaptive; adaptive solvers are differentiated through their steps).
        probes: ``(K, B, *E)`` Hutchinson probes, or ``None`` for the exact trace.
        create_graph: differentiable results (training) or detached ones (evaluation).

    Returns:
        :class:`PathIntegrals` of the block.

    Example:
        >>> from iterflow.nn import MLPVelocity
        >>> blk = Block(MLPVelocity(2, hidden=(8,)))
        >>> r = integrate_path(blk, torch.zeros(3, 2), SolverSpec("rk4", 2), create_graph=False)
        >>> r.z.shape, r.div.shape
        (torch.Size([3, 2]), torch.Size([3]))
    """
    zero = x.new_zeros(x.shape[0])
    state0: AugmentedState = (x, zero, zero, zero)
    z, div, kin, jac = integrate(
        augmented_field(block, probes, create_graph), state0, 0.0, 1.0, spec
    )  # type: ignore[misc]
    return PathIntegrals(z, div, kin, jac)


def draw_probes(
    x: Tensor, divergence: str, probes: int, probe_kind: str, generator: torch.Generator | None
) -> Tensor | None:
    """Hutchinson probes ``(K, B, *E)`` for ``x``, or ``None`` when the trace is exact."""
    dim = x[0].numel()
    if resolve_divergence(divergence, dim) == "exact":
        return None
    return make_probes(
        tuple(x.shape), probes, kind=probe_kind, generator=generator, dtype=x.dtype, device=x.device
    )


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
        ``{"logdet": E[log-det of the stage], "kl_proxy": E[|x_n|^2/2] - (logdet_before + logdet)}``.
    """
    gen = torch.Generator(device=before.device).manual_seed(seed)
    divs, energies = [], []
    for part in before.split(chunk):
        eps = draw_probes(part, divergence, probes, probe_kind, gen)
        for b in stage.blocks:
            r = integrate_path(b, part, spec, probes=eps, create_graph=False)
            part = r.z
            divs.append(r.div)
        energies.append(0.5 * part.pow(2).reshape(part.shape[0], -1).sum(1))
    logdet = float(torch.cat(divs).sum() / before.shape[0])
    energy = float(torch.cat(energies).mean())
    return {"logdet": logdet, "kl_proxy": energy - (logdet_before + logdet)}


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
        divergence: ``auto`` (exact trace up to 16 dimensions), ``exact`` or ``hutchinson``.
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
    (:func:`iterflow.distributed.local_rows`) and returns its share of the mean
    (:func:`iterflow.distributed.shard_mean`), so DDP's gradient average is the one-process gradient.
    """
    n = x.shape[0]
    rows = local_rows(n)
    x, probes = x[rows], None if probes is None else probes[:, rows]
    logdet = x.new_zeros(x.shape[0])
    kin = x.new_zeros(x.shape[0])
    jac = x.new_zeros(x.shape[0])
    z = x
    for b in stage.blocks:
        r = integrate_path(b, z, spec, probes=probes, create_graph=True)
        z, logdet, kin, jac = r.z, logdet + r.div, kin + r.kinetic, jac + r.jacobian
    nll_rows = -(standard_normal_log_prob(z) + logdet)
    total = nll_rows
    if kinetic:
        total = total + kinetic * kin
    if jacobian:
        total = total + jacobian * jac
    value = shard_mean(total, n)
    terms = {"nll": shard_mean(nll_rows, n).detach(), "kinetic": shard_mean(kin, n).detach(),
             "jacobian": shard_mean(jac, n).detach()}  # fmt: skip
    return Loss(value, terms)


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
