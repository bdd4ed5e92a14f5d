"""Learning-rate schedules as pure functions of progress. Covered by tests/test_train_schedule.py."""
from __future__ import annotations

import math

__all__ = ["lr_at", "SCHEDULES"]

SCHEDULES = ("cosine", "step", "constant")


def lr_at(step: int, steps_per_epoch: int, *, base_lr: float, epochs: int, schedule: str = "cosine",
          warmup_epochs: float = 0.0, lr_steps: tuple[float, ...] = (0.6, 0.8), total_steps: int | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_epochs``, then
    ``cosine``: base_lr * 0.5 * (1 + cos(pi * t)), t the fraction of the post-warm-up steps done;
    ``step``: base_lr * 0.1 ** (number of fractions in ``lr_steps`` passed); ``constant``: base_lr.
    ``total_steps``: the run's length when it is not whole epochs (--steps, --time); default epochs x steps_per_epoch.
    """
    total = max(1, total_steps if total_steps is not None else steps_per_epoch * epochs)
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return base_lr * (step + 1) / warm
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        done = step / total
        return base_lr * 0.1 ** sum(done >= f for f in lr_steps)
    if schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"unknown schedule {schedule!r}")
