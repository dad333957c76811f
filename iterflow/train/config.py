"""The configuration of a training run (:class:`TrainConfig`) and the helpers that turn it into
devices, dtypes, seeds, normalisation and networks."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iterflow.core.coerce import coerce, coerce_fields, field_types, to_json_value
from iterflow.core.nn import NETWORKS, build_network
from iterflow.core.seeds import derived_seed
from iterflow.core.store import DTYPES
from iterflow.errors import check_positive, fail
from iterflow.methods import METHODS, Method, typed_options
from iterflow.train.loop import OptimConfig

AUTOCAST = ("auto", "none", "bf16")
# Config keys that may change on resume without changing the trained model (beyond rounding).
RUNTIME_KEYS = ("checkpoint_every", "log_every", "device", "compile")


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
        x_freqs, x_scale: random Fourier features of ``x`` in the MLP's first layer (their number,
            0 for none, and the standard deviation of their frequencies in cycles per standardised
            unit; :class:`~iterflow.core.nn.mlp.FourierInput`).
        warm_start: initialise block ``n`` from block ``n - 1`` (progressive methods).
        n_train, n_val, n_test: sizes of the splits (caps for file-backed data sets).
        standardize: affine normalisation recorded from the training data: ``dim`` (per-dimension mean
            and standard deviation), ``scalar`` (one mean and standard deviation for all entries),
            ``none``, or ``auto`` (``dim`` for vectors, ``scalar`` for images and other tensors).
        net_options: extra keyword arguments of non-MLP networks (e.g. U-Net widths), coerced by the
            network constructor's annotations (``{"channel_mult": "1,2"}`` -> ``[1, 2]``).
        seed: seeds data splits, initialisation and every random draw of training.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; dtype: ``float32`` or ``float64``.
        autocast: mixed precision of the training losses' forward passes: ``none``, ``bf16``
            (``torch.autocast`` to bfloat16; weights, optimiser and EMA stay in ``dtype``), or ``auto``
            (bf16 for ``float32`` runs of methods marked ``autocast_safe`` on CPUs with native bf16
            arithmetic, e.g. AVX512-BF16 or AMX, where it is ~2.5x faster; otherwise none).
        compile: run the velocity networks through ``torch.compile`` while training, their
            one-pass Jacobian terms included (:class:`~iterflow.core.nn.compiled.CompiledVelocity`).
            Compilation takes seconds (cached on disk for later runs); on the 2-core CPU it was
            measured on it pays off for CNF training (about 2.2x per step: many small operations,
            one network), not for flow matching (large matrix products), and for JKO-flow's short
            blocks compilation outweighed the gain in the runs measured (``bench_speed.py``).
        checkpoint_every: steps between in-stage checkpoints; log_every: steps between log lines.
        time_budget: seconds of optimisation per stage (per block for progressive methods), 0 for
            none: ``steps`` becomes the cap, and at the end of the warm-up the loop fixes the step
            count that fits the budget at the speed it measured
            (:attr:`~iterflow.train.loop.OptimConfig.time_budget`); the run's records give it
            (``meta.json``'s stages: ``steps`` taken, ``planned_steps``). When a stage took all
            its planned steps, ``--steps N --time-budget 0`` with ``N`` those steps repeats it
            step for step where the warm-up is the same (``N`` and the cap both >= 1,000); a stage
            the budget cut short stopped inside its schedule.
        options: method-specific options (see each method's ``Options``), e.g. ``{"gamma": 0.5}``.
            Only the keys given are kept (unset options take the method's defaults; the run's
            ``manifest.json`` records all of them), each coerced once to its typed value in JSON
            form: ``{"gamma": "0.5"}`` (the command line's ``-o gamma=0.5``) and ``{"gamma": 0.5}``
            are one configuration, with one :func:`config_hash`; tuples are stored as lists.
        img2d_dir: folder of the image-defined 2-D densities (``rose``, ``tree``).
        labels: condition the flow on the data set's class labels (labelled sets: ``moons``,
            ``8gaussians``, ``digits8``, ``fashion-mnist``, ``sklearn:iris``, ...; see
            :func:`iterflow.data.get_dataset`): the networks get ``num_classes`` classes and a null
            label, and ``log p(x | y)``, guided sampling and the generative classifier apply
            (:mod:`iterflow.core.guidance`, :mod:`iterflow.evaluation.conditional`).
        label_column: for a ``.csv`` / ``.npy`` data file: the column of class labels (an index,
            negative from the end, or a CSV header name); the other columns are the data. Implies
            ``labels``.
        label_dropout: probability that a training row's label is replaced by the null label
            (the unconditional field classifier-free guidance needs; Ho & Salimans 2022 use 0.1
            to 0.2). Only runs with labels use it.

    Every field is coerced by its annotation when the config is built (text from the command line,
    values from Python, JSON from ``config.json``), so equal configurations compare and hash equal.
    Errors name the field (``lr``, ``steps``) or the option (``option 'gamma'``).

    Example:
        >>> TrainConfig(method="jko", lr=1, hidden=[64], options={"gamma": "1"}).options
        {'gamma': 1.0}
        >>> config_hash(TrainConfig(lr=1)) == config_hash(TrainConfig(lr=1.0))
        True
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
    x_freqs: int = 0
    x_scale: float = 1.0
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
    time_budget: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    net_options: dict[str, Any] = field(default_factory=dict)
    img2d_dir: str | None = None
    labels: bool = False
    label_column: str = ""
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.standardize, bool):  # older configs: True/False
            object.__setattr__(self, "standardize", "auto" if self.standardize else "none")
        # Every field coerced once, by its annotation (values, not text: the command line parses its
        # flags): 1 and 1.0, [32] and (32,) are one configuration (one hash) from the command line,
        # from Python and from config.json. Method options may be text (-o gamma=0.5): see below.
        for name, annotation in field_types(TrainConfig).items():
            value = coerce(getattr(self, name), annotation, name, text=False)
            object.__setattr__(self, name, value)
        for name in ("blocks", "n_train", "n_val", "n_test"):
            check_positive(getattr(self, name), name, integer=True)
        check_positive(self.x_freqs, "x_freqs", integer=True, allow_zero=True)
        check_positive(self.x_scale, "x_scale")
        self.optim_config()  # the loop's settings are validated where they are defined
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {sorted(DTYPES)}", self.dtype)
        if self.autocast not in AUTOCAST:
            fail("autocast", f"must be one of {list(AUTOCAST)}", self.autocast)
        if self.autocast == "bf16" and self.dtype != "float32":
            fail("autocast", "bf16 needs dtype float32", self.autocast)
        if self.seed < 0:
            fail("seed", "must be a non-negative integer", self.seed)
        if not 0.0 <= self.label_dropout < 1.0:
            fail("label_dropout", "must be in [0, 1)", self.label_dropout)
        if self.label_column and not self.labels:
            object.__setattr__(self, "labels", True)
        if self.standardize not in ("auto", "dim", "scalar", "none"):
            fail("standardize", "must be 'auto', 'dim', 'scalar' or 'none'", self.standardize)
        # The method's options: the keys given, typed and validated (unset ones take the method's
        # defaults when training; the manifest records all of them).
        method = METHODS.get(self.method, "method")
        object.__setattr__(self, "options", typed_options(method, self.options))
        if self.network != "mlp" and self.network in NETWORKS and self.net_options:
            typed = coerce_fields(
                field_types(NETWORKS[self.network]),
                self.net_options,
                lambda key: f"net option {key!r}",
                name="net_options",
                owner=f" for network {self.network!r}",
            )
            object.__setattr__(self, "net_options", to_json_value(typed))

    @classmethod
    def for_method(cls, method: str = "fm", **given: Any) -> TrainConfig:
        """A config with ``method``'s recommended settings wherever ``given`` leaves a field unset.

        The recommendations are the method's :attr:`~iterflow.methods.base.Method.recommended`
        (e.g. JKO-flow: 5 blocks of 400 steps, width 128, the plain time input, ``gamma = 1``,
        Jacobian weight 0.02);
        ``None`` counts as unset; ``options`` are merged key by key, the given ones winning. The
        recommendations are tuned for vector data and the MLP: with another ``network`` (the image
        U-Net, a user's module) only their method options are used, less those in the method's
        ``mlp_options``. This is what ``iterflow train`` builds;
        ``TrainConfig(...)`` itself has one set of defaults for all methods.

        Example:
            >>> cfg = TrainConfig.for_method("jko", steps=100, options={"gamma": 0.5})
            >>> cfg.blocks, cfg.steps, cfg.time_freqs, cfg.options["gamma"], cfg.options["jacobian"]
            (5, 100, 0, 0.5, 0.02)
        """
        cls_method = METHODS.get(method, "method")
        rec = dict(cls_method.recommended)
        given = {k: v for k, v in given.items() if v is not None}
        if given.get("network", "mlp") != "mlp":  # tuned for vectors and the MLP: keep the options
            kept = rec.get("options", {}).items()
            rec = {"options": {k: v for k, v in kept if k not in cls_method.mlp_options}}
        options = {**rec.pop("options", {}), **given.pop("options", {})}
        return cls(method=method, **{**rec, **given, "options": options})

    def optim_config(self) -> OptimConfig:
        """The settings of the optimisation loop for one stage."""
        return OptimConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            ema=self.ema,
            checkpoint_every=self.checkpoint_every,
            log_every=self.log_every,
            time_budget=self.time_budget,
        )

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
        fail("device", "must be 'cpu', 'cuda', 'cuda:N' or 'auto'", name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail("device", "asks for CUDA but no CUDA device is available here", name)
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


def config_hash(cfg: TrainConfig) -> str:
    keep = cfg.to_json()
    for k in RUNTIME_KEYS:
        keep.pop(k)  # may change on resume without changing the result
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def stage_seed(seed: int, index: int, salt: int = 0) -> int:
    """Independent, reproducible seed per (run seed, stage, purpose)."""
    return derived_seed(seed, index, salt)


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


def build_velocity(
    cfg: TrainConfig, event_shape: tuple[int, ...], seed: int, num_classes: int = 0
) -> torch.nn.Module:
    """A fresh velocity network for one block, initialised from ``seed`` without touching global
    RNGs; label-conditional with ``num_classes > 0`` classes."""
    net_cfg = network_config(cfg, event_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(net_cfg)


def network_config(
    cfg: TrainConfig, event_shape: tuple[int, ...], num_classes: int = 0
) -> dict[str, Any]:
    """The ``config()`` of ``cfg``'s network for events of ``event_shape`` (with ``num_classes``
    classes when > 0)."""
    classes = {"num_classes": int(num_classes)} if num_classes > 0 else {}
    if cfg.network == "mlp":
        if len(event_shape) != 1:
            fail(
                "network",
                "mlp needs vector data of shape (n, d); use an image network for images",
                event_shape,
            )
        if cfg.net_options:
            fail(
                "net_options",
                "is only for non-MLP networks (use hidden, activation, ... for the MLP)",
                cfg.net_options,
            )
        return {
            "kind": "mlp",
            "dim": event_shape[0],
            "hidden": list(cfg.hidden),
            "activation": cfg.activation,
            "time_freqs": cfg.time_freqs,
            "zero_init": cfg.zero_init,
            **classes,
            **({"x_freqs": cfg.x_freqs, "x_scale": cfg.x_scale} if cfg.x_freqs > 0 else {}),
        }
    if cfg.x_freqs > 0:
        fail(
            "x_freqs",
            "is an option of the mlp network only (set 0 for other networks)",
            cfg.x_freqs,
        )
    return {"kind": cfg.network, "event_shape": list(event_shape), **cfg.net_options, **classes}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of ``cfg``'s stages at ``step`` (0-based)."""
    return cfg.optim_config().lr_at(step)
