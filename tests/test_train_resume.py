"""Interrupt a run at a step boundary, resume it, and compare bitwise with an uninterrupted run (CPU)."""
from pathlib import Path

import pytest
import torch

from instdisc.training import train
from instdisc.training.checkpoint import read_checkpoint
from instdisc.training.loop import _StopFlag

from test_train_loop import tiny_cfg


class StopAfter(_StopFlag):
    """Reports a SIGTERM at the ``n``-th step boundary check."""

    def __init__(self, n):
        super().__init__()
        self.n, self.checks = n, 0

    @property
    def signum(self):
        self.checks += 1
        return 15 if self.checks > self.n else None

    @signum.setter
    def signum(self, v):
        pass


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                if isinstance(x, dict):
                    assert_same_state(x, y)
                else:
                    assert x == y
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("recipe,stops", [("fast", [4, 3]), ("paper", [8])])
def test_interrupt_resume_bitwise(fake_mnist, tmp_path, recipe, stops):
    ref = train(tiny_cfg(fake_mnist, tmp_path / "ref", recipe=recipe, epochs=3))
    out = tmp_path / "run"
    res = train(tiny_cfg(fake_mnist, out, recipe=recipe, epochs=3), stop_flag=StopAfter(stops[0]))
    assert res.interrupted
    for n in stops[1:]:
        res = train(tiny_cfg(fake_mnist, out, recipe=recipe, epochs=3), resume=True, stop_flag=StopAfter(n))
        assert res.interrupted
    res = train(tiny_cfg(fake_mnist, out, recipe=recipe, epochs=3), resume=True)
    assert not res.interrupted and res.global_step == ref.global_step
    a, b = read_checkpoint(tmp_path / "ref"), read_checkpoint(out)
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"], b["optimizer"])
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3


def test_resume_refuses_other_dataset_size(fake_mnist, tmp_path):
    from instdisc.errors import InstdiscError

    train(tiny_cfg(fake_mnist, tmp_path / "r"))
    with pytest.raises(InstdiscError, match="memory bank has 96 slots"):
        train(tiny_cfg(fake_mnist, tmp_path / "r", limit=50), resume=True)


def test_resume_refuses_changed_setting(fake_mnist, tmp_path):
    from instdisc.errors import InstdiscError

    train(tiny_cfg(fake_mnist, tmp_path / "r"))
    with pytest.raises(InstdiscError, match="nce_t"):
        train(tiny_cfg(fake_mnist, tmp_path / "r", nce_t=0.2), resume=True)


# A run saved by the code before the one-loop refactor (commit fefd7ab, tests/data/run_before_one_loop: config,
# metrics and the checkpoint at the end of epoch 1 of
#   tiny_cfg(make_fake_mnist(root), out, limit=48, epochs=1, amp=False, low_dim=16, nce_k=16)
# with torch.set_num_threads(1)). Resumed there to epochs=2, its final state had this digest (sha256 over the state
# dict, keys sorted). One thread: CPU kernels may sum in another order with more.
RUN_BEFORE_ONE_LOOP = Path(__file__).parent / "data" / "run_before_one_loop"
RUN_BEFORE_ONE_LOOP_FINAL = "b9116574db8769cd0f7c72360d805b0ea261467cffe607a8c5cdb306e68bb27c"
# CPU kernels round differently per instruction set, so a bitwise reference holds only on the kind of CPU it was
# recorded on. The checkpoint above and its final digest come from an AVX512 CPU. On AVX2 CPUs (without AVX512) the
# references are the digests the code of commit 2b1c3fa (the stop before the bank-neighbour change, which passed
# this test on AVX512) computed on an AVX2 AMD EPYC: its fresh first epoch, and the old checkpoint resumed to 2.
# On Intel AVX512 CPUs (float32 kernels differ from AMD's of the same capability) they are what the code before the
# one-loop refactor (6c6112e^) computed on a 2-core Intel Xeon with AMX, today's code computing the same.
BEFORE_ONE_LOOP_REFERENCES = {  # _cpu_kind(), else the capability alone -> (fresh epoch 1 digest, final digest);
    # no entry: the checkpoint's own (AMD AVX512) digests
    "AVX2": ("0b2ec5e98274e0a6a06925fd08b048cabda3a1c34d0503d81ee04ecf506cc748",
             "edf9e09a2f8acedb76133040a47d2ed520ca16414094420163d75d9382429cb3"),
    "AVX512 GenuineIntel": ("e837652210093ebea989a0eceabd0d252be4a6753a87237fdcc3eac8a1cbe07f",
                            "b4fcb3b2b3f61165c0d65d25623c0b7c3600fb889b35f3457aea5eb0b6783a44"),
}


def _cpu_kind() -> str:
    """torch's CPU capability and the vendor (float32 kernels differ between AMD and Intel CPUs of one capability)."""
    vendor = ""
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()} {vendor}".strip()


def _state_digest(state: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_a_checkpoint_from_before_the_refactor_loads_and_resumes_as_it_did(tmp_path, one_torch_thread):
    import shutil

    from conftest import make_fake_mnist

    root = make_fake_mnist(tmp_path / "fmnist")
    out = tmp_path / "run"
    shutil.copytree(RUN_BEFORE_ONE_LOOP, out)
    kw = dict(limit=48, amp=False, low_dim=16, nce_k=16)
    old = read_checkpoint(out)
    own = (_state_digest(old["model"]), RUN_BEFORE_ONE_LOOP_FINAL)
    want_fresh, want_final = BEFORE_ONE_LOOP_REFERENCES.get(
        _cpu_kind(), BEFORE_ONE_LOOP_REFERENCES.get(torch.backends.cpu.get_cpu_capability(), own))
    # today's code computes the same first epoch, bit for bit
    fresh = train(tiny_cfg(root, tmp_path / "fresh", epochs=1, **kw))
    assert _state_digest(fresh.model.state_dict()) == want_fresh
    # and continues the old checkpoint to what the old code computed from it
    res = train(tiny_cfg(root, out, epochs=2, **kw), resume=True)
    assert res.global_step == 6 and res.epochs_done == 2
    assert _state_digest(res.model.state_dict()) == want_final


@pytest.mark.parametrize("stops,start,select", [([4, 3], 1, 1.0), ([7], 0, 1.0), ([4], 1, 0.5)])
def test_interrupt_resume_bitwise_with_bank_neighbours(fake_mnist, tmp_path, stops, start, select):
    """Bank neighbours and clusters searched at epoch ends (or right after the bank's init), all or a selected half:
    a run stopped before and resumed after a search ends bit for bit where the uninterrupted run does, the tables
    included."""
    kw = dict(epochs=3, neighbours=3, clusters=4, neighbour_start=start, neighbour_select=select)
    ref = train(tiny_cfg(fake_mnist, tmp_path / "ref", **kw))
    out = tmp_path / "run"
    res = train(tiny_cfg(fake_mnist, out, **kw), stop_flag=StopAfter(stops[0]))
    assert res.interrupted
    for n in stops[1:]:
        res = train(tiny_cfg(fake_mnist, out, **kw), resume=True, stop_flag=StopAfter(n))
        assert res.interrupted
    res = train(tiny_cfg(fake_mnist, out, **kw), resume=True)
    a, b = read_checkpoint(tmp_path / "ref"), read_checkpoint(out)
    assert int(a["model"]["objective.neighbours.refreshes"]) == 3 + (start == 0)
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"], b["optimizer"])
