"""Flush subnormal floats to zero, in the calling thread and in PyTorch's CPU worker threads.

Why. A float32 below 1.18e-38 in magnitude is *subnormal*; x86 CPUs compute with such operands
through a microcode assist that costs tens to hundreds of cycles per operation. Flow training makes
them: SiLU's derivative at a very negative pre-activation ``x`` is about ``x e^x``, subnormal for
``x`` below about -87, and the gradients and Adam moments that follow from it are subnormal too. A
network with many inactive units then trains far slower: the rose's flow-matching preset
(``rose-fm-fourier``, 3 x 256 SiLU, 128 Fourier features, lr 8e-3) at step 86,329 of its two-thread
hour, where 89 % and 94 % of two hidden layers' outputs are exactly zero, made 94.6 steps/s with
subnormals computed and 144.8 with them flushed (medians of three interleaved processes, two
threads, Intel Xeon; ``benchmarks/bench_denormals.py``, ``results/denormals.json``). Flushing
changes nothing of substance: after those 1,500 steps the weights and the EMA weights were
bit-identical with and without it, the Adam moments within 4e-33 (the flushed values themselves).

How. :func:`torch.set_flush_denormal` sets the FTZ/DAZ bits (x86 SSE/AVX ``MXCSR``; ARM ``FZ``)
of the *calling* thread only. PyTorch's intra-op workers are OpenMP threads, started the first time
an operation runs in parallel and kept; a new thread copies the floating-point control state of
the thread that starts it. So the setting reaches the workers only when it is made before the
process's first parallel operation: :func:`flush_denormals` is called first thing by the command
line (``iterflow``) and the benchmarks, and by the trainer (:func:`iterflow.train.loop.optimize`)
when it starts, where it always covers the training thread and covers the workers if the pool does
not exist yet. A Python program that wants it everywhere calls ``iterflow.flush_denormals()``
before its first PyTorch computation. :func:`pool_flushes` checks whether it reached every worker.

``ITERFLOW_FLUSH_DENORMALS=0`` (or ``off``, ``false``, ``no``) turns it off: subnormals are then
computed exactly (IEEE 754 gradual underflow), at the cost above.
"""

from __future__ import annotations

import os

import torch

#: The environment variable that turns the flushing off (``0``, ``off``, ``false`` or ``no``).
ENV = "ITERFLOW_FLUSH_DENORMALS"
#: Elements of the probe in :func:`pool_flushes`: enough for an elementwise operation to be split
#: over every worker (PyTorch's grain for elementwise loops is 32,768 elements).
_PROBE = 1 << 20


def flushing_enabled() -> bool:
    """Whether :data:`ENV` leaves the flushing on (unset: on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def flush_denormals() -> bool:
    """Flush subnormal floats to zero in the calling thread and in the CPU worker threads PyTorch
    starts from now on (see the module docstring), unless :data:`ENV` turns it off.

    Returns:
        Whether flushing is in force in the calling thread: ``False`` when turned off or where the
        CPU has no such mode (:func:`torch.set_flush_denormal` returns ``False``).
    """
    if not flushing_enabled():
        return False
    return bool(torch.set_flush_denormal(True))


def pool_flushes() -> bool:
    """Whether subnormals are flushed in the calling thread *and* in every intra-op worker: the
    elementwise product ``1e-30 * 1e-9`` (a float32 subnormal) over :data:`_PROBE` elements, split
    over the workers, comes out all zero.
    Starts the worker pool if it does not exist yet (with the calling thread's setting)."""
    x = torch.full((_PROBE,), 1e-30, dtype=torch.float32) * 1e-9  # 1e-39 each: subnormal
    return bool((x == 0).all())
