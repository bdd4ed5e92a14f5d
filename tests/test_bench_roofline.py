"""Tests for the pure parts of benchmarks/bench_roofline.py: FLOP counting against the closed forms, and the tables
and JSON of a tiny --quick run. Imported by path."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(_BENCH) not in sys.path:  # bench_roofline imports _machine by name, as the scripts do
        sys.path.insert(0, str(_BENCH))
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


br = _load("bench_roofline")


@pytest.mark.parametrize("m,n,k", [(3, 5, 7), (16, 16, 16), (1, 9, 4)])
def test_matmul_count_is_the_closed_form(m, n, k):
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert br.count_flops(lambda: a @ b) == br.matmul_flops(m, n, k) == 2 * m * n * k


@pytest.mark.parametrize("batch,c_in,c_out,side,kernel,stride", [(2, 3, 4, 9, 3, 2), (1, 1, 8, 7, 3, 1),
                                                                 (3, 4, 2, 6, 1, 1)])
def test_conv_count_is_the_closed_form(batch, c_in, c_out, side, kernel, stride):
    x = torch.randn(batch, c_in, side, side).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, kernel, kernel)
    out = F.conv2d(x, w, stride=stride, padding=kernel // 2)
    h = br.conv_out_side(side, kernel, stride, kernel // 2)
    assert out.shape == (batch, c_out, h, h)
    want = 2 * c_out * c_in * kernel * kernel * h * h * batch
    assert br.conv2d_flops(batch, c_in, c_out, kernel, h, h) == want
    assert br.count_flops(lambda: F.conv2d(x, w, stride=stride, padding=kernel // 2)) == want


def test_backward_is_counted_too():
    """forward + backward of a matmul with both inputs requiring grad: 3 matmuls of the same size."""
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(6, 5, requires_grad=True)
    assert br.count_flops(lambda: (a @ b).sum().backward()) == 3 * br.matmul_flops(4, 5, 6)


def test_time_ms_is_the_median_after_warmup():
    calls = []
    ms = br.time_ms(lambda: calls.append(1), torch.device("cpu"), repeats=5, warmup=2)
    assert len(calls) == 7 and 0 <= ms < 50


class _Clock:
    """A fake perf_counter: each call of ``work`` advances it by the next of ``durations`` seconds."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, list(durations)

    def perf_counter(self):
        return self.now

    def work(self):
        self.now += self.durations.pop(0)


@pytest.mark.parametrize("durations,warmup,budget_s,want", [
    ([0.01] * 30, 1, 10.0, [10.0] * 20),  # within the budget: every repeat
    ([1.0] * 30, 1, 2.5, [1000.0] * 3),  # past the budget after MIN_REPEATS timed calls
    ([0.5, 0.5, 3.0, 1.0], 2, 2.5, [3000.0]),  # one timed call past the budget: that one alone
    ([3.0, 1.0], 2, 2.5, [3000.0]),  # a warm-up call past the budget: that one alone
    ([1.0] * 30, 0, None, [1000.0] * 20),  # no budget
])
def test_time_budget(monkeypatch, durations, warmup, budget_s, want):
    clock = _Clock(durations)
    monkeypatch.setattr(br.time, "perf_counter", clock.perf_counter)
    got = br.times_ms(clock.work, torch.device("cpu"), repeats=20, warmup=warmup, budget_s=budget_s)
    assert got == pytest.approx(want)


def test_quick_run_writes_the_tables_and_json(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert br.main(["--quick", "--device", "cpu", "--repeats", "2", "--warmup", "1", "--profile-iters", "1",
                    "--json-out", str(out)]) == 0  # (no wall-clock bound: a busy machine made it flaky)
    text = capsys.readouterr().out
    for needle in ("measured limits on cpu", "matmul", "conv2d", "whole step", "where the time goes", str(out)):
        assert needle in text
    res = json.loads(out.read_text())
    assert res["benchmark"] == "bench_roofline" and res["machine"]["device"] == "cpu"
    assert "--quick" in res["command"] and f"--matmul-n {br.QUICK.matmul_n}" in res["command"]
    assert "--device cpu" in res["command"] and "None" not in res["command"] and "json" not in res["command"]
    assert {(r["op"], r["dtype"]) for r in res["limits"]} == {(o, d) for o in ("matmul", "conv2d")
                                                              for d in ("float32", "bf16")}
    n = br.QUICK.matmul_n
    mm = next(r for r in res["limits"] if r["op"] == "matmul" and r["dtype"] == "float32")
    assert mm["flops"] == br.matmul_flops(n, n, n)
    b, c_in, c_out, side, k, s = br.QUICK.conv
    h = br.conv_out_side(side, k, s, k // 2)
    assert all(r["flops"] == br.conv2d_flops(b, c_in, c_out, k, h, h) for r in res["limits"] if r["op"] == "conv2d")
    assert all(r["gflops"] > 0 and r["ms"] > 0 and r["repeats"] == 2 for r in res["limits"])
    parts = {r["part"]: r for r in res["parts"]}
    assert list(parts) == ["encoder+head forward", "encoder+head fwd+bwd", "whole step"]
    fwd, fb, step = parts.values()
    assert 0 < fwd["flops"] < fb["flops"] < step["flops"]  # backward ~2x forward; the step adds the loss's matmuls
    prec = res["config"]["precision"]
    limits = {(r["op"], r["dtype"]): r["gflops"] for r in res["limits"]}
    for r in res["parts"]:
        assert r["precision"] == prec
        assert r["gflops"] == pytest.approx(r["flops"] / r["ms"] / 1e6)
        assert r["of_matmul_limit"] == pytest.approx(r["gflops"] / limits[("matmul", prec)])
        assert r["of_bf16_matmul_limit"] == pytest.approx(r["gflops"] / limits[("matmul", "bf16")])
    ops = res["profile"]["ops"]
    assert 0 < len(ops) <= 12 and all(o["self_ms"] >= 0 for o in ops)
    assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
    assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    assert any("conv" in o["op"] for o in ops)
