import random

import numpy as np
import torch

from instdisc.seeding import get_rng_state, seed_everything, set_rng_state


def test_seed_everything_repeatable():
    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_state_roundtrip_through_weights_only(tmp_path):
    seed_everything(1)
    st = get_rng_state()
    p = tmp_path / "s.pt"
    torch.save(st, p)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(99)
    set_rng_state(torch.load(p, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
