"""Encoders from timm (``--arch timm:NAME``): any timm model, random weights, its pooled pre-logits output as the
feature. Covered by tests/test_timm_encoder.py.

The registry resolves the ``timm:`` prefix here, so the loop, export and kNN never know where an encoder came from.
The model is ``timm.create_model(NAME, pretrained=False, num_classes=0, in_chans=C, **size_args)`` itself (its
state dict keys are timm's own, so an export loads into plain timm); ``size_args`` gives models that take an image
size (ViT, DeiT, EVA, ...) ``img_size`` = the data's side and a ``patch_size`` that divides it. Nothing is ever
downloaded (``pretrained=False``); start from local weights with ``--init-weights`` instead.
"""
from __future__ import annotations

import difflib
import inspect

import torch
from torch import nn

from ..errors import InstdiscError

__all__ = ["TIMM_PREFIX", "build_timm_encoder", "timm_create_args", "require_timm", "LIST_HINT"]

TIMM_PREFIX = "timm:"  # --arch timm:NAME
LIST_HINT = "python -c \"import timm; print(timm.list_models('resnet*'))\""  # any glob pattern


def require_timm():
    try:
        import timm
    except ImportError:
        raise InstdiscError("timm encoders need the timm package: pip install 'instdisc[timm]'") from None
    return timm


def _patch_for(image_size: int, default_patch: int) -> int:
    """The model's patch if it divides ``image_size`` into a grid of >= 4 x 4, else the largest divisor of
    ``image_size`` below it that does (28 px, patch 16 -> 7: a 4 x 4 grid; 32 px -> 8; 224 px keeps 16)."""
    for p in range(min(default_patch, image_size // 4), 0, -1):
        if image_size % p == 0:
            return p
    return 1


def timm_create_args(name: str, in_channels: int, image_size: int) -> dict:
    """The keyword arguments of ``timm.create_model(name, **args)`` for this data (what a consumer passes too)."""
    timm = require_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise InstdiscError(f"unknown timm model {name!r}{hint}; list them with: {LIST_HINT}")
    args = {"pretrained": False, "num_classes": 0, "in_chans": int(in_channels)}
    with torch.device("meta"):  # the class and its patch size, without allocating or initialising weights
        probe = timm.create_model(name, **args)
    params = inspect.signature(type(probe).__init__).parameters
    if "img_size" in params:
        args["img_size"] = int(image_size)
        patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
        if "patch_size" in params and patch is not None:
            default = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
            args["patch_size"] = _patch_for(int(image_size), default)
    return args


def build_timm_encoder(name: str, in_channels: int, image_size: int) -> nn.Module:
    """timm model ``name`` as an encoder (B, C, S, S) -> (B, feature_dim); one forward pass proves it takes S px."""
    timm = require_timm()
    args = timm_create_args(name, in_channels, image_size)
    try:
        net = timm.create_model(name, **args)
    except Exception as e:  # noqa: BLE001 - timm raises many kinds for arguments a model does not take
        raise InstdiscError(f"timm model {name!r} cannot be built for {in_channels}x{image_size}x{image_size} "
                            f"images ({_first_line(e)})") from None
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            v = net(torch.zeros(1, in_channels, image_size, image_size))  # (1, feature_dim)
    except Exception as e:  # noqa: BLE001
        raise InstdiscError(f"timm model {name!r} cannot take {in_channels}x{image_size}x{image_size} images "
                            f"({_first_line(e)}); choose another model or a larger --image-size") from None
    net.train(was_training)
    if v.dim() != 2:
        raise InstdiscError(f"timm model {name!r} returns {tuple(v.shape)} features, not (batch, dim)")
    net.feature_dim = int(v.shape[1])
    return net


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]
