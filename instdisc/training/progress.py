"""Progress lines (logging) and machine-readable metrics (JSON lines). Covered by tests/test_train_progress.py."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

__all__ = ["MetricsWriter", "Progress", "format_eta"]

log = logging.getLogger("instdisc.training")


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsWriter:
    """Appends one JSON object per line to ``path`` and flushes each line (survives a kill)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=float)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


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
