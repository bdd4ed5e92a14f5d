"""MNIST-style IDX files (fashion-mnist, mnist), gzipped or not. Covered by tests/test_data_idx.py.

Format (big-endian): two zero bytes, a type byte (0x08 = uint8), the number of dimensions, one int32 per dimension,
then the data row-major.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InstdiscError

__all__ = ["IDX_DATASETS", "IdxInfo", "read_idx", "find_idx_dir", "load_idx_split"]

_UBYTE = 0x08


@dataclass(frozen=True)
class IdxInfo:
    """What differs between the IDX datasets: where they live, class names, channel statistics."""

    name: str
    folder_names: tuple[str, ...]  # tried under data_root, after data_root itself
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int = 28


IDX_DATASETS = {
    "fashion-mnist": IdxInfo(
        "fashion-mnist", ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (0.2860,), (0.3530,)),
    "mnist": IdxInfo(
        "mnist", ("mnist", "MNIST/raw", "MNIST"), tuple(str(d) for d in range(10)), (0.1307,), (0.3081,)),
}

_PREFIX = {"train": "train", "test": "t10k"}


def _file_names(split: str) -> tuple[str, str]:
    p = _PREFIX[split]
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def _existing(directory: str, base: str) -> str | None:
    """``base`` or ``base.gz`` in ``directory`` (also the ``images.idx3`` spelling of the original site)."""
    for name in (base, base + ".gz", base.replace("-idx", ".idx"), base.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def find_idx_dir(info: IdxInfo, split: str, root: str) -> tuple[str, str]:
    """(images_path, labels_path) under ``root`` or a known sub-folder; InstdiscError naming what is missing."""
    images, labels = _file_names(split)
    candidates = [root] + [os.path.join(root, f) for f in info.folder_names]
    for d in candidates:
        img, lab = _existing(d, images), _existing(d, labels)
        if img and lab:
            return img, lab
        if img or lab:
            missing = labels if img else images
            raise InstdiscError(f"{info.name}:{split} is incomplete: expected {os.path.join(d, missing)}[.gz]")
    raise InstdiscError(
        f"{info.name}:{split} files not found: expected {os.path.join(root, images)}[.gz] "
        f"(also looked in {', '.join(info.folder_names)} under {root}); set the data root to the folder holding them")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array stored in an IDX file with ``ndim`` dimensions (gzip detected from the magic bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            data = gzip.decompress(f.read()) if head == b"\x1f\x8b" else f.read()
    except (OSError, EOFError) as e:
        raise InstdiscError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InstdiscError(f"not an IDX file (bad magic number): {path}")
    if data[2] != _UBYTE or data[3] != ndim:
        raise InstdiscError(
            f"unexpected IDX layout in {path}: type 0x{data[2]:02x} with {data[3]} dims, want 0x08 with {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InstdiscError(f"IDX file is truncated: {path}")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    n_bytes = int(np.prod(shape))
    if len(data) - header != n_bytes:
        raise InstdiscError(
            f"IDX file {path} has {len(data) - header} data bytes, header shape {shape} needs {n_bytes}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_split(info: IdxInfo, split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 1 x H x W, labels int64 (N,))."""
    img_path, lab_path = find_idx_dir(info, split, root)
    images = read_idx(img_path, 3)  # N x H x W
    labels = read_idx(lab_path, 1).astype(np.int64)  # (N,)
    if len(images) != len(labels):
        raise InstdiscError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    if len(labels) and labels.max() >= len(info.classes):
        raise InstdiscError(f"label {labels.max()} in {lab_path} is out of range for {len(info.classes)} classes")
    return images[:, None], labels  # N x 1 x H x W
