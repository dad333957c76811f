r"""Flow-based optimal transport between two sample sets (Xu, Cheng & Xie, arXiv 2305.11857).

Given samples of ``P`` and ``Q``, learn an invertible flow ``dx/dt = v(x, t)``, ``t in [0, 1]``,
that carries ``P`` (``t = 0``) to ``Q`` (``t = 1``) with (near) minimal kinetic energy, the dynamic
(Benamou-Brenier) form of optimal transport,

.. math::
    W_2^2(P, Q) = \min_v \int_0^1 E \lVert v(x(t), t) \rVert^2 \, dt
    \quad \text{over flows with } x(0) \sim P,\ x(1) \sim Q .

**Objective** (:mod:`iterflow.methods.transport`). The end-point constraint is relaxed by two KL
terms (tutorial eq. 27),

.. math::
    \int_0^1 E \lVert v \rVert^2 dt + \gamma\, KL(P \,\|\, \hat P) + \gamma\, KL(Q \,\|\, \hat Q),
    \qquad \hat P = T^{-1}_\# Q,\ \hat Q = T_\# P,

with ``T`` the time-1 map. Since ``T`` is invertible, ``KL(P || T^{-1}_# Q) = KL(T_# P || Q)`` and
``KL(Q || T_# P) = KL(T^{-1}_# Q || P)``: the first is measured on source particles pushed forward,
the second on target particles pulled back, so the flow is trained in both directions. Each KL is
estimated by a logistic classifier (minimiser ``log f1/f0``): ``c_f ~ log Q / T_# P`` trained on
``T(x)`` (label 0) vs ``y ~ Q`` (label 1), so that ``KL(T_# P || Q) = -E_P c_f(T(x))``, and
``c_b ~ log P / T^{-1}_# Q`` likewise. With the classifier held fixed, the gradient of
``-E c_f(T_theta(x))`` is the gradient of the KL along the push-forward (its first variation is
``log(T_# P / Q) = -c_f``).

**Phases**, each one call of the one loop (:func:`iterflow.train.optimize`):

1. ``init``: the blocks by flow matching with a minibatch-OT coupling between ``P`` and ``Q`` (Tong
   et al. 2023, arXiv 2302.00482; Pooladian et al. 2023, arXiv 2304.14772): a coupled pair
   ``(x0, x1)`` gives block ``n`` the straight segment from ``x0 + (n/B)(x1 - x0)`` to
   ``x0 + ((n+1)/B)(x1 - x0)``.
2. ``straighten``: one reflow (Liu et al., arXiv 2209.03003) of the initial flow: the blocks go on
   by flow matching on the straight segments of the flow's *own* pairs ``(x, T(x))`` and
   ``(T^{-1}(y), y)``. In more than a few dimensions minibatch OT pairs points far from their
   optimal partners (in 20-D the mean squared partner error is about ``W2^2`` itself at 256 rows
   and hardly falls with the batch size), so the initial flow, the marginal flow of a blurred
   coupling, has curved paths: its map is close to the optimal one (its displacement within 0.5%
   of ``W2^2``) but its kinetic energy ~10% above. The reflow keeps the map and straightens the
   paths, so the kinetic energy becomes the displacement.
3. ``classifiers`` (only with ``refine_steps > 0``): the two KL classifiers warmed up on the flow.
4. ``refine`` (optional, off by default): the flow and the classifiers *together*, one module and
   one optimiser step per minibatch on the sum of the classifiers' logistic loss (on particles moved
   without gradients) and the relaxed objective (through the classifiers with frozen weights), so
   each part gets only its own gradient; the classifiers' learning rate is scaled (``lr_scales``)
   to track the moving flow. After the two phases above the end points already match to within
   what a classifier can detect (its logistic loss stays at ``2 log 2`` per side), so the
   classifier-estimated KL gradients are estimation noise, which the kinetic term and Adam's
   normalised steps turn into a drift: measured on Gaussians in 10 and 20 dimensions and on a 2-D
   mixture pair, 400-600 refinement steps moved ``W2^2`` by -1.6% to +6% and raised the map's
   error (``benchmarks/bench_transport_ratio.py``), so ``refine_steps`` defaults to 0.

In a run folder (``folder``) every phase checkpoints, a finished phase is committed atomically and
skipped on a re-run, so a run interrupted at any point (``kill -9``) and run again gives the
uninterrupted result. Under ``torchrun`` (``ctx``) every rank computes its share of each minibatch
and rank 0 alone writes.

**Blocks and units.** Block ``n`` covers ``t in [n/B, (n+1)/B]`` in its own time ``s = B t - n``, so
``dx/ds = v(x, t) / B`` and ``int E|v|^2 dt = B sum_n int_0^1 E|v_n|^2 ds``. The flow holds the
isotropic normalisation of :func:`~iterflow.apps.ot.maps.transport_normalization`; the maps in data
units are :attr:`TransportResult.forward` and :attr:`TransportResult.backward`. ``Flow.log_prob``
assumes an ``N(0, I)`` end and does not apply to a transport flow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iterflow.apps.ot.classifiers import LogitNet
from iterflow.apps.ot.maps import transport_cost, transport_normalization
from iterflow.apps.ot.phases import PhaseFolder, ProgressFn, Runtime, run_phase, seeded
from iterflow.apps.ot.result import TransportOptions, TransportResult, make_result
from iterflow.apps.ot.samples import (
    check_points,
    draw_rows,
    evenly,
    fingerprint,
    generator_fingerprint,
)
from iterflow.apps.ot.store import KIND, load_transport, result_fields, save_flow
from iterflow.core.couplings import pairing_environment
from iterflow.core.distributed import DistContext
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import MLPVelocity
from iterflow.core.ode import SolverSpec
from iterflow.methods import Loss
from iterflow.methods.transport import (
    KLClassifiers,
    joint_loss,
    kl_classifier_loss,
    segment_matching_loss,
    transport_integrals,
)
from iterflow.train import Checkpoint, StepBudget

#: The phases of a fit: name, checkpoint key.
PHASES = {"init": 0, "classifiers": 1, "refine": 2, "straighten": 3}


def build_transport_flow(
    dim: int, shift: Tensor, scale: Tensor, options: TransportOptions, generator: torch.Generator
) -> Flow:
    """``options.blocks`` fresh :class:`~iterflow.core.nn.MLPVelocity` blocks with the
    normalisation, each initialised from a seed drawn from ``generator``."""

    def velocity() -> nn.Module:
        return MLPVelocity(dim, options.hidden, options.activation, options.time_freqs)

    blocks = [Block(seeded(velocity, generator)) for _ in range(options.blocks)]
    return Flow(blocks, (dim,), shift=shift, scale=scale)


def build_classifiers(
    dim: int, options: TransportOptions, generator: torch.Generator
) -> KLClassifiers:
    """The two KL classifiers (:class:`~iterflow.apps.ot.classifiers.LogitNet`), seeded from
    ``generator``."""

    def net() -> nn.Module:
        return LogitNet(dim, options.classifier_hidden, options.activation)

    return KLClassifiers(seeded(net, generator), seeded(net, generator))


def _pairs(
    u_p: Tensor, u_q: Tensor, size: int
) -> Callable[[torch.Generator, int], tuple[Tensor, ...]]:
    """Minibatches ``(x, y)`` of ``size`` rows of each side, drawn independently."""
    return lambda gen, _: (draw_rows(u_p, size, gen), draw_rows(u_q, size, gen))


def initialize_by_flow_matching(
    flow: Flow,
    u_p: Tensor,
    u_q: Tensor,
    options: TransportOptions,
    generator: torch.Generator,
    runtime: Runtime | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """Phase ``init``: every block by flow matching on its segment of minibatch-OT pairs of the
    model-unit samples ``u_p``, ``u_q`` (:func:`iterflow.methods.transport.segment_matching_loss`)."""
    runtime, objective = runtime or Runtime(), options.objective()

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        return segment_matching_loss(flow, batch[0], batch[1], objective, gen)

    record = run_phase(flow, loss_fn, _pairs(u_p, u_q, options.batch_size),
                       options.init_config(runtime.checkpoint_every), generator=generator,
                       label="flow matching (OT pairs)", runtime=runtime, checkpoint=checkpoint,
                       key=PHASES["init"])  # fmt: skip
    return {"phase": "init", **record}


def own_pairs(
    flow: Flow, u_p: Tensor, u_q: Tensor, options: TransportOptions
) -> tuple[Tensor, Tensor]:
    """The flow's own coupled pairs in model units: ``(x, T(x))`` for ``straighten_points`` evenly
    spaced source rows and ``(T^{-1}(y), y)`` for as many target rows, stacked as ``(x0, x1)``
    (``rk4`` with ``eval_steps`` steps per block, no gradients)."""
    spec = SolverSpec("rk4", options.eval_steps)
    x, y = evenly(u_p, options.straighten_points), evenly(u_q, options.straighten_points)
    with torch.no_grad():
        tx = torch.cat([transport_integrals(flow, c, spec, create_graph=False).z
                        for c in x.split(4096)])  # fmt: skip
        ty = torch.cat([transport_integrals(flow, c, spec, reverse=True, create_graph=False).z
                        for c in y.split(4096)])  # fmt: skip
    return torch.cat([x, ty]), torch.cat([tx, y])


def straighten(
    flow: Flow,
    u_p: Tensor,
    u_q: Tensor,
    options: TransportOptions,
    generator: torch.Generator,
    runtime: Runtime | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """Phase ``straighten``: one reflow of the current flow. Its own pairs (:func:`own_pairs`,
    computed from the weights the phase starts from) replace the minibatch-OT pairs, and every
    block goes on by flow matching on its segment of them
    (:func:`iterflow.methods.transport.segment_matching_loss`, no re-coupling): the map stays, the
    paths become straight lines at constant speed, whose kinetic energy is the map's displacement."""
    runtime = runtime or Runtime()
    objective = dataclasses.replace(options.objective(), coupling="independent")
    x0, x1 = own_pairs(flow, u_p, u_q, options)
    b = options.batch_size

    def draw(gen: torch.Generator, _: int) -> tuple[Tensor, ...]:
        idx = torch.randint(0, x0.shape[0], (b,), generator=gen, device=gen.device).to(x0.device)
        return x0[idx], x1[idx]

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        return segment_matching_loss(flow, batch[0], batch[1], objective, gen)

    record = run_phase(flow, loss_fn, draw, options.straighten_config(runtime.checkpoint_every),
                       generator=generator, label="straightening (own pairs)", runtime=runtime,
                       checkpoint=checkpoint, key=PHASES["straighten"])  # fmt: skip
    return {"phase": "straighten", **record}


def warm_up_classifiers(
    classifiers: KLClassifiers,
    flow: Flow,
    u_p: Tensor,
    u_q: Tensor,
    options: TransportOptions,
    generator: torch.Generator,
    runtime: Runtime | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """Phase ``classifiers``: ``options.classifier_warmup`` steps of the classifiers alone on the
    current flow (:func:`iterflow.methods.transport.kl_classifier_loss`)."""
    runtime, spec = runtime or Runtime(), options.objective().spec()
    if options.classifier_warmup == 0:
        return {"phase": "classifiers", "steps": 0, "seconds": 0.0}

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        return kl_classifier_loss(classifiers, flow, batch[0], batch[1], spec)

    record = run_phase(classifiers, loss_fn, _pairs(u_p, u_q, options.classifier_batch_size),
                       options.warmup_config(runtime.checkpoint_every), generator=generator,
                       label="KL classifiers (warm-up)", runtime=runtime, checkpoint=checkpoint,
                       key=PHASES["classifiers"])  # fmt: skip
    return {"phase": "classifiers", **record}


def refine(
    flow: Flow,
    classifiers: KLClassifiers,
    u_p: Tensor,
    u_q: Tensor,
    options: TransportOptions,
    generator: torch.Generator,
    runtime: Runtime | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    r"""Phase ``refine``: minimise ``kinetic + gamma (KL(T_# P || Q) + KL(T^{-1}_# Q || P))`` and
    the classifiers' logistic loss in one optimiser step per minibatch.

    Each step draws ``classifier_batch_size`` particles per side for the classifiers and
    ``batch_size`` for the flow (:func:`iterflow.methods.transport.joint_loss`); the module holds the
    flow and the classifiers, the classifiers' learning rate being
    ``classifier_steps * classifier_lr`` (:meth:`TransportOptions.refine_lr_scales`).
    """
    runtime, objective = runtime or Runtime(), options.objective()
    joint = nn.ModuleDict({"flow": flow, "classifiers": classifiers})
    b, bc = options.batch_size, options.classifier_batch_size

    def draw(gen: torch.Generator, _: int) -> tuple[Tensor, ...]:
        x_c, y_c = draw_rows(u_p, bc, gen), draw_rows(u_q, bc, gen)
        return draw_rows(u_p, b, gen), draw_rows(u_q, b, gen), x_c, y_c

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        return joint_loss(flow, classifiers, batch, objective)  # type: ignore[arg-type]

    record = run_phase(joint, loss_fn, draw, options.refine_config(runtime.checkpoint_every),
                       generator=generator, label="relaxed-OT refinement", runtime=runtime,
                       checkpoint=checkpoint, key=PHASES["refine"],
                       lr_scales=options.refine_lr_scales("classifiers."))  # fmt: skip
    return {"phase": "refine", **record}


def fit_transport(
    source: Tensor,
    target: Tensor,
    options: TransportOptions | None = None,
    *,
    generator: torch.Generator,
    folder: str | Path | None = None,
    progress: ProgressFn | None = None,
    ctx: DistContext | None = None,
    autocast: torch.dtype | None = None,
    checkpoint_every: int = 200,
    budget: StepBudget | None = None,
    eval_points: int = 20000,
    extra_config: dict[str, Any] | None = None,
) -> TransportResult:
    """Learn a flow transporting ``P`` (``source`` samples) to ``Q`` (``target``) at minimal cost.

    Arguments:
        source, target: ``(n, d)`` and ``(m, d)`` samples (data units); their device and dtype are
            the flow's.
        options: see :class:`TransportOptions`.
        generator: the only source of randomness (initialisation, minibatches, flow-matching times);
            a generator on the samples' device.
        folder: run folder: checkpoints, finished phases and the result (a re-run with the same
            arguments resumes it; a finished one is loaded). ``None``: nothing is written.
        progress: optional callback ``(phase, step, total, terms)``.
        ctx: data-parallel context (:func:`iterflow.core.distributed.setup`; rank 0 writes).
        autocast: dtype of ``torch.autocast`` around the losses (``None``: full precision).
        checkpoint_every: optimiser steps between in-phase checkpoints (with ``folder``).
        budget: testing aid: raise ``KeyboardInterrupt`` after that many steps.
        eval_points: at most this many samples of each side (evenly spaced) for the cost estimate.
        extra_config: JSON values recorded in the folder's ``config`` and part of the run's identity
            (e.g. the command line's description of the data).

    Returns:
        A :class:`TransportResult`; ``result.w2_sq`` estimates ``W_2^2(P, Q)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> p, q = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + 3
        >>> opts = TransportOptions(blocks=1, hidden=(32,), init_steps=50, refine_steps=5,
        ...                         classifier_warmup=5)
        >>> res = fit_transport(p, q, opts, generator=g)
        >>> res.forward(p[:3]).shape
        torch.Size([3, 2])

    References:
        Xu, Cheng & Xie, "Computing high-dimensional optimal transport by flow neural networks",
        AISTATS 2025, arXiv 2305.11857.
    """
    options = options or TransportOptions()
    source = check_points(source, "source")
    target = check_points(target, "target", source.shape[1])
    runtime = Runtime(progress, ctx, autocast, checkpoint_every, budget or StepBudget(None))
    config = {
        "options": options.to_json(),
        "samples": fingerprint(source, target),
        "generator": generator_fingerprint(generator),
        "eval_points": eval_points,
        **(extra_config or {}),
    }
    run = PhaseFolder(folder, KIND, config, ctx=ctx) if folder is not None else None
    if run is not None and run.complete:
        return load_transport(run.path, device=source.device)
    shift, scale = transport_normalization(source, target)
    flow = build_transport_flow(source.shape[1], shift, scale, options, generator)
    flow = flow.to(device=source.device, dtype=source.dtype)
    u_p, u_q = flow.normalize(source), flow.normalize(target)
    history = []
    if options.init_steps > 0:
        pairs = pairing_environment(options.coupling, source.shape[1], chunk=options.ot_chunk)
        init = _phase(run, "init", flow, generator, lambda ck: initialize_by_flow_matching(
            flow, u_p, u_q, options, generator, runtime, ck), pairs)  # fmt: skip
        if options.straighten_steps > 0:
            rec = _phase(run, "straighten", flow, generator, lambda ck: straighten(
                flow, u_p, u_q, options, generator, runtime, ck))  # fmt: skip
            init = {**init, "seconds": init["seconds"] + rec["seconds"], "straighten": rec}
        history.append(init)
    if options.refine_steps > 0:
        classifiers = build_classifiers(source.shape[1], options, generator)
        classifiers = classifiers.to(device=source.device, dtype=source.dtype)
        warm = _phase(run, "classifiers", classifiers, generator, lambda ck: warm_up_classifiers(
            classifiers, flow, u_p, u_q, options, generator, runtime, ck))  # fmt: skip
        record = _phase(run, "refine", flow, generator, lambda ck: refine(
            flow, classifiers, u_p, u_q, options, generator, runtime, ck))  # fmt: skip
        seconds = record["seconds"] + warm["seconds"]  # the warm-up is part of the refinement
        history.append({**record, "seconds": seconds, "classifier_warmup": warm})
    flow.eval()
    cost = transport_cost(flow, evenly(source, eval_points), evenly(target, eval_points),
                          steps=options.eval_steps)  # fmt: skip
    result = make_result(flow, cost, options, history)
    if run is not None:
        if runtime.main:
            save_flow(flow, run.path)
        run.finish(**result_fields(result))
    return result


def _phase(
    run: PhaseFolder | None,
    name: str,
    module: nn.Module,
    generator: torch.Generator,
    train: Callable[[Checkpoint | None], dict[str, Any]],
    environment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run phase ``name`` (``train(checkpoint)``) or, when ``run`` has it, load its result: the
    weights of ``module`` and the generator's state at its end (``environment``: the phase's part
    of its checkpoints' environment, such as the OT pairing's implementation)."""
    if run is not None and run.done(name):
        saved = run.load(name, generator.device)
        state = {k.removeprefix("module."): v for k, v in saved.items() if k.startswith("module.")}
        module.load_state_dict(state)
        generator.set_state(saved["generator"].cpu())
        return run.record(name)
    record = train(run.checkpoint(PHASES[name], environment) if run is not None else None)
    if run is not None:
        tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
        run.commit(name, PHASES[name], {**tensors, "generator": generator.get_state()}, record)
    return record
