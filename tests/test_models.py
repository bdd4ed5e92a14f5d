import pytest
import torch

from instdisc.errors import InstdiscError
from instdisc.models import ENCODERS, ProjectionHead, build_encoder, list_encoders

SMALL = [a for a in list_encoders() if not a.startswith("resnet") or a == "resnet18"]


@pytest.mark.parametrize("arch", SMALL)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_registry_shapes_and_finite(arch, channels, size):
    torch.manual_seed(0)
    enc = build_encoder(arch, in_channels=channels, image_size=size)
    y = enc(torch.randn(3, channels, size, size))
    assert y.shape == (3, enc.feature_dim)
    assert torch.isfinite(y).all()


def test_resnet_large_stem_and_dims():
    enc = build_encoder("resnet50", in_channels=3, image_size=224)
    assert enc.feature_dim == 2048
    assert enc.net.conv1.stride == (2, 2)
    small = build_encoder("resnet18", in_channels=1, image_size=28)
    assert small.net.conv1.stride == (1, 1) and small.net.conv1.in_channels == 1


def test_unknown_arch_suggests():
    with pytest.raises(InstdiscError, match="resnet18"):
        build_encoder("resnet19")


def test_bad_channels():
    with pytest.raises(InstdiscError, match="in_channels"):
        build_encoder("convnet-s", in_channels=2)


def test_registry_is_dict():
    assert isinstance(ENCODERS, dict) and "convnet-s" in ENCODERS


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_unit_rows(kind):
    h = ProjectionHead(16, 8, kind=kind)
    z = h(torch.randn(5, 16))
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


def test_head_bad_kind():
    with pytest.raises(InstdiscError, match="head"):
        ProjectionHead(4, 2, kind="conv")


def test_pool2_keeps_the_quadrants():
    """convnet-s-pool2 = convnet-s's body, then the mean of each quadrant of the last map, flattened."""
    torch.manual_seed(0)
    enc = build_encoder("convnet-s-pool2", in_channels=1, image_size=28).eval()
    assert enc.feature_dim == 4 * 256
    x = torch.randn(2, 1, 28, 28)
    fmap = enc.body(x)  # (2, 256, 4, 4)
    assert fmap.shape == (2, 256, 4, 4)
    want = torch.stack([fmap[:, :, :2, :2].mean((2, 3)), fmap[:, :, :2, 2:].mean((2, 3)),
                        fmap[:, :, 2:, :2].mean((2, 3)), fmap[:, :, 2:, 2:].mean((2, 3))], dim=2)  # (2, 256, 4)
    torch.testing.assert_close(enc(x), want.reshape(2, -1))
    # convnet-s is the same body with one global mean
    gap = build_encoder("convnet-s", in_channels=1, image_size=28).eval()
    gap.load_state_dict(enc.state_dict())
    torch.testing.assert_close(gap(x), fmap.mean((2, 3)))


@pytest.mark.parametrize("size,d,side", [(8, 1, 4), (12, 1, 6), (16, 2, 4), (24, 2, 6), (28, 3, 4), (32, 3, 4),
                                         (96, 3, 12)])
def test_convnets_keep_a_useful_map_on_tiny_images(size, d, side):
    """Stride-2 layers only while the last map stays >= MIN_MAP px: 28 px and up as always (3), tiny images fewer."""
    from instdisc.models.registry import convnet_downsample, describe_downsample

    assert convnet_downsample(size, 4) == d
    enc = build_encoder("convnet-s-pool2", in_channels=1, image_size=size)
    assert enc.downsample == d
    assert enc.body(torch.zeros(1, 1, size, size)).shape[-1] == side
    line = describe_downsample("convnet-s-pool2", size)
    assert (line is None) == (d == 3) and (line is None or f"{side}x{side}" in line)


def test_convnet_downsample_override_and_refusals():
    enc = build_encoder("convnet-s-pool2@3", in_channels=1, image_size=8)
    assert enc.downsample == 3 and enc(torch.zeros(2, 1, 8, 8)).shape == (2, 1024)
    assert build_encoder("convnet-s@0", in_channels=3, image_size=32).downsample == 0
    assert describe_downsample_none("convnet-s-pool2@3", 8)
    for bad, word in (("convnet-s@9", "stride-2"), ("convnet-s@x", "after '@'"), ("resnet18@2", "convnet")):
        with pytest.raises(InstdiscError, match=word):
            build_encoder(bad, in_channels=1, image_size=28)


def describe_downsample_none(arch, size):
    from instdisc.models.registry import describe_downsample

    return describe_downsample(arch, size) is None
