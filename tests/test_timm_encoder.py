"""instdisc.models.timm_encoder through the registry: ``timm:NAME`` builds timm's own model (num_classes=0, pooled
pre-logits), channels and image size from the data (ViTs: img_size and a patch that divides it), one-line errors
for unknown names, sizes a model cannot take and a missing timm package; nothing is downloaded."""
import sys

import pytest
import torch

from instdisc.errors import InstdiscError
from instdisc.models import build_encoder, encoder_recipe
from instdisc.models.timm_encoder import _patch_for, timm_create_args

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("size,default,want", [(28, 16, 7), (32, 16, 8), (224, 16, 16), (96, 16, 16), (30, 16, 6),
                                               (29, 16, 1), (64, 14, 8), (56, 14, 14)])
def test_patch_divides_the_image_into_at_least_4x4(size, default, want):
    p = _patch_for(size, default)
    assert p == want and size % p == 0 and size // p >= 4


def test_resnet_is_timms_model_with_pooled_features():
    torch.manual_seed(0)
    enc = build_encoder("timm:resnet10t", in_channels=1, image_size=28)
    assert type(enc).__module__.startswith("timm.") and enc.feature_dim == 512 == enc.num_features
    assert not any(k.startswith("fc.") for k in enc.state_dict())  # num_classes=0: no classifier
    v = enc(torch.randn(3, 1, 28, 28))
    assert v.shape == (3, 512) and torch.isfinite(v).all()
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    assert ref.state_dict().keys() == enc.state_dict().keys()


def test_vit_gets_the_datas_size_and_patch():
    args = timm_create_args("vit_tiny_patch16_224", 1, 28)
    assert args == {"pretrained": False, "num_classes": 0, "in_chans": 1, "img_size": 28, "patch_size": 7}
    enc = build_encoder("timm:vit_tiny_patch16_224", in_channels=1, image_size=28)
    assert enc.patch_embed.grid_size == (4, 4) and enc(torch.randn(2, 1, 28, 28)).shape == (2, enc.feature_dim)
    assert "img_size" not in timm_create_args("resnet10t", 3, 28)
    rec = encoder_recipe("timm:vit_tiny_patch16_224", in_channels=1, image_size=28)
    assert rec == {"library": "timm", "model": "vit_tiny_patch16_224", "create_args": args}
    assert encoder_recipe("convnet-s", in_channels=1, image_size=28) == {"library": "instdisc", "arch": "convnet-s"}


def test_one_line_errors(monkeypatch):
    with pytest.raises(InstdiscError, match=r"convnext_atto' cannot take 1x28x28 images .*--image-size") as e:
        build_encoder("timm:convnext_atto", in_channels=1, image_size=28)  # stride-32 pyramid: 28 px is too small
    assert "\n" not in str(e.value)
    with pytest.raises(InstdiscError, match=r"unknown timm model 'resnet10x' \(did you mean resnet10t.*list_models"):
        build_encoder("timm:resnet10x", in_channels=1, image_size=28)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(InstdiscError, match=r"pip install 'instdisc\[timm\]'"):
        build_encoder("timm:resnet10t", in_channels=1, image_size=28)
