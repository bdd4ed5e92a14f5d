"""Tests for instdisc/objective.py: the chunked per-sample autograd Function against a naive gather + bmm, the
objective's losses against float64 python loops from the definitions, Z handling, state, validation."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from instdisc.errors import InstdiscError
from instdisc.objective import Objective, per_sample_logits

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _unit(b, d, seed, dtype=torch.float32):
    return F.normalize(torch.randn(b, d, generator=_gen(seed), dtype=dtype), dim=1)


def naive_logits(zs, memory, neg_idx):
    """The reference way: gather B x K x D, then bmm (autograd through the gather)."""
    w = memory[neg_idx].to(zs.dtype)  # B x K x D
    return torch.bmm(w, zs[:, :, None]).squeeze(-1)  # B x K


# ---------------------------------------------------------------------------------------------------- per-sample
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("impl,b,k,block_rows", [
    ("tiled", 4, 5, 1), ("tiled", 4, 5, 3), ("tiled", 4, 17, 5), ("tiled", 6, 5, 16), ("tiled", 3, 7, 4096),
    ("tiled", 1, 1, 1), ("fused", 4, 17, 5), ("fused", 1, 1, 1), ("auto", 6, 5, 16)])
def test_per_sample_logits_values_and_grads_equal_naive(dtype, impl, b, k, block_rows):
    memory = _unit(30, 8, 1, dtype)
    neg_idx = torch.randint(0, 30, (b, k), generator=_gen(2))
    neg_idx[0, 0] = neg_idx[0, -1]  # a repeated slot in one row
    zs = (_unit(b, 8, 3, dtype) / 0.1).requires_grad_()
    zs_ref = zs.detach().clone().requires_grad_()
    out = per_sample_logits(zs, memory, neg_idx, block_rows=block_rows, impl=impl)
    ref = naive_logits(zs_ref, memory, neg_idx)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, ref, **tol)
    up = torch.randn(b, k, generator=_gen(4), dtype=dtype)
    out.backward(up)
    ref.backward(up)
    torch.testing.assert_close(zs.grad, zs_ref.grad, **tol)


@pytest.mark.parametrize("impl,block_rows,bank_dtype", [
    ("fused", 2, F64), ("tiled", 2, F64), ("tiled", 100, F64),
    ("auto", 2, torch.float32), ("auto", 100, torch.float32)])  # float32 bank under float64 zs: tiled path
def test_per_sample_logits_gradcheck(impl, block_rows, bank_dtype):
    memory = _unit(12, 5, 5, F64).to(bank_dtype)
    neg_idx = torch.randint(0, 12, (3, 6), generator=_gen(6))
    zs = _unit(3, 5, 7, F64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q: per_sample_logits(q, memory, neg_idx, block_rows=block_rows, impl=impl), (zs,))


@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16])
def test_per_sample_logits_half_bank(bank_dtype):
    memory = _unit(40, 16, 8).to(bank_dtype)
    neg_idx = torch.randint(0, 40, (5, 9), generator=_gen(9))
    zs = _unit(5, 16, 10).requires_grad_()
    zs_ref = zs.detach().clone().requires_grad_()
    out = per_sample_logits(zs, memory, neg_idx, block_rows=4)
    ref = naive_logits(zs_ref, memory.float(), neg_idx)  # same rounded bank, float32 arithmetic
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    up = torch.randn(5, 9, generator=_gen(11))
    out.backward(up)
    ref.backward(up)
    torch.testing.assert_close(zs.grad, zs_ref.grad, rtol=1e-5, atol=1e-5)


def test_per_sample_logits_auto_on_one_thread_matches_fused():
    memory = _unit(50, 8, 1)
    neg_idx = torch.randint(0, 50, (6, 9), generator=_gen(2))
    zs = _unit(6, 8, 3)
    fused = per_sample_logits(zs, memory, neg_idx, impl="fused")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # auto picks the tiled path here
        auto = per_sample_logits(zs, memory, neg_idx, block_rows=16)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(auto, fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "tiled"])
def test_per_sample_logits_refuses_bank_changed_before_backward(impl):
    memory = _unit(10, 4, 1)
    zs = _unit(2, 4, 2).requires_grad_()
    out = per_sample_logits(zs, memory, torch.randint(0, 10, (2, 3), generator=_gen(3)), impl=impl)
    memory[0].mul_(2.0)  # in-place bank write between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_per_sample_logits_validation():
    zs, one = torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(InstdiscError, match="bank must not require grad"):
        per_sample_logits(zs, torch.zeros(4, 3, requires_grad=True), one)
    with pytest.raises(InstdiscError, match=r"\(2, 3\), \(4, 5\), \(2, 1\)"):
        per_sample_logits(zs, torch.zeros(4, 5), one)
    with pytest.raises(InstdiscError, match=r"impl='fused' needs the bank dtype \(torch.float16\)"):
        per_sample_logits(zs, torch.zeros(4, 3, dtype=torch.float16), one, impl="fused")
    with pytest.raises(InstdiscError, match="unknown impl 'cuda'"):
        per_sample_logits(zs, torch.zeros(4, 3), one, impl="cuda")
    with pytest.raises(InstdiscError, match="block_rows must be >= 1, got 0"):
        per_sample_logits(zs, torch.zeros(4, 3), one, block_rows=0)


# ---------------------------------------------------------------------------------------------------- references
def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def reference_logits_py(obj, z, idx, z_pos, neg_idx):
    """Python float64 lists: pos[i], neg[i][k] from the definitions."""
    mem = obj.bank.memory.double().tolist()
    zl = z.double().tolist()
    zp = z_pos.double().tolist() if z_pos is not None else None
    pos, neg = [], []
    for i in range(len(zl)):
        target = mem[int(idx[i])] if obj.positive == "bank" else zp[i]
        pos.append(_dot(zl[i], target) / obj.tau)
        row = neg_idx.tolist() if neg_idx.dim() == 1 else neg_idx[i].tolist()
        neg.append([_dot(zl[i], mem[j]) / obj.tau for j in row])
    return pos, neg


def reference_nce_py(pos, neg, n_data):
    """First-batch Z = N mean(exp(all logits)), then the InstDisc NCE loss (no eps)."""
    flat = pos + [x for row in neg for x in row]
    z_val = n_data * sum(math.exp(x) for x in flat) / len(flat)
    k, pn = len(neg[0]), 1.0 / n_data
    total = 0.0
    for i in range(len(pos)):
        p = math.exp(pos[i]) / z_val
        total += math.log(p / (p + k * pn))
        for x in neg[i]:
            q = math.exp(x) / z_val
            total += math.log(k * pn / (q + k * pn))
    return -total / len(pos), math.log(z_val)


def reference_infonce_py(pos, neg, extra=None):
    total = 0.0
    for i in range(len(pos)):
        cols = neg[i] + (extra[i] if extra is not None else [])
        denom = math.exp(pos[i]) + sum(math.exp(x) for x in cols)
        total += math.log(denom) - pos[i]
    return total / len(pos)


def _objective(n=40, d=8, **kw):
    kw.setdefault("k", 6)
    kw.setdefault("tau", 0.2)
    return Objective(n, d, generator=_gen(0), **kw)


def _same_stats(a: dict, b: dict) -> bool:
    """Equal stats dicts, nan equal to nan (unused statistics are nan)."""
    return a.keys() == b.keys() and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in
                                        ((a[k], b[k]) for k in a))


def _negatives_for(obj, b, seed):
    """The indices forward draws with a generator seeded ``seed`` (its only random draw)."""
    mode = obj.negatives
    return obj.bank.sample(b, obj.k, mode=mode, generator=_gen(seed))


# ---------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
@pytest.mark.parametrize("positive", ["bank", "view"])
def test_nce_matches_python_loop_reference(negatives, positive):
    obj = _objective(negatives=negatives, positive=positive, bank_dtype=F64)
    z, idx = _unit(5, 8, 1, F64).requires_grad_(), torch.tensor([0, 3, 39, 7, 12])
    z_pos = _unit(5, 8, 2, F64) if positive == "view" else None
    loss, stats = obj(z, idx, z_pos=z_pos, generator=_gen(5))
    pos, neg = reference_logits_py(obj, z, idx, z_pos, _negatives_for(obj, 5, 5))
    want, want_log_z = reference_nce_py(pos, neg, 40)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert stats["log_z"] == pytest.approx(want_log_z, rel=1e-10)
    assert stats["loss"] == pytest.approx(want, rel=1e-6)
    assert stats["pos_sim"] == pytest.approx(sum(pos) / 5 * obj.tau, rel=1e-6, abs=1e-9)
    assert stats["neg_sim"] == pytest.approx(sum(map(sum, neg)) / (5 * 6) * obj.tau, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
@pytest.mark.parametrize("positive", ["bank", "view"])
@pytest.mark.parametrize("in_batch", [False, True])
def test_infonce_matches_python_loop_reference(negatives, positive, in_batch):
    obj = _objective(loss="infonce", negatives=negatives, positive=positive, in_batch=in_batch, bank_dtype=F64)
    idx = torch.tensor([4, 9, 4, 20])  # slot 4 twice: those two samples are not each other's negatives
    z = _unit(4, 8, 3, F64).requires_grad_()
    z_pos = _unit(4, 8, 4, F64) if positive == "view" else None
    loss, stats = obj(z, idx, z_pos=z_pos, generator=_gen(6))
    pos, neg = reference_logits_py(obj, z, idx, z_pos, _negatives_for(obj, 4, 6))
    extra = None
    if in_batch:
        other = (z_pos if positive == "view" else z).double().tolist()
        zl = z.double().tolist()
        extra = [[_dot(zl[i], other[j]) / obj.tau for j in range(4) if int(idx[j]) != int(idx[i])]
                 for i in range(4)]
    assert loss.item() == pytest.approx(reference_infonce_py(pos, neg, extra), rel=1e-10)
    assert math.isnan(stats["log_z"])


@pytest.mark.parametrize("positive", ["bank", "view"])
def test_softmax_matches_python_loop_reference(positive):
    obj = _objective(n=15, loss="softmax", positive=positive, bank_dtype=F64, k=4096)  # k unused by softmax
    idx = torch.tensor([14, 0, 6])
    z = _unit(3, 8, 5, F64).requires_grad_()
    z_pos = _unit(3, 8, 6, F64) if positive == "view" else None
    loss, stats = obj(z, idx, z_pos=z_pos)
    mem, zl = obj.bank.memory.tolist(), z.tolist()
    total, neg_sum = 0.0, 0.0
    for i in range(3):
        row = [_dot(zl[i], mem[j]) / obj.tau for j in range(15)]
        if positive == "view":
            row[int(idx[i])] = _dot(zl[i], z_pos[i].tolist()) / obj.tau
        total += math.log(sum(math.exp(x) for x in row)) - row[int(idx[i])]
        neg_sum += sum(row) - row[int(idx[i])]
    assert loss.item() == pytest.approx(total / 3, rel=1e-10)
    assert stats["neg_sim"] == pytest.approx(neg_sum / (3 * 14) * obj.tau, rel=1e-6, abs=1e-9)


def test_closed_form_nce_when_bank_is_orthogonal_to_z():
    # every logit 0: Z = N, P = 1/N = Pn  ->  loss = log(K+1) + K log((K+1)/K)
    obj = _objective(n=50, d=4, k=10, bank_dtype=F64)
    obj.init_bank(torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=F64).repeat(50, 1))
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3, dtype=F64, requires_grad=True)
    loss, stats = obj(z, torch.tensor([0, 1, 2]), generator=_gen(1))
    assert loss.item() == pytest.approx(math.log(11) + 10 * math.log(11 / 10), rel=1e-12)
    assert stats["log_z"] == pytest.approx(math.log(50), rel=1e-12)
    assert stats["pos_sim"] == 0.0 and stats["neg_sim"] == 0.0


def test_closed_form_infonce_identical_bank_rows():
    # every bank row equal: positive and K negatives share one logit -> loss = log(K + 1)
    obj = _objective(n=30, d=4, k=7, loss="infonce", negatives="shared")
    obj.init_bank(torch.randn(1, 4, generator=_gen(2)).repeat(30, 1))
    loss, _ = obj(_unit(5, 4, 3).requires_grad_(), torch.arange(5), generator=_gen(4))
    assert loss.item() == pytest.approx(math.log(8), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
def test_nce_gradient_equals_naive_autograd(negatives):
    obj = _objective(negatives=negatives, bank_dtype=F64)
    idx = torch.tensor([1, 2, 30, 8])
    z = _unit(4, 8, 7, F64).requires_grad_()
    loss, _ = obj(z, idx, generator=_gen(8))
    loss.backward()
    # naive torch: B x K x D gather, P = exp(l) / Z, the reference formula (Z as a constant)
    zr = z.detach().clone().requires_grad_()
    mem, tau = obj.bank.memory, obj.tau
    neg_idx = _negatives_for(obj, 4, 8)
    neg_idx = neg_idx.expand(4, -1) if neg_idx.dim() == 1 else neg_idx
    pos = (zr * mem[idx]).sum(1) / tau
    neg = naive_logits(zr / tau, mem, neg_idx)
    zval, kpn = obj.z.value, obj.k / obj.n_data
    p_pos, p_neg = torch.exp(pos) / zval, torch.exp(neg) / zval
    ref = -(torch.log(p_pos / (p_pos + kpn)).sum() + torch.log(kpn / (p_neg + kpn)).sum()) / 4
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-10, atol=1e-12)


def test_objective_gradcheck_per_sample_nce_and_in_batch_infonce():
    obj = _objective(bank_dtype=F64)
    obj.z.log_z.fill_(3.0)
    idx = torch.tensor([0, 5, 9])
    z = _unit(3, 8, 9, F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: obj(q, idx, generator=_gen(1), observe_z=False)[0], (z,))
    obj2 = _objective(loss="infonce", positive="view", in_batch=True, bank_dtype=F64)
    zp = _unit(3, 8, 10, F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, p: obj2(q, idx, z_pos=p, generator=_gen(1))[0], (z, zp))


# ---------------------------------------------------------------------------------------------------- Z state
def test_first_batch_z_is_frozen_and_running_z_moves():
    frozen, running = _objective(), _objective(z_mode="running", z_momentum=0.5)
    idx = torch.arange(4)
    first_f = frozen(_unit(4, 8, 1).requires_grad_(), idx, generator=_gen(1))[1]["log_z"]
    first_r = running(_unit(4, 8, 1).requires_grad_(), idx, generator=_gen(1))[1]["log_z"]
    assert first_f == pytest.approx(first_r, rel=1e-12)  # both start from the first batch's estimate
    z2 = frozen.bank.memory[:4].clone().requires_grad_()  # aligned with the positives: a different batch Z
    second_f = frozen(z2, idx, generator=_gen(2))[1]["log_z"]
    second_r = running(z2, idx, generator=_gen(2))[1]["log_z"]
    assert second_f == first_f
    assert second_r != pytest.approx(first_r, rel=1e-6)


def test_observe_z_false_leaves_state_and_unset_z_raises():
    obj = _objective()
    z, idx = _unit(3, 8, 1).requires_grad_(), torch.arange(3)
    with pytest.raises(InstdiscError, match="normaliser Z is unset"):
        obj(z, idx, generator=_gen(1), observe_z=False)
    obj(z, idx, generator=_gen(1))
    before = obj.z.log_z.clone()
    running = _objective(z_mode="running")
    running.z.log_z.copy_(before)
    running(z, idx, generator=_gen(2), observe_z=False)
    assert torch.equal(running.z.log_z, before)


# ---------------------------------------------------------------------------------------------------- bank state
def test_update_is_the_bank_momentum_rule_and_forward_does_not_touch_the_bank():
    obj = _objective(m=0.5)
    before = obj.bank.memory.clone()
    z, idx = _unit(3, 8, 1).requires_grad_(), torch.tensor([2, 11, 30])
    loss, _ = obj(z, idx, generator=_gen(1))
    loss.backward()
    assert torch.equal(obj.bank.memory, before)
    obj.update(idx, z)
    torch.testing.assert_close(obj.bank.memory[idx], F.normalize(0.5 * before[idx] + 0.5 * z.detach(), dim=1))
    mask = torch.ones(40, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(obj.bank.memory[mask], before[mask])


def test_update_before_backward_is_refused_for_per_sample():
    obj = _objective(negatives="per-sample")
    z, idx = _unit(3, 8, 1).requires_grad_(), torch.tensor([2, 11, 30])
    loss, _ = obj(z, idx, generator=_gen(1))
    obj.update(idx, z)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_state_dict_round_trip_has_bank_and_log_z():
    obj = _objective()
    z, idx = _unit(4, 8, 1).requires_grad_(), torch.arange(4)
    obj(z, idx, generator=_gen(1))
    obj.update(idx, z)
    sd = obj.state_dict()
    assert set(sd) == {"bank.memory", "z.log_z"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = Objective(40, 8, k=6, tau=0.2, generator=_gen(123))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.bank.memory, obj.bank.memory) and fresh.z.log_z.item() == obj.z.log_z.item()
    a = obj(z, idx, generator=_gen(2))[0].item()
    b = fresh(z, idx, generator=_gen(2))[0].item()
    assert a == b


@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
def test_half_precision_bank_objective(bank_dtype, negatives):
    half = _objective(negatives=negatives, bank_dtype=bank_dtype)
    full = _objective(negatives=negatives)
    full.bank.memory.copy_(half.bank.memory.float())  # the same (rounded) rows in float32
    z, idx = _unit(5, 8, 1).requires_grad_(), torch.tensor([0, 1, 2, 3, 4])
    zf = z.detach().clone().requires_grad_()
    lh, _ = half(z, idx, generator=_gen(3))
    lf, _ = full(zf, idx, generator=_gen(3))
    assert lh.item() == pytest.approx(lf.item(), rel=1e-5)
    lh.backward()
    lf.backward()
    torch.testing.assert_close(z.grad, zf.grad, rtol=1e-4, atol=1e-6)
    half.update(idx, z)
    assert half.bank.memory.dtype == bank_dtype


def test_deterministic_and_degenerate_sizes():
    obj = _objective(n=7, k=1)
    z, idx = _unit(1, 8, 1).requires_grad_(), torch.tensor([6])  # one query, K = 1, N not a multiple of B
    a = obj(z, idx, generator=_gen(5))
    b = obj(z, idx, generator=_gen(5))
    assert a[0].item() == b[0].item() and _same_stats(a[1], b[1])
    assert set(a[1]) == {"loss", "pos_sim", "neg_sim", "log_z", "own_sim", "inbatch_sim", "bank_share",
                         "neighbour_sim"}
    assert all(isinstance(v, float) for v in a[1].values())


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    ({"k": 40}, "k must satisfy 0 <= k < n_data, got k=40 with n_data=40"),
    ({"k": -1}, "got k=-1"),
    ({"k": 0}, "k=0 \\(no bank negatives\\) needs loss='infonce'"),
    ({"tau": 0.0}, "tau must be a finite number > 0, got 0.0"),
    ({"tau": -1.0}, "got -1.0"),
    ({"m": 1.0}, r"m must be in \[0, 1\), got 1.0"),
    ({"m": -0.1}, "got -0.1"),
    ({"loss": "triplet"}, "unknown loss 'triplet'"),
    ({"negatives": "hard"}, "unknown negatives 'hard'"),
    ({"positive": "self"}, "unknown positive 'self'"),
    ({"in_batch": True}, "in_batch=True needs loss='infonce', got loss='nce'"),
    ({"in_batch": True, "loss": "softmax"}, "got loss='softmax'"),
    ({"z_mode": "ema"}, "unknown z_mode 'ema'"),
    ({"bank_dtype": torch.int8}, "torch.int8"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(InstdiscError, match=match):
        Objective(40, 8, **{"k": 6, **kwargs})


def test_forward_validation():
    obj = _objective()
    z = _unit(3, 8, 1)
    with pytest.raises(InstdiscError, match=r"z must be \(B, 8\), got \(3, 5\)"):
        obj(torch.zeros(3, 5), torch.arange(3))
    with pytest.raises(InstdiscError, match=r"idx must be \(3,\)"):
        obj(z, torch.arange(4))
    with pytest.raises(InstdiscError, match=r"out of range \[0, 40\).*max 40"):
        obj(z, torch.tensor([0, 1, 40]))
    with pytest.raises(InstdiscError, match="z_pos was given but positive='bank'"):
        obj(z, torch.arange(3), z_pos=z)
    view = _objective(positive="view")
    with pytest.raises(InstdiscError, match="positive='view' needs z_pos"):
        view(z, torch.arange(3))
    with pytest.raises(InstdiscError, match=r"z_pos must have the shape of z \(3, 8\), got \(2, 8\)"):
        view(z, torch.arange(3), z_pos=z[:2])


# ---------------------------------------------------------------------------------------------------- view+bank, K = 0
@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
@pytest.mark.parametrize("w", [0.5, 0.25, 1.0])
def test_view_plus_bank_matches_python_loop_reference(negatives, w):
    """(1 - w) InfoNCE(z . z_pos | in-batch z_pos_j) + w InfoNCE(z . v_idx | K bank rows), from the definitions."""
    obj = _objective(loss="infonce", negatives=negatives, positive="view+bank", in_batch=True, bank_weight=w,
                     bank_dtype=F64)
    idx = torch.tensor([4, 9, 4, 20, 33])  # slot 4 twice: those two samples are not each other's negatives
    z = _unit(5, 8, 3, F64).requires_grad_()
    z_pos = _unit(5, 8, 4, F64)
    loss, stats = obj(z, idx, z_pos=z_pos, generator=_gen(6))
    mem, zl, zp = obj.bank.memory.tolist(), z.double().tolist(), z_pos.double().tolist()
    neg_idx = _negatives_for(obj, 5, 6)
    t = obj.tau
    view_pos = [_dot(zl[i], zp[i]) / t for i in range(5)]
    view_neg = [[_dot(zl[i], zp[j]) / t for j in range(5) if int(idx[j]) != int(idx[i])] for i in range(5)]
    bank_pos = [_dot(zl[i], mem[int(idx[i])]) / t for i in range(5)]
    bank_neg = [[_dot(zl[i], mem[j]) / t for j in (neg_idx.tolist() if neg_idx.dim() == 1 else neg_idx[i].tolist())]
                for i in range(5)]
    want = (1 - w) * reference_infonce_py(view_pos, view_neg) + w * reference_infonce_py(bank_pos, bank_neg)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert stats["pos_sim"] == pytest.approx(sum(view_pos) / 5 * t, rel=1e-6)
    assert stats["own_sim"] == pytest.approx(sum(bank_pos) / 5 * t, rel=1e-6)
    n_inb = sum(len(r) for r in view_neg)
    assert stats["inbatch_sim"] == pytest.approx(sum(map(sum, view_neg)) / n_inb * t, rel=1e-6)

    # bank_share: per sample, the bank term's share of the softmax weight on negatives (the negative side of the
    # gradient), averaged over the batch
    def neg_weight(pos, neg):
        return [1 - math.exp(p) / (math.exp(p) + sum(math.exp(x) for x in row)) for p, row in zip(pos, neg)]
    wb = [w * x for x in neg_weight(bank_pos, bank_neg)]
    wv = [(1 - w) * x for x in neg_weight(view_pos, view_neg)]
    assert stats["bank_share"] == pytest.approx(sum(b / (b + v) for b, v in zip(wb, wv)) / 5, rel=1e-6)


def test_view_plus_bank_gradient_matches_float64_gradcheck():
    obj = _objective(loss="infonce", negatives="per-sample", positive="view+bank", in_batch=True, bank_dtype=F64)
    idx = torch.tensor([1, 5, 9])
    z, zp = _unit(3, 8, 1, F64).requires_grad_(), _unit(3, 8, 2, F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, p: obj(q, idx, z_pos=p, generator=_gen(1))[0], (z, zp))


def test_view_plus_bank_closed_form_uniform_logits():
    # z orthogonal to every bank row and to every other view, z . z_pos = 0: every logit 0, so
    # loss = (1 - w) log(B') + w log(K + 1) with B' = B - 1 in-batch columns + the positive
    obj = _objective(n=20, d=6, k=7, loss="infonce", positive="view+bank", in_batch=True, bank_weight=0.25,
                     bank_dtype=F64)
    obj.init_bank(torch.tensor([[0.0, 0, 0, 0, 0, 1]], dtype=F64).repeat(20, 1))
    z = torch.eye(6, dtype=F64)[:3].requires_grad_()  # e0, e1, e2
    z_pos = torch.eye(6, dtype=F64)[3:5].repeat(2, 1)[:3]  # e3, e4, e3: orthogonal to every z
    loss, stats = obj(z, torch.tensor([0, 1, 2]), z_pos=z_pos, generator=_gen(0))
    assert loss.item() == pytest.approx(0.75 * math.log(3) + 0.25 * math.log(8), rel=1e-12)
    # negative weights: view 1 - 1/3 per sample, bank 1 - 1/8
    wb, wv = 0.25 * 7 / 8, 0.75 * 2 / 3
    assert stats["bank_share"] == pytest.approx(wb / (wb + wv), rel=1e-6)  # stats are float32


@pytest.mark.parametrize("positive", ["view", "view+bank"])  # view+bank without bank negatives: its view term
def test_k_zero_is_in_batch_infonce_and_never_reads_the_bank(positive):
    obj = _objective(k=0, loss="infonce", positive=positive, in_batch=True, bank_dtype=F64)
    idx = torch.tensor([3, 8, 3, 11])
    z, z_pos = _unit(4, 8, 7, F64).requires_grad_(), _unit(4, 8, 8, F64)
    gen = _gen(3)
    state = gen.get_state()
    loss, stats = obj(z, idx, z_pos=z_pos, generator=gen)
    assert torch.equal(gen.get_state(), state)  # no negatives drawn
    zl, zp = z.double().tolist(), z_pos.double().tolist()
    pos = [_dot(zl[i], zp[i]) / obj.tau for i in range(4)]
    extra = [[_dot(zl[i], zp[j]) / obj.tau for j in range(4) if int(idx[j]) != int(idx[i])] for i in range(4)]
    assert loss.item() == pytest.approx(reference_infonce_py(pos, [[] for _ in range(4)], extra), rel=1e-10)
    assert math.isnan(stats["neg_sim"]) and stats["bank_share"] == 0.0
    obj.bank.memory.fill_(float("nan"))  # the bank is never read for the loss
    loss2, _ = obj(z, idx, z_pos=z_pos, generator=_gen(3))
    assert loss2.item() == loss.item()


def test_single_softmax_bank_share_is_the_bank_columns_mass():
    obj = _objective(loss="infonce", negatives="shared", positive="view", in_batch=True, bank_dtype=F64)
    idx = torch.tensor([0, 1, 2])
    z, z_pos = _unit(3, 8, 9, F64), _unit(3, 8, 10, F64)
    _, stats = obj(z, idx, z_pos=z_pos, generator=_gen(2))
    pos, neg = reference_logits_py(obj, z, idx, z_pos, _negatives_for(obj, 3, 2))
    zl, zp = z.tolist(), z_pos.tolist()
    extra = [[_dot(zl[i], zp[j]) / obj.tau for j in range(3) if j != i] for i in range(3)]
    share = [sum(map(math.exp, neg[i])) / (sum(map(math.exp, neg[i])) + sum(map(math.exp, extra[i])))
             for i in range(3)]
    assert stats["bank_share"] == pytest.approx(sum(share) / 3, rel=1e-6)


@pytest.mark.parametrize("kw,msg", [
    ({"k": 0, "loss": "infonce", "positive": "bank", "in_batch": True}, "k=0 \\(no bank negatives\\) needs"),
    ({"k": 0, "loss": "nce"}, "k=0 \\(no bank negatives\\) needs"),
    ({"positive": "view+bank", "loss": "nce"}, "positive='view\\+bank' needs loss='infonce'"),
    ({"positive": "view+bank", "loss": "infonce", "in_batch": False}, "needs in_batch=True"),
    ({"positive": "view+bank", "loss": "infonce", "in_batch": True, "bank_weight": 0.0}, "bank_weight must be in"),
])
def test_view_plus_bank_and_k_zero_validation(kw, msg):
    with pytest.raises(InstdiscError, match=msg):
        _objective(**kw)


# ---------------------------------------------------------------------------------------------------- neighbour
def _nearest_other_py(obj, z, idx):
    """Float64 loop: for each query the stored row with the largest dot product, its own slot excluded, ties to
    the lowest slot."""
    mem, out = obj.bank.memory.double().tolist(), []
    for i, q in enumerate(z.double().tolist()):
        best, arg = -math.inf, None
        for j, row in enumerate(mem):
            if j != int(idx[i]) and _dot(q, row) > best:
                best, arg = _dot(q, row), j
        out.append(mem[arg])
    return out


@pytest.mark.parametrize("block", [4096, 7, 1])
def test_nearest_rows_match_a_loop_and_exclude_the_own_slot(block, monkeypatch):
    import instdisc.objective as objective_module

    monkeypatch.setattr(objective_module, "NEAREST_BLOCK_ROWS", block)
    obj = _objective(n=30, loss="infonce", positive="neighbour", in_batch=True, k=0, bank_dtype=F64)
    idx = torch.tensor([3, 17, 29, 0])
    z = obj.bank.memory[idx].clone()  # each query IS its own row: the own slot would win if it were allowed
    got = obj._nearest_rows(z, idx)
    torch.testing.assert_close(got.double(), torch.tensor(_nearest_other_py(obj, z, idx), dtype=F64))
    assert not any(torch.equal(got[i].double(), obj.bank.memory[int(idx[i])]) for i in range(4))


def test_nearest_rows_ties_go_to_the_lowest_slot():
    obj = _objective(n=6, d=2, loss="infonce", positive="neighbour", in_batch=True, k=0, bank_dtype=F64)
    rows = torch.tensor([[0.0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [0, -1]], dtype=F64)
    obj.init_bank(rows)
    got = obj._nearest_rows(torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64), torch.tensor([1, 5]))
    # query 0 (own slot 1): slots 2 and 4 tie -> 2; query 1 (own slot 5): slots 1, 2, 4 tie -> 1
    torch.testing.assert_close(got.double(), rows[[2, 1]])


@pytest.mark.parametrize("positive,w", [("neighbour", 0.5), ("view+neighbour", 0.5), ("view+neighbour", 0.25)])
def test_neighbour_losses_match_python_loop_reference(positive, w):
    obj = _objective(loss="infonce", positive=positive, in_batch=True, k=0, bank_weight=w, bank_dtype=F64)
    idx = torch.tensor([4, 9, 4, 20])
    z, z_pos = _unit(4, 8, 3, F64).requires_grad_(), _unit(4, 8, 4, F64).requires_grad_()
    loss, stats = obj(z, idx, z_pos=z_pos)
    t, zl, zp = obj.tau, z.double().tolist(), z_pos.double().tolist()
    anchor = _nearest_other_py(obj, z.detach(), idx)
    nn_pos = [_dot(anchor[i], zp[i]) / t for i in range(4)]
    nn_neg = [[_dot(anchor[i], zp[j]) / t for j in range(4) if int(idx[j]) != int(idx[i])] for i in range(4)]
    want = reference_infonce_py(nn_pos, nn_neg)
    if positive == "view+neighbour":
        view_pos = [_dot(zl[i], zp[i]) / t for i in range(4)]
        view_neg = [[_dot(zl[i], zp[j]) / t for j in range(4) if int(idx[j]) != int(idx[i])] for i in range(4)]
        want = (1 - w) * reference_infonce_py(view_pos, view_neg) + w * want
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert stats["pos_sim"] == pytest.approx(sum(nn_pos) / 4 * t, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(z_pos.grad) > 0
    if positive == "neighbour":  # the anchor has no gradient, and z only picks it: no gradient reaches z
        assert z.grad is None


# ---------------------------------------------------------------------------------------------------- bank neighbours
def _with_table(obj, table):
    """Fill the objective's neighbour table by hand (as a refresh would) -> the objective."""
    obj.neighbours.slots.copy_(torch.as_tensor(table, dtype=torch.int64))
    obj.neighbours.refreshes.fill_(1)
    return obj


def _neighbour_table(n, k_nb, seed=0):
    """(n, k_nb) distinct other slots per row, drawn at random (a refresh's shape, not its content)."""
    g = _gen(seed)
    rows = []
    for i in range(n):
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != i]
        rows.append(others[:k_nb])
    return rows


def reference_set_infonce_py(pos_sets, neg):
    """-log( sum_{j in P_i} e^{s_ij} / (sum_{j in P_i} e^{s_ij} + sum_k e^{s_ik}) ), averaged: the definition."""
    total = 0.0
    for ps, row in zip(pos_sets, neg):
        num = sum(math.exp(x) for x in ps)
        total += -math.log(num / (num + sum(math.exp(x) for x in row)))
    return total / len(pos_sets)


@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
@pytest.mark.parametrize("w,k_nb", [(0.5, 3), (0.25, 1), (1.0, 5)])
def test_view_plus_bank_neighbours_match_python_loop_reference(negatives, w, k_nb):
    """(1 - w) InfoNCE(view) + w * bank term whose positive is the set {idx_i} ∪ N(idx_i), from the definitions."""
    obj = _objective(loss="infonce", negatives=negatives, positive="view+bank", in_batch=True, bank_weight=w,
                     bank_dtype=F64, neighbours=k_nb)
    table = _neighbour_table(40, k_nb, seed=k_nb)
    _with_table(obj, table)
    idx = torch.tensor([4, 9, 4, 20, 33])
    z = _unit(5, 8, 3, F64).requires_grad_()
    z_pos = _unit(5, 8, 4, F64)
    loss, stats = obj(z, idx, z_pos=z_pos, generator=_gen(6))
    mem, zl, zp, t = obj.bank.memory.tolist(), z.double().tolist(), z_pos.double().tolist(), obj.tau
    neg_idx = _negatives_for(obj, 5, 6)
    view_pos = [_dot(zl[i], zp[i]) / t for i in range(5)]
    view_neg = [[_dot(zl[i], zp[j]) / t for j in range(5) if int(idx[j]) != int(idx[i])] for i in range(5)]
    sets = [[_dot(zl[i], mem[j]) / t for j in [int(idx[i])] + table[int(idx[i])]] for i in range(5)]
    bank_neg = [[_dot(zl[i], mem[j]) / t for j in (neg_idx.tolist() if neg_idx.dim() == 1 else neg_idx[i].tolist())]
                for i in range(5)]
    want = (1 - w) * reference_infonce_py(view_pos, view_neg) + w * reference_set_infonce_py(sets, bank_neg)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    nb = [s[1:] for s in sets]
    assert stats["neighbour_sim"] == pytest.approx(sum(map(sum, nb)) / (5 * k_nb) * t, rel=1e-6)
    assert stats["own_sim"] == pytest.approx(sum(s[0] for s in sets) / 5 * t, rel=1e-6)


@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
def test_bank_positive_neighbours_match_python_loop_reference(negatives):
    """positive 'bank' (one view, InfoNCE): the whole loss is the set-positive bank term."""
    obj = _objective(loss="infonce", negatives=negatives, positive="bank", bank_dtype=F64, neighbours=2)
    table = _neighbour_table(40, 2, seed=5)
    _with_table(obj, table)
    idx = torch.tensor([0, 39, 17])
    z = _unit(3, 8, 9, F64).requires_grad_()
    loss, stats = obj(z, idx, generator=_gen(2))
    mem, zl, t = obj.bank.memory.tolist(), z.double().tolist(), obj.tau
    neg_idx = _negatives_for(obj, 3, 2)
    sets = [[_dot(zl[i], mem[j]) / t for j in [int(idx[i])] + table[int(idx[i])]] for i in range(3)]
    neg = [[_dot(zl[i], mem[j]) / t for j in (neg_idx.tolist() if neg_idx.dim() == 1 else neg_idx[i].tolist())]
           for i in range(3)]
    assert loss.item() == pytest.approx(reference_set_infonce_py(sets, neg), rel=1e-10)
    # pos_sim reports the positive the loss scores: (1/B) sum_i tau * log sum_{j in P_i} e^{s_ij}
    want_pos = sum(math.log(sum(math.exp(x) for x in s)) for s in sets) / 3 * t
    assert stats["pos_sim"] == pytest.approx(want_pos, rel=1e-6)


def _with_holes(table, every=3):
    """``table`` with every ``every``-th entry (row-major) set to -1: pairs a refresh did not find or select."""
    flat = [j if (r * len(table[0]) + c) % every else -1 for r, row in enumerate(table) for c, j in enumerate(row)]
    return [flat[r * len(table[0]):(r + 1) * len(table[0])] for r in range(len(table))]


@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
@pytest.mark.parametrize("positive", ["view+bank", "bank"])
def test_absent_neighbours_leave_the_positive_set(negatives, positive):
    """Entries -1 in the table (--neighbour-select, or IVF finding fewer than k) are no positive: P_i = {idx_i} ∪
    {j in N(idx_i), j >= 0}, from the definition; the batch holds a row with no neighbour left."""
    w = 0.5 if positive == "view+bank" else 1.0
    obj = _objective(loss="infonce", negatives=negatives, positive=positive, in_batch=positive == "view+bank",
                     bank_weight=w, bank_dtype=F64, neighbours=3)
    table = _with_holes(_neighbour_table(40, 3, seed=11))
    table[7] = [-1, -1, -1]
    _with_table(obj, table)
    idx = torch.tensor([7, 1, 2, 20, 33])
    z = _unit(5, 8, 3, F64).requires_grad_()
    z_pos = _unit(5, 8, 4, F64)
    loss, stats = obj(z, idx, z_pos=z_pos if positive == "view+bank" else None, generator=_gen(6))
    mem, zl, zp, t = obj.bank.memory.tolist(), z.double().tolist(), z_pos.double().tolist(), obj.tau
    neg_idx = _negatives_for(obj, 5, 6)
    sets = [[_dot(zl[i], mem[j]) / t for j in [int(idx[i])] + [s for s in table[int(idx[i])] if s >= 0]]
            for i in range(5)]
    bank_neg = [[_dot(zl[i], mem[j]) / t for j in (neg_idx.tolist() if neg_idx.dim() == 1 else neg_idx[i].tolist())]
                for i in range(5)]
    want = w * reference_set_infonce_py(sets, bank_neg)
    if positive == "view+bank":
        view_pos = [_dot(zl[i], zp[i]) / t for i in range(5)]
        view_neg = [[_dot(zl[i], zp[j]) / t for j in range(5) if j != i] for i in range(5)]
        want += (1 - w) * reference_infonce_py(view_pos, view_neg)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    nb = [x for s in sets for x in s[1:]]
    assert stats["neighbour_sim"] == pytest.approx(sum(nb) / len(nb) * t, rel=1e-6)  # over the present ones
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_a_table_without_neighbours_is_the_plain_bank_term():
    plain = _objective(loss="infonce", negatives="shared", positive="view+bank", in_batch=True, bank_dtype=F64)
    empty = _with_table(_objective(loss="infonce", negatives="shared", positive="view+bank", in_batch=True,
                                   bank_dtype=F64, neighbours=2), [[-1, -1]] * 40)
    idx, z, zp = torch.tensor([1, 2, 3]), _unit(3, 8, 1, F64), _unit(3, 8, 2, F64)
    assert plain(z, idx, z_pos=zp, generator=_gen(3))[0].item() == pytest.approx(
        empty(z, idx, z_pos=zp, generator=_gen(3))[0].item(), rel=1e-14)


@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
def test_neighbours_with_absent_entries_gradcheck(negatives):
    obj = _objective(loss="infonce", negatives=negatives, positive="view+bank", in_batch=True, bank_dtype=F64,
                     neighbours=3)
    _with_table(obj, _with_holes(_neighbour_table(40, 3, seed=2), every=2))
    idx = torch.tensor([1, 5, 9, 5])
    z, zp = _unit(4, 8, 1, F64).requires_grad_(), _unit(4, 8, 2, F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, p: obj(q, idx, z_pos=p, generator=_gen(1))[0], (z, zp))


def test_neighbours_closed_form_uniform_logits():
    # every logit 0: bank term = log(1 + k_nb + K) - log(1 + k_nb); view term log(B' + 1) as before
    obj = _objective(n=20, d=6, k=7, loss="infonce", positive="view+bank", in_batch=True, bank_weight=0.25,
                     bank_dtype=F64, neighbours=3)
    obj.init_bank(torch.tensor([[0.0, 0, 0, 0, 0, 1]], dtype=F64).repeat(20, 1))
    _with_table(obj, _neighbour_table(20, 3))
    z = torch.eye(6, dtype=F64)[:3].requires_grad_()
    z_pos = torch.eye(6, dtype=F64)[3:5].repeat(2, 1)[:3]
    loss, _ = obj(z, torch.tensor([0, 1, 2]), z_pos=z_pos, generator=_gen(0))
    assert loss.item() == pytest.approx(0.75 * math.log(3) + 0.25 * (math.log(11) - math.log(4)), rel=1e-12)


def test_neighbours_hand_built_case():
    """Two slots in 2-D, one negative drawn (slot 2), the neighbour of slot 0 is slot 1. z = e0, tau = 1:
    s(own v0 = e0) = 1, s(neighbour v1 = (0.6, 0.8)) = 0.6, s(negative v2 = e1) = 0, so the loss is
    -log((e + e^0.6) / (e + e^0.6 + 1))."""
    obj = Objective(3, 2, k=1, tau=1.0, loss="infonce", positive="bank", negatives="shared", bank_dtype=F64,
                    neighbours=1, generator=_gen(0))
    obj.init_bank(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=F64))
    _with_table(obj, [[1], [0], [1]])
    g = _gen(0)
    while int(obj.bank.sample(1, 1, mode="shared", generator=_gen(g.initial_seed()))[0]) != 2:
        g = _gen(g.initial_seed() + 1)  # a seed whose single shared draw is slot 2
    z = torch.tensor([[1.0, 0.0]], dtype=F64, requires_grad=True)
    loss, _ = obj(z, torch.tensor([0]), generator=_gen(g.initial_seed()))
    num = math.e + math.exp(0.6)
    assert loss.item() == pytest.approx(-math.log(num / (num + 1.0)), rel=1e-12)


def test_neighbours_before_the_first_refresh_are_the_plain_bank_term():
    plain = _objective(loss="infonce", negatives="per-sample", positive="view+bank", in_batch=True, bank_dtype=F64)
    with_nb = _objective(loss="infonce", negatives="per-sample", positive="view+bank", in_batch=True,
                         bank_dtype=F64, neighbours=4)
    idx, z, zp = torch.tensor([1, 2, 3]), _unit(3, 8, 1, F64), _unit(3, 8, 2, F64)
    a, sa = plain(z, idx, z_pos=zp, generator=_gen(3))
    b, sb = with_nb(z, idx, z_pos=zp, generator=_gen(3))
    assert a.item() == b.item()
    assert math.isnan(sb["neighbour_sim"])


@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
def test_neighbours_gradcheck(negatives):
    obj = _objective(loss="infonce", negatives=negatives, positive="view+bank", in_batch=True, bank_dtype=F64,
                     neighbours=3)
    _with_table(obj, _neighbour_table(40, 3, seed=2))
    idx = torch.tensor([1, 5, 9, 5])
    z, zp = _unit(4, 8, 1, F64).requires_grad_(), _unit(4, 8, 2, F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, p: obj(q, idx, z_pos=p, generator=_gen(1))[0], (z, zp))


def test_refresh_neighbours_searches_the_bank_and_round_trips_in_the_state_dict():
    obj = _objective(loss="infonce", positive="view+bank", in_batch=True, neighbours=3)
    stats = obj.refresh_neighbours()
    mem = obj.bank.memory.double()
    sims = mem @ mem.T
    sims.fill_diagonal_(-float("inf"))
    torch.testing.assert_close(obj.neighbours.slots, sims.topk(3, dim=1).indices)  # random rows: no ties
    assert math.isnan(stats["neighbour_stability"]) and stats["neighbour_index"] == "flat"
    assert obj.refresh_neighbours()["neighbour_stability"] == 1.0  # same bank, same table
    sd = obj.state_dict()
    assert set(sd) == {"bank.memory", "z.log_z", "neighbours.slots", "neighbours.assign", "neighbours.refreshes"}
    fresh = _objective(loss="infonce", positive="view+bank", in_batch=True, neighbours=3)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.neighbours.slots, obj.neighbours.slots) and fresh.neighbours.ready


@pytest.mark.parametrize("kw,msg", [
    ({"neighbours": -1, "loss": "infonce", "positive": "view+bank", "in_batch": True}, "neighbours must be >= 0"),
    ({"neighbours": 2, "loss": "nce"}, "neighbours > 0 needs loss='infonce'"),
    ({"neighbours": 2, "loss": "infonce", "positive": "view", "in_batch": True}, "neighbours > 0 needs"),
    ({"neighbours": 2, "loss": "infonce", "positive": "view+bank", "in_batch": True, "k": 0}, "k > 0"),
    ({"neighbours": 40, "loss": "infonce", "positive": "view+bank", "in_batch": True}, "1 <= k < N"),
    ({"neighbours": 2, "neighbour_index": "hnsw", "loss": "infonce", "positive": "bank"}, "neighbour index must"),
])
def test_neighbour_validation(kw, msg):
    with pytest.raises(InstdiscError, match=msg):
        Objective(40, 8, **{"k": 6, **kw})
    with pytest.raises(InstdiscError, match="no neighbour table"):
        _objective().refresh_neighbours()


# ---------------------------------------------------------------------------------------------------- bank clusters
def _with_clusters(obj, assign):
    obj.neighbours.set_clusters(torch.as_tensor(assign))
    obj.neighbours.refreshes.fill_(1)
    return obj


@pytest.mark.parametrize("negatives", ["per-sample", "shared"])
@pytest.mark.parametrize("positive,w,k_nb", [("view+bank", 0.5, 0), ("view+bank", 0.3, 2), ("view", 0.5, 0)])
@pytest.mark.parametrize("holes", [False, True])
def test_cluster_positives_match_python_loop_reference(negatives, positive, w, k_nb, holes):
    """View term: -log( sum over {z_pos_i} ∪ same-cluster other views / (pos + every in-batch column) ); the bank term
    (view+bank) unchanged, with or without neighbours, from the definitions. ``holes``: every fourth slot in no
    cluster (-1, as --neighbour-select leaves the members farthest from their centroid): no positive but its own
    view, and a plain negative for the others."""
    obj = _objective(loss="infonce", negatives=negatives, positive=positive, in_batch=True, bank_weight=w,
                     bank_dtype=F64, clusters=3, neighbours=k_nb)
    assign = [-1 if holes and i % 4 == 0 else i % 3 for i in range(40)]
    _with_clusters(obj, assign)
    table = _neighbour_table(40, k_nb, seed=1) if k_nb else None
    if k_nb:
        _with_table(obj, table)
    idx = torch.tensor([4, 9, 4, 20, 33, 7])  # clusters 1, 0, 1, 2, 0, 1; slot 4 twice (never its own positive)
    z = _unit(6, 8, 3, F64).requires_grad_()
    z_pos = _unit(6, 8, 4, F64)
    loss, _ = obj(z, idx, z_pos=z_pos, generator=_gen(6))
    mem, zl, zp, t = obj.bank.memory.tolist(), z.double().tolist(), z_pos.double().tolist(), obj.tau
    ids = idx.tolist()
    view = 0.0
    for i in range(6):
        pos = _dot(zl[i], zp[i]) / t
        cols = [j for j in range(6) if ids[j] != ids[i]]
        same = [_dot(zl[i], zp[j]) / t for j in cols if assign[ids[j]] == assign[ids[i]] >= 0]
        denom = math.exp(pos) + sum(math.exp(_dot(zl[i], zp[j]) / t) for j in cols)
        view += -math.log((math.exp(pos) + sum(math.exp(x) for x in same)) / denom)
    view /= 6
    if positive == "view":
        neg_idx = _negatives_for(obj, 6, 6)
        # positive "view" with bank negatives: one softmax over bank rows and in-batch columns
        total = 0.0
        for i in range(6):
            pos = _dot(zl[i], zp[i]) / t
            cols = [j for j in range(6) if ids[j] != ids[i]]
            same = [_dot(zl[i], zp[j]) / t for j in cols if assign[ids[j]] == assign[ids[i]] >= 0]
            row = neg_idx.tolist() if neg_idx.dim() == 1 else neg_idx[i].tolist()
            denom = math.exp(pos) + sum(math.exp(_dot(zl[i], zp[j]) / t) for j in cols) + \
                sum(math.exp(_dot(zl[i], mem[j]) / t) for j in row)
            total += -math.log((math.exp(pos) + sum(math.exp(x) for x in same)) / denom)
        want = total / 6
    else:
        neg_idx = _negatives_for(obj, 6, 6)
        sets = [[_dot(zl[i], mem[j]) / t for j in [ids[i]] + (table[ids[i]] if k_nb else [])] for i in range(6)]
        bank_neg = [[_dot(zl[i], mem[j]) / t for j in (neg_idx.tolist() if neg_idx.dim() == 1 else neg_idx[i].tolist())]
                    for i in range(6)]
        want = (1 - w) * view + w * reference_set_infonce_py(sets, bank_neg)
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_cluster_positives_hand_built_and_closed_form():
    # no bank negatives (K = 0), every logit 0. Slots 0, 1, 2, 10 in clusters 4, 5, 5, 4: every sample has one
    # same-cluster column among its B' = 3 in-batch columns, so each term is -log((1 + 1) / (1 + 3)).
    obj = _objective(n=20, d=6, k=0, loss="infonce", positive="view", in_batch=True, bank_dtype=F64, clusters=6)
    assign = torch.zeros(20, dtype=torch.int64)
    assign[[0, 1, 2, 3]] = torch.tensor([4, 5, 5, 3])
    assign[10] = 4
    _with_clusters(obj, assign)
    z = torch.eye(6, dtype=F64)[:4].requires_grad_()
    z_pos = torch.eye(6, dtype=F64)[5].repeat(4, 1)  # e5 for every sample, orthogonal to e0..e3: every logit 0
    loss, _ = obj(z, torch.tensor([0, 1, 2, 10]), z_pos=z_pos)
    assert loss.item() == pytest.approx(-math.log(2 / 4), rel=1e-12)
    _with_clusters(obj, torch.arange(20))  # every slot its own cluster: the plain view term, log(4)
    loss, _ = obj(z, torch.tensor([0, 1, 2, 10]), z_pos=z_pos)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-12)


def test_cluster_positives_gradcheck_and_before_refresh():
    obj = _objective(loss="infonce", negatives="per-sample", positive="view+bank", in_batch=True, bank_dtype=F64,
                     clusters=4)
    plain = _objective(loss="infonce", negatives="per-sample", positive="view+bank", in_batch=True, bank_dtype=F64)
    idx = torch.tensor([1, 5, 9, 5, 13])
    z, zp = _unit(5, 8, 1, F64).requires_grad_(), _unit(5, 8, 2, F64).requires_grad_()
    assert obj(z, idx, z_pos=zp, generator=_gen(1))[0].item() == plain(z, idx, z_pos=zp, generator=_gen(1))[0].item()
    _with_clusters(obj, [i % 4 for i in range(40)])
    assert torch.autograd.gradcheck(lambda q, p: obj(q, idx, z_pos=p, generator=_gen(1))[0], (z, zp))


@pytest.mark.parametrize("kw,msg", [
    ({"clusters": 3, "loss": "nce"}, "clusters > 0 needs loss='infonce'"),
    ({"clusters": 3, "loss": "infonce", "positive": "bank", "in_batch": True}, "clusters > 0 needs"),
    ({"clusters": 41, "loss": "infonce", "positive": "view", "in_batch": True}, "2 <= C <= N"),
])
def test_cluster_validation(kw, msg):
    with pytest.raises(InstdiscError, match=msg):
        Objective(40, 8, **{"k": 6, **kw})
