"""Encoders by name. Covered by tests/test_models.py.

Every encoder maps (B, C, H, W) images to (B, feature_dim) features and carries ``feature_dim``.
Names live in the ``ENCODERS`` dict (no lookups through ``module.__dict__``); tiny test models are registered like
real ones, so the tests can run over the whole registry. ``timm:NAME`` is resolved here, in one place, to any timm
model (:mod:`instdisc.models.timm_encoder`; the timm package is imported only then).
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import nn

from ..errors import InstdiscError
from .timm_encoder import TIMM_PREFIX, build_timm_encoder, timm_create_args  # timm itself: imported on use

__all__ = ["ENCODERS", "CONVNETS", "register_encoder", "build_encoder", "list_encoders", "encoder_recipe",
           "check_arch", "convnet_downsample", "describe_downsample", "split_downsample", "MIN_MAP"]

ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str):
    def deco(fn):
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} registered twice")
        ENCODERS[name] = fn
        return fn
    return deco


def list_encoders() -> list[str]:
    return sorted(ENCODERS)


def check_arch(arch: str) -> tuple[str, int | None]:
    """``split_downsample(arch)`` of a known ``arch`` (a registered name, ``NAME@D`` of a convnet, ``timm:NAME``);
    InstdiscError naming the problem (with the closest name) otherwise. Training checks it before reading data."""
    name, downsample = split_downsample(arch)
    if downsample is not None and name not in CONVNETS:
        raise InstdiscError(f"--arch {arch}: '@D' (stride-2 layers) is for the convnet encoders only")
    if name not in ENCODERS and not name.startswith(TIMM_PREFIX):
        close = difflib.get_close_matches(name, ENCODERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InstdiscError(f"unknown arch {arch!r}{hint}; choose one of: {', '.join(list_encoders())}")
    return name, downsample


def split_downsample(arch: str) -> tuple[str, int | None]:
    """``"convnet-s-pool2@1"`` -> ``("convnet-s-pool2", 1)``; a name without ``@D`` -> ``(name, None)``."""
    if "@" not in arch or arch.startswith(TIMM_PREFIX):
        return arch, None
    name, _, d = arch.rpartition("@")
    if not d.isdigit():
        raise InstdiscError(f"--arch {arch}: after '@' comes the number of stride-2 layers, e.g. {name}@2")
    return name, int(d)


MIN_MAP = 4  # ConvNet encoders: a stride-2 layer is skipped when it would leave a map narrower than this


def convnet_downsample(image_size: int, layers: int) -> int:
    """Stride-2 layers a ConvNet with ``layers`` conv layers uses at ``image_size``: one after each conv but the
    first, while the map stays at least ``MIN_MAP`` px (28 px: 14, 7, 4 -> all 3, as always; 16 px: 8, 4 -> 2;
    8 px: 4 -> 1). Tiny images thus keep a spatial map of useful size instead of ending at 1 x 1."""
    d = 0
    while d < layers - 1 and _final_side(image_size, d + 1) >= MIN_MAP:
        d += 1
    return d


def describe_downsample(arch: str, image_size: int) -> str | None:
    """A line saying how a ConvNet encoder adapted to ``image_size`` (None when it uses every stride-2 layer or is
    not a ConvNet), for the log and config.json."""
    name, given = split_downsample(arch)
    if name not in CONVNETS or given is not None:
        return None
    layers = len(CONVNET_WIDTHS[name])
    d = convnet_downsample(image_size, layers)
    if d == layers - 1:
        return None
    side, full = _final_side(image_size, d), _final_side(image_size, layers - 1)
    return (f"encoder {name} at {image_size} px: {d} of its {layers - 1} stride-2 layers, so that the last map is "
            f"{side}x{side} px (not {full}x{full}); --arch {name}@{layers - 1} keeps them all")


def _final_side(side: int, d: int) -> int:
    """The map's side after ``d`` stride-2 3x3 convs (padding 1) on ``side`` px."""
    for _ in range(d):
        side = (side + 1) // 2
    return side


def build_encoder(arch: str, *, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """Build encoder ``arch`` for ``in_channels``-channel images of side ``image_size``; it has ``feature_dim``.

    ``arch`` is a registered name or ``timm:NAME`` (any timm model, ``num_classes=0``: its pooled pre-logits). The
    ConvNet encoders take ``NAME@D``: exactly D stride-2 layers, instead of as many as keep the last map at least
    ``MIN_MAP`` pixels wide (see :func:`convnet_downsample`)."""
    name, downsample = check_arch(arch)
    if in_channels not in (1, 3):
        raise InstdiscError(f"in_channels must be 1 or 3, got {in_channels}")
    if image_size < 8:
        raise InstdiscError(f"image_size must be at least 8, got {image_size}")
    if name in CONVNETS:
        enc = CONVNETS[name](in_channels, image_size, downsample)
    elif arch.startswith(TIMM_PREFIX):
        enc = build_timm_encoder(arch[len(TIMM_PREFIX):], in_channels, image_size)
    else:
        enc = ENCODERS[arch](in_channels=in_channels, image_size=image_size)
    assert isinstance(getattr(enc, "feature_dim", None), int)
    return enc


def encoder_recipe(arch: str, *, in_channels: int, image_size: int) -> dict:
    """How to rebuild ``arch`` without instdisc, for export metadata: ``{"library": "timm", "model": NAME,
    "create_args": {...}}`` (``timm.create_model(NAME, **create_args)``), or ``{"library": "instdisc", "arch": ...}``.
    """
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        return {"library": "timm", "model": name, "create_args": timm_create_args(name, in_channels, image_size)}
    return {"library": "instdisc", "arch": arch}


class ConvNet(nn.Module):
    """A small CNN for CPU budgets: 3x3 conv-BN-ReLU blocks, stride 2 after the first, then average pooling to a
    ``grid`` x ``grid`` map, flattened (``grid=1``: global average pooling; ``grid=2`` keeps the coarse layout: for
    28 px images, the four quadrants of the last 4x4 map)."""

    def __init__(self, widths: tuple[int, ...], in_channels: int, grid: int = 1, downsample: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        d = len(widths) - 1 if downsample is None else downsample  # stride-2 layers: the first d after layer 0
        if not 0 <= d <= len(widths) - 1:
            raise InstdiscError(f"a convnet of {len(widths)} layers has 0 to {len(widths) - 1} stride-2 layers, "
                                f"not {d}")
        self.downsample = d
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=2 if 1 <= i <= d else 1, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.feature_dim = c * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)  # (B, feature_dim)


class ResNetEncoder(nn.Module):
    """A torchvision ResNet with its fc removed; a 3x3 stride-1 stem without max-pool for images <= 64 px."""

    def __init__(self, name: str, in_channels: int, image_size: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if image_size <= 64:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, feature_dim)


# The ConvNet encoders: (widths, grid). Their stride-2 layers adapt to the image size (convnet_downsample).
CONVNET_WIDTHS: dict[str, tuple[int, ...]] = {
    "convnet-tiny": (8, 16), "convnet-s": (32, 64, 128, 256), "convnet-s-pool2": (32, 64, 128, 256),
    "convnet-m": (64, 128, 256, 512)}
_CONVNET_GRID = {"convnet-s-pool2": 2}


def _convnet(name: str):
    def build(in_channels: int, image_size: int, downsample: int | None = None) -> nn.Module:
        widths = CONVNET_WIDTHS[name]
        d = convnet_downsample(image_size, len(widths)) if downsample is None else downsample
        return ConvNet(widths, in_channels, grid=_CONVNET_GRID.get(name, 1), downsample=d)
    return build


CONVNETS: dict[str, Callable[..., nn.Module]] = {name: _convnet(name) for name in CONVNET_WIDTHS}
for _name, _build in CONVNETS.items():
    register_encoder(_name)(_build)


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register_encoder(_name)(lambda in_channels, image_size, _n=_name: ResNetEncoder(_n, in_channels, image_size))
