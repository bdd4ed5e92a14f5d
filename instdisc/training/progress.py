"""Progress lines (logging) and machine-readable metrics (strict JSON lines, optionally TensorBoard too).

Covered by tests/test_train_progress.py (the TensorBoard sink: tests/test_train_tensorboard.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from ..progress_bar import format_eta  # re-exported: the loop and tests import it from here

__all__ = ["MetricsWriter", "Progress", "format_eta", "json_safe"]

log = logging.getLogger("instdisc.training")


def json_safe(value):
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, recursively through dicts, lists and
    tuples; numpy scalars and arrays and torch tensors become plain floats / ints / lists. The result passes
    ``json.dumps(allow_nan=False)``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar, 0-d array or tensor
        return json_safe(value.item())
    if hasattr(value, "tolist"):  # numpy array or tensor
        return json_safe(value.tolist())
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends one strict JSON object per line to ``path`` and flushes each line (survives a kill).

    Non-finite numbers are written as ``null`` (see :func:`json_safe`), so every line parses with any JSON reader.
    ``tensorboard``: also write each record's numeric fields as TensorBoard scalars into that folder
    (:class:`~instdisc.training.tensorboard.TensorBoardSink`).
    """

    def __init__(self, path: str | os.PathLike, tensorboard: str | os.PathLike | None = None):
        self.path = Path(path)
        self.tensorboard = None
        if tensorboard is not None:
            from .tensorboard import TensorBoardSink

            self.tensorboard = TensorBoardSink(tensorboard)

    @classmethod
    def for_run(cls, out: Path, cfg, main: bool = True) -> "MetricsWriter":
        """The writer of a training run: ``out/metrics.jsonl`` (+ ``cfg.tensorboard``) on the main process; other
        processes of a distributed run write nowhere."""
        if not main:
            return cls(os.devnull)
        return cls(Path(out) / "metrics.jsonl", tensorboard=getattr(cfg, "tensorboard", None))

    def write(self, record: dict) -> None:
        line = json.dumps(json_safe(record), sort_keys=True, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(record)


class Progress:
    """Tracks throughput since the last report and logs ``epoch step loss img/s ETA`` lines."""

    def __init__(self, total_steps: int, batch_size: int, done_steps: int = 0):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.start_step = done_steps
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = done_steps

    def rates(self, step: int) -> tuple[float, float, float]:
        """(steps/s since last call, images/s, ETA seconds) for global step ``step`` (steps done)."""
        now = time.perf_counter()
        dt = max(1e-9, now - self.t_last)
        sps = (step - self.step_last) / dt
        overall = (step - self.start_step) / max(1e-9, now - self.t0)
        eta = (self.total_steps - step) / overall if overall > 0 else float("inf")
        self.t_last, self.step_last = now, step
        return sps, sps * self.batch_size, eta
