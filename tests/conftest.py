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
