"""JKO-flow: each block is one Wasserstein-2 proximal (JKO) step of ``KL(. || N(0, I))``
(Xu, Cheng, Xie, "Normalizing flow neural networks by JKO scheme", NeurIPS 2023, arXiv 2212.14424).

Block ``n`` is trained on the particles ``x ~ p_{n-1}`` that blocks ``1..n-1`` pushed, by minimising

.. math::
    \\mathbb E\\Big[\\tfrac12 |x(1)|^2 - \\int_0^1 \\operatorname{div} v(x(s), s)\\, ds\\Big]
    + \\frac{1}{2\\gamma_n} \\mathbb E\\, |x(1) - x(0)|^2,

the first term being ``KL(p_n || N(0, I))`` up to a constant of ``p_{n-1}`` (instantaneous change of
variables) and the second the squared W2 distance of the step for the coupling the map defines. The ODE
is integrated by a fixed-step solver (RK4 by default) over ``substeps`` sub-steps. Then ``p_n`` is the
push-forward of ``p_{n-1}`` by the block. The step sizes follow a constant, geometric
(``gamma_n = gamma * growth^(n-1)``) or adaptive schedule (``gamma`` grown from the blocks' measured
W2 movement; :mod:`iterflow.methods.jko_schedule`), optionally capped, and the chain stops early
once a block moves the particles less than ``stop_tol`` (``E|x_n - x_{n-1}|^2``) or, with
``val_stop``, at the first block that makes the validation particles' ``kl_proxy`` worse (that
block is dropped).

Per block the run's history records ``gamma``, ``logdet`` (mean log-determinant of the block),
``kl_proxy`` (``E[|x_n|^2/2 - L_n]``, the KL to ``N(0, I)`` up to a constant of the data; see
:func:`iterflow.methods.cnf.kl_proxy_report`), ``solver_gap`` (``E|F_train(x) - F_push(x)|^2``, the
training solver's end points against the push solver's), ``w2_movement`` and ``w2_movement_se``
(``sqrt(E|x_n - x_{n-1}|^2)``, an upper bound of ``W2(p_{n-1}, p_n)``, and its standard error) and,
in low dimension, ``kl_to_normal`` and ``kl_to_normal_se`` (the k-NN estimate
:func:`iterflow.metrics.kl_to_standard_normal` of the pushed particles and its batch-means standard
error, :func:`iterflow.methods.jko_schedule.knn_kl_with_error`), all on the validation particles.
Where the data's density is known, :func:`iterflow.methods.jko_schedule.prefix_kl` gives the
unbiased per-block KL of held-out points (``benchmarks/bench_jko_convergence.py``).

A fixed-step training solver can be exploited: a field that varies too fast for ``substeps`` RK4
steps makes the integrated divergence disagree with the log-determinant of the map the steps
actually compute, and the objective can then fall without bound while the true flow degrades (a
large ``solver_gap``, a rising ``kl_proxy``). Time features faster than the steps suffice: with the
MLP's Fourier features ``sin(2 pi k s)`` (``k <= time_freqs = 4``) and 3 RK4 sub-steps, one block on
3-D Gaussian data missed the closed-form mean by 10 times its norm and the covariance by 20 times
(issue 18; the case ``jko_block`` of ``benchmarks/bench_closed_form.py``). The recommended recipe
therefore feeds the network the plain time (``time_freqs = 0``); more ``substeps`` also help (8
sub-steps with the Fourier features: 0.2% and 1.1% off the closed-form mean and covariance, at 2.7
times the cost), and so does the ``straightness`` option (weight 1 with the Fourier features: 1.2%
and 1.1%), which leaves the optimum where it is. Fields stiff in space remain: without any
regulariser the later blocks of the 2-D checkerboard chain exploited the sub-steps (test NLL 20
instead of 3.6). The ``jacobian`` weight (RNODE's ``int |eps^T dv/dx|^2 ds``, Finlay et al., arXiv
2002.02798) keeps fields smooth, but it also moves the optimum, in proportion to the weight: 0.2 put
a 3-D block's covariance 7-8% off the closed form. The recipe's 0.02 keeps the chains stable, and a
single block lands within 1% of the closed-form mean and 2.5% of its covariance from 1 to 10
dimensions (the ``jko_block`` rows of ``benchmarks/results/closed_form.md`` and
``closed_form_jko.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.core.distributed import local_rows
from iterflow.core.flow import Flow
from iterflow.core.integrand import DIVERGENCES, PROBE_KINDS, draw_probes, integrate_path
from iterflow.core.ode import FIXED_SOLVERS, SolverSpec
from iterflow.errors import check_choice, check_positive, fail
from iterflow.methods.base import Loss, Method, MethodOptions
from iterflow.methods.cnf import check_solver_option, likelihood_stage_report
from iterflow.methods.jko_schedule import (
    GAMMA_SCHEDULES,
    gamma_sequence,
    history_movements,
    knn_kl_with_error,
    w2_movement,
)

KNN_MAX_DIM = 5  # the k-NN KL estimate is reported up to this dimension
#: How the Jacobian weight changes from block to block (:class:`JKOOptions`).
JACOBIAN_SCHEDULES = ("constant", "gamma")


@dataclass(frozen=True)
class JKOOptions(MethodOptions):
    """Options of JKO-flow.

    Attributes:
        gamma: step size ``gamma_1`` of the first block.
        gamma_schedule: ``constant``, ``geometric`` (``gamma_n = gamma * gamma_growth^(n-1)``) or
            ``adaptive`` (``gamma_{n+1} = gamma_n * clip(m_1 / m_n, 1, gamma_growth)`` with ``m_n``
            the W2 movement of block ``n``: every block asked for the first block's movement, after
            JKO-iFlow's time reparametrisation; :mod:`iterflow.methods.jko_schedule`).
        gamma_growth: growth factor of the geometric schedule; largest factor between consecutive
            blocks of the adaptive one.
        gamma_max: cap of ``gamma_n`` (0: none).
        solver: fixed-step training solver of each block (``rk4`` in the paper).
        substeps: steps of the training solver over one block.
        divergence: ``auto`` (exact trace up to 16 dimensions,
            :func:`iterflow.core.integrand.resolve_divergence`), ``exact`` or ``hutchinson``.
        probes, probe_kind: Hutchinson probes per sample and their law.
        kinetic: weight of ``int |v|^2 ds`` added to the objective (0: off). It also penalises the
            block's movement, so it moves the optimum (as a smaller ``gamma`` would).
        straightness: weight ``lambda`` of the path regulariser
            ``lambda / (2 gamma) * E[int |v|^2 ds - |x(1) - x(0)|^2]`` (0: off; 1: the W2 term becomes
            the kinetic energy, the Benamou-Brenier form). It is >= 0 (Cauchy-Schwarz, also for the
            solver's quadrature) and 0 exactly for straight paths at constant speed; the JKO step is
            reached by such paths, so it straightens the block without moving the optimum (for a
            network that can represent them: a time-constant field cannot), and it keeps the field
            from oscillating in time between the solver's steps; it does not stop fields stiff in
            space (module docstring).
        jacobian: weight of ``int |eps^T dv/dx|^2 ds`` (0: off); keeps each block's field smooth
            enough for ``substeps`` steps of the training solver (see the module docstring).
        jacobian_schedule: ``constant``, or ``gamma``: block ``n`` uses ``jacobian * gamma_1 /
            gamma_n``, i.e. the Jacobian term joins the proximal term ``W2 / (2 gamma_n)`` and
            loosens with it as a growing ``gamma`` schedule takes longer steps. Tried on the
            rose (issue 15, with ``gamma_schedule=adaptive``, a run stopped early): the chain
            stalled earlier than with the constant weight, so the recipes keep ``constant``.
        stop_tol: stop adding blocks once a block's movement ``E|x_n - x_{n-1}|^2`` is below this
            (0: train every block).
        val_stop: end the chain at the first block that raises the ``kl_proxy`` of the validation
            particles (the partial chain's validation NLL, up to a constant) by more than
            ``val_stop_z`` standard errors of the change (``kl_proxy_change`` and its ``_se``,
            paired over the particles), and drop that block: the run keeps the chain that was
            best on held-out data (the first block is always kept). Catches what the movement
            rule cannot: later blocks that fit the fixed training particles (a chain with
            Fourier features of x on the tree got worse block after block from the fourth on,
            issue 15).
        val_stop_z: the standard errors a rise must exceed to end the chain (0: any rise).
        push_solver, push_steps: solver carrying the particles to the next block (and of the report).
    """

    gamma: float = 0.5
    gamma_schedule: str = "constant"
    gamma_growth: float = 2.0
    gamma_max: float = 0.0
    solver: str = "rk4"
    substeps: int = 3
    divergence: str = "auto"
    probes: int = 1
    probe_kind: str = "rademacher"
    kinetic: float = 0.0
    straightness: float = 0.0
    jacobian: float = 0.0
    jacobian_schedule: str = "constant"
    stop_tol: float = 0.0
    val_stop: bool = False
    val_stop_z: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self.gamma, "option 'gamma'")
        check_choice(self.gamma_schedule, GAMMA_SCHEDULES, "option 'gamma_schedule'")
        check_positive(self.gamma_growth, "option 'gamma_growth'")
        check_positive(self.gamma_max, "option 'gamma_max'", allow_zero=True)
        if self.solver not in FIXED_SOLVERS:
            fail(
                "option 'solver'",
                f"must be a fixed-step solver, one of {FIXED_SOLVERS.names()}",
                self.solver,
            )
        check_positive(self.substeps, "option 'substeps'", integer=True)
        check_solver_option(self.push_solver, self.push_steps, 1.0, 1.0, prefix="push_")
        check_choice(self.divergence, DIVERGENCES, "option 'divergence'")
        check_positive(self.probes, "option 'probes'", integer=True)
        check_choice(self.probe_kind, PROBE_KINDS, "option 'probe_kind'")
        check_positive(self.kinetic, "option 'kinetic'", allow_zero=True)
        check_positive(self.straightness, "option 'straightness'", allow_zero=True)
        check_positive(self.jacobian, "option 'jacobian'", allow_zero=True)
        check_choice(self.jacobian_schedule, JACOBIAN_SCHEDULES, "option 'jacobian_schedule'")
        check_positive(self.stop_tol, "option 'stop_tol'", allow_zero=True)
        check_positive(self.val_stop_z, "option 'val_stop_z'", allow_zero=True)

    def gamma_at(self, index: int, movements: tuple[float, ...] = ()) -> float:
        """``gamma_n`` of the block with 0-based ``index``; the ``adaptive`` schedule reads the W2
        movements of the blocks before it (:func:`~iterflow.methods.jko_schedule.gamma_sequence`)."""
        seq = gamma_sequence(
            self.gamma, self.gamma_schedule, self.gamma_growth, self.gamma_max, movements, index + 1
        )
        return seq[index]

    def train_spec(self) -> SolverSpec:
        return SolverSpec(self.solver, self.substeps)

    def jacobian_at(self, gamma_n: float) -> float:
        """The Jacobian weight of a block with step size ``gamma_n``."""
        if self.jacobian_schedule == "gamma":
            return self.jacobian * self.gamma / gamma_n
        return self.jacobian


def jko_loss(
    block_stage: Flow,
    x: Tensor,
    gamma: float,
    spec: SolverSpec,
    probes: Tensor | None,
    *,
    kinetic: float = 0.0,
    jacobian: float = 0.0,
    straightness: float = 0.0,
) -> Loss:
    """JKO objective of one block on a minibatch of ``p_{n-1}`` particles (model units).

    Arguments:
        block_stage: a flow holding the single block being trained.
        x: ``(B, *E)`` particles.
        gamma: the step size ``gamma_n``.
        spec: fixed-step solver over the block.
        probes: Hutchinson probes ``(K, B, *E)`` or ``None`` (exact trace).
        kinetic, jacobian: weights of the optional regularisers ``E int |v|^2 ds`` and
            ``E int |eps^T dv/dx|^2 ds``.
        straightness: weight of ``E[int |v|^2 ds - |x(1) - x(0)|^2] / (2 gamma)`` (see
            :class:`JKOOptions`).

    Returns:
        :class:`Loss` ``E[|x(1)|^2/2 - int div v] + E|x(1) - x(0)|^2 / (2 gamma)`` (plus the weighted
        regularisers) with terms ``kl`` (the first expectation), ``w2`` (``E|x(1) - x(0)|^2``),
        ``kinetic``, ``jacobian`` and ``straightness`` (``E int |v|^2 ds - E|x(1) - x(0)|^2``).
    """
    n = x.shape[0]
    rows = local_rows(n)  # data-parallel: this rank's rows of the global batch (all rows otherwise)
    x, probes = x[rows], None if probes is None else probes[:, rows]
    r = integrate_path(block_stage.blocks[0], x, spec, probes=probes, create_graph=True)  # type: ignore[arg-type]
    b = x.shape[0]
    kl_rows = 0.5 * r.z.pow(2).reshape(b, -1).sum(1) - r.div
    w2_rows = (r.z - x).pow(2).reshape(b, -1).sum(1)
    excess_rows = r.kinetic - w2_rows  # >= 0: Cauchy-Schwarz on the solver's stage velocities
    total = kl_rows + (w2_rows + straightness * excess_rows) / (2 * gamma)
    if kinetic > 0:
        total = total + kinetic * r.kinetic
    if jacobian > 0:
        total = total + jacobian * r.jacobian
    terms = {
        "kl": kl_rows.detach(),
        "w2": w2_rows.detach(),
        "kinetic": r.kinetic.detach(),
        "jacobian": r.jacobian.detach(),
        "straightness": excess_rows.detach(),
    }
    return Loss(total, n, terms)


class JKOFlow(Method):
    """JKO-flow (arXiv 2212.14424): block n is a W2-proximal step of KL to N(0, I), trained progressively."""

    name = "jko"
    Options = JKOOptions
    progressive = True
    # the rose recipe of benchmarks/bench_likelihood.py: test NLL 2.936 +- 0.014 nats, checkerboard
    # 3.618 +- 0.008 (2.893 and 3.606 with the former Fourier time features and Jacobian weight 0.2,
    # which put a single block's covariance 7% off the closed-form JKO step). The plain time input and
    # a small Jacobian weight keep 3 RK4 sub-steps honest (module docstring).
    recommended = {
        "blocks": 5,
        "steps": 400,
        "batch_size": 512,
        "lr": 5e-3,
        "hidden": (128, 128, 128),
        "activation": "gelu",
        "time_freqs": 0,
        "n_train": 20_000,
        "options": {"gamma": 1.0, "substeps": 3, "jacobian": 0.02},
    }

    def __init__(
        self, options: MethodOptions, *, event_shape: tuple[int, ...], num_blocks: int
    ) -> None:
        super().__init__(options, event_shape=event_shape, num_blocks=num_blocks)
        self._logdet_before = (
            0.0  # E[L_{n-1}] on the validation particles, re-read from the history
        )
        self._movements: tuple[float, ...] = ()  # W2 movements of the finished blocks (history)

    def gamma(self, index: int) -> float:
        """``gamma_n`` of the block with 0-based ``index`` in this run (its finished blocks' W2
        movements feed the adaptive schedule)."""
        o: JKOOptions = self.options  # type: ignore[assignment]
        return o.gamma_at(index, self._movements[:index])

    def loss(
        self, stage: Flow, batch: tuple[Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        o: JKOOptions = self.options  # type: ignore[assignment]
        x = batch[0]
        probes = draw_probes(x, o.divergence, o.probes, o.probe_kind, generator)
        gamma_n = self.gamma(index)
        return jko_loss(
            stage,
            x,
            gamma_n,
            o.train_spec(),
            probes,
            kinetic=o.kinetic,
            jacobian=o.jacobian_at(gamma_n),
            straightness=o.straightness,
        )

    def stage_report(
        self, stage: Flow, before: Tensor, after: Tensor, index: int
    ) -> dict[str, float]:
        o: JKOOptions = self.options  # type: ignore[assignment]
        rep = likelihood_stage_report(o, stage, before, after, index, self._logdet_before)
        self._logdet_before += rep["logdet"]
        gamma_n = self.gamma(index)
        out = {"gamma": gamma_n, "jacobian_weight": o.jacobian_at(gamma_n), **rep}
        out.update(w2_movement(before, after))
        if after[0].numel() <= KNN_MAX_DIM and after.shape[0] > 10:
            out["kl_to_normal"], out["kl_to_normal_se"] = knn_kl_with_error(after.flatten(1))
        return out

    def should_stop(self, history: list[dict[str, Any]]) -> bool:
        """Stop once the last block moved less than ``stop_tol``.

        The trainer calls this before every stage after the first (also after a resume), so it is
        also where the accumulated log-determinant and the W2 movements of the finished blocks (the
        adaptive schedule's input) are re-read.
        """
        self._logdet_before = sum(float(r.get("logdet", 0.0)) for r in history)
        self._movements = tuple(history_movements(history))
        o: JKOOptions = self.options  # type: ignore[assignment]
        return o.stop_tol > 0 and float(history[-1]["movement"]) < o.stop_tol

    def reject_stage(self, record: dict[str, Any]) -> bool:
        """With ``val_stop``: whether the block raised the validation ``kl_proxy`` by more than
        ``val_stop_z`` standard errors of the change (see :class:`JKOOptions`)."""
        o: JKOOptions = self.options  # type: ignore[assignment]
        if not o.val_stop or "kl_proxy_change" not in record or int(record["stage"]) == 0:
            return False  # the first block is always kept: a chain has at least one
        change, se = float(record["kl_proxy_change"]), float(record["kl_proxy_change_se"])
        if not math.isfinite(change):
            return True  # a block whose figures are not finite is never kept
        return change > o.val_stop_z * (se if math.isfinite(se) else 0.0)
