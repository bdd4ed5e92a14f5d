"""instdisc.models.init_weights (``--init-weights``): key matching across the usual prefixes, timm / torchvision /
safetensors / instdisc-export files, one-line report, refusal of files that do not fit; a run that starts from a
file records its SHA-256 and builds its memory bank from the loaded encoder; ``instdisc train`` exits 2 on a
mismatched file."""
import json

import pytest
import torch

from _cli_helpers import assert_one_line_error, invoke
from test_train_loop import tiny_cfg

from instdisc.errors import InstdiscError
from instdisc.export import export_encoder
from instdisc.models import build_encoder
from instdisc.models.init_weights import load_init_weights, match_keys
from instdisc.training import train
from instdisc.training.checkpoint import file_sha256
from instdisc.training.strategy import SingleProcess


def _randomised(module):
    with torch.no_grad():
        for p in module.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn_like(p))
    return module


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_match_keys_strips_wrappers_and_adds_the_encoders_prefix():
    t = torch.zeros(1)
    src = {"module.backbone.conv1.weight": t, "module.backbone.fc.weight": t, "module.backbone.bn1.bias": t}
    matched, missing, unexpected = match_keys(src, ["net.conv1.weight", "net.bn1.bias", "net.bn1.weight"])
    assert sorted(matched) == ["net.bn1.bias", "net.conv1.weight"]
    assert missing == ["net.bn1.weight"] and unexpected == ["module.backbone.fc.weight"]
    matched, missing, unexpected = match_keys({"encoder.a.w": t, "head.b": t}, ["a.w"])
    assert list(matched) == ["a.w"] and not missing and unexpected == ["head.b"]


def test_timm_state_dict_with_prefixes_and_a_head(tmp_path):
    pytest.importorskip("timm")
    import timm

    torch.manual_seed(1)
    full = _randomised(timm.create_model("resnet10t", pretrained=False, in_chans=1, num_classes=10))
    wrapped = {"state_dict": {f"module.backbone.{k}": v for k, v in full.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "w.pth")
    enc = build_encoder("timm:resnet10t", in_channels=1, image_size=28)
    report = load_init_weights(enc, tmp_path / "w.pth")
    assert sorted(report["unexpected"]) == ["module.backbone.fc.bias", "module.backbone.fc.weight"]
    assert report["missing"] == [] and report["sha256"] == file_sha256(tmp_path / "w.pth")
    want = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    _same(enc.state_dict(), want)


def test_torchvision_resnet_safetensors_and_shape_mismatch(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    import torchvision

    torch.manual_seed(2)
    tv = _randomised(torchvision.models.resnet18(weights=None))
    safetensors.save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "r.safetensors"))
    torch.save(tv.state_dict(), tmp_path / "r.pth")
    big = build_encoder("resnet18", in_channels=3, image_size=224)  # torchvision's stem: every shape fits
    report = load_init_weights(big, tmp_path / "r.safetensors")
    assert sorted(report["unexpected"]) == ["fc.bias", "fc.weight"]
    _same(big.net.state_dict(), {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    small = build_encoder("resnet18", in_channels=1, image_size=28)  # 3x3 one-channel stem: conv1 does not fit
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(InstdiscError, match=r"net\.conv1\.weight has shape \(64, 3, 7, 7\) in the file"):
        load_init_weights(small, tmp_path / "r.pth")
    _same(small.state_dict(), before)  # refused before anything was copied


def test_an_instdisc_export_and_bad_files(run, tmp_path):
    export_encoder(run[0], tmp_path / "enc", formats=())
    enc = build_encoder("convnet-tiny", in_channels=1, image_size=28)
    report = load_init_weights(enc, tmp_path / "enc")
    assert report["missing"] == [] == report["unexpected"]
    _same(enc.state_dict(), torch.load(tmp_path / "enc" / "encoder.pt", weights_only=True))
    load_init_weights(build_encoder("convnet-tiny", in_channels=1, image_size=28), run[0])  # a run: its checkpoint
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(InstdiscError, match="not a readable state dict"):
        load_init_weights(enc, tmp_path / "junk.pt")
    torch.save({"x.y": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InstdiscError, match="none of its 1 keys"):
        load_init_weights(enc, tmp_path / "other.pt")
    with pytest.raises(InstdiscError, match="no such file"):
        load_init_weights(enc, tmp_path / "missing.pt")


def test_a_run_starts_from_the_file_and_builds_its_bank_from_it(run, fake_mnist, tmp_path, monkeypatch):
    export_encoder(run[0], tmp_path / "enc", formats=())
    want = torch.load(tmp_path / "enc" / "encoder.pt", weights_only=True)
    seen = {}
    original = SingleProcess.init_bank_from_encoder

    def spy(self, model, ds, batch_size):
        seen.update({k: v.detach().clone() for k, v in model.encoder.state_dict().items()})
        return original(self, model, ds, batch_size)

    monkeypatch.setattr(SingleProcess, "init_bank_from_encoder", spy)
    out = tmp_path / "run"
    train(tiny_cfg(fake_mnist, out, limit=32, nce_k=16, init_weights=str(tmp_path / "enc")))
    _same(seen, want)  # the bank was built by the loaded encoder
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["init_weights"] == str(tmp_path / "enc")
    assert cfg["init_weights_loaded"]["sha256"] == file_sha256(tmp_path / "enc" / "encoder.pt")


def test_cli_refuses_a_mismatched_file_with_exit_2(fake_mnist, tmp_path):
    torch.save({"body.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "rgb.pt")  # convnet-tiny: 1 input channel
    base = ["train", "fashion-mnist:train", "--data-root", fake_mnist, "--out", tmp_path / "r", "--arch",
            "convnet-tiny", "--batch-size", 16, "--nce-k", 16, "--limit", 32, "--epochs", 1]
    assert_one_line_error(invoke(base + ["--init-weights", tmp_path / "rgb.pt"]), "body.0.weight", "(8, 3, 3, 3)")
    assert_one_line_error(invoke(base + ["--init-weights", tmp_path / "nope.pt"]), "no such file")
