"""instdisc/data/idx.py: fashion-mnist / mnist IDX files (fake files in tmp_path, plus one real-data test)."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from instdisc.data import build_dataset
from instdisc.data.idx import read_idx
from instdisc.errors import InstdiscError

REAL_FMNIST = "/usr/share/datasets/fashion-mnist"


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(path, arr, gz):
    data = idx_bytes(arr)
    if gz:
        path, data = str(path) + ".gz", gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)


def make_idx_dataset(folder, n_train=20, n_test=7, gz=True, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, gz)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels, gz)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_reads_train_and_test_gz_and_plain(tmp_path, gz):
    data = make_idx_dataset(tmp_path, gz=gz)
    ds = build_dataset("fashion-mnist", data_root=tmp_path)
    images, labels = data["train"]
    assert ds.spec == "fashion-mnist:train"
    assert ds.array.dtype == torch.uint8 and ds.array.shape == (20, 1, 28, 28)
    assert np.array_equal(ds.array[:, 0].numpy(), images)
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, labels)
    assert ds.channels == 1 and ds.image_size == 28 and ds.paths is None
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    test = build_dataset("fashion-mnist:test", data_root=tmp_path)
    assert len(test) == 7 and np.array_equal(test.labels, data["t10k"][1])


def test_mnist_constants_and_parent_folder_layouts(tmp_path):
    make_idx_dataset(tmp_path / "mnist")
    ds = build_dataset("mnist:test", data_root=tmp_path)  # parent of the folder holding the files
    assert len(ds) == 7 and ds.mean == (0.1307,) and ds.std == (0.3081,) and ds.classes == [str(d) for d in range(10)]
    make_idx_dataset(tmp_path / "FashionMNIST" / "raw", gz=False)  # torchvision's layout
    assert len(build_dataset("fashion-mnist", data_root=tmp_path)) == 20


def test_load_image_and_eval_item(tmp_path):
    images = make_idx_dataset(tmp_path)["train"][0]
    ds = build_dataset("fashion-mnist", data_root=tmp_path)
    img = ds.load_image(3)
    assert img.mode == "L" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img), images[3])
    x, i, label = ds[3]
    expected = (torch.from_numpy(images[3]).float() / 255 - 0.2860) / 0.3530
    assert i == 3 and label == ds.labels[3]
    assert x.shape == (1, 28, 28) and torch.allclose(x[0], expected, atol=1e-6)


def test_limit_is_fixed_sorted_subset(tmp_path):
    images = make_idx_dataset(tmp_path)["train"][0]
    a = build_dataset("fashion-mnist", data_root=tmp_path, limit=5)
    b = build_dataset("fashion-mnist", data_root=tmp_path, limit=5)
    expected = np.sort(np.random.default_rng(0).choice(20, 5, replace=False))
    assert np.array_equal(a.source_indices, expected) and np.array_equal(b.source_indices, expected)
    assert np.array_equal(a.array[:, 0].numpy(), images[expected])
    assert a.fingerprint() == b.fingerprint() != build_dataset("fashion-mnist", data_root=tmp_path).fingerprint()
    with pytest.raises(InstdiscError, match="limit 21 is larger"):
        build_dataset("fashion-mnist", data_root=tmp_path, limit=21)


def test_image_size_override_resizes_eval(tmp_path):
    make_idx_dataset(tmp_path)
    ds = build_dataset("fashion-mnist", data_root=tmp_path, image_size=32)
    assert ds.image_size == 32 and ds.native_size == 28 and ds[0][0].shape == (1, 32, 32)


def test_missing_files_name_expected_path(tmp_path):
    with pytest.raises(InstdiscError) as e:
        build_dataset("fashion-mnist:test", data_root=tmp_path)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InstdiscError, match="data root not found"):
        build_dataset("mnist", data_root=tmp_path / "nope")


def test_incomplete_and_corrupt_files(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), gz=True)
    with pytest.raises(InstdiscError, match="incomplete: expected .*train-labels-idx1-ubyte"):
        build_dataset("fashion-mnist", data_root=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(InstdiscError, match="3 images but .* 4 labels"):
        build_dataset("fashion-mnist", data_root=tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3i", 2, 28, 28) + b"\x00" * 10)
    with pytest.raises(InstdiscError, match="10 data bytes"):
        read_idx(str(bad), 3)
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InstdiscError, match="bad magic"):
        read_idx(str(bad), 3)
    bad.write_bytes(idx_bytes(np.zeros((2, 3), np.uint8)))
    with pytest.raises(InstdiscError, match="2 dims, want 0x08 with 3"):
        read_idx(str(bad), 3)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL_FMNIST), reason=f"{REAL_FMNIST} is not installed")
def test_real_fashion_mnist_subset():
    ds = build_dataset("fashion-mnist:train", limit=500)
    assert len(ds) == 500 and ds.array.shape == (500, 1, 28, 28) and ds.array.dtype == torch.uint8
    assert ds.labels.min() >= 0 and ds.labels.max() <= 9 and len(np.unique(ds.labels)) == 10
    assert np.array_equal(ds.source_indices, np.sort(np.random.default_rng(0).choice(60000, 500, replace=False)))
    pixel_mean = ds.array.float().mean().item() / 255
    assert abs(pixel_mean - ds.mean[0]) < 0.03  # the stated constant matches the data
    x, i, label = ds[0]
    assert x.shape == (1, 28, 28) and i == 0 and label == ds.labels[0]
    assert len(build_dataset("fashion-mnist:test", limit=10)) == 10
