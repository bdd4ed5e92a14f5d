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

__all__ = ["ENCODERS", "register_encoder", "build_encoder", "list_encoders", "encoder_recipe"]

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


def build_encoder(arch: str, *, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """Build encoder ``arch`` for ``in_channels``-channel images of side ``image_size``; it has ``feature_dim``.

    ``arch`` is a registered name or ``timm:NAME`` (any timm model, ``num_classes=0``: its pooled pre-logits)."""
    if arch not in ENCODERS and not arch.startswith(TIMM_PREFIX):
        close = difflib.get_close_matches(arch, ENCODERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InstdiscError(f"unknown arch {arch!r}{hint}; choose one of: {', '.join(list_encoders())}")
    if in_channels not in (1, 3):
        raise InstdiscError(f"in_channels must be 1 or 3, got {in_channels}")
    if image_size < 8:
        raise InstdiscError(f"image_size must be at least 8, got {image_size}")
    if arch.startswith(TIMM_PREFIX):
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

    def __init__(self, widths: tuple[int, ...], in_channels: int, grid: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
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


@register_encoder("convnet-tiny")
def _convnet_tiny(in_channels: int, image_size: int) -> nn.Module:
    return ConvNet((8, 16), in_channels)


@register_encoder("convnet-s")
def _convnet_s(in_channels: int, image_size: int) -> nn.Module:
    return ConvNet((32, 64, 128, 256), in_channels)


@register_encoder("convnet-s-pool2")
def _convnet_s_pool2(in_channels: int, image_size: int) -> nn.Module:
    return ConvNet((32, 64, 128, 256), in_channels, grid=2)


@register_encoder("convnet-m")
def _convnet_m(in_channels: int, image_size: int) -> nn.Module:
    return ConvNet((64, 128, 256, 512), in_channels)


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register_encoder(_name)(lambda in_channels, image_size, _n=_name: ResNetEncoder(_n, in_channels, image_size))
