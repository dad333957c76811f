"""Rebuilding trained flows from folders: the one loader of blocks and normalisation that every
folder kind (training runs, transport maps, worst-case maps) uses. Never unpickles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iterflow.core.flow import Block, Flow
from iterflow.core.nn import build_network
from iterflow.errors import fail
from iterflow.io import RunDir, check_format, load_json, load_tensors

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_flow(
    run: RunDir,
    networks: list[dict[str, Any]],
    event_shape: Any,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    source: str = "meta.json",
) -> Flow:
    """Rebuild a :class:`Flow` from a folder's ``blocks/block_XXX.safetensors`` (one per entry of
    ``networks``, the networks' configs) and ``normalization.safetensors``; evaluation mode.

    Used by every folder kind (training runs, transport maps, worst-case maps). Never unpickles; a
    block that does not match its network, or a normalisation of another shape, raises an error
    naming the file and ``source`` (the JSON file that recorded the networks).
    """
    blocks = []
    for i, net_cfg in enumerate(networks):
        b = Block(build_network(net_cfg)).to(dtype)  # load float64 weights without a float32 detour
        try:
            b.load_state_dict(load_tensors(run.block(i), "run"))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            fail(
                "run",
                f"{run.block(i).name} must match the network recorded in {source} ({first})",
                str(run.path),
            )
        blocks.append(b)
    norm = load_tensors(run.normalization, "run")
    shape = tuple(event_shape)
    if "shift" not in norm or "scale" not in norm or tuple(norm["shift"].shape) != shape:
        fail(
            "run",
            f"normalization.safetensors must hold shift/scale of shape {shape}",
            str(run.path),
        )
    flow = Flow(blocks, shape, shift=norm["shift"], scale=norm["scale"])
    return flow.to(device=device, dtype=dtype).eval()


def load_trained_flow(path: str | Path, *, device: str | torch.device = "cpu") -> Flow:
    """The flow of a training run folder (``config.json`` + ``meta.json`` + blocks), in the run's dtype.

    A light loader for code below the trainer (reflow and distillation load their source run with
    it); :func:`iterflow.train.load_run` also returns the config and meta.
    """
    run = RunDir(path)
    if not run.path.is_dir():
        fail("run", "must be an existing run folder", str(path))
    cfg = load_json(run.config, "run")
    meta = load_json(run.meta, "run")
    check_format(meta, "run", str(run.path))  # a newer iterflow's folder is refused
    if not isinstance(meta, dict) or not meta.get("networks") or "event_shape" not in meta:
        fail("run", "meta.json must hold trained 'networks' and 'event_shape'", str(run.meta))
    dtype = DTYPES.get(cfg.get("dtype", "float32")) if isinstance(cfg, dict) else None
    if dtype is None:
        fail("run", "config.json must name a dtype among float32/float64", str(run.config))
    return load_flow(run, meta["networks"], meta["event_shape"], dtype=dtype, device=device)
