"""bf16 autocast where the hardware has it, channels-last layout (instdisc/training/precision.py)."""
import json

import numpy as np
import pytest
import torch

from instdisc.data import build_dataset
from instdisc.models import build_encoder
from instdisc.training import precision, train
from instdisc.training.checkpoint import read_checkpoint
from instdisc.method import build_seeded_model
from instdisc.training.precision import (as_channels_last, autocast, cpu_has_native_bf16, resolve_amp,
                                         use_channels_last)
from test_train_loop import tiny_cfg


def test_resolve_amp(monkeypatch):
    assert resolve_amp(False, torch.device("cuda")) is False
    assert resolve_amp(False, torch.device("cpu")) is False
    assert resolve_amp(True, torch.device("cuda")) is True
    assert resolve_amp(True, torch.device("cpu")) is cpu_has_native_bf16()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp(True, torch.device("cpu")) is False  # emulated bf16 is slower than float32: stay off
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp(True, torch.device("cpu")) is True


def test_autocast_context_dtype():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast(torch.device("cpu"), True):
        assert lin(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), False):
        assert lin(x).dtype == torch.float32


def test_channels_last_changes_layout_not_values():
    torch.manual_seed(0)
    enc = build_encoder("convnet-s", in_channels=1, image_size=28).eval()
    x = torch.randn(5, 1, 28, 28)
    want = enc(x)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    use_channels_last(enc)
    convs = [m.weight for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k  # same values, other strides
    torch.testing.assert_close(enc(as_channels_last(x)), want, rtol=1e-4, atol=1e-5)
    # A channels-last state dict loads into a fresh (contiguous) model.
    fresh = build_encoder("convnet-s", in_channels=1, image_size=28).eval()
    fresh.load_state_dict(enc.state_dict())
    torch.testing.assert_close(fresh(x), want, rtol=1e-4, atol=1e-5)


def test_as_channels_last_leaves_other_ranks():
    x = torch.randn(3, 4)
    assert as_channels_last(x) is x
    y = as_channels_last(torch.randn(2, 3, 4, 4))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("amp", [True, False])
def test_training_records_amp_and_learns(fake_mnist, tmp_path, amp, one_torch_thread):
    """Six epochs on a fixed 64-image set, with and without bf16 autocast: the epoch mean loss falls and the
    embeddings spread out (the untrained encoder maps the fake images almost onto one point). Measured (seed 0):
    loss 3.355 -> 2.821 (amp) and 3.360 -> 2.808 (float32); z_std 0.0003 -> 0.0016 in both."""
    cfg = tiny_cfg(fake_mnist, tmp_path / "run", amp=amp, limit=64, nce_k=16, epochs=6, lr=0.05)
    ds = build_dataset(cfg.data, data_root=cfg.data_root, limit=64)
    res = train(cfg, dataset=ds)
    assert np.isfinite(res.last_loss) and res.global_step == 6 * 4
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    loss, spread = [r["loss"] for r in epochs], [r["z_std"] for r in epochs]
    assert len(loss) == 6 and all(np.isfinite(loss))
    assert loss[-1] < loss[0] - 0.3 and max(loss[1:]) < loss[0] - 0.3, loss
    assert spread[-1] > 3 * spread[0], spread
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["amp_resolved"] is (amp and cpu_has_native_bf16())
    # The weights stay float32 whatever the autocast; the checkpoint loads into a fresh contiguous model.
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert not [k for k, v in state.items() if v.dtype in (torch.bfloat16, torch.float16)]
    fresh = build_seeded_model(cfg, n_data=64, in_channels=ds.channels, image_size=ds.image_size)
    fresh.load_state_dict(state)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (the CI machines do)")
def test_amp_on_cpu_changes_the_run_when_native():
    """Autocast is really used on a bf16 CPU: the two runs' encoder outputs differ at bf16 rounding, not more."""
    torch.manual_seed(0)
    enc = use_channels_last(build_encoder("convnet-s", in_channels=1, image_size=28).eval())
    x = as_channels_last(torch.randn(8, 1, 28, 28))
    with autocast(torch.device("cpu"), True):
        low = enc(x).float()
    full = enc(x)
    assert not torch.equal(low, full)
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)
