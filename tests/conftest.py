"""Shared fixtures: tiny synthetic datasets written in the real on-disk formats."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    """Write ``arr`` (uint8) as an IDX file (magic: 0x00 0x00 0x08 ndim, then big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        Path(path).write_bytes(data)


def make_fake_mnist(root: Path, n_train: int = 96, n_test: int = 40, size: int = 28, seed: int = 0) -> Path:
    """Class-dependent blobs so that learned features can beat chance: class c is a bright square at a position."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        imgs = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 4)
            imgs[i, 2 + r * 8: 8 + r * 8, 2 + q * 6: 8 + q * 6] = 220
        write_idx(root / f"{split}-images-idx3-ubyte", imgs)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def fake_mnist(tmp_path) -> Path:
    return make_fake_mnist(tmp_path / "fmnist")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (one per test module): (run directory, fake Fashion-MNIST root)."""
    from test_train_loop import tiny_cfg

    from instdisc.training import train

    root = make_fake_mnist(tmp_path_factory.mktemp("data") / "fmnist")
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_cfg(root, out, limit=32, nce_k=16))
    return out, root


@pytest.fixture(scope="module")
def one_faiss_thread():
    """For modules of tiny FAISS indexes: on a busy 2-core machine OpenMP spin-waiting makes each FAISS call cost up
    to seconds, while one thread gives the same results at once."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def make_template_mnist(root: Path, seed: int = 0) -> Path:
    """A Fashion-MNIST-shaped set where nearest neighbours are well posed in float32 whatever the encoder: six
    checkerboard templates at mean levels 25..230 (label 3, 7, 1, 8, 0, 5), 16 exact copies of each in the training
    split (96 images); 40 test images mix two adjacent templates 0.7 / 0.3, labelled as the major template except
    every third, labelled as the minor one. Gallery items of different labels are then never near-tied for a query
    (see ``_reference.label_margin``), while same-label ties are harmless."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:28, :28]
    checker = ((yy + xx) % 2) * 2 - 1  # (28, 28) of -1 / +1
    templates = np.stack([m + 20 * checker for m in (25, 70, 110, 150, 190, 230)]).astype(np.float64)  # (6, 28, 28)
    t_labels = np.array([3, 7, 1, 8, 0, 5])
    a = rng.integers(0, 6, 40)
    b = np.where(a == 0, 1, np.where(a == 5, 4, a + rng.choice([-1, 1], 40)))  # an adjacent template
    splits = {"train": (np.repeat(templates, 16, axis=0), np.repeat(t_labels, 16)),
              "t10k": (0.7 * templates[a] + 0.3 * templates[b],
                       np.where(np.arange(40) % 3 == 0, t_labels[b], t_labels[a]))}
    for split, (imgs, labels) in splits.items():
        write_idx(root / f"{split}-images-idx3-ubyte", np.clip(np.round(imgs), 0, 255).astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


@pytest.fixture
def one_torch_thread():
    """For tests that train for several epochs or big encoders: on a busy 2-core machine two torch threads contend
    (a tiny run takes ~10x longer); one thread runs them at full speed."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
