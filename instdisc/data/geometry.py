"""Image size and channels of a folder or file list, read from the images themselves. Covered by
tests/test_data_geometry.py.

The rule (docs/large-collections.md, "Size and channels"):

* a fixed sample: up to ``SAMPLE`` files, ``np.random.default_rng(0).choice`` of the listing, sorted (all files
  when there are fewer); only the headers are read (``Image.open`` decodes no pixels), ~0.1 ms a file;
* channels: 1 when every readable sampled image is grayscale (modes 1, L, LA, I, I;16*, F, or a palette whose
  colours are all gray), else 3;
* size: the median short side of the sampled images, clamped to [``MIN_SIZE``, ``MAX_SIZE``] (8 .. 224);
* ``image_size`` / ``channels`` given by the caller win; files that cannot be opened are left out of the vote
  (the bad-image scan reports them).

The result says why it chose what it chose (:attr:`Geometry.reason`), for the log line and ``config.json``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["Geometry", "infer_geometry", "is_gray_image", "SAMPLE", "MIN_SIZE", "MAX_SIZE", "GRAY_MEAN", "GRAY_STD"]

SAMPLE = 256
MIN_SIZE = 8  # the smallest input the encoders take
MAX_SIZE = 224
# one-channel normalisation for file datasets: the mean of ImageNet's per-channel constants
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
_GRAY_MODES = {"1", "L", "LA", "I", "F", "La"}


@dataclass(frozen=True)
class Geometry:
    image_size: int
    channels: int
    reason: str  # one line: what was chosen and why
    sampled: int  # headers read (0 when both values were given)
    capped: bool = False  # the size was inferred and the images' median side was over max_size

    def to_dict(self) -> dict:
        return asdict(self)


def is_gray_image(img: Image.Image) -> bool:
    """True for grayscale modes and for palette images whose palette entries are all gray (header only)."""
    mode = img.mode
    if mode in _GRAY_MODES or mode.startswith("I;16"):
        return True
    if mode in ("P", "PA"):
        pal = img.getpalette()
        if not pal:
            return False
        rgb = np.asarray(pal[: (len(pal) // 3) * 3], dtype=np.int16).reshape(-1, 3)  # (entries, 3)
        return bool((rgb == rgb[:, :1]).all())
    return False


def _sample(n: int, k: int) -> np.ndarray:
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(n, k, replace=False)).astype(np.int64)


def infer_geometry(paths: Sequence[str], *, image_size: int | None = None, channels: int | None = None,
                   sample: int = SAMPLE, max_size: int = MAX_SIZE) -> Geometry:
    """Size and channels for the images ``paths`` (see the module docstring)."""
    if image_size is not None and channels is not None:
        return Geometry(int(image_size), int(channels), f"size {image_size} and {channels} channel(s) as given", 0)
    sides, gray, read = [], 0, 0
    for i in _sample(len(paths), sample):
        try:
            with Image.open(paths[int(i)]) as img:
                w, h = img.size
                gray += is_gray_image(img)
        except Exception:  # noqa: BLE001 - an unreadable file has no say; the bad-image scan reports it
            continue
        sides.append(min(w, h))
        read += 1
    parts = []
    if channels is None:
        channels = 1 if read and gray == read else 3
        parts.append(f"{channels} channel{'s' if channels > 1 else ''} ({gray} of {read} sampled images grayscale)")
    else:
        parts.append(f"{channels} channel(s) as given")
    capped = False
    if image_size is None:
        if sides:
            median = int(np.median(np.asarray(sides)))
            image_size = int(min(max_size, max(MIN_SIZE, median)))
            capped = median > max_size
            cap = f", capped at {max_size}" if capped else (f", raised to {MIN_SIZE}" if median < MIN_SIZE else "")
            parts.append(f"size {image_size} (median short side {median} px of {read} sampled images{cap})")
        else:
            image_size = max_size
            parts.append(f"size {image_size} (no sampled image could be read)")
    else:
        parts.append(f"size {image_size} as given")
    return Geometry(int(image_size), int(channels), ", ".join(parts), read, capped)
