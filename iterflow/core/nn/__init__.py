"""Networks: the velocity MLP (:mod:`.mlp`), the image U-Net (:mod:`.unet`) and the registry that
rebuilds either from its recorded ``config()`` (:data:`NETWORKS`, :func:`build_network`)."""

from __future__ import annotations

from torch import nn

from iterflow.core.nn.mlp import (
    ACTIVATIONS,
    FourierTime,
    MLPVelocity,
    stacked_linear,
    time_column,
)
from iterflow.core.nn.unet import UNet
from iterflow.errors import Registry, fail

NETWORKS: Registry[type[nn.Module]] = Registry("network")
NETWORKS.register("mlp", MLPVelocity)
NETWORKS.register("unet", UNet)


def build_network(config: dict) -> nn.Module:
    """Rebuild a velocity network from its :meth:`config` dict (no code is executed)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    cls = NETWORKS.get(kind, "network.kind")
    try:
        return cls(**cfg)
    except TypeError as e:
        fail("network config", f"must match the constructor of {cls.__name__} ({e})", config)


__all__ = [
    "ACTIVATIONS",
    "NETWORKS",
    "FourierTime",
    "MLPVelocity",
    "UNet",
    "build_network",
    "stacked_linear",
    "time_column",
]
