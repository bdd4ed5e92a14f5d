"""Small file datasets decoded into memory (instdisc.data.in_memory): the rows ``instdisc prepare`` stores, the same
images as the per-sample PIL path within the resamplers' tolerance, trained through BatchAugment; above the bound
the PIL path stays and says what prepare would give."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import instdisc.data.in_memory as in_memory
from instdisc.data import build_dataset
from instdisc.data.in_memory import decode_into_memory, decoded_bytes, fits_in_memory
from instdisc.training import train
from test_train_loop import tiny_cfg


def smooth_folder(root, n_per_class=8, classes=("a", "b"), size=(40, 30), mode="L", seed=0):
    """Images of smooth gradients and blobs (resampling differences stay small), sizes varying around ``size``."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            w, h = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
            yy, xx = np.mgrid[:h, :w] / max(h, w)
            fx, fy, ph = rng.uniform(0.5, 1.5, 3)
            base = 127 + 100 * np.sin(2 * np.pi * (fx * xx + fy * yy) + 6 * ph)  # (h, w)
            a = np.clip(base, 0, 255).astype(np.uint8)
            img = Image.fromarray(a) if mode == "L" else Image.fromarray(np.stack([a, a[::-1, ::-1], 255 - a], -1))
            img.save(root / c / f"{i:02d}.png")
    return root


def test_rows_and_labels(tmp_path):
    root = smooth_folder(tmp_path / "imgs", mode="RGB")
    ds = build_dataset(str(root), image_size=24)
    assert fits_in_memory(ds) and decoded_bytes(ds) == len(ds) * 3 * 24 * 24
    mem = decode_into_memory(ds, workers=2)
    assert mem.array.shape == (len(ds), 3, 24, 24) and mem.image_size == mem.native_size == 24
    assert (mem.labels == ds.labels).all() and mem.classes == ds.classes and mem.mean == ds.mean
    assert (mem.source_indices == ds.source_indices).all()
    again = decode_into_memory(ds, workers=1)
    assert torch.equal(mem.array, again.array) and mem.fingerprint() == again.fingerprint()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_same_images_as_the_pil_path(tmp_path, mode):
    """The evaluation views: a folder's eval transform (short side to int(S x 256/224), centre S crop) of each file,
    against the in-memory row: the same pixels (PNG decodes exactly; the bound allows for float rounding)."""
    root = smooth_folder(tmp_path / "imgs", mode=mode)
    files = build_dataset(str(root), image_size=28)
    mem = decode_into_memory(files)
    diffs = []
    for i in range(len(files)):
        a, b = files[i][0], mem[i][0]  # (C, 28, 28) normalised
        assert a.shape == b.shape == (files.channels, 28, 28)
        diffs.append(((a - b).abs() * torch.tensor(files.std).view(-1, 1, 1) * 255).mean().item())
    assert max(diffs) < 0.5, diffs


def test_training_a_small_folder_goes_through_memory(tmp_path):
    root = smooth_folder(tmp_path / "imgs", n_per_class=20)
    res = train(tiny_cfg(None, tmp_path / "r", data=str(root), data_root=None, nce_k=8, verdict=False))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["augment_resolved"] == "batch" and cfg["data_in_memory"] is True and res.global_step == 2


def test_over_the_bound_keeps_the_pil_path_and_says_what_prepare_gives(tmp_path, monkeypatch, caplog):
    root = smooth_folder(tmp_path / "imgs", n_per_class=20)
    monkeypatch.setattr(in_memory, "IN_MEMORY_MAX_BYTES", 100)
    monkeypatch.setattr("instdisc.training.loop.fits_in_memory", lambda ds: fits_in_memory(ds, 100))
    with caplog.at_level(logging.INFO, logger="instdisc"):
        train(tiny_cfg(None, tmp_path / "r", data=str(root), data_root=None, nce_k=8, verdict=False))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["augment_resolved"] == "pil" and cfg["data_in_memory"] is False
    said = [r.getMessage() for r in caplog.records if "instdisc prepare" in r.getMessage()]
    assert len(said) == 1 and "view-images/s" in said[0] and str(root) in said[0]


def test_augment_pil_keeps_the_files(tmp_path):
    root = smooth_folder(tmp_path / "imgs", n_per_class=20)
    train(tiny_cfg(None, tmp_path / "r", data=str(root), data_root=None, nce_k=8, verdict=False, augment="pil"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["augment_resolved"] == "pil"
