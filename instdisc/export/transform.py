"""The eval transform of an exported encoder: PIL image -> the normalised tensor the encoder was trained to see.

Covered by tests/test_export_transform.py.

It repeats :func:`instdisc.data.transforms.eval_transform` from the export's metadata alone (no dataset needed):
``resize="native"`` (encoders trained on an in-memory dataset: Fashion-MNIST, MNIST, CIFAR) uses an image of side S
as it is and resizes others to S; ``resize="crop"`` (encoders trained on image files) resizes the short side to
``int(S * 256 / 224)`` and centre-crops S.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision import transforms as T

from ..data.transforms import EVAL_RESIZE_RATIO
from ..errors import InstdiscError

__all__ = ["EncoderTransform", "RESIZE_MODES"]

RESIZE_MODES = ("native", "crop")


class EncoderTransform:
    """``t(img) -> float32 C x S x S``; picklable (usable in DataLoader workers)."""

    def __init__(self, *, channels: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                 resize: str = "crop"):
        if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
            raise InstdiscError(f"transform needs channels 1 or 3 with one mean/std per channel, got "
                                f"channels={channels}, mean={list(mean)}, std={list(std)}")
        if resize not in RESIZE_MODES:
            raise InstdiscError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        self.channels, self.image_size, self.resize = int(channels), int(image_size), resize
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        size = self.image_size
        if resize == "native":
            self._resize = T.Compose([T.Resize(size), T.CenterCrop(size)])
        else:
            self._resize = T.Compose([T.Resize(int(size * EVAL_RESIZE_RATIO)), T.CenterCrop(size)])
        self._to_tensor = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    @classmethod
    def from_meta(cls, meta: dict) -> "EncoderTransform":
        return cls(channels=meta["channels"], image_size=meta["image_size"], mean=meta["mean"], std=meta["std"],
                   resize=meta.get("eval_resize", "crop"))

    def __call__(self, img) -> torch.Tensor:
        img = img.convert("L" if self.channels == 1 else "RGB")
        if not (self.resize == "native" and img.size == (self.image_size, self.image_size)):
            img = self._resize(img)
        return self._to_tensor(img)  # C x S x S

    def __repr__(self) -> str:
        return (f"EncoderTransform(channels={self.channels}, image_size={self.image_size}, mean={self.mean}, "
                f"std={self.std}, resize={self.resize!r})")
