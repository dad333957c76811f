"""The likelihood sections of ``bench_speed.py``: exact NLL evaluation against the plain torchdiffeq
evaluator a user writes, and the steps/s of likelihood training (CNF, JKO-flow).

Likelihood evaluation (``likelihood`` section). One trained MLP velocity per case (the package's
default network: 3 hidden layers of 256, SiLU): the 2-D checkerboard trained with the demo's
defaults (``--like-steps`` flow-matching steps; ``--like-run`` loads a run folder instead), and
flow-matching models (``--like-steps-hd`` steps, the same defaults) of a mixture of 8 Gaussians in
10, 32 and 64 dimensions (:func:`mixture`; 50,000 training rows). Contenders, on the same points,
all with the exact trace, in interleaved rounds (medians):

* ``plain torchdiffeq``: :func:`plain_nll`, the evaluator a user writes in twenty lines:
  ``torchdiffeq.odeint`` with ``dopri5`` on the augmented state ``(x, logp)``, the exact trace by
  one autograd backward pass per dimension, ``atol = rtol = 1e-5``;
* the same with ``create_graph=True`` (as in torchdiffeq's ``examples/cnf.py``; 2-D only);
* ``iterflow Flow.log_prob``: ``dopri5``, exact trace, ``atol = rtol = 1e-5``;
* ``iterflow Flow.log_prob, error_norm=rows``: the same with every row held to the tolerance
  (:class:`iterflow.core.ode.SolverSpec`), at its cost in NFE;
* ``iterflow Flow.compiled().log_prob``: the first contender through ``torch.compile``
  (:meth:`iterflow.core.flow.Flow.compiled`; compiled in the untimed warm-up round);
* ``iterflow, autograd path``: the same call inside
  :func:`iterflow.core.integrand.autograd_jacobian_terms` (the package before the one-pass
  Jacobian terms of :mod:`iterflow.core.nn.mlp_jacobian`).

Reported: points/s, NFE, the mean NLL, its difference to the plain evaluator (mean and largest per
point) and each contender's error against a reference (``Flow.log_prob`` at ``atol = rtol = 1e-9``),
and the roofline: the points/s an evaluator with the contender's NFE would reach if every matrix
product ran at this machine's float32 GEMM peak (:func:`eval_flops_per_point`), against the plain
evaluator's measured rate. A speed-up above it needs fewer evaluations or cheaper arithmetic, not a
leaner loop.

Work-precision (part ``work-precision``, :func:`bench_work_precision`): the same cases, the plain
evaluator at :data:`WP_PLAIN_TOLS` and iterflow's compiled evaluator in :data:`WP_SETTINGS`
(float32 at :data:`WP_TOLS`; bf16 autocast at :data:`WP_BF16_TOLS`), every row's error against a
float64 ``dopri8`` reference at 1e-9, and the speed-up at equal accuracy: the plain evaluator's
seconds at iterflow's mean and largest per-point error, interpolated on its own curve
(:func:`equal_accuracy_ratio`), over iterflow's.

Likelihood training (``likelihood`` section too): one optimiser step (loss, backward, Adam) of the
CNF and JKO-flow rose recipes (``CNF.recommended`` / ``JKOFlow.recommended``: network, batch,
solver and options), through the one-pass Jacobian terms and through the autograd path, and the
one-pass step under bf16 autocast (for information; the trainer uses it only for methods marked
``autocast_safe``), in interleaved rounds (steps/s, median).

bf16 rows (work-precision settings, training modes) run only where bf16 arithmetic is native
(:func:`bf16_native`): a CPU without AVX512-BF16 or AMX emulates it, hundreds of times slower than
float32 (GEMM peak 0.3 against 118-178 GFLOP/s on an AVX2-only AMD EPYC, ``bench_speed.py``'s
first line), so one such row would take longer than the whole section; the run records that they
were left out.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from iterflow.core.flow import Block, Flow, standard_normal_log_prob
from iterflow.core.integrand import autograd_jacobian_terms, draw_probes
from iterflow.core.nn import MLPVelocity
from iterflow.core.nn.compiled import CompiledVelocity
from iterflow.core.ode import SolverSpec
from iterflow.data import get_dataset
from iterflow.methods.cnf import CNFOptions, likelihood_loss
from iterflow.methods.jko import JKOOptions, jko_loss
from iterflow.train import TrainConfig, TrainData, cpu_has_native_bf16, train, train_tensors

HIGH_DIMS = (10, 32, 64)


def bf16_native(device: torch.device) -> bool:
    """Whether the bf16 rows run on ``device``: any accelerator, or a CPU with native bf16
    arithmetic (:func:`iterflow.train.cpu_has_native_bf16`; see the module docstring)."""
    return device.type != "cpu" or cpu_has_native_bf16()


def mixture(n: int, d: int, seed: int) -> Tensor:
    """``n`` rows of a mixture of 8 Gaussians in ``d`` dimensions (means ``N(0, 4 I)``,
    per-dimension scales in ``[0.2, 0.6]``), the same for one ``seed``."""
    g = torch.Generator().manual_seed(seed + d)
    means = 2.0 * torch.randn(8, d, generator=g)
    scales = 0.2 + 0.4 * torch.rand(8, d, generator=g)
    k = torch.randint(0, 8, (n,), generator=g)
    return means[k] + scales[k] * torch.randn(n, d, generator=g)


def plain_nll(
    velocity: nn.Module, u: Tensor, *, tol: float = 1e-5, create_graph: bool = False
) -> tuple[Tensor, int]:
    """NLL (model units) by the plain torchdiffeq evaluator: dopri5 on ``(x, logp)``, the exact
    trace by one backward pass per dimension. Returns ``(nll (B,), NFE)``."""
    from torchdiffeq import odeint

    nfe = [0]

    def f(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nfe[0] += 1
        with torch.enable_grad():
            z = state[0].detach().requires_grad_(True)
            v = velocity(z, t)
            div = torch.zeros_like(state[1])
            for i in range(z.shape[1]):
                g = torch.autograd.grad(
                    v[:, i].sum(), z, create_graph=create_graph, retain_graph=True
                )
                div = div + g[0][:, i]
        return v.detach(), div.detach()

    with torch.no_grad():
        t = torch.tensor([0.0, 1.0], dtype=u.dtype, device=u.device)
        z, logdet = odeint(f, (u, u.new_zeros(u.shape[0])), t, method="dopri5", atol=tol, rtol=tol)
    return -(standard_normal_log_prob(z[-1]) + logdet[-1]), nfe[0]


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _trained_flow(
    data: str, steps: int, seed: int, device: torch.device, rows: Tensor | None = None
) -> tuple[Flow, Tensor]:
    """The defaults' flow-matching model of ``data`` (or of the tensor ``rows``, named ``data``)
    after ``steps`` steps, and its test points."""
    cfg = TrainConfig(
        data=data, steps=steps, seed=seed, device=str(device), n_test=2000, checkpoint_every=10**6
    )
    if rows is None:
        res = train(cfg, None)
        return res.flow.eval(), res.splits.test
    n = rows.shape[0] - 4000
    tr = TrainData(rows[:n], rows[n : n + 2000], {"name": data}, test=rows[n + 2000 :])
    return train_tensors(cfg, tr).flow.eval(), rows[n + 2000 :]


def _load_flow(run: str, device: torch.device) -> tuple[Flow, Tensor]:
    from iterflow.train import load_run

    flow, cfg, _ = load_run(run, device=str(device))
    s = get_dataset(cfg.data, img2d_dir=cfg.img2d_dir).splits(
        cfg.n_train, cfg.n_val, 2000, cfg.seed
    )
    return flow.eval(), s.test.to(device)


Case = tuple[str, Flow, Tensor]


def likelihood_cases(args: Any, device: torch.device) -> list[Case]:
    """The evaluation cases: ``(name, trained flow, test points)``, 2-D then the mixtures (trained
    once per run, shared by the ``eval`` and ``work-precision`` parts)."""
    cases: list[tuple[str, Flow, Tensor]] = []
    if args.like_run:
        flow, pts = _load_flow(args.like_run, device)
    else:
        flow, pts = _trained_flow("checkerboard", args.like_steps, args.seed, device)
    cases.append(("checkerboard (2-D)", flow, pts[: args.like_points].to(device)))
    for d in HIGH_DIMS:
        if d > args.like_max_dim:
            continue
        rows = mixture(54_000, d, args.seed)
        flow, pts = _trained_flow(f"mixture-{d}d", args.like_steps_hd, args.seed, device, rows)
        cases.append((f"8-Gaussian mixture ({d}-D)", flow, pts[: args.like_points_hd].to(device)))
    return cases


def bench_likelihood_eval(
    cases: list[Case], args: Any, device: torch.device
) -> list[dict[str, Any]]:
    """Rows of the likelihood-evaluation comparison of ``cases`` (see the module docstring)."""
    rows = []
    for name, flow, x in cases:
        rows += _compare(name, flow, x, args.like_rounds, device)
    return rows


def plain_evaluator(flow: Flow, x: Tensor) -> Callable[..., tuple[Tensor, int]]:
    """``(tol=1e-5, create_graph=False) -> (nll (B,), NFE)``: :func:`plain_nll` on ``flow``'s
    velocity at ``x``, in the data's units (the flow's normalisation accounted for)."""
    net = flow.chain[0].velocity
    u = flow.normalize(x)
    logdet_norm = float(flow.normalization_log_det())

    def plain(tol: float = 1e-5, create_graph: bool = False) -> tuple[Tensor, int]:
        nll, nfe = plain_nll(net, u, tol=tol, create_graph=create_graph)
        return nll - logdet_norm, nfe

    return plain


def _compare(
    name: str, flow: Flow, x: Tensor, rounds: int, device: torch.device
) -> list[dict[str, Any]]:
    net = flow.chain[0].velocity
    plain_at = plain_evaluator(flow, x)
    fast = flow.compiled()  # compiled in the warm-up round, which is not timed

    def iterflow_nll(error_norm: str = "batch", model: Flow = flow) -> tuple[Tensor, int]:
        spec = SolverSpec("dopri5", atol=1e-5, rtol=1e-5, error_norm=error_norm)
        with torch.no_grad(), model.count_nfe() as c:
            lp = model.log_prob(x, divergence="exact", solver=spec)
        return -lp, c.nfe

    def autograd_nll() -> tuple[Tensor, int]:
        with autograd_jacobian_terms():
            return iterflow_nll()

    contenders: dict[str, Callable[[], tuple[Tensor, int]]] = {
        "plain torchdiffeq (one backward per dimension)": plain_at,
        "iterflow Flow.log_prob": iterflow_nll,
        "iterflow Flow.log_prob, error_norm=rows": lambda: iterflow_nll("rows"),
        "iterflow Flow.compiled().log_prob": lambda: iterflow_nll(model=fast),
        "iterflow, autograd path": autograd_nll,
    }
    if x.shape[1] <= 2:
        contenders["plain torchdiffeq, create_graph=True"] = lambda: plain_at(create_graph=True)
    with torch.no_grad():
        ref = -flow.log_prob(x, divergence="exact", solver="dopri5", atol=1e-9, rtol=1e-9)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    outs: dict[str, tuple[Tensor, int]] = {}
    for k, fn in contenders.items():  # warm-up
        outs[k] = fn()
    for _ in range(rounds):
        for k, fn in contenders.items():
            dt, outs[k] = _timed(fn, device)
            times[k].append(dt)
    base = outs["plain torchdiffeq (one backward per dimension)"][0]
    base_rate = len(x) / statistics.median(times["plain torchdiffeq (one backward per dimension)"])
    peak = gemm_peak(torch.float32, device)
    flops = eval_flops_per_point(net, x.shape[1])
    rows = []
    for k in contenders:
        nll, nfe = outs[k]
        rate = len(x) / statistics.median(times[k])
        bound = peak / (nfe * flops)  # points/s if every matrix product ran at the GEMM peak
        rows.append(
            {
                "case": name,
                "points": len(x),
                "contender": k,
                "points_per_s": rate,
                "vs_plain": rate / base_rate,
                "nfe": nfe,
                "nll": float(nll.mean()),
                "nll_minus_plain": float((nll - base).mean()),
                "max_abs_diff_vs_plain": float((nll - base).abs().max()),
                "mean_abs_err_vs_ref": float((nll - ref).abs().mean()),
                "max_abs_err_vs_ref": float((nll - ref).abs().max()),
                "gemm_bound_points_per_s": bound,
                "gemm_bound_vs_plain": bound / base_rate,
            }
        )
    return rows


def eval_flops_per_point(net: nn.Module, dim: int) -> float:
    """Matrix-multiply FLOPs of one velocity evaluation with the exact divergence, per point: the
    forward pass (``2 sum in*out`` over the network's ``nn.Linear`` layers) and one Jacobian column
    per dimension, each pushed through every layer but the input ones (``inp``, ``inp_t`` of
    :class:`~iterflow.core.nn.MLPVelocity`: a column of the first layer costs nothing). Reverse-mode
    columns (one backward per dimension) cost the same products.

    Example:
        >>> net = MLPVelocity(2, (4, 4), time_freqs=0)  # Linear 2->4, 1->4 (time), 4->4, 4->2
        >>> eval_flops_per_point(net, 2)  # 2 * (8 + 4 + 16 + 8) + 2 * 2 * (16 + 8)
        168.0
    """
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    total = sum(m.in_features * m.out_features for m in linears.values())
    first = sum(m.in_features * m.out_features for n, m in linears.items() if n in ("inp", "inp_t"))
    return 2.0 * total + dim * 2.0 * (total - first)


def gemm_peak(dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """Best FLOP/s of square matrix products (2048 rows on a CPU, 8192 on a GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps + 1):
        dt, _ = _timed(lambda: torch.matmul(a, b, out=c), device)
        best = max(best, 2 * n**3 / dt)
    return best


# ------------------------------------------------------------------------------------------------
# Likelihood training: CNF and JKO-flow steps/s
# ------------------------------------------------------------------------------------------------


def _recipe_step(method: str, x_all: Tensor, seed: int) -> Callable[[str], float]:
    """``step(mode)``: one optimiser step of the method's rose recipe (``mode``: ``one-pass``,
    ``autograd``, ``one-pass bf16``, ``one-pass compiled``, through ``torch.compile``: its
    compilation happens in the warm-up step, which is not timed, or ``one-pass compiled bf16``, both);
    returns the loss."""
    cfg = TrainConfig.for_method(method, data="rose")
    torch.manual_seed(seed)
    d, blocks = x_all.shape[1], cfg.blocks if method == "cnf" else 1  # JKO: one block at a time
    nets = [
        MLPVelocity(d, cfg.hidden, cfg.activation, time_freqs=cfg.time_freqs) for _ in range(blocks)
    ]
    flow = Flow([Block(n) for n in nets], (d,)).to(x_all.device)
    # the same parameters through torch.compile (the ``compile`` training setting)
    compiled = Flow([Block(CompiledVelocity(n)) for n in nets], (d,)).to(x_all.device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=x_all.device).manual_seed(seed)
    options, batch = cfg.options, cfg.batch_size

    def loss(x: Tensor, model: Flow) -> Tensor:
        if method == "cnf":
            o = CNFOptions(**options)
            eps = draw_probes(x, o.divergence, o.probes, o.probe_kind, gen)
            return likelihood_loss(
                model, x, o.train_spec(), eps, kinetic=o.kinetic, jacobian=o.jacobian
            ).rows.mean()
        j = JKOOptions(**options)
        eps = draw_probes(x, j.divergence, j.probes, j.probe_kind, gen)
        return jko_loss(
            model, x, j.gamma_at(0), j.train_spec(), eps, kinetic=j.kinetic, jacobian=j.jacobian
        ).rows.mean()

    def step(mode: str) -> float:
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen, device=x_all.device)
        opt.zero_grad()
        amp = torch.autocast(x_all.device.type, dtype=torch.bfloat16, enabled="bf16" in mode)
        model = compiled if "compiled" in mode else flow
        if mode == "autograd":
            with autograd_jacobian_terms(), amp:
                value = loss(x_all[idx], model)
        else:
            with amp:
                value = loss(x_all[idx], model)
        value.backward()
        opt.step()
        return float(value.detach())

    return step


#: The optimiser-step paths of :func:`bench_likelihood_training` (:func:`_recipe_step`'s modes).
TRAINING_MODES = (
    "autograd",
    "one-pass",
    "one-pass bf16",
    "one-pass compiled",
    "one-pass compiled bf16",
)


def training_modes(device: torch.device) -> tuple[str, ...]:
    """The :data:`TRAINING_MODES` that run on ``device``: the bf16 ones only where bf16 is
    native (:func:`bf16_native`)."""
    return tuple(m for m in TRAINING_MODES if "bf16" not in m or bf16_native(device))


def bench_likelihood_training(args: Any, device: torch.device) -> list[dict[str, Any]]:
    """Steps/s of the CNF and JKO-flow rose recipes' optimiser step, one-pass vs autograd."""
    try:
        ds = get_dataset("rose", img2d_dir=args.img2d_dir)
        data = "rose"
    except Exception:  # the image folder of the papers' densities is optional
        ds, data = get_dataset("checkerboard"), "checkerboard"
    x = ds.splits(20_000, 10, 10, args.seed).train
    x = ((x - x.mean(0)) / x.std(0)).to(device)
    modes = training_modes(device)
    n, rows = args.like_train_steps, []
    for method in ("cnf", "jko"):
        step = _recipe_step(method, x, args.seed)
        for m in modes:  # warm-up (compilation of the compiled path: two graphs)
            step(m)
            step(m)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.like_rounds):
            for m in modes:
                dt, _ = _timed(lambda m=m, st=step: [st(m) for _ in range(n)], device)
                rates[m].append(n / dt)
        base = statistics.median(rates["autograd"])
        for m in modes:
            med = statistics.median(rates[m])
            rows.append(
                {
                    "method": method,
                    "data": data,
                    "path": m,
                    "steps_per_s": med,
                    "min": min(rates[m]),
                    "max": max(rates[m]),
                    "vs_autograd": med / base,
                }
            )
    return rows


def load() -> dict[str, Any]:
    """Threads and load average (recorded with the timings)."""
    one, five, fifteen = os.getloadavg()
    return {"threads": torch.get_num_threads(), "loadavg_1_5_15": [one, five, fifteen]}


# ------------------------------------------------------------------------------------------------
# Work-precision: speed at equal accuracy
# ------------------------------------------------------------------------------------------------

#: Tolerances (``atol = rtol``) of the plain evaluator's work-precision curve (from 3e-3: the bf16
#: settings at 1e-3 are about as accurate as the plain evaluator at 1e-3, and a ratio is read only
#: between two measured points of its curve).
WP_PLAIN_TOLS = (3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
WP_TOLS = (1e-3, 1e-4, 1e-5, 1e-6)
#: Tolerances of the bf16 settings (``Flow.log_prob`` refuses adaptive tolerances below 1e-4 under
#: bf16: its rounding keeps the error estimate above them).
WP_BF16_TOLS = (1e-3, 3e-4, 1e-4)
#: iterflow's settings on the curve, through ``Flow.compiled()``: ``(solver, error_norm,
#: autocast, tolerances)``.
WP_SETTINGS = (
    ("dopri5", "batch", "none", WP_TOLS),
    ("dopri5", "rows", "none", WP_TOLS),
    ("bosh3", "batch", "none", WP_TOLS),
    ("dopri5", "batch", "bf16", WP_BF16_TOLS),
    ("dopri5", "rows", "bf16", WP_BF16_TOLS),
    ("bosh3", "batch", "bf16", WP_BF16_TOLS),
)


def wp_settings(device: torch.device) -> tuple[tuple[str, str, str, tuple[float, ...]], ...]:
    """The :data:`WP_SETTINGS` that run on ``device``: the bf16 ones only where bf16 is native
    (:func:`bf16_native`)."""
    return tuple(s for s in WP_SETTINGS if s[2] == "none" or bf16_native(device))


def time_at_error(curve: list[tuple[float, float]], error: float) -> float | None:
    """Seconds an evaluator needs to reach a per-point ``error``, from its work-precision points
    ``(error, seconds)`` (one per tolerance): on the curve's lower frontier (the points no
    cheaper point beats in error), interpolated linearly in log-log between the two points that
    bracket ``error``. ``None`` outside the measured errors: neither side is extrapolated.

    Example:
        >>> time_at_error([(1e-2, 1.0), (1e-4, 4.0)], 1e-3)  # halfway in log error
        2.0
    """
    frontier: list[tuple[float, float]] = []
    for e, t in sorted(curve):
        if not frontier or t < frontier[-1][1]:
            frontier.append((e, t))
    if not frontier or not frontier[0][0] <= error <= frontier[-1][0]:
        return None
    for (e0, t0), (e1, t1) in zip(frontier, frontier[1:]):
        if e0 <= error <= e1:
            w = math.log(error / e0) / math.log(e1 / e0) if e1 > e0 else 0.0
            return math.exp(math.log(t0) + w * math.log(t1 / t0))
    return frontier[0][1]  # a one-point frontier at exactly this error


def equal_accuracy_ratio(
    plain: list[dict[str, Any]], point: dict[str, Any]
) -> tuple[float | None, float | None]:
    """``(seconds, ratio)``: what the plain evaluator needs to be as accurate as ``point`` in both
    the mean and the largest per-point error (the larger of the two interpolated times,
    :func:`time_at_error`), and that over ``point``'s seconds. ``(None, None)`` where ``point``'s
    errors lie outside the plain curve's."""
    need = [
        time_at_error([(p[key], p["seconds"]) for p in plain], point[key])
        for key in ("mean_abs_err", "max_abs_err")
    ]
    if any(t is None for t in need):
        return None, None
    seconds = max(t for t in need if t is not None)
    return seconds, seconds / point["seconds"]


def _reference_nll(flow: Flow, x: Tensor) -> Tensor:
    """NLL in float64 by ``dopri8`` at ``atol = rtol = 1e-9``: the float32 evaluators' errors are
    measured against it (their round-off included)."""
    f64 = copy.deepcopy(flow).double()
    with torch.no_grad():
        lp = f64.log_prob(x.double(), divergence="exact", solver="dopri8", atol=1e-9, rtol=1e-9)
    return -lp.float()


def bench_work_precision(
    cases: list[Case], args: Any, device: torch.device
) -> dict[str, list[dict[str, Any]]]:
    """Speed at equal accuracy: the plain evaluator at :data:`WP_PLAIN_TOLS` and iterflow's
    compiled evaluator in the :data:`WP_SETTINGS` at :data:`WP_TOLS`, on ``cases``
    (:func:`likelihood_cases`); seconds are medians of ``--like-rounds`` interleaved passes over
    every setting of a case, errors per point against :func:`_reference_nll`.

    Returns ``{"points": one row per setting, "equal": one row per case}``: the best ratio of the
    plain evaluator's interpolated seconds at the same mean and largest per-point error
    (:func:`equal_accuracy_ratio`) over iterflow's, with its setting, next to the ratio at the
    same tolerance (1e-5, dopri5, batch control: the ``eval`` part's comparison)."""
    points: list[dict[str, Any]] = []
    equal: list[dict[str, Any]] = []
    for name, flow, x in cases:
        rows = _work_precision_case(name, flow, x, args.like_rounds, device)
        points += rows
        equal.append(_equal_accuracy_summary(name, rows))
    return {"points": points, "equal": equal}


def _work_precision_case(
    name: str, flow: Flow, x: Tensor, rounds: int, device: torch.device
) -> list[dict[str, Any]]:
    """One case's work-precision rows (:func:`bench_work_precision`)."""
    plain = plain_evaluator(flow, x)
    fast = flow.compiled()
    ref = _reference_nll(flow, x)

    def ours(solver: str, norm: str, amp: str, tol: float) -> tuple[Tensor, int]:
        spec = SolverSpec(solver, atol=tol, rtol=tol, error_norm=norm)
        with torch.no_grad(), fast.count_nfe() as c:
            lp = fast.log_prob(x, divergence="exact", solver=spec, autocast=amp)
        return -lp, c.nfe

    Key = tuple[str, str, str, str, float]
    runs: dict[Key, Callable[[], tuple[Tensor, int]]] = {
        ("plain torchdiffeq", "dopri5", "batch", "none", tol): (lambda tol=tol: plain(tol))
        for tol in WP_PLAIN_TOLS
    }
    settings = wp_settings(device)
    for solver, norm, amp, tols in settings:
        for tol in tols:
            runs[("iterflow compiled", solver, norm, amp, tol)] = (
                lambda s=solver, n=norm, a=amp, tol=tol: ours(s, n, a, tol)
            )
    for amp in dict.fromkeys(a for _, _, a, _ in settings):  # compiles; not timed
        ours("dopri5", "batch", amp, 1e-3)
    times: dict[Key, list[float]] = {k: [] for k in runs}
    outs: dict[Key, tuple[Tensor, int]] = {}
    for _ in range(rounds):
        for k, fn in runs.items():
            dt, outs[k] = _timed(fn, device)
            times[k].append(dt)
    rows = []
    for k in runs:
        nll, nfe = outs[k]
        err = (nll - ref).abs()
        seconds = statistics.median(times[k])
        rows.append(
            {
                "case": name,
                "evaluator": k[0],
                "solver": k[1],
                "error_norm": k[2],
                "autocast": k[3],
                "tol": k[4],
                "nfe": nfe,
                "seconds": seconds,
                "points_per_s": len(x) / seconds,
                "nll": float(nll.mean()),
                "nll_minus_ref": float((nll - ref).mean()),
                "mean_abs_err": float(err.mean()),
                "max_abs_err": float(err.max()),
            }
        )
    plain_rows = [r for r in rows if r["evaluator"] == "plain torchdiffeq"]
    for r in rows:
        if r["evaluator"] != "plain torchdiffeq":
            r["plain_seconds_at_equal_accuracy"], r["vs_plain_at_equal_accuracy"] = (
                equal_accuracy_ratio(plain_rows, r)
            )
    return rows


def nll_allowed(plain_nll_minus_ref: float | None) -> float:
    """How far an evaluator's mean NLL may lie from the reference: 1e-3 nats (the issue's
    tolerance), or as far as the plain evaluator's at 1e-5 where that is further. Judged against
    the reference, not the plain result: a more exact mean NLL is no failure."""
    return max(1e-3, abs(plain_nll_minus_ref or 0.0))


def _equal_accuracy_summary(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A case's best speed-up at equal accuracy among the settings whose mean NLL is within
    :func:`nll_allowed`, next to its speed-up at the same tolerance."""
    plain = {r["tol"]: r for r in rows if r["evaluator"] == "plain torchdiffeq"}
    ours = [r for r in rows if r["evaluator"] != "plain torchdiffeq"]
    same = next(
        r
        for r in ours
        if (r["solver"], r["error_norm"], r.get("autocast", "none"), r["tol"])
        == ("dopri5", "batch", "none", 1e-5)
    )
    allowed = nll_allowed(plain[1e-5]["nll_minus_ref"])
    rated = [
        r
        for r in ours
        if r.get("vs_plain_at_equal_accuracy") is not None and abs(r["nll_minus_ref"]) <= allowed
    ]
    best = max(rated, key=lambda r: r["vs_plain_at_equal_accuracy"]) if rated else None
    full = [r["vs_plain_at_equal_accuracy"] for r in rated if r.get("autocast", "none") == "none"]
    return {
        "case": name,
        "same_tolerance_vs_plain": plain[1e-5]["seconds"] / same["seconds"],
        "best_setting": setting_name(best) if best else None,
        "best_float32_vs_plain": max(full) if full else None,
        "best_nfe": best["nfe"] if best else None,
        "best_mean_abs_err": best["mean_abs_err"] if best else None,
        "best_max_abs_err": best["max_abs_err"] if best else None,
        "equal_accuracy_vs_plain": best["vs_plain_at_equal_accuracy"] if best else None,
        "best_nll_minus_plain_1e-5": best["nll"] - plain[1e-5]["nll"] if best else None,
        "best_nll_minus_ref": best["nll_minus_ref"] if best else None,
        "plain_1e-5_nll_minus_ref": plain[1e-5]["nll_minus_ref"],
    }


def setting_name(r: dict[str, Any]) -> str:
    """``solver error_norm [bf16] tol`` of a work-precision row."""
    amp = " bf16" if r.get("autocast", "none") != "none" else ""
    return f"{r['solver']} {r['error_norm']}{amp} {r['tol']:g}"


def plot_work_precision(points: list[dict[str, Any]], path: str) -> None:
    """One panel per case: points/s against the largest and the mean per-point error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in points))
    fig, axes = plt.subplots(2, len(cases), figsize=(3.6 * len(cases), 6.4), squeeze=False)
    for j, case in enumerate(cases):
        rows = [r for r in points if r["case"] == case]
        series = list(dict.fromkeys(_series(r) for r in rows))
        for i, key in enumerate(("max_abs_err", "mean_abs_err")):
            ax = axes[i][j]
            for s in series:
                rs = sorted((r for r in rows if _series(r) == s), key=lambda r: r["tol"])
                plain = s[0] == "plain torchdiffeq"
                amp = "" if s[3] == "none" else f", {s[3]}"
                label = "plain torchdiffeq (dopri5)" if plain else f"iterflow {s[1]}, {s[2]}{amp}"
                ax.loglog([r[key] for r in rs], [r["points_per_s"] for r in rs], "o-" if plain
                          else ".--", lw=2.2 if plain else 1.2, color="k" if plain else None,
                          label=label)  # fmt: skip
            ax.set_xlabel(
                ("largest" if key == "max_abs_err" else "mean") + " per-point error (nats)"
            )
            if j == 0:
                ax.set_ylabel("points/s")
            if i == 0:
                ax.set_title(case, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(r: dict[str, Any]) -> tuple[str, str, str, str]:
    return (r["evaluator"], r["solver"], r["error_norm"], r.get("autocast", "none"))
