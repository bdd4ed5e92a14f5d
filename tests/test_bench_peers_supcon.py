"""Tests for benchmarks/_supcon.py (the label oracle's loss in bench_peers.py): a naive float64 loop from the definition,
closed forms, the checks at the boundary. Imported by path; needs torch only (no lightly)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_supcon.py"
_spec = importlib.util.spec_from_file_location("bench_peers_supcon", _PATH)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
supcon_loss = _mod.supcon_loss


def naive_supcon(z: list[list[float]], labels: list[int], t: float) -> float:
    """Khosla et al. 2020, L^sup_out, one anchor at a time in python floats: for anchor i, the mean over its positives p
    of -log(exp(s_ip/t) / sum_{a != i} exp(s_ia/t)), s the cosine; then the mean over anchors with a positive."""
    m = len(z)
    norm = [math.sqrt(sum(v * v for v in row)) for row in z]
    s = [[sum(x * y for x, y in zip(z[i], z[j])) / (norm[i] * norm[j]) for j in range(m)] for i in range(m)]
    total, anchors = 0.0, 0
    for i in range(m):
        positives = [p for p in range(m) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(s[i][a] / t) for a in range(m) if a != i)
        total += sum(-math.log(math.exp(s[i][p] / t) / denom) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_matches_the_naive_loop_on_six_views():
    # 3 images x 2 views; images 0 and 2 share class 1, so a view of image 0 has 3 positives, a view of image 1 has 1
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 4, 1, 1, 4, 1])
    for t in (0.1, 0.5, 1.0):
        got = supcon_loss(z, labels, temperature=t).item()
        assert got == pytest.approx(naive_supcon(z.tolist(), labels.tolist(), t), rel=1e-12, abs=1e-12)


def test_float32_agrees_and_a_view_without_positive_is_no_anchor():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 7])  # the last view has no positive: it only appears in denominators
    want = naive_supcon(z.tolist(), labels.tolist(), 0.1)
    assert supcon_loss(z.float(), labels, 0.1).item() == pytest.approx(want, rel=1e-5)


def test_closed_forms():
    # identical projections: every other view scores the same, so each log-softmax term is log(1/(M-1))
    z = torch.ones(6, 3, dtype=torch.float64)
    assert supcon_loss(z, torch.tensor([0, 0, 1, 1, 2, 2]), 0.1).item() == pytest.approx(math.log(5))
    # two views, one class: the only other view is the positive and takes the whole softmax
    assert supcon_loss(torch.randn(2, 3, dtype=torch.float64), torch.tensor([3, 3]), 0.1).item() == pytest.approx(0.0)


def test_gradient_is_finite():
    z = torch.randn(8, 4, requires_grad=True)
    supcon_loss(z, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 0.1).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("z, labels, t, match", [
    (torch.ones(4, 2), torch.tensor([0, 1, 2]), 0.1, "labels"),
    (torch.ones(4), torch.tensor([0, 1, 2, 3]), 0.1, "labels"),
    (torch.ones(4, 2), torch.tensor([0, 0, 1, 1]), 0.0, "temperature"),
    (torch.ones(4, 2), torch.tensor([0, 1, 2, 3]), 0.1, "no positives"),
])
def test_bad_input_raises_with_the_value(z, labels, t, match):
    with pytest.raises(ValueError, match=match):
        supcon_loss(z, labels, t)
