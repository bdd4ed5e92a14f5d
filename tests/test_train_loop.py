import json

import numpy as np
import pytest
import torch

from instdisc.data import build_dataset
from instdisc.errors import InstdiscError
from instdisc.training import TrainConfig, TrainingDiverged, load_run, train
from instdisc.method import build_seeded_model
from instdisc.training.batches import Batches
from instdisc.training.checkpoint import read_checkpoint


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
    """40 images at batch 16: one epoch is 2 steps over 32 rows and the permutation's last 8 rows are left out
    (steps_per_epoch = N // B drops the remainder). Exactly those 32 bank rows move, for every parameter set: the
    bank the run starts with (random, or the untrained encoder's embeddings) is read from a run stopped before its
    first step."""
    from test_train_resume import StopAfter

    n = 40
    run_cfg = dict(recipe=recipe, epochs=1, nce_k=16, limit=n, **over)
    ds = build_dataset("fashion-mnist:train", data_root=str(fake_mnist), limit=n)
    # The bank the run starts with: a run stopped at its first step boundary saves it, untouched.
    stopped = train(tiny_cfg(fake_mnist, tmp_path / "start", **run_cfg), dataset=ds, stop_flag=StopAfter(0))
    assert stopped.interrupted and stopped.global_step == 0
    start = read_checkpoint(tmp_path / "start")
    assert (start["epoch"], start["step_in_epoch"], start["step"]) == (0, 0, 0)
    bank0 = start["model"]["objective.bank.memory"]  # (40, 16)
    cfg = tiny_cfg(fake_mnist, tmp_path / "run", **run_cfg)
    seeded = build_seeded_model(cfg, n_data=n, in_channels=ds.channels, image_size=ds.image_size)
    if cfg.bank_init == "random":  # the seeded model's random bank is the start
        assert torch.equal(bank0, seeded.objective.bank.memory)
    else:  # the encoder-initialised start differs from the random draw
        assert not torch.equal(bank0, seeded.objective.bank.memory)
    res = train(cfg, dataset=ds)
    assert res.global_step == 2 and np.isfinite(res.last_loss)
    # The model starts from the seeded weights and they changed.
    changed = [not torch.equal(a, b) for a, b in zip(seeded.encoder.parameters(), res.model.encoder.parameters())]
    assert any(changed)
    # The rows that changed are exactly the rows of the two batches; the 8 left-over rows are bitwise as they were.
    batches = Batches(cfg, ds, torch.device("cpu"), use_batch_aug=cfg.augment != "pil")
    assert batches.steps_per_epoch == 2
    perm = batches.permutation(0)
    touched = set(perm[:32].tolist())
    assert len(touched) == 32 and set(perm[32:].tolist()) == set(range(n)) - touched
    bank = res.model.objective.bank.memory
    diff = (bank0 != bank).any(dim=1)
    assert set(torch.nonzero(diff).flatten().tolist()) == touched
    rows = bank.float().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-3, rtol=0)


def test_exact_batch_rows_with_encoder_init(fake_mnist, tmp_path):
    """With bank_init=encoder the bank starts from the untrained embeddings; still only batch rows move."""
    cfg = tiny_cfg(fake_mnist, tmp_path / "r1", limit=40, epochs=1, log_every=1)
    cfg_ref = tiny_cfg(fake_mnist, tmp_path / "r2", limit=40, epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0,
                       nce_m=0.999999)
    res = train(cfg)
    # 40 images, batch 16: 2 steps, 32 rows touched, 8 untouched.
    batches = Batches(cfg, build_dataset(cfg.data, data_root=cfg.data_root, limit=40), torch.device("cpu"), True)
    touched = set(batches.permutation(0)[:32].tolist())
    ref = train(cfg_ref)  # same init, (almost) no update: untouched rows must match exactly
    same = (ref.model.objective.bank.memory == res.model.objective.bank.memory).all(dim=1)
    assert set(torch.nonzero(same).flatten().tolist()) >= set(range(40)) - touched
    assert not same[list(touched)].any()


@pytest.mark.parametrize("batch_aug", [True, False])
def test_jitter_reaches_the_views(fake_mnist, tmp_path, batch_aug):
    """--jitter sets the colour jitter of the training views (both paths) and of the health probe's views."""
    from instdisc.training.health import HealthProbe

    cfg = tiny_cfg(fake_mnist, tmp_path / "r", jitter=0.8, crop_min=0.2)
    ds = build_dataset(cfg.data, data_root=cfg.data_root, limit=40)
    b = Batches(cfg, ds, torch.device("cpu"), batch_aug)
    probe = HealthProbe(ds, 0, crop_min=0.2, jitter=cfg.jitter)
    if batch_aug:
        assert b.aug.strengths[:2] == (0.8, 0.8) and probe.aug.strengths[:2] == (0.8, 0.8)
    else:
        assert b.transform.transforms[1].brightness == pytest.approx((0.2, 1.8))
    default = Batches(tiny_cfg(fake_mnist, tmp_path / "d"), ds, torch.device("cpu"), True)
    assert default.aug.strengths[:2] == (0.4, 0.4)


def test_files_written(fake_mnist, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(fake_mnist, out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["instdisc_version"] and "git_commit" in cfg and cfg["nce_k"] == 32
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["type"] for x in lines} == {"step", "epoch", "verdict"} and lines[-1]["type"] == "verdict"
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
        assert all(r["neg_sim"] is None and r["bank_share"] == 0.0 for r in epochs)  # nan is written as null
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


def _gray_pngs(folder, n, size=28, seed=0):
    """``n`` grayscale PNGs ``folder/<k>.png`` with class-dependent content (class k % 4)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        a = rng.integers(0, 40, (size, size)).astype(np.uint8)
        c = k % 4
        a[2 + 5 * c: 8 + 5 * c, 4:12] = 220
        p = folder / f"{k:04d}.png"
        Image.fromarray(a, "L").save(p)
        paths.append(p)
    return paths


def test_grayscale_folder_trains_at_its_own_size_and_config_records_it(tmp_path):
    for k, p in enumerate(_gray_pngs(tmp_path / "src", 32)):
        (tmp_path / "g" / f"c{k % 4}").mkdir(parents=True, exist_ok=True)
        p.rename(tmp_path / "g" / f"c{k % 4}" / p.name)
    cfg = tiny_cfg(None, tmp_path / "run", data=str(tmp_path / "g"), nce_k=16, data_root=None)
    res = train(cfg)
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (conf["dataset"]["channels"], conf["dataset"]["image_size"]) == (1, 28)
    assert conf["dataset"]["geometry"]["channels"] == 1 and "grayscale" in conf["dataset"]["geometry"]["reason"]
    assert res.model.encoder(torch.zeros(2, 1, 28, 28)).shape[0] == 2
    from instdisc.export import export_encoder, export_features, read_features_attrs

    meta = export_encoder(tmp_path / "run", tmp_path / "enc")  # exports record the choice too
    assert meta["data"]["geometry"] == conf["dataset"]["geometry"] and meta["channels"] == 1
    export_features(tmp_path / "enc", str(tmp_path / "g"), tmp_path / "f.h5")
    attrs = read_features_attrs(tmp_path / "f.h5")
    assert attrs["channels"] == 1 and json.loads(attrs["geometry_json"])["image_size"] == 28


def _partly_labelled_list(tmp_path, n=64, unlabeled_every=4):
    paths = _gray_pngs(tmp_path / "imgs", n)
    lines = [f"{p}" if k % unlabeled_every == 0 else f"{p},{k % 4}" for k, p in enumerate(paths)]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def test_knn_monitor_uses_the_labelled_part_at_the_training_size(tmp_path, caplog):
    lst = _partly_labelled_list(tmp_path)
    spec = f"filelist:{lst}"
    cfg = tiny_cfg(None, tmp_path / "run", data=spec, data_root=None, image_size=24, knn_every=1, knn_data=spec,
                   nce_k=16, knn_k=10)
    with caplog.at_level("WARNING", logger="instdisc"):
        train(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in recs if r["type"] == "epoch"][-1]
    assert 0 <= epoch["knn_top1"] <= 1
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "16 of 64 training images are unlabeled" in msgs and "16 of 64 --knn-data images are unlabeled" in msgs


def test_knn_monitor_size_follows_the_training_data(tmp_path):
    from instdisc.training.knn_monitor import KnnMonitor

    lst = _partly_labelled_list(tmp_path, n=16)
    train_ds = build_dataset(f"filelist:{lst}", image_size=20)
    cfg = tiny_cfg(None, tmp_path / "r", data=f"filelist:{lst}", data_root=None, knn_every=1,
                   knn_data=f"filelist:{lst}")
    mon = KnnMonitor(cfg, train_ds, torch.device("cpu"))
    assert (mon.test_ds.image_size, mon.test_ds.channels) == (20, 1)


def test_unusable_knn_monitor_is_refused_before_anything_is_written(tmp_path):
    paths = _gray_pngs(tmp_path / "imgs", 32)
    unl = tmp_path / "unlabeled.txt"
    unl.write_text("\n".join(str(p) for p in paths) + "\n")
    lab = tmp_path / "labelled.txt"
    lab.write_text("\n".join(f"{p},{k % 4}" for k, p in enumerate(paths)) + "\n")
    out = tmp_path / "run"
    cfg = tiny_cfg(None, out, data=f"filelist:{lab}", data_root=None, knn_every=1, knn_data=f"filelist:{unl}",
                   nce_k=16)
    with pytest.raises(InstdiscError, match="has no labelled images"):
        train(cfg)
    assert not (out / "config.json").exists() and not (out / "checkpoint.pt").exists()
    cfg = tiny_cfg(None, out, data=f"filelist:{unl}", data_root=None, knn_every=1, knn_data=f"filelist:{lab}",
                   nce_k=16)
    with pytest.raises(InstdiscError, match="needs labels in the training data"):
        train(cfg)
    assert not (out / "config.json").exists()


def test_neighbour_schedule():
    from instdisc.training.loop import neighbours_due

    cfg = TrainConfig.from_recipe("fast", neighbours=2, neighbour_start=2, neighbour_every=3)
    assert [e for e in range(12) if neighbours_due(cfg, e)] == [2, 5, 8, 11]
    cfg = TrainConfig.from_recipe("fast", neighbours=2, neighbour_start=0)
    assert [e for e in range(4) if neighbours_due(cfg, e)] == [0, 1, 2, 3]
    assert not any(neighbours_due(TrainConfig.from_recipe("fast", neighbours=0), e) for e in range(4))


def test_bank_neighbours_are_searched_logged_and_used(fake_mnist, tmp_path):
    from instdisc.bank_neighbours import label_agreement, search_bank

    res = train(tiny_cfg(fake_mnist, tmp_path / "run", epochs=2, neighbours=3))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [e["neighbour_index"] for e in epochs] == ["flat", "flat"]
    assert epochs[0]["neighbour_stability"] is None and 0 <= epochs[1]["neighbour_stability"] <= 1
    assert epochs[0]["neighbour_sim"] is None  # no table during epoch 1: the plain bank term
    assert -1 <= epochs[1]["neighbour_sim"] <= 1  # epoch 2 scored the neighbours searched after epoch 1
    obj = res.model.objective
    # the table is the search of the final bank, and its label agreement is what the record says
    assert torch.equal(obj.neighbours.slots, search_bank(obj.bank.memory, 3))
    from instdisc.data import build_dataset

    labels = build_dataset("fashion-mnist:train", data_root=str(fake_mnist)).labels
    assert epochs[1]["neighbour_label_agreement"] == pytest.approx(label_agreement(obj.neighbours.slots, labels))


def test_neighbours_recipe_trains_with_neighbours_sized_to_the_data(fake_mnist, tmp_path):
    """--recipe neighbours on 96 images: the recipe's 10 neighbours shrink to 96 // 20 = 4, said in the log line,
    recorded in config.json, and the table searched after epoch 1 has 4 columns."""
    res = train(tiny_cfg(fake_mnist, tmp_path / "run", epochs=2, recipe="neighbours", nce_k=None))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["recipe"] == "neighbours" and cfg["neighbours"] == 4
    assert tuple(res.model.objective.neighbours.slots.shape) == (96, 4)
    epochs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "epoch"]
    assert epochs[1]["neighbour_sim"] is not None and epochs[1]["neighbour_stability"] is not None


def test_clusters_are_logged_and_the_label_oracle_uses_the_labels(fake_mnist, tmp_path):
    from instdisc.bank_neighbours import cluster_purity

    res = train(tiny_cfg(fake_mnist, tmp_path / "run", epochs=1, clusters=4))
    rec = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r["type"] == "epoch"][-1]
    labels = build_dataset("fashion-mnist:train", data_root=str(fake_mnist)).labels
    assert rec["cluster_label_purity"] == pytest.approx(cluster_purity(res.model.objective.neighbours.assign, labels))
    oracle = train(tiny_cfg(fake_mnist, tmp_path / "oracle", epochs=1, clusters=4, cluster_source="labels"))
    assert oracle.model.objective.neighbours.assign.tolist() == labels.tolist()


def test_neighbour_settings_are_validated():
    from instdisc.errors import InstdiscError

    with pytest.raises(InstdiscError, match="--neighbours must be >= 0"):
        TrainConfig.from_recipe("fast", neighbours=-1)
    with pytest.raises(InstdiscError, match="--neighbours needs --loss infonce"):
        TrainConfig.from_recipe("paper", neighbours=2)
    with pytest.raises(InstdiscError, match="bank negatives"):
        TrainConfig.from_recipe("fast", neighbours=2, nce_k=0)
    with pytest.raises(InstdiscError, match="--clusters must be 0 or >= 2"):
        TrainConfig.from_recipe("fast", clusters=1)
    with pytest.raises(InstdiscError, match="--clusters needs --loss infonce"):
        TrainConfig.from_recipe("paper", clusters=4)
    with pytest.raises(InstdiscError, match="--cluster-source must be one of bank, labels"):
        TrainConfig.from_recipe("fast", clusters=4, cluster_source="oracle")
    with pytest.raises(InstdiscError, match=r"--clusters \(97\) must not exceed"):
        TrainConfig.from_recipe("fast", clusters=97, batch_size=16, nce_k=32).validate_for_data(96)
    with pytest.raises(InstdiscError, match="--neighbour-every must be >= 1"):
        TrainConfig.from_recipe("fast", neighbours=2, neighbour_every=0)
    with pytest.raises(InstdiscError, match="--neighbour-start must be >= 0"):
        TrainConfig.from_recipe("fast", neighbours=2, neighbour_start=-1)
    with pytest.raises(InstdiscError, match=r"--neighbours \(96\) must be smaller"):
        TrainConfig.from_recipe("fast", neighbours=96, batch_size=16, nce_k=32).validate_for_data(96)
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(InstdiscError, match=r"--neighbour-select must be in \(0, 1\]"):
            TrainConfig.from_recipe("fast", neighbours=2, neighbour_select=bad)


def test_selected_neighbours_are_logged_and_the_table_holds_that_share(fake_mnist, tmp_path):
    """--neighbour-select 0.4: after each search 40 % of the neighbour pairs and of the cluster members stay (the
    rest -1), and the epoch record says so."""
    res = train(tiny_cfg(fake_mnist, tmp_path / "run", epochs=2, neighbours=3, clusters=4, neighbour_select=0.4))
    epochs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "epoch"]
    slots = res.model.objective.neighbours.slots
    assert [e["neighbour_selected"] for e in epochs] == [pytest.approx(round(0.4 * slots.numel()) / slots.numel())] * 2
    assert float((slots >= 0).float().mean()) == pytest.approx(epochs[1]["neighbour_selected"])
    assert 0 <= epochs[1]["neighbour_stability"] <= 1 and -1 <= epochs[1]["neighbour_sim"] <= 1
    assign = res.model.objective.neighbours.assign  # the 40 % of the images nearest their centroid keep a cluster
    assert [e["cluster_selected"] for e in epochs] == [pytest.approx(round(0.4 * assign.numel()) / assign.numel())] * 2
    assert int((assign >= 0).sum()) == round(0.4 * assign.numel())


def test_large_photos_train_at_the_cpu_size_cap(tmp_path, caplog):
    """A folder of 200 x 150 photos, no --image-size, on a CPU: size 96 (the CPU cap), said in the log and recorded."""
    import logging

    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(tmp_path / "photos" / c / f"{i}.jpg")
    with caplog.at_level(logging.INFO, logger="instdisc"):
        train(tiny_cfg(None, tmp_path / "r", data=str(tmp_path / "photos"), data_root=None, nce_k=8, batch_size=8,
                       steps=1, epochs=None, verdict=False, device="cpu"))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["dataset"]["image_size"] == 96 and "capped at 96" in cfg["dataset"]["geometry"]["reason"]
    assert any("capped at 96 on cpu" in r.getMessage() for r in caplog.records)
