"""A small U-Net velocity network for images: ``model(x, t) -> (B, C, H, W)``.

The architecture follows the DDPM U-Net (Ho, Jain, Abbeel, arXiv 2006.11239; Ronneberger et al.,
arXiv 1505.04597) scaled down for CPU training of flow models on small images:

* sinusoidal embedding of the time ``t`` (Vaswani et al., arXiv 1706.03762), ``t`` scaled by
  ``time_scale`` first so that ``t`` in ``[0, 1]`` spans many periods, followed by a two-layer MLP;
* an optional class embedding added to the time embedding (conditional models; index
  ``num_classes`` means "no label", so one network can be trained with label dropout);
* residual blocks ``GroupNorm -> SiLU -> conv3x3 -> (+ embedding) -> GroupNorm -> SiLU -> conv3x3``
  with a 1x1 skip when the width changes;
* ``len(channel_mult)`` resolutions, ``num_res_blocks`` blocks per resolution, stride-2
  convolutions down and nearest-neighbour up-sampling (to the skip's exact size, so odd sizes such
  as 7x7 work), skip connections concatenated on the way up;
* the output convolution initialised to zero (``zero_init``): a fresh block is the identity map.

Shapes: ``x`` is ``(B, C, H, W)``; ``t`` is a 0-dim tensor (one time for the batch, as inside an
ODE solver), a ``(1,)`` or a ``(B,)`` tensor (one time per sample, as in flow-matching training).

Mixed precision: ``autocast="bf16"`` runs the body under :func:`torch.autocast` with bfloat16 on
the input's device type and returns the result in ``x``'s dtype (useful on GPUs; on CPU it is
usually slower). Keep it off for likelihood evaluation, where the divergence needs full precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from iterflow.errors import check_positive, fail

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """``[cos(t w_k), sin(t w_k)]`` with ``w_k = max_period^(-k / (dim/2))``, ``k = 0..dim/2-1``.

    Arguments:
        t: ``(B,)`` times (already scaled).
        dim: even embedding size.
        max_period: the longest period.

    Returns:
        ``(B, dim)`` embedding in ``t``'s dtype.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half).to(t.dtype)
    ang = t[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([ang.cos(), ang.sin()], dim=1)


def norm_groups(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` not above ``max_groups`` (GroupNorm needs a divisor)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """Residual block with the embedding added between the two convolutions."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(norm_groups(c_out, groups), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(
        self, x: Tensor, emb: Tensor
    ) -> Tensor:  # (B, c_in, H, W), (B, E) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """Time-conditioned (and optionally class-conditioned) U-Net velocity field for images.

    Arguments:
        event_shape: ``(C, H, W)`` of one image.
        channels: width of the first resolution.
        channel_mult: width multipliers, one per resolution (``(1, 2, 2)``: 3 resolutions).
        num_res_blocks: residual blocks per resolution on the way down (one more on the way up).
        groups: GroupNorm groups (the largest divisor of each width not above this).
        dropout: dropout inside residual blocks.
        num_classes: number of classes for class conditioning (0: unconditional).
        time_scale: ``t`` is multiplied by this before the sinusoidal embedding.
        zero_init: initialise the output convolution to zero (identity block at start).
        autocast: ``"none"``, ``"bf16"`` or ``"fp16"``: mixed precision for the body.

    Example:
        >>> net = UNet((1, 8, 8), channels=8, channel_mult=(1, 2))
        >>> net(torch.zeros(3, 1, 8, 8), torch.tensor(0.5)).shape
        torch.Size([3, 1, 8, 8])

    References:
        Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239;
        Ronneberger, Fischer, Brox, "U-Net", arXiv 1505.04597.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        groups: int = 8,
        dropout: float = 0.0,
        num_classes: int = 0,
        time_scale: float = 1000.0,
        zero_init: bool = True,
        autocast: str = "none",
    ) -> None:
        super().__init__()
        shape = tuple(event_shape)
        if len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
        ):
            fail(
                "event_shape",
                "must be (C, H, W) with positive integers (the U-Net is for images)",
                event_shape,
            )
        check_positive(channels, "channels", integer=True)
        if len(channel_mult) == 0:
            fail("channel_mult", "must list at least one multiplier", channel_mult)
        for m in channel_mult:
            check_positive(m, "channel_mult", integer=True)
        check_positive(num_res_blocks, "num_res_blocks", integer=True)
        check_positive(groups, "groups", integer=True)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            fail("dropout", "must be in [0, 1)", dropout)
        check_positive(num_classes, "num_classes", integer=True, allow_zero=True)
        check_positive(time_scale, "time_scale")
        if autocast not in AUTOCAST_DTYPES:
            fail("autocast", f"must be one of {sorted(AUTOCAST_DTYPES)}", autocast)
        self.event_shape = shape
        self.channels, self.channel_mult = channels, tuple(int(m) for m in channel_mult)
        self.num_res_blocks, self.groups, self.dropout = num_res_blocks, groups, float(dropout)
        self.num_classes, self.time_scale = num_classes, float(time_scale)
        self.zero_init, self.autocast = zero_init, autocast
        self._label: Tensor | None = None
        self._build()

    def _build(self) -> None:
        c_img, ch = self.event_shape[0], self.channels
        emb = 4 * ch
        self.time_dim = 2 * max(1, ch // 2)  # sinusoidal features come in (cos, sin) pairs
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(self.num_classes + 1, emb) if self.num_classes > 0 else None
        self.inp = nn.Conv2d(c_img, ch, 3, padding=1)
        widths = [ch * m for m in self.channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [ch], ch
        for i, w in enumerate(widths):
            for _ in range(self.num_res_blocks):
                self.down.append(ResBlock(c, w, emb, self.groups, self.dropout))
                c = w
                skips.append(c)
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb, self.groups, self.dropout) for _ in range(2)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(self.num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w, emb, self.groups, self.dropout))
                c = w
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm = nn.GroupNorm(norm_groups(c, self.groups), c)
        self.out = nn.Conv2d(c, c_img, 3, padding=1)
        if self.zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    # -- conditioning ----------------------------------------------------------------------------
    @contextmanager
    def condition(self, labels: Tensor | None) -> Iterator[None]:
        """Use ``labels`` (``(B,)`` long, or ``None`` for unconditional) when ``forward`` gets none.

        Lets a conditional network run inside code that calls ``model(x, t)`` only (ODE solvers,
        :meth:`iterflow.flow.Flow.sample`).

        Example:
            >>> net = UNet((1, 8, 8), channels=8, channel_mult=(1,), num_classes=10)
            >>> with net.condition(torch.arange(4)):
            ...     v = net(torch.zeros(4, 1, 8, 8), torch.tensor(0.3))
        """
        if self.num_classes == 0 and labels is not None:
            fail("labels", "need a network built with num_classes > 0", tuple(labels.shape))
        old, self._label = self._label, labels
        try:
            yield
        finally:
            self._label = old

    def _embedding(self, x: Tensor, t: Tensor | float, y: Tensor | None) -> Tensor:
        b = x.shape[0]
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        if tt.numel() not in (1, b):
            fail("t", f"must be a scalar or hold one time per sample ({b})", tuple(tt.shape))
        tt = tt.expand(b)
        emb = self.time_mlp(sinusoidal_embedding(tt * self.time_scale, self.time_dim))
        if self.label_emb is not None:
            y = self._label if y is None else y
            if y is None:
                y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            elif y.shape != (b,):
                fail("y", f"must hold one label per sample, shape ({b},)", tuple(y.shape))
            emb = emb + self.label_emb(y.to(device=x.device, dtype=torch.long))
        return emb

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Velocity at ``(x, t)``: ``(B, C, H, W)`` in ``x``'s dtype.

        Arguments:
            x: ``(B, C, H, W)`` images (model units).
            t: time, 0-dim, ``(1,)`` or ``(B,)``.
            y: ``(B,)`` class labels (conditional networks); ``num_classes`` means "no label".
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != self.event_shape:
            fail(
                "x", f"must have shape (B, {', '.join(map(str, self.event_shape))})", tuple(x.shape)
            )
        dtype = AUTOCAST_DTYPES[self.autocast]
        ctx = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            out = self._body(x, self._embedding(x, t, y))
        return out.to(x.dtype)

    def _body(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.inp(x)  # (B, ch, H, W)
        hs = [h]
        blocks, downs = iter(self.down), iter(self.downsample)
        for i in range(len(self.channel_mult)):
            for _ in range(self.num_res_blocks):
                h = next(blocks)(h, emb)
                hs.append(h)
            if i < len(self.channel_mult) - 1:
                h = next(downs)(h)  # (B, c, ceil(H/2), ceil(W/2))
                hs.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        blocks, ups = iter(self.up), iter(self.upsample)
        for i in reversed(range(len(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                skip = hs.pop()
                h = next(blocks)(torch.cat([h, skip], dim=1), emb)
            if i > 0:
                size = hs[-1].shape[-2:]  # the next skip's size (odd sizes round-trip exactly)
                h = next(ups)(F.interpolate(h, size=size, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (saved with checkpoints), with ``kind: unet``."""
        return {
            "kind": "unet",
            "event_shape": list(self.event_shape),
            "channels": self.channels,
            "channel_mult": list(self.channel_mult),
            "num_res_blocks": self.num_res_blocks,
            "groups": self.groups,
            "dropout": self.dropout,
            "num_classes": self.num_classes,
            "time_scale": self.time_scale,
            "zero_init": self.zero_init,
            "autocast": self.autocast,
        }
