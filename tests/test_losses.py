"""Tests for instdisc/losses.py: naive float64 loops from the definitions, closed forms, hand-built cases."""
from __future__ import annotations

import math

import pytest
import torch

from instdisc.errors import InstdiscError
from instdisc.losses import full_softmax_loss, info_nce_loss, nce_loss


def _rand(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------------------------------- references
def naive_nce(pos, neg, log_z, n_data, eps=0.0):
    """-(1/B) sum_i [log(P_pos/(P_pos + K Pn + eps)) + sum_k log(K Pn/(P_k + K Pn + eps))], P = exp(l)/Z."""
    b, k = len(neg), len(neg[0])
    z, pn = math.exp(log_z), 1.0 / n_data
    total = 0.0
    for i in range(b):
        p_pos = math.exp(pos[i]) / z
        total += math.log(p_pos / (p_pos + k * pn + eps))
        for j in range(k):
            p = math.exp(neg[i][j]) / z
            total += math.log(k * pn / (p + k * pn + eps))
    return -total / b


def naive_info_nce(pos, neg):
    total = 0.0
    for i in range(len(pos)):
        denom = math.exp(pos[i]) + sum(math.exp(x) for x in neg[i])
        total += -math.log(math.exp(pos[i]) / denom)
    return total / len(pos)


def naive_softmax(logits, idx):
    total = 0.0
    for i, row in enumerate(logits):
        total += -math.log(math.exp(row[idx[i]]) / sum(math.exp(x) for x in row))
    return total / len(logits)


# ---------------------------------------------------------------------------------------------------- NCE
@pytest.mark.parametrize("b,k,n", [(1, 1, 2), (5, 7, 100), (8, 16, 1000)])
def test_nce_matches_naive_loop(b, k, n):
    pos, neg = _rand(b, seed=1), _rand(b, k, seed=2)
    log_z = 2.5
    got = nce_loss(pos, neg, log_z, n)
    want = naive_nce(pos.tolist(), neg.tolist(), log_z, n)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_nce_log_z_tensor_equals_float_and_float32_is_close():
    pos, neg = _rand(4, seed=3), _rand(4, 9, seed=4)
    a = nce_loss(pos, neg, 1.25, 50)
    b = nce_loss(pos, neg, torch.tensor(1.25, dtype=torch.float64), 50)
    c = nce_loss(pos.float(), neg.float(), torch.tensor(1.25, dtype=torch.float64), 50)
    assert a.item() == pytest.approx(b.item(), rel=1e-14)
    assert c.dtype == torch.float32 and c.item() == pytest.approx(a.item(), rel=1e-5)


def test_nce_closed_form_when_every_p_equals_pn():
    # logit - log Z = -log N  =>  P = Pn = 1/N for every slot: h(P_pos) = 1/(K+1), 1 - h(P_k) = K/(K+1)
    b, k, n = 3, 10, 500
    log_z = 4.0
    pos = torch.full((b,), log_z - math.log(n), dtype=torch.float64)
    neg = torch.full((b, k), log_z - math.log(n), dtype=torch.float64)
    want = math.log(k + 1) + k * math.log((k + 1) / k)
    assert nce_loss(pos, neg, log_z, n).item() == pytest.approx(want, rel=1e-13)


def test_nce_hand_built_single_pair():
    # one sample, K=1, N=2: K Pn = 1/2. With Z = 1: P_pos = e^0 = 1, P_neg = e^{log 0.5} = 0.5
    # loss = -[log(1/(1+0.5)) + log(0.5/(0.5+0.5))] = log 1.5 + log 2 = log 3
    pos = torch.tensor([0.0], dtype=torch.float64)
    neg = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    assert nce_loss(pos, neg, 0.0, 2).item() == pytest.approx(math.log(3.0), rel=1e-14)


def test_nce_invariant_to_a_common_shift_and_finite_where_exp_overflows():
    pos, neg = _rand(6, seed=5), _rand(6, 12, seed=6)
    base = nce_loss(pos, neg, 3.0, 1000)
    shifted = nce_loss(pos + 800.0, neg + 800.0, 803.0, 1000)  # exp(800) overflows float64
    assert shifted.item() == pytest.approx(base.item(), rel=1e-10)
    f32 = nce_loss((pos + 100.0).float(), (neg + 100.0).float(), 103.0, 1000)  # exp(100) overflows float32
    assert torch.isfinite(f32) and f32.item() == pytest.approx(base.item(), rel=1e-5)


def test_nce_reference_eps_changes_the_value_negligibly():
    pos, neg = _rand(5, seed=7), _rand(5, 20, seed=8)
    exact = nce_loss(pos, neg, 2.0, 4096).item()
    with_eps = naive_nce(pos.tolist(), neg.tolist(), 2.0, 4096, eps=1e-7)
    assert exact == pytest.approx(with_eps, rel=1e-4)
    assert exact != with_eps


def test_nce_gradcheck():
    pos = _rand(3, seed=9).requires_grad_()
    neg = _rand(3, 5, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: nce_loss(p, q, 1.5, 40), (pos, neg))


def test_nce_validation():
    with pytest.raises(InstdiscError, match=r"\(4,\).*\(3, 2\)"):
        nce_loss(torch.zeros(4), torch.zeros(3, 2), 0.0, 10)
    with pytest.raises(InstdiscError, match="at least one negative"):
        nce_loss(torch.zeros(3), torch.zeros(3, 0), 0.0, 10)
    with pytest.raises(InstdiscError, match="n_data must be >= 1, got 0"):
        nce_loss(torch.zeros(3), torch.zeros(3, 2), 0.0, 0)


# ---------------------------------------------------------------------------------------------------- InfoNCE
@pytest.mark.parametrize("b,k", [(1, 1), (4, 6), (7, 33)])
def test_info_nce_matches_naive_loop(b, k):
    pos, neg = _rand(b, seed=11), _rand(b, k, seed=12)
    want = naive_info_nce(pos.tolist(), neg.tolist())
    assert info_nce_loss(pos, neg).item() == pytest.approx(want, rel=1e-12)


def test_info_nce_equals_cross_entropy_with_positive_at_column_zero():
    pos, neg = _rand(5, seed=13), _rand(5, 8, seed=14)
    ce = torch.nn.functional.cross_entropy(torch.cat([pos[:, None], neg], 1), torch.zeros(5, dtype=torch.long))
    assert info_nce_loss(pos, neg).item() == pytest.approx(ce.item(), rel=1e-12)


@pytest.mark.parametrize("k", [1, 4, 4096])
def test_info_nce_closed_form_identical_logits(k):
    # K negatives with the positive's logit: softmax puts 1/(K+1) on the positive
    pos = torch.full((3,), 0.7, dtype=torch.float64)
    neg = torch.full((3, k), 0.7, dtype=torch.float64)
    assert info_nce_loss(pos, neg).item() == pytest.approx(math.log(k + 1), rel=1e-12)


def test_info_nce_masked_columns_are_ignored_and_no_negatives_gives_zero():
    pos, neg = _rand(4, seed=15), _rand(4, 5, seed=16)
    masked = torch.cat([neg, torch.full((4, 3), float("-inf"), dtype=torch.float64)], 1)
    assert info_nce_loss(pos, masked).item() == pytest.approx(info_nce_loss(pos, neg).item(), rel=1e-14)
    assert info_nce_loss(pos, neg[:, :0]).item() == 0.0


def test_info_nce_gradcheck():
    pos = _rand(3, seed=17).requires_grad_()
    neg = _rand(3, 4, seed=18).requires_grad_()
    assert torch.autograd.gradcheck(info_nce_loss, (pos, neg))


# ---------------------------------------------------------------------------------------------------- softmax
def test_full_softmax_matches_naive_loop_and_uniform_case():
    logits, idx = _rand(4, 11, seed=19), torch.tensor([0, 10, 3, 3])
    want = naive_softmax(logits.tolist(), idx.tolist())
    assert full_softmax_loss(logits, idx).item() == pytest.approx(want, rel=1e-12)
    flat = torch.zeros(2, 50, dtype=torch.float64)
    assert full_softmax_loss(flat, torch.tensor([1, 49])).item() == pytest.approx(math.log(50), rel=1e-14)


def test_full_softmax_validation():
    with pytest.raises(InstdiscError, match=r"\(4, 11\).*\(3,\)"):
        full_softmax_loss(torch.zeros(4, 11), torch.zeros(3, dtype=torch.long))
