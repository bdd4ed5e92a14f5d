"""The training budget: the default that gives small data enough steps (TrainConfig.resolve_budget), --steps, and
--time (instdisc.training.budget.TimeBudget): planned from a measured speed, re-planned at epoch ends, stopped when
spent, kept on resume; a short real run ends within 10% of its budget."""
import json
import math
import time

import pytest

from _cli_helpers import assert_one_line_error, invoke
from instdisc.errors import InstdiscError
from instdisc.training import train
from instdisc.training.budget import WARM_STEPS, WINDOW_STEPS, TimeBudget
from instdisc.training.config import DEFAULT_BATCH, MIN_STEPS, TrainConfig, parse_duration
from instdisc.training.schedule import lr_at
from test_train_loop import tiny_cfg


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), ("45", 45),
                                          ("2m30s", 150), (" 10 m ", 600), (12.5, 12.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "10x", "m10", "0", "-5", "0s", "nan", "inf", "10m abc"])
def test_parse_duration_refuses(text):
    with pytest.raises(InstdiscError, match="--time"):
        parse_duration(text)


def _resolved(n, **kw):
    cfg = TrainConfig.from_recipe("fast", **kw)
    line = cfg.resolve_budget(n)
    return cfg, line


def test_default_budget_large_data_is_ten_epochs_of_256():
    cfg, line = _resolved(60000)
    assert (cfg.batch_size, cfg.epochs) == (DEFAULT_BATCH, 10) and "2340 steps" in line and "instead" not in line


@pytest.mark.parametrize("n,batch,epochs", [(8000, 64, 12), (1000, 64, 100), (19000, 64, 10), (20000, 128, 10), (38400, 256, 10),
                                            (100, 32, 500), (5, 2, 750)])
def test_small_data_gets_at_least_min_steps(n, batch, epochs):
    """The batch shrinks to 64 first, then the epochs grow: never fewer than MIN_STEPS steps (N // B per epoch)."""
    cfg, line = _resolved(n)
    assert (cfg.batch_size, cfg.epochs) == (batch, epochs), line
    assert (n // batch) * epochs >= MIN_STEPS
    assert (n // batch) * (epochs - 1) < MIN_STEPS or epochs == 10
    assert ("at least 1500 optimiser steps" in line) == ((batch, epochs) != (256, 10))


def test_given_settings_win():
    cfg, _ = _resolved(8000, batch_size=256)
    assert cfg.batch_size == 256 and cfg.epochs == math.ceil(MIN_STEPS / 31)  # epochs grow instead
    cfg, line = _resolved(8000, epochs=3)
    assert cfg.epochs == 3 and cfg.batch_size == 64  # the batch still shrinks
    cfg, line = _resolved(8000, batch_size=128, epochs=2)
    assert (cfg.batch_size, cfg.epochs) == (128, 2) and "instead" not in line
    cfg, line = _resolved(8000, steps=40)
    assert cfg.epochs is None and cfg.steps == 40 and "40 steps" in line
    cfg, line = _resolved(8000, time="2m")
    assert cfg.time == 120 and cfg.epochs is None and "--time 120s" in line


@pytest.mark.parametrize("kw,words", [(dict(epochs=2, steps=5), ("--epochs", "--steps")),
                                      (dict(time="1m", epochs=3), ("--epochs", "--time")),
                                      (dict(time="1m", steps=3), ("--steps", "--time")),
                                      (dict(steps=0), ("--steps",)), (dict(time="soon"), ("--time",))])
def test_conflicting_lengths_refused(kw, words):
    with pytest.raises(InstdiscError) as e:
        TrainConfig.from_recipe("fast", **kw)
    assert all(w in str(e.value) for w in words)


def test_cli_refuses_bad_time_before_reading_data(tmp_path):
    r = invoke(["train", "/nonexistent-folder", "--out", tmp_path / "r", "--time", "10 minutes"])
    assert_one_line_error(r, "--time")
    r = invoke(["train", "/nonexistent-folder", "--out", tmp_path / "r", "--time", "10m", "--epochs", "2"])
    assert_one_line_error(r, "--time", "--epochs")
    assert not (tmp_path / "r").exists()


def test_lr_schedule_fits_total_steps():
    assert lr_at(50, 10, base_lr=1.0, epochs=3, total_steps=100) == pytest.approx(0.5)
    assert lr_at(50, 10, base_lr=1.0, epochs=10) == pytest.approx(0.5)  # total = epochs x steps per epoch
    assert lr_at(99, 10, base_lr=1.0, epochs=1, total_steps=100) == pytest.approx(0.5 * (1 + math.cos(math.pi * .99)))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_time_budget_plans_from_the_measured_window_then_refits_at_epoch_ends():
    clock = Clock()
    b = TimeBudget(100.0, clock=clock, spent=10.0)  # 10 s of set-up before the first step
    plans = []
    for step in range(1, WARM_STEPS + WINDOW_STEPS + 1):
        clock.t += 2.0 if step <= WARM_STEPS else 0.5  # slow first steps, then 0.5 s a step
        plans.append(b.after_step(step, step))
    assert plans[:-1] == [None] * (len(plans) - 1)
    spent = 10 + 2.0 * WARM_STEPS + 0.5 * WINDOW_STEPS
    assert plans[-1] == b.plan == WARM_STEPS + WINDOW_STEPS + int((100 - spent) / 0.5)
    assert b.seconds_per_step == pytest.approx(0.5)
    # an epoch end that cost 5 s: the plan shrinks so that the rest still fits
    step = WARM_STEPS + WINDOW_STEPS
    clock.t += 5.0
    new = b.at_epoch_end(step)
    per_step = (0.5 * WINDOW_STEPS + 5.0) / WINDOW_STEPS
    assert new == step + int((100 - spent - 5) / per_step) < plans[-1]


def test_time_budget_stops_when_spent_and_resume_keeps_the_plan():
    clock = Clock()
    b = TimeBudget(10.0, clock=clock, plan=1000)  # a resumed run: no new measurement
    assert not b.replan and b.after_step(5, WARM_STEPS) is None and b.at_epoch_end(5) is None
    fresh = TimeBudget(10.0, clock=clock)
    fresh.plan, fresh.replan = 1000, True
    clock.t = 11.0
    assert fresh.after_step(7, 7) == 7 == fresh.plan  # spent: stop at this step boundary
    fresh.hard_stop = False
    state = TimeBudget.from_state(fresh.state(), 10.0, clock=clock).state()
    assert state["plan"] == 7 and state["spent"] == pytest.approx(11.0)


def test_steps_end_mid_epoch(fake_mnist, tmp_path):
    """--steps 5 at 2 steps an epoch: three epochs, the last one stopped after its first step."""
    res = train(tiny_cfg(fake_mnist, tmp_path / "r", limit=40, nce_k=16, steps=5, epochs=None, verdict=False))
    assert (res.global_step, res.epochs_done, res.interrupted) == (5, 3, False)
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in recs if r["type"] == "epoch"] == [2, 4, 5]


def test_time_run_ends_within_ten_percent_of_its_budget(fake_mnist, tmp_path, one_torch_thread):
    budget = 8.0
    t0 = time.perf_counter()
    res = train(tiny_cfg(fake_mnist, tmp_path / "r", limit=96, epochs=None, time=budget, verdict=False,
                         log_every=1000))
    took = time.perf_counter() - t0
    assert abs(took - budget) <= 0.1 * budget, took
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    plans = [r for r in recs if r["type"] == "plan"]
    assert plans and plans[0]["why"] == "measured" and plans[-1]["steps"] == res.global_step
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["time"] == budget and "--time 8s" in cfg["budget"]


def test_resumed_time_run_keeps_its_plan(fake_mnist, tmp_path, one_torch_thread):
    """Stopped after its plan was made, a --time run resumed with the same flags trains exactly the planned steps
    (it does not measure again), and the plan is in the checkpoint."""
    from instdisc.training.checkpoint import read_checkpoint
    from test_train_resume import StopAfter

    cfg = lambda: tiny_cfg(fake_mnist, tmp_path / "r", limit=96, epochs=None, time=6.0, verdict=False,  # noqa: E731
                           log_every=1000)
    stopped = train(cfg(), stop_flag=StopAfter(WARM_STEPS + WINDOW_STEPS + 4))
    assert stopped.interrupted
    plan = read_checkpoint(tmp_path / "r" / "checkpoint.pt", map_location="cpu")["time_budget"]["plan"]
    assert plan is not None and plan > stopped.global_step
    done = train(cfg(), resume=True)
    assert done.global_step == plan and not done.interrupted
