import math

import pytest

from instdisc.training.schedule import lr_at


def test_cosine_endpoints_and_mid():
    kw = dict(base_lr=0.1, epochs=10, schedule="cosine")
    assert lr_at(0, 10, **kw) == pytest.approx(0.1)
    assert lr_at(50, 10, **kw) == pytest.approx(0.05)
    assert lr_at(100, 10, **kw) == pytest.approx(0.0, abs=1e-12)
    t = 25 / 100
    assert lr_at(25, 10, **kw) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * t)))


def test_warmup_linear():
    kw = dict(base_lr=1.0, epochs=10, schedule="constant", warmup_epochs=1)
    assert [lr_at(s, 4, **kw) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_step_schedule_paper_milestones():
    kw = dict(base_lr=0.03, epochs=200, schedule="step", lr_steps=(120 / 200, 160 / 200))
    assert lr_at(119, 1, **kw) == pytest.approx(0.03)
    assert lr_at(120, 1, **kw) == pytest.approx(0.003)
    assert lr_at(160, 1, **kw) == pytest.approx(0.0003)


def test_unknown():
    with pytest.raises(ValueError):
        lr_at(0, 1, base_lr=1, epochs=1, schedule="poly")
