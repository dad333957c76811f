"""TensorBoard logging of a training run (optional: ``pip install 'iterflow[tensorboard]'``).

The run folder's ``log.jsonl`` stays the record of a run; TensorBoard is a view of it while it trains
and after: :class:`TensorBoardLog` owns one event folder, :meth:`TensorBoardLog.reporter` is a
:class:`~iterflow.train.loop.Reporter` that writes each logged step's loss terms (``train/loss``,
``train/<term>``) and each finished stage's figures (``train_stage/movement``, ...) and passes
everything on to another reporter (the command line's progress bars), and
:meth:`~TensorBoardLog.add_images` adds a run's plots. Steps are counted over all stages (step
``s`` of stage ``k`` of ``S`` steps each is ``k * S + s``), as in ``plots/training.png``; stage
figures are plotted against the stage number (1, 2, ...). A resumed run first drops what an
interrupted one wrote after its last checkpoint, so the curves match ``log.jsonl``.

Example:
    >>> import tempfile, iterflow, torch
    >>> from iterflow.train.tensorboard import TensorBoardLog
    >>> x = torch.randn(256, 2)
    >>> with TensorBoardLog(tempfile.mkdtemp()) as tb:  # doctest: +SKIP
    ...     result = iterflow.fit("fm", x, steps=50, hidden=(32,), reporter=tb.reporter())
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from iterflow.errors import fail
from iterflow.train.loop import Reporter, SilentReporter, report_planned

#: Keys of a stage record that are bookkeeping, not figures of the stage.
_NOT_FIGURES = ("stage", "steps", "world_size", "seconds_before_resume", "rejected")


class TensorBoardLog:
    """A TensorBoard event folder: scalars of training, a run's plots as images, its config as text.

    Arguments:
        logdir: the folder of the event files (created if needed; point ``tensorboard --logdir``
            at it or at a folder above it).

    Raises:
        InputError: naming ``tensorboard`` when the ``tensorboard`` package is not installed.
    """

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail(
                "tensorboard",
                "needs the tensorboard package: pip install 'iterflow[tensorboard]'",
                str(logdir),
            )
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write everything out and close the event file."""
        self.writer.close()

    def reporter(self, inner: Reporter | None = None, prefix: str = "train") -> Reporter:
        """A :class:`~iterflow.train.loop.Reporter` writing under ``prefix`` and forwarding every
        call to ``inner`` (default: nothing else)."""
        return TensorBoardReporter(self, inner, prefix)

    def progress(
        self, inner: Callable[[str, int, int, dict[str, float]], None] | None = None
    ) -> Callable[[str, int, int, dict[str, float]], None]:
        """A ``progress(phase, step, total, terms)`` function (the transport fits' progress) that
        writes each phase's terms as ``<phase>/<term>`` (the phase's words joined by ``_``:
        ``relaxed_ot_refinement/loss``) and forwards to ``inner``."""

        def progress(phase: str, step: int, total: int, terms: dict[str, float]) -> None:
            self.add_scalars(re.sub(r"[^a-z0-9]+", "_", phase.lower()).strip("_"), terms, step)
            if inner is not None:
                inner(phase, step, total, terms)

        return progress

    def add_scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """Each number in ``values`` as the scalar ``<prefix>/<key>`` at ``step`` (nested
        mappings as ``<prefix>/<key>/<sub-key>``; other values are left out)."""
        for key, v in values.items():
            if isinstance(v, dict):
                self.add_scalars(f"{prefix}/{key}", v, step)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(v), step)

    def add_images(self, paths: Iterable[str | Path], prefix: str = "plots") -> list[str]:
        """Add PNG files as images ``<prefix>/<file stem>``; returns the tags written."""
        import matplotlib.image as mpimg
        import numpy as np

        tags = []
        for path in sorted(Path(p) for p in paths):
            img = np.asarray(mpimg.imread(path))  # (H, W, C) floats in [0, 1] for PNGs
            if img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            rgb = (np.clip(img[:, :, :3], 0.0, 1.0) * 255).round().astype(np.uint8)
            tag = f"{prefix}/{path.stem}"
            self.writer.add_image(tag, rgb, 0, dataformats="HWC")
            tags.append(tag)
        return tags

    def add_text(self, tag: str, text: str) -> None:
        """Add ``text`` (Markdown) under ``tag``."""
        self.writer.add_text(tag, text, 0)

    def purge_after(self, step: int) -> None:
        """Drop from the view every point an earlier writer of this folder logged at or after
        ``step`` (TensorBoard's session restart: what a resumed run computes again)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        file_writer = self.writer._get_file_writer()
        file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))


class TensorBoardReporter:
    """The loop's :class:`~iterflow.train.loop.Reporter` for TensorBoard (see the module's text);
    made by :meth:`TensorBoardLog.reporter`."""

    def __init__(self, log: TensorBoardLog, inner: Reporter | None, prefix: str) -> None:
        self.log, self.inner, self.prefix = log, inner or SilentReporter(), prefix
        self.stage, self.offset = 0, 0

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        self.stage, self.offset = index, index * total_steps
        if done_steps > 0:  # resumed: what was logged after the checkpoint is logged again
            self.log.purge_after(self.offset + done_steps + 1)
        self.inner.stage_start(index, n_stages, total_steps, done_steps)

    def stage_planned(self, total_steps: int) -> None:
        report_planned(self.inner, total_steps)

    def step(self, step: int, terms: dict[str, float]) -> None:
        self.log.add_scalars(self.prefix, terms, self.offset + step)
        self.inner.step(step, terms)

    def stage_end(self, record: dict[str, Any]) -> None:
        figures = {k: v for k, v in record.items() if k not in _NOT_FIGURES}
        self.log.add_scalars(f"{self.prefix}_stage", figures, self.stage + 1)
        self.log.writer.flush()
        self.inner.stage_end(record)
