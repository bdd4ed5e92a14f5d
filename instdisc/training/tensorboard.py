"""TensorBoard output of a training run: the records of ``metrics.jsonl`` as scalars. Covered by
tests/test_train_tensorboard.py.

Every numeric field of a step record is written as ``step/<name>`` and of an epoch record as ``epoch/<name>``, at the
record's ``global_step`` (so step and epoch scalars share one x axis); ``type`` and ``global_step`` are not scalars,
booleans and non-finite values (``null`` in metrics.jsonl) are skipped. Needs the ``tensorboard`` package
(``pip install 'instdisc[plot]'``); the events are written through ``torch.utils.tensorboard``.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from ..errors import InstdiscError

__all__ = ["TensorBoardSink", "require_tensorboard", "scalars_of"]

_PREFIX = {"step": "step/", "epoch": "epoch/"}


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or InstdiscError naming the extra that provides it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InstdiscError("--tensorboard needs the tensorboard package: pip install 'instdisc[plot]'") from None
    return SummaryWriter


def scalars_of(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics record: {"step/loss": 6.1, ...} (empty for other record types)."""
    prefix = _PREFIX.get(record.get("type"))
    if prefix is None:
        return {}
    out = {}
    for name, value in record.items():
        if name in ("type", "global_step") or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isfinite(value):
            out[prefix + name] = value
    return out


class TensorBoardSink:
    """Writes records as scalars into ``log_dir`` (created on the first record, flushed after each).

    The event writer opens at the first record with ``purge_step`` = that record's global step: after a resume,
    TensorBoard drops the earlier events at and beyond that step, which the resumed run writes again (as
    ``metrics.jsonl`` is cut back to the checkpoint).
    """

    def __init__(self, log_dir: str | os.PathLike):
        self._summary_writer = require_tensorboard()
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise InstdiscError(f"--tensorboard must be a folder, {self.log_dir} is a file")
        self._writer = None

    def write(self, record: dict) -> None:
        scalars = scalars_of(record)
        if not scalars:
            return
        step = int(record.get("global_step", 0))
        if self._writer is None:
            self._writer = self._summary_writer(log_dir=str(self.log_dir), purge_step=step)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
