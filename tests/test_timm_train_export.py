"""timm encoders end to end on real Fashion-MNIST (a few hundred images, a few steps each): train, stop mid-epoch,
resume bit-exact (CPU), export in every format with parity, features of the export equal to the checkpoint's
encoder. Covers ``--arch timm:NAME`` through instdisc.models.registry, instdisc.training and instdisc.export."""
import json
import os

import numpy as np
import pytest
import torch

from test_train_resume import StopAfter, assert_same_state

from instdisc.export import export_encoder, export_features
from instdisc.export.hdf5 import read_features
from instdisc.training import TrainConfig, train
from instdisc.training.checkpoint import read_checkpoint

pytest.importorskip("timm")
FMNIST = "/usr/share/datasets/fashion-mnist"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs Fashion-MNIST")]

# (timm model, image side): a ResNet at the data's 28 px, a tiny ViT and a ConvNeXt at 32 px (ConvNeXt's stride-32
# pyramid cannot take 28 px, see test_timm_encoder.py); 96 images at batch 32: 3 steps per epoch.
MODELS = [("resnet10t", 28), ("vit_tiny_patch16_224", 32), ("convnext_atto", 32)]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def cfg_for(name, size, out, **kw):
    base = dict(data="fashion-mnist:train", data_root=FMNIST, out=str(out), arch=f"timm:{name}", image_size=size,
                limit=96, epochs=1, batch_size=32, nce_k=32, low_dim=16, log_every=1, lr=0.01, seed=0)
    base.update(kw)
    return TrainConfig.from_recipe("fast", **base)


@pytest.mark.parametrize("name,size", MODELS, ids=[m for m, _ in MODELS])
def test_timm_trains_resumes_exactly_and_exports(tmp_path, name, size):
    whole = train(cfg_for(name, size, tmp_path / "whole"))
    assert whole.global_step == 3 and np.isfinite(whole.last_loss)
    out = tmp_path / "run"
    part = train(cfg_for(name, size, out), stop_flag=StopAfter(2))
    assert part.interrupted and part.global_step == 2
    train(cfg_for(name, size, out), resume=True)
    a, b = read_checkpoint(tmp_path / "whole"), read_checkpoint(out)
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"], b["optimizer"])
    assert json.loads((out / "config.json").read_text())["arch"] == f"timm:{name}"

    meta = export_encoder(out, tmp_path / "enc", with_head=True)
    files = sorted(os.listdir(tmp_path / "enc"))
    for f in ("encoder.pt", "head.pt", "encoder.safetensors", "head.safetensors", "encoder.onnx", "metadata.json"):
        assert f in files, (f, files)
    assert "encoder.torchscript.pt" in files or "encoder.pt2" in files
    assert set(meta["formats"]) == {"torchscript", "safetensors", "onnx"} and meta["formats"]["onnx"]["opset"] == 17
    assert max(meta["parity"]["max_abs_diff"].values()) < 1e-5
    assert max(meta["formats"]["onnx"]["max_abs_diff"].values()) < 1e-4 * 10  # limit: 1e-4 x max(1, max |v|)
    recipe = meta["encoder_recipe"]
    assert recipe["library"] == "timm" and recipe["model"] == name and recipe["create_args"]["num_classes"] == 0
    state = torch.load(tmp_path / "enc" / "encoder.pt", weights_only=True)
    assert not any(k.startswith(("net.", "encoder.")) for k in state)  # timm's own keys

    export_features(tmp_path / "enc", "fashion-mnist:test", tmp_path / "f.h5", data_root=FMNIST, limit=16,
                    batch_size=8)
    feats, _, _, attrs = read_features(tmp_path / "f.h5")
    assert feats.shape == (16, meta["feature_dim"]) and np.isfinite(feats).all()
