"""The one trainer: progressive (block after block) or end to end (one stage), with EMA, atomic
checkpoints, resumption and logs.

For stage ``k`` the trainer

1. builds the stage's blocks (warm-started from the previous block when the method trains one block
   per stage), seeded from ``(seed, k)`` so that a resumed run rebuilds the same chain;
2. optimises ``method.loss`` on minibatches of the particles that stages ``< k`` pushed (cached on disk,
   earlier blocks are never re-run), keeping an exponential moving average of the weights;
3. pushes the training and validation particles through the EMA blocks, logs the movement
   ``E|x_after - x_before|^2``, the time and the function evaluations, and
4. writes the blocks, the pushed particles and ``meta.json`` atomically (``meta.json`` last: it is the
   commit record). Every ``checkpoint_every`` steps inside a stage it also saves the optimiser, EMA and
   random-generator states, so that ``kill -9`` loses at most that many steps.

Run-folder layout: ``config.json``, ``meta.json``, ``blocks/block_XXX.safetensors``,
``normalization.safetensors``, ``particles.safetensors`` (cache), ``progress.*`` (inside a stage),
``log.jsonl``.

Speed: the hot loop samples minibatches by index from tensors prepared once per stage, runs the loss
under bf16 autocast where that is measured to keep results (``TrainConfig.autocast``), uses the fused
Adam kernel, and updates the EMA with one foreach call. Under ``torchrun`` the same function trains
data-parallel with DDP and gives the one-process model (:mod:`iterflow.distributed`): every rank
draws the global batch, computes its shard, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from iterflow._version import __version__
from iterflow.core import distributed as ddp
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import build_network
from iterflow.core.store import DTYPES, load_flow
from iterflow.data import Splits, get_dataset
from iterflow.errors import InputError, check_positive, fail
from iterflow.io import FORMAT_VERSION, RunDir, load_json, load_tensors, save_json, save_tensors
from iterflow.methods import METHODS, Method, parse_options

AUTOCAST = ("auto", "none", "bf16")
# Config keys that may change on resume without changing the trained model (beyond rounding).
_RUNTIME_KEYS = ("checkpoint_every", "log_every", "device", "compile")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run folder).

    Attributes:
        method: name in :data:`iterflow.methods.METHODS` (``fm``, ``cnf``, ``jko``, ``local-fm``, ...).
        data: data set name or file path (see :func:`iterflow.data.get_dataset`).
        blocks: number of blocks in the chain.
        steps: optimiser steps per stage (per block for progressive methods).
        batch_size, lr, weight_decay, grad_clip: optimisation (Adam/AdamW).
        lr_schedule: ``cosine`` (with linear warm-up, down to 5% of ``lr``) or ``constant``.
        ema: decay of the weights' exponential moving average (0 disables it).
        network: ``mlp`` (more network kinds may be registered in :data:`iterflow.nn.NETWORKS`).
        hidden, activation, time_freqs, zero_init: MLP architecture (per block).
        warm_start: initialise block ``n`` from block ``n - 1`` (progressive methods).
        n_train, n_val, n_test: sizes of the splits (caps for file-backed data sets).
        standardize: affine normalisation recorded from the training data: ``dim`` (per-dimension mean
            and standard deviation), ``scalar`` (one mean and standard deviation for all entries),
            ``none``, or ``auto`` (``dim`` for vectors, ``scalar`` for images and other tensors).
        net_options: extra keyword arguments of non-MLP networks (e.g. U-Net widths).
        seed: seeds data splits, initialisation and every random draw of training.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; dtype: ``float32`` or ``float64``.
        autocast: mixed precision of the training losses' forward passes: ``none``, ``bf16``
            (``torch.autocast`` to bfloat16; weights, optimiser and EMA stay in ``dtype``), or ``auto``
            (bf16 for ``float32`` runs of methods marked ``autocast_safe`` on CPUs with native bf16
            arithmetic, e.g. AVX512-BF16 or AMX, where it is ~2.5x faster; otherwise none).
        compile: run the velocity networks through ``torch.compile`` while training (slow to start;
            it did not pay off on the 2-core CPU this was measured on).
        checkpoint_every: steps between in-stage checkpoints; log_every: steps between log lines.
        options: method-specific options (see each method's ``Options``), e.g. ``{"gamma": 0.5}``.
        img2d_dir: folder of the image-defined 2-D densities (``rose``, ``tree``).
    """

    method: str = "fm"
    data: str = "checkerboard"
    blocks: int = 1
    steps: int = 6000
    batch_size: int = 1024
    lr: float = 4e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    network: str = "mlp"
    hidden: tuple[int, ...] = (256, 256, 256)
    activation: str = "silu"
    time_freqs: int = 4
    zero_init: bool = False
    warm_start: bool = True
    n_train: int = 200_000
    n_val: int = 2_000
    n_test: int = 5_000
    standardize: str = "auto"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    autocast: str = "auto"
    compile: bool = False
    checkpoint_every: int = 500
    log_every: int = 50
    options: dict[str, Any] = field(default_factory=dict)
    net_options: dict[str, Any] = field(default_factory=dict)
    img2d_dir: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "blocks",
            "steps",
            "batch_size",
            "n_train",
            "n_val",
            "n_test",
            "checkpoint_every",
            "log_every",
        ):
            check_positive(getattr(self, name), f"--{name.replace('_', '-')}", integer=True)
        check_positive(self.lr, "--lr")
        check_positive(self.weight_decay, "--weight-decay", allow_zero=True)
        check_positive(self.grad_clip, "--grad-clip", allow_zero=True)
        if not 0.0 <= self.ema < 1.0:
            fail("--ema", "must be in [0, 1)", self.ema)
        if self.lr_schedule not in ("cosine", "constant"):
            fail("--lr-schedule", "must be 'cosine' or 'constant'", self.lr_schedule)
        if self.dtype not in DTYPES:
            fail("--dtype", f"must be one of {sorted(DTYPES)}", self.dtype)
        if self.autocast not in AUTOCAST:
            fail("--autocast", f"must be one of {list(AUTOCAST)}", self.autocast)
        if self.autocast == "bf16" and self.dtype != "float32":
            fail("--autocast", "bf16 needs --dtype float32", self.autocast)
        if not isinstance(self.compile, bool):
            fail("--compile", "must be true or false", self.compile)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            fail("--seed", "must be a non-negative integer", self.seed)
        METHODS.get(self.method, "--method")
        if isinstance(self.standardize, bool):  # older configs: True/False
            object.__setattr__(self, "standardize", "auto" if self.standardize else "none")
        if self.standardize not in ("auto", "dim", "scalar", "none"):
            fail("--standardize", "must be 'auto', 'dim', 'scalar' or 'none'", self.standardize)

    @classmethod
    def for_method(cls, method: str = "fm", **given: Any) -> TrainConfig:
        """A config with ``method``'s recommended settings wherever ``given`` leaves a field unset.

        The recommendations are the method's :attr:`~iterflow.methods.base.Method.recommended`
        (e.g. JKO-flow: 5 blocks of 400 steps, width 128, ``gamma = 1``, Jacobian weight 0.2);
        ``None`` counts as unset; ``options`` are merged key by key, the given ones winning. The
        recommendations are tuned for vector data and the MLP: with another ``network`` (the image
        U-Net) only their method options are used. This is what ``iterflow train`` builds;
        ``TrainConfig(...)`` itself has one set of defaults for all methods.

        Example:
            >>> cfg = TrainConfig.for_method("jko", steps=100, options={"gamma": 0.5})
            >>> cfg.blocks, cfg.steps, cfg.options["gamma"], cfg.options["jacobian"]
            (5, 100, 0.5, 0.2)
        """
        rec = dict(METHODS.get(method, "--method").recommended)
        given = {k: v for k, v in given.items() if v is not None}
        if given.get("network", "mlp") != "mlp":  # tuned for vectors and the MLP: keep the options
            rec = {"options": rec.get("options", {})}
        options = {**rec.pop("options", {}), **given.pop("options", {})}
        return cls(method=method, **{**rec, **given, "options": options})

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            fail("config.json", f"keys must be among {sorted(known)}", unknown)
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; validates explicit names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        fail("--device", "must be 'cpu', 'cuda', 'cuda:N' or 'auto'", name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail("--device", "asks for CUDA but no CUDA device is available here", name)
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16; Linux ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def autocast_dtype(
    cfg: TrainConfig, method: Method, device: torch.device, dtype: torch.dtype
) -> torch.dtype | None:
    """The autocast dtype the losses run under (``None``: full precision), resolving ``auto``."""
    if cfg.autocast == "bf16":
        return torch.bfloat16
    if cfg.autocast == "none" or dtype != torch.float32:
        return None
    safe = getattr(method, "autocast_safe", False)
    return torch.bfloat16 if safe and device.type == "cpu" and cpu_has_native_bf16() else None


class Reporter(Protocol):
    """Receives progress; the CLI shows it with rich, the library default is silent."""

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None: ...
    def step(self, step: int, terms: dict[str, float]) -> None: ...
    def stage_end(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, step: int, terms: dict[str, float]) -> None:
        pass

    def stage_end(self, record: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    flow: Flow
    history: list[dict[str, Any]]
    run_dir: Path
    splits: Splits


def _config_hash(cfg: TrainConfig) -> str:
    keep = cfg.to_json()
    for k in _RUNTIME_KEYS:
        keep.pop(k)  # may change on resume without changing the result
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def stage_seed(seed: int, index: int, salt: int = 0) -> int:
    """Independent, reproducible seed per (run seed, stage, purpose)."""
    h = hashlib.sha256(f"{seed}/{index}/{salt}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def standardization(x: Tensor, mode: str = "auto") -> tuple[Tensor, Tensor]:
    """Shift and scale of the normalisation ``u = (x - shift) / scale`` for data ``x`` ``(n, *E)``.

    ``dim``: per-entry mean and standard deviation; ``scalar``: one mean and standard deviation over
    all entries (broadcast to ``E``); ``none``: identity; ``auto``: ``dim`` for vectors, ``scalar`` for
    higher-order tensors (images). Standard deviations are floored at 1e-6.
    """
    event = tuple(x.shape[1:])
    if mode == "auto":
        mode = "dim" if len(event) == 1 else "scalar"
    if mode == "none":
        return torch.zeros(event, dtype=x.dtype), torch.ones(event, dtype=x.dtype)
    if mode == "scalar":
        m, s = x.mean(), x.std().clamp_min(1e-6)
        return torch.full(event, float(m), dtype=x.dtype), torch.full(
            event, float(s), dtype=x.dtype
        )
    return x.mean(0), x.std(0).clamp_min(1e-6)


def build_velocity(cfg: TrainConfig, event_shape: tuple[int, ...], seed: int) -> torch.nn.Module:
    """A fresh velocity network for one block, initialised from ``seed`` without touching global RNGs."""
    net_cfg = network_config(cfg, event_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(net_cfg)


def network_config(cfg: TrainConfig, event_shape: tuple[int, ...]) -> dict[str, Any]:
    if cfg.network == "mlp":
        if len(event_shape) != 1:
            fail(
                "--network",
                "mlp needs vector data of shape (n, d); use an image network for images",
                event_shape,
            )
        if cfg.net_options:
            fail(
                "--net-option",
                "is only for non-MLP networks (use --hidden etc. for the MLP)",
                cfg.net_options,
            )
        return {
            "kind": "mlp",
            "dim": event_shape[0],
            "hidden": list(cfg.hidden),
            "activation": cfg.activation,
            "time_freqs": cfg.time_freqs,
            "zero_init": cfg.zero_init,
        }
    return {"kind": cfg.network, "event_shape": list(event_shape), **cfg.net_options}


def cosine_lr(lr: float, step: int, steps: int, warmup: int | None = None) -> float:
    """The library's learning-rate schedule at ``step`` (0-based) of ``steps``: a linear warm-up
    over ``warmup`` steps (default ``min(100, steps // 10)``; 0: none), then a cosine decay from
    ``lr`` to ``0.05 lr``."""
    warm = min(100, steps // 10) if warmup is None else warmup
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate at ``step`` (0-based) of a stage."""
    return cfg.lr if cfg.lr_schedule == "constant" else cosine_lr(cfg.lr, step, cfg.steps)


def _prepare_run_dir(
    run: RunDir, cfg: TrainConfig, resume: bool, ctx: ddp.DistContext | None = None
) -> dict[str, Any] | None:
    """Create the folder, or return the existing meta when resuming the same config.

    Under data-parallel training every rank validates the folder, then rank 0 alone creates it.
    """
    if run.config.exists():
        old = load_json(run.config, "--out")
        try:
            old_cfg = TrainConfig.from_json(old)
        except (TypeError, InputError) as e:
            fail("--out", f"holds a config.json this version cannot read ({e})", str(run.path))
        if _config_hash(old_cfg) != _config_hash(cfg):
            diff = {
                k: (old.get(k), v)
                for k, v in cfg.to_json().items()
                if old.get(k) != v and k not in _RUNTIME_KEYS
            }
            fail(
                "--out",
                f"already holds a run with another config {diff}; use a new folder",
                str(run.path),
            )
        if not resume:
            fail("--out", "already holds a run; resume it or choose a new folder", str(run.path))
        return load_json(run.meta, "--out") if run.meta.exists() else None
    if run.path.exists() and any(run.path.iterdir()):
        fail("--out", "must be a new or empty folder, or a run folder to resume", str(run.path))
    ddp.barrier(ctx)  # every rank has seen the folder before rank 0 writes into it
    if ctx is None or ctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_json(run.config, cfg.to_json())
    return None


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = True,
    reporter: Reporter | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train ``cfg.method`` into the run folder ``out`` (resuming it when it holds the same config).

    Arguments:
        cfg: the run's configuration.
        out: run folder.
        resume: continue an interrupted run with the same config (otherwise such a folder is an error).
        reporter: progress sink (default: silent).
        stop_after_steps: testing aid: raise ``KeyboardInterrupt`` after this many optimiser steps in
            this call (simulates an interruption after the last checkpoint).

    Returns:
        :class:`TrainResult` with the trained flow (data units) and the per-stage history.
    """
    reporter = reporter or SilentReporter()
    method_cls = METHODS.get(cfg.method, "--method")
    options = parse_options(method_cls, cfg.options)
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    ctx = ddp.setup(device)
    if ctx is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    main = ctx is None or ctx.is_main
    if not main:
        reporter = SilentReporter()
    dataset = get_dataset(cfg.data, img2d_dir=cfg.img2d_dir)
    splits = dataset.splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    train_x = splits.train.to(device=device, dtype=dtype)
    val_x = splits.val.to(device=device, dtype=dtype)
    event_shape = tuple(train_x.shape[1:])
    method = method_cls(options, event_shape=event_shape, num_blocks=cfg.blocks)
    amp = autocast_dtype(cfg, method, device, dtype)

    run = RunDir(out)
    meta = _prepare_run_dir(run, cfg, resume, ctx)
    shift, scale = (t.cpu() for t in standardization(train_x, cfg.standardize))
    if main:
        save_tensors(run.normalization, {"shift": shift, "scale": scale})
    norm = Flow([], event_shape, shift=shift.cpu(), scale=scale.cpu()).to(
        device=device, dtype=dtype
    )
    if meta is None:
        meta = {
            "format_version": FORMAT_VERSION,
            "iterflow_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config_hash": _config_hash(cfg),
            "data": dataset.describe(),
            "event_shape": list(event_shape),
            "networks": [],
            "stages_done": 0,
            "history": [],
            "train_seconds": 0.0,
        }
    stages = method.stages()
    blocks: list[Block] = []
    for i, net_cfg in enumerate(meta["networks"]):
        b = Block(build_network(net_cfg)).to(device=device, dtype=dtype)
        b.load_state_dict(load_tensors(run.block(i), "--out", device))
        blocks.append(b)
    done = meta["stages_done"]
    if done > 0:
        cache = load_tensors(run.particles, "--out", device)
        cur_train, cur_val = cache["train"].to(dtype), cache["val"].to(dtype)
    else:
        cur_train, cur_val = norm.normalize(train_x), norm.normalize(val_x)
    steps_budget = [stop_after_steps]
    for k in range(done, len(stages)):
        if meta["history"] and method.should_stop(meta["history"]):
            break
        t_stage = time.perf_counter()
        stage_blocks = _make_stage_blocks(cfg, stages[k], blocks, k, event_shape, device, dtype)
        stage = Flow(stage_blocks, event_shape).to(device=device, dtype=dtype)
        last = k == len(stages) - 1
        record = _optimize_stage(
            cfg, method, stage, cur_train, k, len(stages), run, reporter, steps_budget, ctx, amp
        )
        stage.eval()
        with stage.count_nfe() as c_val:
            new_val = _push(method, stage, cur_val, ctx)
        new_train = None if last else _push(method, stage, cur_train, ctx)
        record.update(
            {
                "stage": k,
                "blocks": stages[k],
                "movement": float((new_val - cur_val).pow(2).flatten(1).sum(1).mean()),
                "push_nfe": c_val.nfe,
                **method.stage_report(stage, cur_val, new_val, k),
            }
        )
        record["seconds"] = record["seconds_optimize"] + (
            time.perf_counter() - t_stage - record["seconds_optimize"]
        )
        blocks.extend(stage_blocks)
        meta["networks"].extend(_block_network_config(b) for b in stage_blocks)
        meta["stages_done"] = k + 1
        meta["history"].append(record)
        meta["train_seconds"] = float(meta["train_seconds"]) + record["seconds"]
        if main:  # commit: blocks, particles, then meta.json (the record that makes them count)
            for j, b in zip(stages[k], stage_blocks):
                save_tensors(run.block(j), b.state_dict())
            save_tensors(
                run.particles,
                {"train": (new_train if new_train is not None else cur_train[:0]), "val": new_val},
            )
            save_json(run.meta, meta)
            for p in (run.progress, run.progress_meta):
                p.unlink(missing_ok=True)
        ddp.barrier(ctx)  # no rank looks for the next stage's progress file before this commit
        reporter.stage_end(record)
        cur_val = new_val
        cur_train = new_train if new_train is not None else cur_train
    ddp.barrier(ctx)  # the run folder is complete before any rank returns
    flow = Flow(blocks, event_shape, shift=shift.cpu(), scale=scale.cpu()).to(
        device=device, dtype=dtype
    )
    flow.eval()
    return TrainResult(flow=flow, history=meta["history"], run_dir=run.path, splits=splits)


def _push(method: Method, stage: Flow, x: Tensor, ctx: ddp.DistContext | None) -> Tensor:
    """``method.push`` of the particles ``x``; under data parallelism each rank pushes its shard of
    rows and the shards are all-gathered (pushes are row by row: fixed-step solvers)."""
    if ctx is None:
        return method.push(stage, x)
    lo, hi = ctx.bounds(x.shape[0])
    return ddp.all_gather_rows(method.push(stage, x[lo:hi]), x.shape[0], ctx)


def _training_view(
    stage: Flow, cfg: TrainConfig, ctx: ddp.DistContext | None, device: torch.device
) -> Flow:
    """The stage as the optimiser drives it: each velocity network wrapped in DDP (data parallel)
    and/or ``torch.compile``. Shares its parameters with ``stage`` (which is what gets saved)."""
    if ctx is None and not cfg.compile:
        return stage
    blocks = []
    for b in stage.blocks:
        v: torch.nn.Module = b.velocity
        if ctx is not None and any(p.requires_grad for p in v.parameters()):
            v = ctx.wrap(v, device)
        if cfg.compile:
            v = torch.compile(v)  # type: ignore[assignment]
        blocks.append(Block(v))
    view = Flow(blocks, stage.event_shape, shift=stage.shift, scale=stage.scale)
    return view.to(device=stage.shift.device, dtype=stage.shift.dtype)


def _block_network_config(b: Block) -> dict[str, Any]:
    cfg = getattr(b.velocity, "config", None)
    if cfg is None:
        raise TypeError(f"velocity network {type(b.velocity).__name__} must define config()")
    return cfg()


def _make_stage_blocks(
    cfg: TrainConfig,
    indices: list[int],
    previous: list[Block],
    k: int,
    event_shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> list[Block]:
    out = []
    for j in indices:
        net = build_velocity(cfg, event_shape, stage_seed(cfg.seed, j, salt=1))
        if cfg.warm_start and previous and len(indices) == 1:
            try:
                net.load_state_dict(previous[-1].velocity.state_dict())
            except RuntimeError:
                pass  # architectures differ (e.g. a custom last block): keep the fresh init
        out.append(Block(net).to(device=device, dtype=dtype))
    return out


def _optimize_stage(
    cfg: TrainConfig,
    method: Method,
    stage: Flow,
    particles: Tensor,
    k: int,
    n_stages: int,
    run: RunDir,
    reporter: Reporter,
    budget: list[int | None],
    ctx: ddp.DistContext | None = None,
    amp: torch.dtype | None = None,
) -> dict[str, Any]:
    """Optimise one stage in place (its parameters end as their EMA) and return its record.

    Every rank draws the same global minibatch; under data parallelism the loss runs inside
    :func:`iterflow.distributed.sharding` and DDP averages the gradients (see
    :mod:`iterflow.distributed`). ``amp`` is the autocast dtype of the loss (``None``: none).
    """
    device = particles.device
    main = ctx is None or ctx.is_main
    gen = torch.Generator(device=device).manual_seed(stage_seed(cfg.seed, k, salt=2))
    data = method.stage_data(stage, particles, k, gen)
    n = data[0].shape[0]
    batch_size = min(cfg.batch_size, n)
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = _optimizer(cfg, params)
    ema = [p.detach().clone() for p in params] if cfg.ema > 0 else None
    live = [p.detach() for p in params]  # EMA sources, built once (not per step)
    start = 0
    seconds = 0.0
    acc: dict[str, float] = {}  # sums of the logged terms of this stage, for the record's means
    acc_n = 0
    if run.progress_meta.exists():
        start, seconds = _load_progress(run, k, params, ema, opt, gen, cfg)
        if main:  # the stage's means count the rows logged before the interruption too
            for r in run.trim_log(k, start):
                if r.get("stage") == k:
                    for name, v in r.items():
                        if name not in ("stage", "step", "lr"):
                            acc[name] = acc.get(name, 0.0) + v
                    acc_n += 1
    reporter.stage_start(k, n_stages, cfg.steps, start)
    view = _training_view(stage, cfg, ctx, device)
    view.train()
    autocast = torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
    log_rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        if budget[0] is not None:
            if budget[0] <= 0:
                raise KeyboardInterrupt("stop_after_steps reached")
            budget[0] -= 1
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (batch_size,), generator=gen, device=device)
        batch = tuple(t[idx] for t in data)
        with ddp.sharding(ctx), autocast:
            loss = method.loss(view, batch, k, gen)
        opt.zero_grad(set_to_none=True)
        loss.value.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, live, 1 - decay)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            terms = {name: float(v) for name, v in loss.terms.items()}
            terms["loss"] = float(loss.value.detach())
            terms = ddp.all_reduce_mean(terms, ctx)
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(
                    f"loss became {terms['loss']} at stage {k} step {step + 1}; lower --lr or check the data"
                )
            log_rows.append({"stage": k, "step": step + 1, "lr": lr, **terms})
            for name, v in terms.items():
                acc[name] = acc.get(name, 0.0) + v
            acc_n += 1
            reporter.step(step + 1, terms)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            if main:
                run.append_log(log_rows)
                _save_progress(
                    run, k, step + 1, params, ema, opt, gen, seconds + time.perf_counter() - t0
                )
            log_rows = []
    if main:
        run.append_log(log_rows)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    last_terms = {
        f"final_{k_}": v
        for k_, v in (log_rows[-1].items() if log_rows else [])
        if k_ not in ("stage", "step", "lr")
    }
    return {
        "steps": cfg.steps,
        "seconds_optimize": seconds + time.perf_counter() - t0,
        "autocast": str(amp).replace("torch.", "") if amp is not None else "none",
        "world_size": ctx.world_size if ctx is not None else 1,
        **{f"mean_{k_}": v / max(acc_n, 1) for k_, v in acc.items()},
        **last_terms,
    }


def _optimizer(cfg: TrainConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay), with the fused kernel where PyTorch has one: on the CPU it
    runs the whole update in one call instead of ~10 foreach kernels (about 3x less step time)."""
    opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )
    return opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _save_progress(
    run: RunDir,
    k: int,
    step: int,
    params: list[Tensor],
    ema: list[Tensor] | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    seconds: float,
) -> None:
    tensors: dict[str, Tensor] = {f"param.{i}": p for i, p in enumerate(params)}
    if ema is not None:
        tensors.update({f"ema.{i}": e for i, e in enumerate(ema)})
    state = opt.state_dict()
    for pi, st in state["state"].items():
        for key, v in st.items():
            tensors[f"opt.{pi}.{key}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    tensors["generator"] = gen.get_state()
    save_tensors(run.progress, tensors)
    save_json(
        run.progress_meta,
        {"stage": k, "step": step, "seconds": seconds, "param_groups": state["param_groups"]},
    )


def _load_progress(
    run: RunDir,
    k: int,
    params: list[Tensor],
    ema: list[Tensor] | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    cfg: TrainConfig,
) -> tuple[int, float]:
    pm = load_json(run.progress_meta, "--out")
    if pm.get("stage") != k:
        return 0, 0.0
    t = load_tensors(run.progress, "--out", params[0].device if params else "cpu")
    with torch.no_grad():
        for i, p in enumerate(params):
            if t[f"param.{i}"].shape != p.shape:
                fail(
                    "--out", "progress.safetensors must match the stage's parameters", str(run.path)
                )
            p.copy_(t[f"param.{i}"])
        if ema is not None:
            for i, e in enumerate(ema):
                e.copy_(t[f"ema.{i}"])
    state: dict[str, Any] = {"state": {}, "param_groups": pm["param_groups"]}
    for key, v in t.items():
        if key.startswith("opt."):
            _, pi, name = key.split(".", 2)
            state["state"].setdefault(int(pi), {})[name] = v
    opt.load_state_dict(state)
    gen.set_state(t["generator"].cpu())
    return int(pm["step"]), float(pm.get("seconds", 0.0))


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_run(path: str | Path, *, device: str = "cpu") -> tuple[Flow, TrainConfig, dict[str, Any]]:
    """Load a run folder: ``(flow, config, meta)``. Never unpickles; mismatches raise InputError."""
    run = RunDir(path)
    if not run.path.is_dir():
        fail("run", "must be an existing run folder", str(path))
    cfg = TrainConfig.from_json(load_json(run.config, "run"))
    meta = load_json(run.meta, "run")
    if not isinstance(meta, dict) or "networks" not in meta or "event_shape" not in meta:
        fail("run", "meta.json must hold 'networks' and 'event_shape'", str(run.meta))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        fail(
            "run",
            f"was written by a newer iterflow (format {meta.get('format_version')}); upgrade",
            str(path),
        )
    if not meta["networks"]:
        fail("run", "must hold at least one trained block (is training still running?)", str(path))
    flow = load_flow(
        run,
        meta["networks"],
        meta["event_shape"],
        dtype=DTYPES[cfg.dtype],
        device=resolve_device(device),
        source="meta.json",
    )
    return flow, cfg, meta
