r"""Bits per dimension of a flow on dequantized images.

An image ``x`` has ``D`` integer pixels in ``{0, ..., K-1}``. Uniform dequantization gives
``y = x + u`` in ``[0, K)^D`` (``u ~ U[0, 1)^D``), and the data set serves the scaled point
``s = low + step * y`` with ``step = (high - low) / K``
(:class:`iterflow.data.images.Quantization`).
The flow's ``log_prob`` is a density of ``s`` (its own standardisation ``u = (s - shift) / scale``
is already inside it). By the change of variables ``y -> s``, whose Jacobian is ``step`` in every
coordinate,

.. math::
    \log p_Y(y) = \log p_S(s) + D \log(\mathrm{step}),

and the bits per dimension are the NLL in the units of ``y`` (the dequantized ``[0, K)^D`` cube, in
which a grey level has width 1) divided by ``D ln 2``:

.. math::
    \mathrm{bpd} = \frac{-\log p_S(s) - D \log(\mathrm{step})}{D \ln 2}
                 = \frac{-\log p_S(s)}{D \ln 2} + \log_2 \frac{K}{\mathrm{high} - \mathrm{low}}.

For 8-bit images scaled to ``[0, 1]`` the correction is ``+ D log 256`` nats, i.e. ``+ 8`` bits per
dimension. Since the cell ``x + [0, 1)^D`` has unit volume, Jensen's inequality gives
``-log P(x) <= E_u[-log p_Y(x + u)]``: the bpd of the continuous model is an upper bound on the bpd
of the discrete model it defines (Theis, van den Oord, Bethge, arXiv 1511.01844). A model uniform on
``[low, high]^D`` scores exactly ``log2 K`` (8 bits for 8-bit images).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

from torch import Tensor

from iterflow.core.flow import Flow
from iterflow.core.nn.unet import UNet
from iterflow.core.ode import SolverSpec
from iterflow.data.images import Quantization
from iterflow.errors import check_positive, fail
from iterflow.evaluation.evaluate import nll_per_sample

__all__ = ["BitsPerDim", "bits_per_dim", "full_precision", "image_bits_per_dim"]


def bits_per_dim(nll_nats: float | Tensor, dim: int, quantization: Quantization) -> float | Tensor:
    """Bits per dimension of dequantized images from the NLL of the scaled continuous data.

    ``bpd = (nll + D log(K / (high - low))) / (D ln 2)`` (derivation in the module docstring).

    Arguments:
        nll_nats: ``-log p_S(s)`` in nats per image: a number or a tensor of per-image values
            (returned elementwise).
        dim: number of pixels ``D`` (``C * H * W``).
        quantization: grey levels and scaling of the data set.

    Returns:
        Bits per dimension (float, or a tensor shaped like ``nll_nats``).

    Example:
        >>> q = Quantization(256, 0.0, 1.0)  # the uniform model on [0, 1]^D has NLL 0
        >>> bits_per_dim(0.0, 10, q)  # ... and scores log2 K bits per pixel
        8.0
    """
    check_positive(dim, "dim", integer=True)
    return (nll_nats - quantization.log_jacobian(dim)) / (dim * math.log(2.0))


@dataclass(frozen=True)
class BitsPerDim:
    """Bits/dim of a flow on dequantized images.

    Attributes:
        bpd: mean bits per dimension; stderr: its standard error over images.
        nll_nats: mean NLL of the scaled data ``s`` (nats per image, before the correction).
        n: images; dim: pixels per image; nfe: velocity evaluations used.
        divergence, probes, solver, steps: how the log-likelihood was computed.
    """

    bpd: float
    stderr: float
    nll_nats: float
    n: int
    dim: int
    nfe: int
    divergence: str
    probes: int
    solver: str
    steps: int


@contextmanager
def full_precision(flow: Flow) -> Iterator[None]:
    """Run every :class:`~iterflow.core.nn.unet.UNet` of ``flow`` without mixed precision.

    Likelihoods integrate a divergence (a sum of ``D`` Jacobian entries estimated by
    vector-Jacobian products); bfloat16's 8-bit mantissa makes that sum too noisy, so bits/dim are
    computed in the flow's own dtype even for networks trained with ``autocast="bf16"``. The
    networks' settings are restored on exit.

    Arguments:
        flow: the flow whose U-Nets run in full precision inside the ``with`` block.
    """
    nets = [m for m in flow.modules() if isinstance(m, UNet)]
    saved = [n.autocast for n in nets]
    try:
        for n in nets:
            n.autocast = "none"
        yield
    finally:
        for n, a in zip(nets, saved, strict=True):
            n.autocast = a


def image_bits_per_dim(
    flow: Flow,
    x: Tensor,
    quantization: Quantization,
    *,
    solver: str = "dopri5",
    steps: int = 16,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    divergence: str = "hutchinson",
    probes: int = 1,
    seed: int = 0,
    chunk: int = 128,
) -> BitsPerDim:
    """Bits per dimension of ``flow`` on dequantized images ``x`` (data units).

    The NLL comes from :meth:`Flow.log_prob` (instantaneous change of variables; Hutchinson's
    estimator with ``probes`` Rademacher probes above 16 dimensions, unbiased for the log-density);
    then :func:`bits_per_dim` adds the scaling's log-Jacobian. U-Nets run in full precision here
    (:func:`full_precision`).

    Arguments:
        flow: trained flow on the scaled images.
        x: ``(n, C, H, W)`` dequantized test images in the data set's continuous units.
        quantization: the data set's :class:`~iterflow.data.images.Quantization`.
        solver, steps, atol, rtol: integration of the likelihood ODE.
        divergence, probes: ``"exact"``, ``"hutchinson"`` or ``"auto"``, and the probe count.
        seed: seeds the probes.
        chunk: images per batch.

    Returns:
        :class:`BitsPerDim`.
    """
    check_positive(chunk, "chunk", integer=True)
    if x.shape[0] < 1:
        fail("x", "must hold at least one image", tuple(x.shape))
    x = x.to(device=flow.shift.device, dtype=flow.shift.dtype)
    spec = SolverSpec(solver, steps, atol, rtol)
    with full_precision(flow):
        nll, nfe = nll_per_sample(
            flow, x, spec=spec, divergence=divergence, probes=probes, seed=seed, chunk=chunk
        )
    nll = nll.cpu()
    per_image = cast(Tensor, bits_per_dim(nll, flow.dim, quantization))  # (n,)
    stderr = float(per_image.std() / math.sqrt(len(nll))) if len(nll) > 1 else math.nan
    return BitsPerDim(
        bpd=float(per_image.mean()),
        stderr=stderr,
        nll_nats=float(nll.mean()),
        n=int(len(nll)),
        dim=flow.dim,
        nfe=nfe,
        divergence=divergence,
        probes=probes,
        solver=solver,
        steps=steps,
    )
