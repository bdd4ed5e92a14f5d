"""CIFAR-10 / CIFAR-100 "python version" pickle batches. Covered by tests/test_data_cifar.py.

The batches are pickles; they are read with an unpickler that only builds numpy arrays, plain containers and bytes,
so a tampered file cannot run code.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from ..errors import InstdiscError

__all__ = ["CIFAR_DATASETS", "CifarInfo", "find_cifar_dir", "load_cifar_split"]


@dataclass(frozen=True)
class CifarInfo:
    name: str
    folder_name: str  # the folder the official archive unpacks to
    files: dict  # split -> batch file names
    meta_file: str
    label_key: bytes
    names_key: bytes
    n_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int = 32


CIFAR_DATASETS = {
    "cifar10": CifarInfo(
        "cifar10", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)},
        "batches.meta", b"labels", b"label_names", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": CifarInfo(
        "cifar100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
        "meta", b"fine_labels", b"fine_label_names", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # pickles from numpy 1.x
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise InstdiscError(f"cannot read CIFAR batch {path}: {e}") from None
    if not isinstance(obj, dict):
        raise InstdiscError(f"CIFAR batch {path} holds a {type(obj).__name__}, expected a dict")
    # Python-3-written pickles have str keys; the official ones (Python 2) have bytes keys.
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def find_cifar_dir(info: CifarInfo, split: str, root: str) -> str:
    """The folder holding the batch files: ``root`` itself or ``root/<archive folder>``."""
    first = info.files[split][0]
    for d in (root, os.path.join(root, info.folder_name)):
        if os.path.isfile(os.path.join(d, first)):
            return d
    raise InstdiscError(
        f"{info.name}:{split} files not found: expected {os.path.join(root, info.folder_name, first)} "
        f"(or {os.path.join(root, first)}); set the data root to the folder holding them")


def _class_names(info: CifarInfo, directory: str) -> list[str]:
    path = os.path.join(directory, info.meta_file)
    if os.path.isfile(path):
        names = _load_pickle(path).get(info.names_key)
        if names is not None and len(names) == info.n_classes:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(k) for k in range(info.n_classes)]


def load_cifar_split(info: CifarInfo, split: str, root: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 N x 3 x 32 x 32, labels int64 (N,), class names)."""
    directory = find_cifar_dir(info, split, root)
    images, labels = [], []
    for name in info.files[split]:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise InstdiscError(f"{info.name}:{split} is incomplete: expected {path}")
        batch = _load_pickle(path)
        if b"data" not in batch or info.label_key not in batch:
            raise InstdiscError(
                f"CIFAR batch {path} lacks 'data' or '{info.label_key.decode()}' (is it {info.name}?)")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        lab = np.asarray(batch[info.label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lab):
            raise InstdiscError(f"CIFAR batch {path} has data {data.shape} and {len(lab)} labels, want N x 3072")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
        labels.append(lab)
    labels_all = np.concatenate(labels)
    if len(labels_all) and (labels_all.min() < 0 or labels_all.max() >= info.n_classes):
        raise InstdiscError(f"{info.name} labels out of range [0, {info.n_classes}) in {directory}")
    return np.concatenate(images), labels_all, _class_names(info, directory)
