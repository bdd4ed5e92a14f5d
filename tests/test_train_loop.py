import json

import numpy as np
import pytest
import torch

from instdisc.data import build_dataset
from instdisc.errors import InstdiscError
from instdisc.training import TrainConfig, TrainingDiverged, load_run, train
from instdisc.training.loop import _Batches, build_seeded_model


def tiny_cfg(root, out, **kw):
    base = dict(data="fashion-mnist:train", data_root=str(root), out=str(out), arch="convnet-tiny", epochs=1,
                batch_size=16, nce_k=32, low_dim=16, log_every=1)
    base.update(kw)
    recipe = base.pop("recipe", "fast")
    return TrainConfig.from_recipe(recipe, **base)


@pytest.mark.parametrize("recipe,over", [
    ("fast", {}),
    ("paper", {}),
    ("fast", dict(loss="nce", positive="bank", in_batch=False, negatives="per-sample")),
    ("fast", dict(loss="softmax", in_batch=False, positive="bank")),
    ("fast", dict(augment="pil")),
])
def test_two_steps_change_params_and_exactly_batch_rows(fake_mnist, tmp_path, recipe, over):
    cfg = tiny_cfg(fake_mnist, tmp_path / "run", recipe=recipe, epochs=1, nce_k=16, **over)
    ds = build_dataset(cfg.data, data_root=cfg.data_root)
    before = build_seeded_model(cfg, n_data=len(ds), in_channels=ds.channels, image_size=ds.image_size)
    # Two steps: a dataset of exactly 2 batches, so one epoch is two steps.
    ds2 = build_dataset(cfg.data, data_root=cfg.data_root, limit=32)
    cfg.limit = 32
    res = train(cfg, dataset=ds2)
    assert res.global_step == 2 and np.isfinite(res.last_loss)
    # The model starts from the seeded weights and they changed.
    start = build_seeded_model(cfg, n_data=32, in_channels=ds.channels, image_size=ds.image_size)
    changed = [not torch.equal(a, b) for a, b in zip(start.encoder.parameters(), res.model.encoder.parameters())]
    assert any(changed)
    # Bank rows that changed are exactly the rows of the two batches (bank init "random" for this comparison).
    batches = _Batches(cfg, ds2, torch.device("cpu"), use_batch_aug=cfg.augment != "pil")
    touched = set(batches.permutation(0)[:32].tolist())
    if cfg.bank_init == "random":
        diff = (start.objective.bank.memory != res.model.objective.bank.memory).any(dim=1)
        assert set(torch.nonzero(diff).flatten().tolist()) == touched
    rows = res.model.objective.bank.memory.float().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-3, rtol=0)
    del before


def test_exact_batch_rows_with_encoder_init(fake_mnist, tmp_path):
    """With bank_init=encoder the bank starts from the untrained embeddings; still only batch rows move."""
    cfg = tiny_cfg(fake_mnist, tmp_path / "r1", limit=40, epochs=1, log_every=1)
    cfg_ref = tiny_cfg(fake_mnist, tmp_path / "r2", limit=40, epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0,
                       nce_m=0.999999)
    res = train(cfg)
    # 40 images, batch 16: 2 steps, 32 rows touched, 8 untouched.
    batches = _Batches(cfg, build_dataset(cfg.data, data_root=cfg.data_root, limit=40), torch.device("cpu"), True)
    touched = set(batches.permutation(0)[:32].tolist())
    ref = train(cfg_ref)  # same init, (almost) no update: untouched rows must match exactly
    same = (ref.model.objective.bank.memory == res.model.objective.bank.memory).all(dim=1)
    assert set(torch.nonzero(same).flatten().tolist()) >= set(range(40)) - touched
    assert not same[list(touched)].any()


def test_files_written(fake_mnist, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(fake_mnist, out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["instdisc_version"] and "git_commit" in cfg and cfg["nce_k"] == 32
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["type"] for x in lines} == {"step", "epoch"}
    step = next(x for x in lines if x["type"] == "step")
    assert {"loss", "lr", "images_per_s", "eta_s", "epoch", "step"} <= set(step)
    c, model, ckpt = load_run(out)
    assert ckpt["epoch"] == 1 and ckpt["format_version"] == 1
    assert model.objective.bank.memory.shape == (96, 16)


def test_refuses_existing_run_without_resume(fake_mnist, tmp_path):
    train(tiny_cfg(fake_mnist, tmp_path / "run"))
    with pytest.raises(InstdiscError, match="--resume"):
        train(tiny_cfg(fake_mnist, tmp_path / "run"))


def test_non_finite_loss_stops_and_keeps_checkpoint(fake_mnist, tmp_path, monkeypatch):
    import instdisc.training.loop as loop

    out = tmp_path / "run"
    train(tiny_cfg(fake_mnist, out))
    before = (out / "checkpoint.pt").read_bytes()
    real = loop._step_loss
    calls = []

    def poisoned(*a, **kw):
        loss, stats, z = real(*a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats, z

    monkeypatch.setattr(loop, "_step_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2 step 3"):
        train(tiny_cfg(fake_mnist, out, epochs=2), resume=True)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_k_too_large_and_batch_too_large(fake_mnist, tmp_path):
    with pytest.raises(InstdiscError, match="nce-k"):
        train(tiny_cfg(fake_mnist, tmp_path / "a", nce_k=96))
    with pytest.raises(InstdiscError, match="batch-size"):
        train(tiny_cfg(fake_mnist, tmp_path / "b", batch_size=200, nce_k=8))


HEALTH_FIELDS = ("pos_sim", "neg_sim", "own_sim", "inbatch_sim", "bank_share", "gap", "staleness", "stale_gap",
                 "uniformity", "z_std", "alignment")


@pytest.mark.parametrize("over", [dict(), dict(positive="view+bank"), dict(nce_k=0)])
def test_epoch_records_carry_the_health_signals(fake_mnist, tmp_path, over, caplog):
    cfg = tiny_cfg(fake_mnist, tmp_path / "run", epochs=2, limit=32, **{"nce_k": 16, **over})
    with caplog.at_level("INFO", logger="instdisc.training"):
        train(cfg)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert set(HEALTH_FIELDS) <= set(r)
        for key in ("pos_sim", "own_sim", "staleness", "uniformity", "z_std", "alignment", "gap"):
            assert np.isfinite(r[key]), key
        assert -1 <= r["staleness"] <= 1 and r["uniformity"] <= 0 and r["z_std"] >= 0
    if over.get("nce_k") == 0:  # the no-bank control: no bank negatives, the gap is against in-batch negatives
        assert all(np.isnan(r["neg_sim"]) and r["bank_share"] == 0.0 for r in epochs)
        assert epochs[0]["gap"] == pytest.approx(epochs[0]["pos_sim"] - epochs[0]["inbatch_sim"])
    else:
        assert all(0 < r["bank_share"] <= 1 for r in epochs)
        assert epochs[0]["gap"] == pytest.approx(epochs[0]["pos_sim"] - epochs[0]["neg_sim"])
    line = next(m for m in caplog.messages if m.startswith("epoch 1/2 done"))
    assert "pos/neg gap" in line and "staleness" in line and "uniformity" in line


def test_k_not_given_adapts_to_the_dataset_and_is_logged(fake_mnist, tmp_path, caplog):
    cfg = tiny_cfg(fake_mnist, tmp_path / "run", limit=32, nce_k=None)
    with caplog.at_level("INFO", logger="instdisc.training"):
        res = train(cfg)
    assert res.model.objective.k == 16
    assert "bank negatives K = 16 (half of the 32 images (default 4096); set --nce-k to choose)" in caplog.messages
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["nce_k"] == 16
    train(tiny_cfg(fake_mnist, tmp_path / "run", limit=32, nce_k=None, epochs=2), resume=True)  # resumes alike


def test_health_probe_does_not_change_training(fake_mnist, tmp_path, monkeypatch):
    """Training with the probe equals training with a probe that measures nothing (bitwise on CPU)."""
    import instdisc.training.loop as loop

    a = train(tiny_cfg(fake_mnist, tmp_path / "a", limit=32, epochs=2, nce_k=16))

    class Silent(loop.HealthProbe):
        def __call__(self, model, epoch, **kw):
            return {}

    monkeypatch.setattr(loop, "HealthProbe", Silent)
    b = train(tiny_cfg(fake_mnist, tmp_path / "b", limit=32, epochs=2, nce_k=16))
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
