"""``--time``: fit the number of optimiser steps to a wall-clock budget. Covered by tests/test_train_budget.py.

The budget counts from the start of :func:`instdisc.training.train` (data, model, bank initialisation included) to the
end of the last step's epoch record and checkpoint; the end-of-run verdict (bounded, see
:mod:`instdisc.training.verdict`) comes after it. The plan:

* after ``WARM_STEPS`` steps (first calls are slow: allocations, oneDNN kernel choice) the next ``WINDOW_STEPS``
  steps are timed; the plan is then ``steps = done + (budget - elapsed) / seconds_per_step``;
* at each epoch end the run plans again with the rate measured since the window began, which includes the epoch
  ends' own cost (health probe, checkpoint, neighbour search), so the end lands close to the budget;
* the learning-rate schedule is always fitted to the current plan (``lr_at(..., total_steps=plan)``);
* if the machine slows down after that and the budget is spent before the plan's last step, the run stops at that
  step boundary (its schedule is then cut short; the ``plan`` record says so);
* the plan is saved in every checkpoint: a resumed run keeps it and does not measure again (a run resumed before
  its first plan measures then, with the budget left).
"""
from __future__ import annotations

import math
import time

__all__ = ["TimeBudget", "WARM_STEPS", "WINDOW_STEPS"]

WARM_STEPS = 3
WINDOW_STEPS = 20


class TimeBudget:
    """The step plan of one ``--time`` run. ``clock`` returns seconds (``time.perf_counter``; tests pass their own)."""

    def __init__(self, seconds: float, *, clock=time.perf_counter, spent: float = 0.0, plan: int | None = None,
                 hard_stop: bool = True):
        self.seconds = float(seconds)
        self.clock = clock
        self.t0 = clock() - float(spent)  # ``spent``: seconds of the budget used before a resume
        self.plan = plan  # total optimiser steps, None until measured
        self.replan = plan is None  # a resumed run keeps the plan it saved
        self._mark: tuple[int, float] | None = None  # (global step, time) where the timing window began
        self.seconds_per_step: float | None = None
        self.hard_stop = hard_stop  # stop when the budget is spent (one process; a distributed run keeps its plan)

    def spent(self) -> float:
        return self.clock() - self.t0

    def _fit(self, done: int, per_step: float) -> int:
        left = self.seconds - self.spent()
        self.seconds_per_step = per_step
        return max(done + 1, done + int(left / per_step)) if left > 0 else done + 1

    def after_step(self, global_step: int, steps_this_process: int) -> int | None:
        """Call after each optimiser step; returns the new plan when one is made, else None.
        ``steps_this_process``: steps this process ran (a resumed run's first steps are warm-up too)."""
        if self.plan is not None:
            if self.hard_stop and self.replan and global_step < self.plan and self.spent() >= self.seconds:
                self.plan = global_step  # slower than measured, the budget is spent: stop at this step boundary
                return self.plan
            return None
        if not self.replan:
            return None
        if steps_this_process == WARM_STEPS:
            self._mark = (global_step, self.clock())
        elif self._mark is not None and global_step - self._mark[0] >= WINDOW_STEPS:
            self.plan = self._fit(global_step, (self.clock() - self._mark[1]) / (global_step - self._mark[0]))
            return self.plan
        return None

    def at_epoch_end(self, global_step: int) -> int | None:
        """Call after an epoch's record and checkpoint; returns the new plan when it changed, else None."""
        if not self.replan or self.plan is None or self._mark is None or global_step >= self.plan:
            return None
        per_step = (self.clock() - self._mark[1]) / max(1, global_step - self._mark[0])
        new = self._fit(global_step, per_step)
        if new == self.plan:
            return None
        self.plan = new
        return new

    def state(self) -> dict:
        """What a checkpoint keeps: the budget, the seconds spent, the plan."""
        return {"seconds": self.seconds, "spent": self.spent(), "plan": self.plan,
                "seconds_per_step": self.seconds_per_step}

    @classmethod
    def from_state(cls, state: dict | None, seconds: float, *, since: float = 0.0, clock=time.perf_counter,
                   hard_stop: bool = True) -> "TimeBudget":
        """The budget of a run that :meth:`state` described (None or {}: a new run), ``since`` seconds of it spent
        since then (this process's set-up)."""
        state = state or {}
        return cls(seconds, clock=clock, spent=float(state.get("spent", 0.0)) + since, plan=state.get("plan"),
                   hard_stop=hard_stop)

    def describe(self) -> str:
        eta = self.seconds_per_step * self.plan if self.seconds_per_step else math.nan
        return (f"time budget {self.seconds:g}s: {self.seconds_per_step:.3f}s a step measured, {self.plan} steps in "
                f"all (~{eta:.0f}s of steps), {self.spent():.1f}s spent so far; learning-rate schedule fitted")
