"""The dataset every instdisc component consumes. Covered by tests/test_data_spec.py (and the per-source tests).

Each sample is ``(x, i, label)``: ``i`` is the sample's fixed position, used as its memory-bank slot.
"""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import InstdiscError
from .images import open_image
from .paths import PathTable

__all__ = ["IndexedDataset", "limit_indices", "take_rows"]


def take_rows(array, idx) -> torch.Tensor:
    """Rows ``idx`` (a sequence or tensor of positions) of a B x ... tensor ``array`` -> a new len(idx) x ... tensor
    on ``array``'s device (or ``array[idx]`` for anything else that indexes like one).

    ``index_select`` copies whole rows; indexing with a tensor (``array[idx]``) is an elementwise gather, on a CPU
    7-25x slower for image rows (256 rows of 3 x 96 x 96 bytes from an image cache's memory map: 0.35 ms against
    2.4-9 ms)."""
    if not isinstance(array, torch.Tensor):
        return array[idx]
    return array.index_select(0, torch.as_tensor(idx, dtype=torch.long).to(array.device))


def limit_indices(n: int, limit: int | None, spec: str) -> np.ndarray:
    """The fixed subset of ``--limit``: ``default_rng(0).choice(n, limit, replace=False)``, sorted (all of 0..n-1
    without limit) -> (limit,) int64."""
    if limit is None:
        return np.arange(n, dtype=np.int64)
    if limit > n:
        raise InstdiscError(f"limit {limit} is larger than dataset {spec!r} ({n} images)")
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False)).astype(np.int64)


class IndexedDataset(Dataset):
    """Images held in memory (``array``) or as files (``paths``), with labels and normalisation constants.

    Attributes (see docs/design.md): ``spec``, ``labels`` int64 (N,) with -1 = unlabeled, ``classes``, ``paths``
    (a read-only sequence of str, or None), ``channels`` (1 or 3), ``image_size`` (side the model sees), ``mean`` /
    ``std`` per channel, ``array`` (uint8 N x C x H x W tensor or None), ``transform``, ``source_indices`` int64 (N,)
    (position of each sample in the full, unfiltered source: differs from ``arange(N)`` after ``limit`` or skipping
    bad images), ``native_size`` (H of ``array``; None for files).

    Picklable (DataLoader workers); file paths are kept in a compact :class:`~instdisc.data.paths.PathTable`.
    """

    def __init__(self, *, spec: str, labels: np.ndarray, classes: Sequence[str], channels: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], array: torch.Tensor | None = None,
                 paths: Sequence[str] | None = None, transform: Callable | None = None,
                 source_indices: np.ndarray | None = None):
        if (array is None) == (paths is None):
            raise ValueError("give exactly one of array and paths")
        labels = np.asarray(labels, dtype=np.int64)
        n = len(array) if array is not None else len(paths)
        if labels.shape != (n,):
            raise ValueError(f"labels shape {labels.shape} does not match {n} samples")
        if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
            raise ValueError(f"channels={channels} with mean {mean} / std {std}")
        if array is not None:
            if array.dtype != torch.uint8 or array.ndim != 4 or array.shape[1] != channels:
                raise ValueError(f"array must be uint8 N x {channels} x H x W, got {array.dtype} {tuple(array.shape)}")
        self.spec = spec
        self.labels = labels
        self.classes = list(classes)
        self.paths = paths
        self.array = array  # uint8 N x C x H x W
        self.channels = channels
        self.image_size = int(image_size)
        self.native_size = int(array.shape[2]) if array is not None else None
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.draft_scale: float | None = None  # files: JPEGs may decode at reduced scale, short side >= this x size
        self.content_id: str | None = None  # stands for the pixels in fingerprint() (an image cache's source)
        self.eval_crop: float | None = None  # arrays: evaluation sees this centre fraction (image caches: 224/256)
        self.memmapped = False  # array is a read-only memory map of a file (an image cache): never copied whole
        self.geometry: dict | None = None  # files: how size and channels were chosen (instdisc.data.geometry)
        self.source_indices = (np.arange(n, dtype=np.int64) if source_indices is None
                               else np.asarray(source_indices, dtype=np.int64))
        if transform is None:
            from .transforms import eval_transform
            transform = eval_transform(self)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def _check_index(self, i) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        return i

    def load_image(self, i: int) -> Image.Image:
        """Sample ``i`` as a PIL image in mode "L" (channels 1) or "RGB" (channels 3).

        A file that cannot be read (deleted, truncated after the scan) raises InstdiscError naming it.
        """
        i = self._check_index(i)
        if self.array is not None:
            a = self.array[i].numpy()  # C x H x W
            return Image.fromarray(a[0] if self.channels == 1 else np.ascontiguousarray(a.transpose(1, 2, 0)))
        min_side = math.ceil(self.draft_scale * self.image_size) if self.draft_scale else None
        return open_image(self.paths[i], "L" if self.channels == 1 else "RGB", min_side=min_side)

    def __getitem__(self, i):
        i = self._check_index(i)
        img = self.load_image(i)
        x = self.transform(img) if self.transform is not None else img
        return x, i, int(self.labels[i])

    def with_transform(self, transform: Callable | None) -> "IndexedDataset":
        """A shallow copy (shares array, paths and labels) that applies ``transform``."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def with_draft(self, scale: float | None) -> "IndexedDataset":
        """A shallow copy whose JPEGs decode at reduced scale while their short side stays >= ``scale`` x
        ``image_size`` (:func:`~instdisc.data.images.draft_for`); None: full decodes."""
        out = copy.copy(self)
        out.draft_scale = None if scale is None else float(scale)
        return out

    def fingerprint(self) -> str:
        """16 hex digits identifying the content: sample count, labels and pixels (in memory) or file names
        (relative to the folder / list, so a moved dataset keeps its fingerprint)."""
        h = hashlib.sha1()
        h.update(f"{len(self)}:{self.channels}:{self.image_size}".encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.content_id is not None:
            h.update(self.content_id.encode())
        elif self.array is not None:
            h.update(self.array.contiguous().numpy().tobytes())
        elif isinstance(self.paths, PathTable):
            h.update(self.paths.blob.tobytes())
            h.update(self.paths.offsets.tobytes())
        else:
            for p in self.paths:
                h.update(p.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        kind = ("memory-mapped" if self.memmapped else "in-memory") if self.array is not None else "files"
        return (f"IndexedDataset(spec={self.spec!r}, n={len(self)}, {kind}, channels={self.channels}, "
                f"image_size={self.image_size}, classes={len(self.classes)})")
