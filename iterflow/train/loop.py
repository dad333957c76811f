"""The one optimisation loop through which every network of iterflow is trained.

Flow blocks of every method, transport maps, worst-case maps, ratio classifiers, the risk classifier
and the image feature classifier all train here: :func:`optimize` owns the optimiser (Adam/AdamW,
PyTorch's fused kernel where it exists), the learning-rate schedule, gradient clipping, the EMA of the
weights, the non-finite-loss check, autocast, progress reporting, in-stage checkpoints with their
resumption, and the data-parallel reduction. An objective only computes *per-row* losses
(:class:`~iterflow.methods.base.Loss`): the loop reduces them to the global minibatch mean.

Data parallelism (``torchrun``; :mod:`iterflow.core.distributed`). Every rank draws the same global
minibatch from identically seeded generators; inside :func:`~iterflow.core.distributed.sharding` the
objective computes only its own rows (:func:`~iterflow.core.distributed.local_rows`); the loop takes
this rank's share of the global mean and averages the gradients over ranks with one all-reduce of the
flattened gradient. The update is then the one-process update on the global batch, for any
``nn.Module`` (no DDP wrapper is needed, so users' own modules train data-parallel too).

Checkpoints (:class:`Checkpoint`): every ``checkpoint_every`` steps the parameters, the EMA, the
optimiser state, the generator state, the step and the elapsed seconds are written atomically
(``progress.safetensors`` then ``progress.json``, the commit record); a later call with the same
``key`` resumes from there bit for bit, so ``kill -9`` loses at most that many steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from iterflow.core import distributed as ddp
from iterflow.core.allocator import tune_cpu_allocator
from iterflow.core.denormals import flush_denormals
from iterflow.errors import check_positive, fail
from iterflow.io import load_json, load_tensors, read_jsonl, save_json, save_tensors
from iterflow.methods.base import Loss

#: ``draw(generator, batch_size) -> batch``, or the tensors whose rows minibatches are drawn from.
BatchSource = tuple[Tensor, ...] | Callable[[torch.Generator, int], tuple[Tensor, ...]]


@dataclass(frozen=True)
class OptimConfig:
    """Settings of one run of the loop.

    Attributes:
        steps: optimiser steps.
        batch_size: rows per minibatch (the global batch under data parallelism; capped at the data).
        lr: peak learning rate; weight_decay: AdamW's decoupled decay (0: Adam).
        lr_schedule: ``cosine`` (linear warm-up over ``warmup`` steps, default
            ``min(100, steps // 10)``, then a cosine decay to 5% of ``lr``) or ``constant``.
        grad_clip: maximal global gradient norm (0: no clipping).
        ema: decay of the weights' exponential moving average (0: none); the trained module ends
            holding the average.
        checkpoint_every, log_every: steps between in-stage checkpoints / log lines.
        time_budget: at most this many seconds of optimisation (the record's
            ``seconds_optimize``; 0: none, ``steps`` steps). At the end of the warm-up (step
            ``min(100, steps // 10)``, at least 2) the loop times the second half of the warm-up
            and fixes the step count ``N <= steps`` that fits the remaining seconds at that rate;
            the schedule then decays over ``N`` steps (``steps`` is the cap). ``N`` is saved with
            the in-stage checkpoints, so a run resumed after the plan takes the same steps as one
            not interrupted; under data parallelism the ranks take the mean of their counts. If
            the steps turn out slower than timed, the stage ends where the seconds are spent
            (its learning rate then short of the schedule's end). The record's ``steps`` are the
            steps taken.
    """

    steps: int
    batch_size: int
    lr: float
    lr_schedule: str = "cosine"
    warmup: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.0
    checkpoint_every: int = 500
    log_every: int = 50
    time_budget: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            check_positive(getattr(self, name), name, integer=True)
        check_positive(self.lr, "lr")
        check_positive(self.time_budget, "time_budget", allow_zero=True)
        if math.isinf(self.time_budget):
            fail("time_budget", "must be a finite number of seconds (0: none)", self.time_budget)
        if self.warmup is not None:
            check_positive(self.warmup, "warmup", integer=True, allow_zero=True)
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_positive(self.grad_clip, "grad_clip", allow_zero=True)
        if not 0.0 <= self.ema < 1.0:
            fail("ema", "must be in [0, 1)", self.ema)
        if self.lr_schedule not in ("cosine", "constant"):
            fail("lr_schedule", "must be 'cosine' or 'constant'", self.lr_schedule)

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` (0-based)."""
        if self.lr_schedule == "constant":
            return self.lr
        return cosine_lr(self.lr, step, self.steps, self.warmup)

    @property
    def plan_step(self) -> int:
        """The step at which a :attr:`time_budget` fixes the step count: the end of the default
        warm-up, ``min(100, steps // 10)``, and at least 2 (one step timed)."""
        return max(2, min(100, self.steps // 10))

    def planned(self, steps: int) -> OptimConfig:
        """These settings with the step count a :attr:`time_budget` fixed (``steps``): the same
        warm-up as before the plan, no budget left to plan."""
        warm = min(100, self.steps // 10) if self.warmup is None else self.warmup
        return dataclasses.replace(self, steps=steps, warmup=warm, time_budget=0.0)


def cosine_lr(lr: float, step: int, steps: int, warmup: int | None = None) -> float:
    """The library's learning-rate schedule at ``step`` (0-based) of ``steps``: a linear warm-up
    over ``warmup`` steps (default ``min(100, steps // 10)``; 0: none), then a cosine decay from
    ``lr`` to ``0.05 lr``.

    Example:
        >>> round(cosine_lr(1.0, 0, 1000), 4), round(cosine_lr(1.0, 999, 1000), 4)
        (0.01, 0.05)
    """
    warm = min(100, steps // 10) if warmup is None else warmup
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


class Reporter(Protocol):
    """Receives progress; the CLI shows it with rich, the library default is silent.

    A reporter may also define ``stage_planned(total_steps)``: the loop calls it when a
    :attr:`OptimConfig.time_budget` has fixed the stage's step count (``stage_start`` was given the
    cap, ``steps``)."""

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None: ...
    def step(self, step: int, terms: dict[str, float]) -> None: ...
    def stage_end(self, record: dict[str, Any]) -> None: ...


def report_planned(reporter: Reporter, total_steps: int) -> None:
    """Tell ``reporter`` the step count a time budget fixed, if it has the optional
    ``stage_planned`` (see :class:`Reporter`)."""
    stage_planned = getattr(reporter, "stage_planned", None)
    if callable(stage_planned):
        stage_planned(total_steps)


class SilentReporter:
    """The library's default :class:`Reporter`: shows nothing."""

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, step: int, terms: dict[str, float]) -> None:
        pass

    def stage_end(self, record: dict[str, Any]) -> None:
        pass


class StepBudget:
    """Testing aid: raise ``KeyboardInterrupt`` after ``steps`` optimiser steps (``None``: never),
    shared by every run of the loop of one call (simulates an interruption after a checkpoint)."""

    def __init__(self, steps: int | None) -> None:
        self.left = steps

    def take(self) -> None:
        if self.left is None:
            return
        if self.left <= 0:
            raise KeyboardInterrupt("stop_after_steps reached")
        self.left -= 1


class Checkpoint:
    """Where one run of the loop keeps its in-stage progress: ``progress.safetensors`` and
    ``progress.json`` in ``folder``, tagged with ``key`` (a progress file of another key is ignored).

    ``log`` (optional) is the folder's ``log.jsonl``: rows are appended at each checkpoint, and rows
    written after the checkpoint a run resumes from are dropped.

    ``environment`` names what besides the saved state decides the steps that follow (PyTorch's
    version is always added; :meth:`iterflow.methods.Method.environment` adds a method's own, such
    as the OT pairing's implementation). It is saved with each checkpoint; a run resumed where it
    differs continues correctly but not bit for bit as the interrupted run would have, and
    :meth:`load` says so with a :class:`ResumeWarning`.
    """

    def __init__(
        self,
        folder: str | Path,
        key: str | int,
        *,
        write: bool = True,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.key = key
        self.write = write  # False on the non-main ranks of a data-parallel job
        self.environment = run_environment(environment)
        self.tensors = self.folder / "progress.safetensors"
        self.meta = self.folder / "progress.json"
        self.log = self.folder / "log.jsonl"

    def clear(self) -> None:
        """Remove the progress files (after the stage's results are committed)."""
        if self.write:
            for p in (self.tensors, self.meta):
                p.unlink(missing_ok=True)

    def append_log(self, rows: list[dict[str, Any]]) -> None:
        if self.write and rows:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a") as fh:
                for r in rows:
                    fh.write(json.dumps(r) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """The rows of ``log.jsonl`` (a line cut short by a kill is skipped)."""
        return read_jsonl(self.log)

    def _trim_log(self, step: int) -> list[dict[str, Any]]:
        """Drop this key's rows after ``step``; return this key's rows kept."""
        rows = self.read_log()
        keep = [r for r in rows if r.get("stage") != self.key or r.get("step", 0) <= step]
        if self.write and self.log.exists() and len(keep) != len(rows):
            self.log.write_text("".join(json.dumps(r) + "\n" for r in keep))
        return [r for r in keep if r.get("stage") == self.key]

    def save(self, state: _LoopState, seconds: float) -> None:
        if not self.write:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {f"param.{i}": p for i, p in enumerate(state.params)}
        if state.ema is not None:
            tensors.update({f"ema.{i}": e for i, e in enumerate(state.ema)})
        opt = state.opt.state_dict()
        for pi, st in opt["state"].items():
            for key, v in st.items():
                tensors[f"opt.{pi}.{key}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        tensors["generator"] = state.gen.get_state()
        save_tensors(self.tensors, tensors)
        save_json(
            self.meta,
            {"stage": self.key, "step": state.step, "seconds": seconds,
             "param_groups": opt["param_groups"], "environment": self.environment,
             "planned_steps": state.planned},
        )  # fmt: skip

    def load(self, state: _LoopState) -> tuple[int, float]:
        """Restore ``state`` from the progress files of this key: ``(step, seconds)``; ``(0, 0)``
        when there are none."""
        if not self.meta.exists():
            return 0, 0.0
        pm = load_json(self.meta, "out")
        if not isinstance(pm, dict) or pm.get("stage") != self.key:
            return 0, 0.0
        device = state.params[0].device if state.params else "cpu"
        t = load_tensors(self.tensors, "out", device)
        with torch.no_grad():
            for i, p in enumerate(state.params):
                if t.get(f"param.{i}") is None or t[f"param.{i}"].shape != p.shape:
                    fail("out", "progress.safetensors must match the parameters", str(self.folder))
                p.copy_(t[f"param.{i}"])
            if state.ema is not None:
                for i, e in enumerate(state.ema):
                    e.copy_(t[f"ema.{i}"])
        opt: dict[str, Any] = {"state": {}, "param_groups": pm["param_groups"]}
        for key, v in t.items():
            if key.startswith("opt."):
                _, pi, name = key.split(".", 2)
                opt["state"].setdefault(int(pi), {})[name] = v
        state.opt.load_state_dict(opt)
        state.gen.set_state(t["generator"].cpu())
        planned = pm.get("planned_steps")
        state.planned = planned if isinstance(planned, int) and planned > 0 else None
        step = int(pm["step"])
        if self.write:  # one warning, from the process that writes (rank 0 of a data-parallel job)
            warn_environment(
                pm.get("environment"), self.environment, f"step {step} of stage {self.key}"
            )
        return step, float(pm.get("seconds", 0.0))


class ResumeWarning(UserWarning):
    """A run resumes where something that decides its steps differs from where it was saved (a
    checkpoint, or a run folder's finished stages): it continues correctly, not bit for bit."""


def run_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What besides the saved state decides a run's steps: PyTorch's version and ``extra`` (a
    method's own, :meth:`iterflow.methods.Method.environment`)."""
    return {"torch": torch.__version__, **(extra or {})}


def warn_environment(saved: Any, now: dict[str, str], where: str) -> None:
    """Warn (:class:`ResumeWarning`) when a run resumed at ``where`` was saved in another
    ``environment`` (:func:`run_environment`); a record without one (an older folder) is taken as
    the same."""
    if not isinstance(saved, dict):
        return
    changed = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
    if changed:
        what = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in sorted(changed.items()))
        warnings.warn(
            f"resuming from {where}, saved with another environment ({what}): the run continues "
            "correctly, but not bit for bit as it would have where it was saved",
            ResumeWarning,
            stacklevel=3,
        )


@dataclass
class _LoopState:
    params: list[Tensor]
    ema: list[Tensor] | None
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int = 0
    planned: int | None = None  # the step count a time budget fixed (None: not yet, or no budget)


def make_optimizer(
    groups: Sequence[dict[str, Any]], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay), with the fused kernel where PyTorch has one: on the CPU it
    runs the whole update in one call instead of ~10 foreach kernels (about 3x less step time)."""
    params = [p for g in groups for p in g["params"]]
    opt_cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )
    return opt_cls(list(groups), lr=lr, weight_decay=weight_decay, fused=fused or None)


_ADAM_STATE_ORDER = ("exp_avg", "exp_avg_sq", "step")
_ADAM_STATE = frozenset(_ADAM_STATE_ORDER)


class AdamStep:
    """``opt.step()`` of the loop's fused Adam/AdamW, without the per-step bookkeeping around the
    kernel.

    ``torch.optim.Adam.step`` gathers each group's state into fresh lists (``_init_group``), opens a
    profiler range and runs the step hooks before it calls the functional
    ``torch.optim.adam.adam``. The loop's parameters, their state tensors and the (absent) hooks do
    not change between steps, so once every parameter has its state this calls that same function
    with lists gathered once, and the same hyper-parameters from ``param_groups`` (a changed
    learning rate included): the update is the same kernel's, bit for bit (``tests/test_loop.py``).
    It takes ``opt.step()`` itself for the first step (which creates the state), in a step where a
    parameter has no gradient, after ``load_state_dict`` replaced the state tensors (until the lists
    are gathered again), and for any other optimiser or setting (``foreach``, ``amsgrad``,
    ``maximize``, complex parameters, hooks, a PyTorch whose Adam lacks ``decoupled_weight_decay``).
    ``benchmarks/bench_step_parts.py`` (the demo's 3 x 256 MLP, two threads): ``opt.step()`` 254
    µs, this 185 µs, the fused kernel and the step counters alone 122 µs
    (``results/step_parts_t2.md``); ``benchmarks/compare_revisions.py`` measures the training step
    (``results/revisions_adamstep_t2.md``).
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        from torch.optim import optimizer as optim_module
        from torch.optim.adam import adam

        self.opt, self._adam = opt, adam
        # the step hooks opt.step() would run: PyTorch's global registries and the optimiser's own
        # (dicts filled in place by their registration); a PyTorch without them takes opt.step()
        self._hooks = tuple(
            getattr(owner, name, None)
            for owner, name in (
                (optim_module, "_global_optimizer_pre_hooks"),
                (optim_module, "_global_optimizer_post_hooks"),
                (opt, "_optimizer_step_pre_hooks"),
                (opt, "_optimizer_step_post_hooks"),
            )
        )
        groups = opt.param_groups
        self.direct = (
            all(isinstance(h, dict) for h in self._hooks)
            and type(opt) in (torch.optim.Adam, torch.optim.AdamW)
            and all(
                g.get("fused") and "decoupled_weight_decay" in g
                and not (g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"])
                for g in groups
            )
            and not any(torch.is_complex(p) for g in groups for p in g["params"])
        )  # fmt: skip
        self._lists: list[tuple[list[Tensor], ...]] | None = None

    def _state_lists(self) -> list[tuple[list[Tensor], ...]] | None:
        """Per group: the state tensors ``(exp_avg, exp_avg_sq, step)`` lists (``None``: not all
        there yet). Kept while the first parameter's ``exp_avg`` is still the same tensor."""
        state = self.opt.state
        first = self.opt.param_groups[0]["params"][0]
        if self._lists is not None and state.get(first, {}).get("exp_avg") is self._lists[0][0][0]:
            return self._lists
        lists = []
        for g in self.opt.param_groups:
            st = [state.get(p, {}) for p in g["params"]]
            if any(not _ADAM_STATE <= s.keys() for s in st):
                return None
            lists.append(tuple([s[k] for s in st] for k in _ADAM_STATE_ORDER))
        self._lists = lists
        return lists

    def __call__(self) -> None:
        opt = self.opt
        lists = self._state_lists() if self.direct else None
        if (
            lists is None
            or any(self._hooks)
            or any(p.grad is None for g in opt.param_groups for p in g["params"])
        ):  # fmt: skip
            opt.step()
            return
        with torch.no_grad():
            for g, (exp_avgs, exp_avg_sqs, steps) in zip(opt.param_groups, lists):
                beta1, beta2 = g["betas"]
                self._adam(
                    g["params"],
                    [p.grad for p in g["params"]],
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    fused=True,
                    grad_scale=getattr(opt, "grad_scale", None),
                    found_inf=getattr(opt, "found_inf", None),
                    decoupled_weight_decay=g["decoupled_weight_decay"],
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=g["lr"],
                    weight_decay=g["weight_decay"],
                    eps=g["eps"],
                    maximize=False,
                )


def _average_gradients(params: list[Tensor], ctx: ddp.DistContext | None) -> None:
    """Average the gradients over the ranks of a data-parallel job (one flattened all-reduce)."""
    if ctx is None:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


#: The loop's clock (seconds): the time budget's rate and the records' ``seconds_optimize``. Tests
#: replace it to plan a budget deterministically.
_clock: Callable[[], float] = time.perf_counter


class _BudgetPlan:
    """Fixes a :attr:`OptimConfig.time_budget`'s step count: times the steps from half-way
    through the warm-up (or from where a resumed run starts, if later) to
    :attr:`OptimConfig.plan_step`, then counts the steps the remaining seconds allow at that rate.

    ``start`` / ``seconds``: the step the loop starts from and the seconds spent before it."""

    def __init__(
        self, config: OptimConfig, start: int, seconds: float, device: torch.device
    ) -> None:
        self.config, self.device = config, device
        # A run resumed past the plan step without a plan (no checkpoint of this loop is: the
        # plan is fixed before the checkpoint of its step) times one step.
        self.plan = max(config.plan_step, start + 1)
        self.mark_step = max(start, self.plan // 2)
        self.mark = seconds if self.mark_step == start else None

    def after(
        self, done: int, elapsed_now: Callable[[], float], ctx: ddp.DistContext | None
    ) -> int | None:
        """Called after each step with the steps ``done`` and the stage's clock (``elapsed_now()``:
        its seconds so far): the step count when this is the plan step, else ``None``."""
        if done not in (self.mark_step, self.plan):
            return None
        if self.device.type == "cuda":  # the kernels queued so far are part of the time
            torch.cuda.synchronize(self.device)
        elapsed = elapsed_now()
        if done == self.mark_step:
            self.mark = elapsed
            return None
        assert self.mark is not None  # mark_step < plan: the mark was taken
        cap = self.config.steps
        per_step = max(elapsed - self.mark, 1e-9) / (done - self.mark_step)
        steps = min(float(cap), done + max(0.0, self.config.time_budget - elapsed) / per_step)
        mean = ddp.all_reduce_mean({"steps": steps}, ctx)["steps"]  # one count on every rank
        return max(done, min(cap, int(mean)))


def optimize(
    module: nn.Module,
    loss_fn: Callable[[tuple[Tensor, ...], torch.Generator], Loss],
    data: BatchSource,
    config: OptimConfig,
    *,
    generator: torch.Generator,
    checkpoint: Checkpoint | None = None,
    reporter: Reporter | None = None,
    ctx: ddp.DistContext | None = None,
    autocast: torch.dtype | None = None,
    lr_scales: dict[str, float] | None = None,
    stage: int = 0,
    n_stages: int = 1,
    budget: StepBudget | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``module``'s parameters on ``loss_fn`` in place (they end as their EMA); return the record.

    Arguments:
        module: owns every trainable parameter (``requires_grad``) the loss reaches.
        loss_fn: ``loss_fn(batch, generator) -> Loss`` with per-row values of this rank's rows.
        data: tensors whose rows are sampled (uniformly, with replacement; all of equal length), or a
            function ``draw(generator, batch_size)`` returning a minibatch (its ``close()``, if it
            has one, is called when the loop ends, also on an error or an interruption).
        config: the optimisation settings.
        generator: every random draw of the loop and of ``loss_fn`` (its state is checkpointed).
        checkpoint: in-stage checkpoints and resumption (``None``: none).
        reporter: progress (default: silent). ``stage`` / ``n_stages`` are passed to it and tag
            the log rows.
        ctx: the data-parallel context (``None``: one process).
        autocast: dtype of ``torch.autocast`` around ``loss_fn`` (``None``: full precision).
        lr_scales: learning-rate factor per named parameter prefix (e.g. ``{"critic.": 2.0}``);
            other parameters get 1.
        budget: testing aid (see :class:`StepBudget`).
        on_start: called once with the step training starts from (0, or the step of the
            checkpoint it resumes from), so that an objective with its own step-dependent state
            (e.g. a pool of pairs regenerated every k steps) can restore it.

    Returns:
        ``steps`` (the steps taken; with a time budget also ``time_budget`` and
        ``planned_steps``, the count fixed at the end of the warm-up, ``None`` if the budget was
        spent before),
        ``seconds_optimize`` (including ``seconds_before_resume``, the optimisation time
        spent before an interruption this run resumed from), ``autocast``,
        ``world_size``, ``mean_<term>`` over the logged steps of this run and ``final_<term>``.
    """
    reporter = reporter or SilentReporter()
    budget = budget or StepBudget(None)
    budget_seconds = config.time_budget
    tune_cpu_allocator()  # with ITERFLOW_MALLOC_TUNING=1: freed memory stays in the process
    flush_denormals()  # subnormals to zero (iterflow.core.denormals; env ITERFLOW_FLUSH_DENORMALS=0: off)
    named: list[tuple[str, Tensor]] = [
        (n, p) for n, p in module.named_parameters() if p.requires_grad
    ]
    if not named:
        fail("module", "must have trainable parameters", type(module).__name__)
    params = [p for _, p in named]
    groups = _param_groups(named, lr_scales or {})
    opt = make_optimizer(groups, config.lr, config.weight_decay)
    opt_step = AdamStep(opt)
    scales = [g.get("lr_scale", 1.0) for g in opt.param_groups]
    ema = [p.detach().clone() for p in params] if config.ema > 0 else None
    live = [p.detach() for p in params]
    state = _LoopState(params, ema, opt, generator)
    draw = _drawer(data, config.batch_size)
    start, seconds = checkpoint.load(state) if checkpoint is not None else (0, 0.0)
    budget_plan = None
    if config.time_budget > 0 and state.planned is not None:  # resumed after the plan
        config = config.planned(state.planned)
    elif config.time_budget > 0:
        budget_plan = _BudgetPlan(config, start, seconds, params[0].device)
    acc: dict[str, float] = {}
    acc_n = 0
    if checkpoint is not None:
        for r in checkpoint._trim_log(start):  # the stage's means count rows before the kill too
            acc_n += _accumulate(acc, r)
    if on_start is not None:
        on_start(start)
    reporter.stage_start(stage, n_stages, config.steps, start)
    tag = checkpoint.key if checkpoint is not None else stage  # log rows' "stage"
    was_training = module.training
    module.train()
    amp = torch.autocast(
        _device_type(params[0]), dtype=autocast or torch.bfloat16, enabled=autocast is not None
    )
    log_rows: list[dict[str, Any]] = []
    try:
        t0 = _clock()

        def elapsed_now() -> float:  # the stage's optimisation seconds so far
            return seconds + _clock() - t0

        step = start
        while step < config.steps:
            budget.take()
            lr = config.lr_at(step)
            for g, s in zip(opt.param_groups, scales):
                g["lr"] = lr * s
            batch = draw(generator)
            with ddp.sharding(ctx), amp:
                loss = loss_fn(batch, generator)
            for p in params:  # opt.zero_grad(set_to_none=True) without its profiler range
                p.grad = None
            loss.value(ctx).backward()
            _average_gradients(params, ctx)
            if config.grad_clip > 0:
                clip_gradients(params, config.grad_clip)
            opt_step()
            if ema is not None:
                torch._foreach_lerp_(ema, live, 1 - min(config.ema, (1 + step) / (10 + step)))
            if budget_seconds > 0:
                planned = budget_plan.after(step + 1, elapsed_now, ctx) if budget_plan else None
                if planned is not None:
                    config, state.planned, budget_plan = config.planned(planned), planned, None
                    report_planned(reporter, planned)
                spent = {"spent": float(elapsed_now() >= budget_seconds)}
                if step + 1 < config.steps and ddp.all_reduce_mean(spent, ctx)["spent"] > 0:
                    # slower than planned (on any rank): this step is the stage's last
                    config, budget_plan = config.planned(step + 1), None
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                terms = ddp.all_reduce_mean(_terms(loss, ctx), ctx)
                if not math.isfinite(terms["loss"]):
                    raise FloatingPointError(
                        f"loss became {terms['loss']} at stage {stage} step {step + 1}; "
                        "lower the learning rate (lr) or check the data"
                    )
                row = {"stage": tag, "step": step + 1, "lr": lr, **terms}
                log_rows.append(row)
                acc_n += _accumulate(acc, row)
                reporter.step(step + 1, terms)
            if (
                checkpoint is not None
                and (step + 1) % config.checkpoint_every == 0
                and (step + 1 < config.steps)
            ):
                checkpoint.append_log(log_rows)
                log_rows = []
                state.step = step + 1
                checkpoint.save(state, elapsed_now())
            step += 1
    finally:
        close = getattr(data, "close", None)  # a batch source with a worker (CoupledBatches)
        if callable(close):
            close()
    if checkpoint is not None:
        checkpoint.append_log(log_rows)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    module.train(was_training)
    last = log_rows[-1] if log_rows else {}
    budget_record = {"time_budget": budget_seconds, "planned_steps": state.planned}
    return {
        "steps": config.steps,
        **(budget_record if budget_seconds > 0 else {}),
        "seconds_optimize": elapsed_now(),
        "seconds_before_resume": seconds,
        "autocast": str(autocast).replace("torch.", "") if autocast is not None else "none",
        "world_size": ctx.world_size if ctx is not None else 1,
        **{f"mean_{k}": v / max(acc_n, 1) for k, v in acc.items()},
        **{f"final_{k}": v for k, v in last.items() if k not in ("stage", "step", "lr")},
    }


def clip_gradients(params: list[Tensor], max_norm: float) -> None:
    """Scale the gradients of ``params`` so that their global 2-norm is at most ``max_norm``.

    The rule and the arithmetic of ``torch.nn.utils.clip_grad_norm_`` (``torch._foreach_norm`` per
    tensor, the norm of the stacked norms, the factor ``max_norm / (norm + 1e-6)`` in the norm's
    dtype): the gradients come out bit for bit the same (``tests/test_loop.py``). On the CPU
    the factor is read on the host and the gradients are multiplied only when it is below 1 (or not
    a number); ``clip_grad_norm_`` multiplies every step by the factor clamped at 1, which spares a
    GPU a synchronisation but costs a CPU a multiplication of every gradient and the Python of its
    device grouping. Measured in the demo's training loop (3 x 256 MLP, batch 1,024, two threads;
    exploratory per-section timing, not a scripted figure): 0.36 ms a step with the library's
    function, 0.11-0.16 ms with this one; ``benchmarks/compare_revisions.py`` measures the
    step. Elsewhere (GPUs, sparse or mixed-dtype gradients) the library's function runs.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if len({g.dtype for g in grads}) > 1 or any(
        g.device.type != "cpu" or g.is_sparse for g in grads
    ):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    factor = max_norm / (total + 1e-6)
    if not bool(factor >= 1.0):  # NaN included: the library multiplies by it too
        torch._foreach_mul_(grads, factor)


def _param_groups(
    named: list[tuple[str, Tensor]], lr_scales: dict[str, float]
) -> list[dict[str, Any]]:
    """One optimiser group per learning-rate factor (parameters in module order)."""
    by_scale: dict[float, list[Tensor]] = {}
    for name, p in named:
        scale = next((s for prefix, s in lr_scales.items() if name.startswith(prefix)), 1.0)
        by_scale.setdefault(scale, []).append(p)
    return [{"params": ps, "lr_scale": s} for s, ps in by_scale.items()]


def _drawer(data: BatchSource, batch_size: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    if callable(data):
        return lambda gen: data(gen, batch_size)
    if not data or any(t.shape[0] != data[0].shape[0] for t in data):
        fail("data", "must be tensors with the same number of rows", [tuple(t.shape) for t in data])
    n = data[0].shape[0]
    if n == 0:
        fail("data", "must hold at least one row", 0)
    size = min(batch_size, n)
    device = data[0].device

    def draw(gen: torch.Generator) -> tuple[Tensor, ...]:
        idx = torch.randint(0, n, (size,), generator=gen, device=device)
        # index_select, not t[idx]: the same rows, 2.2x faster on the CPU for 1,024 rows of a
        # (100000, 2) set, 4.6x for 128 image rows (benchmarks/bench_step_parts.py)
        return tuple(torch.index_select(t, 0, idx) for t in data)

    return draw


def _terms(loss: Loss, ctx: ddp.DistContext | None) -> dict[str, float]:
    """The logged scalars: the loss and its named terms, each this rank's share of the global mean."""
    with torch.no_grad():
        out = {name: float(ddp.row_mean(v.detach().double(), loss.n, ctx))
               for name, v in loss.terms.items()}  # fmt: skip
        out["loss"] = float(loss.value(ctx).detach())
    return out


def _accumulate(acc: dict[str, float], row: dict[str, Any]) -> int:
    for name, v in row.items():
        if name not in ("stage", "step", "lr") and isinstance(v, (int, float)):
            acc[name] = acc.get(name, 0.0) + v
    return 1


def _device_type(p: Tensor) -> str:
    return p.device.type
