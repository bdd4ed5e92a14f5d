"""Interrupt a run at a step boundary, resume it, and compare bitwise with an uninterrupted run (CPU)."""
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
