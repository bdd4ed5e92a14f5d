import json
import math

import numpy as np
import pytest
import torch

from instdisc.training.progress import MetricsWriter, Progress, format_eta, json_safe


def strict_loads(line: str):
    """json.loads that refuses NaN / Infinity / -Infinity, as jq and most JSON readers outside Python do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_format_eta():
    assert format_eta(5) == "5s"
    assert format_eta(125) == "2m05s"
    assert format_eta(3 * 3600 + 61) == "3h01m01s"
    assert format_eta(math.inf) == "?" and format_eta(-1) == "?"


def test_metrics_writer_appends_lines(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"a": 1})
    w.write({"b": 2.5})
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"a": 1}, {"b": 2.5}]


def test_strict_loads_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads('{"log_z": NaN}')


def test_json_safe_maps_non_finite_to_none_recursively():
    rec = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, np.float32(np.nan)), "e": "NaN",
           "f": np.float64(0.5), "g": torch.tensor(3.0), "h": torch.tensor(float("nan")), "i": True, "j": None,
           "k": np.int64(7), "l": np.array([1.0, np.nan])}
    assert json_safe(rec) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, None], "e": "NaN", "f": 0.5,
                              "g": 3.0, "h": None, "i": True, "j": None, "k": 7, "l": [1.0, None]}
    assert type(json_safe(np.int64(7))) is int and type(json_safe(np.float32(0.25))) is float


def test_metrics_writer_writes_strict_json(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"type": "step", "loss": 1.5, "log_z": math.nan, "eta_s": math.inf, "pos_sim": np.float32(0.25)})
    w.write({"type": "epoch", "knn": {"top1": math.nan}, "loss": -math.inf})
    lines = [strict_loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"type": "step", "loss": 1.5, "log_z": None, "eta_s": None, "pos_sim": 0.25},
                     {"type": "epoch", "knn": {"top1": None}, "loss": None}]


def test_training_run_metrics_parse_strictly(run):
    """Every line of a real run's metrics.jsonl (default recipe: log_z is NaN on every step) is strict JSON."""
    out, _ = run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [strict_loads(x) for x in lines]
    steps = [r for r in records if r["type"] == "step"]
    assert steps and all(r["log_z"] is None for r in steps)  # InfoNCE has no normaliser Z: null, not NaN
    assert any(r["type"] == "epoch" for r in records)


def test_progress_rates(monkeypatch):
    import instdisc.training.progress as p

    t = iter([0.0, 10.0])
    monkeypatch.setattr(p.time, "perf_counter", lambda: next(t))
    prog = Progress(total_steps=100, batch_size=8, done_steps=0)
    sps, ips, eta = prog.rates(20)  # 20 steps in 10 s
    assert sps == 2.0 and ips == 16.0 and eta == 40.0
