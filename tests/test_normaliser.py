"""Tests for instdisc/normaliser.py: the Z estimate (first-batch frozen vs running average)."""
from __future__ import annotations

import io
import math

import pytest
import torch

from instdisc.errors import InstdiscError
from instdisc.normaliser import NormaliserZ, estimate_log_z


def _logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def naive_z(values, n_data):
    """N * mean(exp(l)) with a python loop in float64."""
    flat = [float(v) for v in values]
    return n_data * sum(math.exp(v) for v in flat) / len(flat)


def test_estimate_matches_naive_mean_exp_times_n():
    x = _logits(6, 9, seed=1)
    got = estimate_log_z(x, 1000)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert math.exp(got.item()) == pytest.approx(naive_z(x.flatten().tolist(), 1000), rel=1e-6)


def test_estimate_pools_several_tensors_like_their_concatenation():
    pos, neg = _logits(5, seed=2), _logits(5, 7, seed=3)
    pooled = estimate_log_z((pos, neg), 77).item()
    cat = estimate_log_z(torch.cat([pos[:, None], neg], 1), 77).item()
    assert pooled == pytest.approx(cat, rel=1e-6)
    assert math.exp(pooled) == pytest.approx(naive_z(pos.tolist() + neg.flatten().tolist(), 77), rel=1e-5)


def test_estimate_closed_form_and_no_overflow():
    # all logits equal to c: Z = N e^c exactly
    x = torch.full((4, 8), 3.0)
    assert estimate_log_z(x, 500).item() == pytest.approx(3.0 + math.log(500), rel=1e-7)
    big = torch.full((4, 8), 150.0)  # exp(150) overflows float32
    assert estimate_log_z(big, 500).item() == pytest.approx(150.0 + math.log(500), rel=1e-7)


def test_estimate_empty_raises():
    with pytest.raises(InstdiscError, match="empty"):
        estimate_log_z(torch.zeros(0), 10)


def test_starts_unset_as_float64_nan():
    z = NormaliserZ()
    assert z.log_z.dtype == torch.float64 and z.log_z.dim() == 0
    assert not z.is_set and math.isnan(z.value)


def test_first_batch_is_estimated_once_then_frozen():
    z = NormaliserZ("first-batch")
    a, b = _logits(4, 6, seed=4), _logits(4, 6, seed=5) + 1.0
    z.observe(a, 100)
    first = z.log_z.item()
    assert first == pytest.approx(estimate_log_z(a, 100).item(), rel=1e-12)
    z.observe(b, 100)
    assert z.log_z.item() == first
    assert z.value == pytest.approx(math.exp(first), rel=1e-12)


def test_running_is_a_momentum_average_of_z_itself():
    mu = 0.9
    z = NormaliserZ("running", momentum=mu)
    batches = [_logits(3, 5, seed=s) + 0.3 * s for s in range(6)]
    ref = None
    for x in batches:
        z.observe(x, 64)
        zb = naive_z(x.flatten().tolist(), 64)
        ref = zb if ref is None else mu * ref + (1 - mu) * zb  # average of Z, not of log Z
        assert z.value == pytest.approx(ref, rel=1e-6)
    assert z.log_z.item() != pytest.approx(estimate_log_z(batches[-1], 64).item(), rel=1e-3)


def test_running_momentum_zero_tracks_last_batch():
    z = NormaliserZ("running", momentum=0.0)
    z.observe(_logits(3, 5, seed=1), 10)
    last = _logits(3, 5, seed=2)
    z.observe(last, 10)
    assert z.log_z.item() == pytest.approx(estimate_log_z(last, 10).item(), rel=1e-12)


def test_reset_and_state_dict_round_trip():
    z = NormaliserZ("running", momentum=0.5)
    z.observe(_logits(2, 3), 10)
    sd = z.state_dict()
    assert set(sd) == {"log_z"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = NormaliserZ("running", momentum=0.5)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.log_z.item() == z.log_z.item()
    z.reset()
    assert not z.is_set


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "frozen"}, "unknown z_mode 'frozen'"),
    ({"momentum": 1.0}, r"z_momentum must be in \[0, 1\), got 1.0"),
    ({"momentum": -0.1}, r"got -0.1"),
])
def test_validation(kwargs, match):
    with pytest.raises(InstdiscError, match=match):
        NormaliserZ(**kwargs)
