"""Tests for instdisc/bank.py: init, uniform sampling, momentum update, duplicates, half storage, validation."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from instdisc.bank import MemoryBank
from instdisc.errors import InstdiscError


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _bank(n=20, d=6, seed=0, **kw):
    return MemoryBank(n, d, generator=_gen(seed), **kw)


def naive_update(memory, idx, z, m):
    """Row by row in float64: v <- (m v + (1 - m) z) / |m v + (1 - m) z| (distinct idx)."""
    out = memory.double().clone()
    for i, j in enumerate(idx.tolist()):
        row = [m * a + (1 - m) * b for a, b in zip(out[j].tolist(), z[i].double().tolist())]
        norm = sum(x * x for x in row) ** 0.5
        out[j] = torch.tensor([x / norm for x in row], dtype=torch.float64)
    return out


# ---------------------------------------------------------------------------------------------------- init
def test_init_unit_rows_persistent_buffer_and_seeded():
    bank = _bank(30, 8)
    assert bank.memory.shape == (30, 8) and bank.memory.dtype == torch.float32
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(30))
    assert "memory" in bank.state_dict()
    assert torch.equal(bank.memory, _bank(30, 8).memory)
    assert not torch.equal(bank.memory, _bank(30, 8, seed=1).memory)
    assert not bank.memory.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_init_other_storage_dtypes(dtype):
    bank = _bank(40, 16, dtype=dtype)
    assert bank.memory.dtype == dtype
    tol = 1e-2 if dtype != torch.float64 else 1e-12
    assert (bank.memory.double().norm(dim=1) - 1).abs().max() < tol


# ---------------------------------------------------------------------------------------------------- sampling
def test_sample_shapes_range_dtype():
    bank = _bank(20)
    per = bank.sample(5, 7, generator=_gen())
    shared = bank.sample(5, 7, mode="shared", generator=_gen())
    assert per.shape == (5, 7) and shared.shape == (7,)
    for t in (per, shared):
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < 20
    assert bank.sample(0, 3).shape == (0, 3)
    assert bank.sample(1, 1).shape == (1, 1)


def test_sample_deterministic_under_generator():
    bank = _bank(100)
    a = bank.sample(8, 50, generator=_gen(3))
    b = bank.sample(8, 50, generator=_gen(3))
    c = bank.sample(8, 50, generator=_gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["per-sample", "shared"])
def test_sample_is_uniform_with_replacement_over_all_slots(mode):
    n = 50
    bank = _bank(n)
    draws = bank.sample(400, 500, mode=mode, generator=_gen(7)).reshape(-1) if mode == "per-sample" else \
        bank.sample(1, 200_000, mode=mode, generator=_gen(7))
    counts = torch.bincount(draws, minlength=n).double()
    expected = draws.numel() / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # chi-square with 49 dof: mean 49, sd ~9.9; 110 is > 6 sd (fixed seed, so this is deterministic anyway)
    assert chi2 < 110, chi2
    assert (counts > 0).all()  # every slot, the sample's own included, can be drawn
    # with replacement: a per-sample row of 500 draws over 50 slots must repeat slots
    if mode == "per-sample":
        row = bank.sample(1, 60, generator=_gen(1))[0]
        assert row.unique().numel() < 60


# ---------------------------------------------------------------------------------------------------- update
@pytest.mark.parametrize("m", [0.0, 0.5, 0.9])
def test_update_matches_float64_reference_and_touches_only_batch_rows(m):
    bank = _bank(20, 6)
    before = bank.memory.clone()
    idx = torch.tensor([4, 0, 17, 9])
    z = F.normalize(torch.randn(4, 6, generator=_gen(5)), dim=1)
    bank.update(idx, z, m)
    want = naive_update(before, idx, z, m)
    torch.testing.assert_close(bank.memory.double(), want, rtol=1e-6, atol=1e-6)
    other = torch.ones(20, dtype=torch.bool)
    other[idx] = False
    assert torch.equal(bank.memory[other], before[other])  # bit-identical elsewhere
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(20))


def test_update_with_non_unit_z_keeps_rows_unit():
    bank = _bank(10, 4)
    bank.update(torch.tensor([1, 2]), torch.randn(2, 4, generator=_gen(2)) * 7.0, 0.5)
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(10))


def test_update_duplicates_are_averaged_and_order_independent():
    bank = _bank(10, 5)
    before = bank.memory.clone()
    z = F.normalize(torch.randn(4, 5, generator=_gen(3)), dim=1)
    idx = torch.tensor([3, 7, 3, 3])
    bank.update(idx, z, 0.5)
    # slot 3 gets ONE update with the mean of rows 0, 2, 3; slot 7 a normal update
    mean3 = (z[0] + z[2] + z[3]) / 3
    want3 = F.normalize(0.5 * before[3] + 0.5 * mean3, dim=0)
    want7 = F.normalize(0.5 * before[7] + 0.5 * z[1], dim=0)
    torch.testing.assert_close(bank.memory[3], want3)
    torch.testing.assert_close(bank.memory[7], want7)
    # any permutation of the batch gives the same rows (up to the rounding of the float sum)
    other = _bank(10, 5)
    perm = torch.tensor([2, 0, 3, 1])
    other.update(idx[perm], z[perm], 0.5)
    torch.testing.assert_close(other.memory, bank.memory, rtol=0, atol=1e-7)


def test_update_is_deterministic():
    a, b = _bank(), _bank()
    idx = torch.tensor([1, 5, 5, 2])
    z = torch.randn(4, 6, generator=_gen(9))
    a.update(idx, z, 0.5)
    b.update(idx, z, 0.5)
    assert torch.equal(a.memory, b.memory)


def test_update_detaches_and_accepts_grad_tensors():
    bank = _bank(8, 3)
    z = torch.randn(2, 3, requires_grad=True)
    bank.update(torch.tensor([0, 1]), z, 0.5)
    assert not bank.memory.requires_grad


def test_set_rows_and_init_from():
    bank = _bank(8, 3)
    z = torch.randn(2, 3, generator=_gen(1)) * 4
    bank.set_rows(torch.tensor([6, 2]), z)
    torch.testing.assert_close(bank.memory[[6, 2]], F.normalize(z, dim=1))
    z_all = torch.randn(8, 3, generator=_gen(2)) * 3
    bank.init_from(z_all)
    torch.testing.assert_close(bank.memory, F.normalize(z_all, dim=1))
    with pytest.raises(InstdiscError, match=r"\(8, 3\).*\(7, 3\)"):
        bank.init_from(z_all[:7])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bank_update(dtype):
    bank = _bank(30, 16, dtype=dtype)
    assert bank.memory.element_size() == 2
    before = bank.memory.float().clone()
    idx = torch.tensor([0, 29, 11])
    z = F.normalize(torch.randn(3, 16, generator=_gen(4)), dim=1)
    bank.update(idx, z, 0.5)
    assert bank.memory.dtype == dtype
    want = naive_update(before, idx, z, 0.5)[idx]
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(bank.memory[idx].double(), want, rtol=0, atol=tol)
    assert (bank.memory.double().norm(dim=1) - 1).abs().max() < tol


def test_state_dict_round_trip():
    bank = _bank(12, 4)
    bank.update(torch.tensor([3]), torch.randn(1, 4), 0.5)
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    fresh = _bank(12, 4, seed=99)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.memory, bank.memory)


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    ({"n_data": 0}, "n_data must be >= 1, got 0"),
    ({"dim": 0}, "dim must be >= 1, got 0"),
    ({"dtype": torch.int32}, "torch.int32"),
])
def test_constructor_validation(kwargs, match):
    args = {"n_data": 5, "dim": 3, **kwargs}
    with pytest.raises(InstdiscError, match=match):
        MemoryBank(args.pop("n_data"), args.pop("dim"), **args)


def test_method_validation():
    bank = _bank(10, 4)
    with pytest.raises(InstdiscError, match=r"m must be in \[0, 1\), got 1.0"):
        bank.update(torch.tensor([0]), torch.randn(1, 4), 1.0)
    with pytest.raises(InstdiscError, match="got -0.5"):
        bank.update(torch.tensor([0]), torch.randn(1, 4), -0.5)
    with pytest.raises(InstdiscError, match=r"out of range \[0, 10\).*max 10"):
        bank.update(torch.tensor([10]), torch.randn(1, 4), 0.5)
    with pytest.raises(InstdiscError, match=r"min -1"):
        bank.update(torch.tensor([-1]), torch.randn(1, 4), 0.5)
    with pytest.raises(InstdiscError, match=r"\(2, 4\).*\(2, 3\)"):
        bank.update(torch.tensor([0, 1]), torch.randn(2, 3), 0.5)
    with pytest.raises(InstdiscError, match="unknown sample mode 'all'"):
        bank.sample(2, 3, mode="all")
    with pytest.raises(InstdiscError, match="k must be >= 1, got 0"):
        bank.sample(2, 0)
