import json
import math

from instdisc.training.progress import MetricsWriter, Progress, format_eta


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


def test_progress_rates(monkeypatch):
    import instdisc.training.progress as p

    t = iter([0.0, 10.0])
    monkeypatch.setattr(p.time, "perf_counter", lambda: next(t))
    prog = Progress(total_steps=100, batch_size=8, done_steps=0)
    sps, ips, eta = prog.rates(20)  # 20 steps in 10 s
    assert sps == 2.0 and ips == 16.0 and eta == 40.0
